"""Talking to a model: prompts from conversations, and replies streamed as text.

``chat`` / ``chat_stream`` follow the reference ``model.chat``: ``history`` is a list of ``(query, response)``
pairs and the reply is stripped. A checkpoint with its own Jinja chat template (a Qwen2-family
``tokenizer_config.json``, a GGUF ``tokenizer.chat_template``) is rendered with it; otherwise (Qwen v1) the
prompt is ChatML built by ``make_context``. Either way a message can never produce a special token: only
the template's own markup becomes special ids, message text is encoded as plain text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwenlm.chat.format import CHATML, DEFAULT_MAX_WINDOW_SIZE, History
from qwenlm.chat.stream import StreamDecoder
from qwenlm.chat.template import render_chat_template

if TYPE_CHECKING:
    from qwenlm.model import QwenForCausalLM
    from qwenlm.tokenizer import QwenTokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")
Message = Mapping[str, str]  # {"role": ..., "content": ...}


# -- where a checkpoint keeps its template ------------------------------------------------------------------
def find_chat_template(path: str | Path) -> str | None:
    """The chat template a checkpoint carries, or None (Qwen v1 folders have none: they use ChatML).

    Looked for in a GGUF file's ``tokenizer.chat_template``, else a folder's ``chat_template.jinja`` or
    ``tokenizer_config.json`` ``chat_template`` (a string, or a list of named templates: "default" is used).
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from qwenlm.gguf import read_gguf_field

        template = read_gguf_field(path, "tokenizer.chat_template")
        return template if isinstance(template, str) and template else None
    if not path.is_dir():
        return None
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config_file = path / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    try:
        template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{config_file} is not valid JSON ({e}); restore it from the checkpoint") from e
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def chat_stop_ids(tokenizer: QwenTokenizer, eos_ids: Iterable[int] = ()) -> list[int]:
    """Ids that end a chat reply: both ChatML markers, end of text, the tokenizer's and the config's eos."""
    ids = [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id, tokenizer.eos_token_id, *eos_ids]
    return list(dict.fromkeys(i for i in ids if i is not None))


# -- prompts ------------------------------------------------------------------------------------------------
def check_messages(messages: Sequence[Message]) -> None:
    """ValueError naming the first message that is not ``{"role": system|user|assistant, "content": str}``."""
    if not messages:
        raise ValueError("messages is empty: a chat needs at least one message")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role is {m.get('role')!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(m.get('content')).__name__}")


def chatml_tokens(tokenizer: QwenTokenizer, messages: Sequence[Message], system: str = DEFAULT_SYSTEM) -> list[int]:
    """ChatML prompt tokens of any message list, laid out as ``make_context`` lays out a conversation:
    blocks joined by newlines, then an open assistant block. ``system`` is used when no message has that role."""
    check_messages(messages)
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    nl = tokenizer.encode("\n")
    tokens: list[int] = []
    for i, m in enumerate(messages):
        tokens += ([] if i == 0 else nl) + CHATML._block(tokenizer, m["role"], m["content"])[1]
    return tokens + nl + [tokenizer.im_start_id, *tokenizer.encode("assistant"), *nl]


def template_tokens(tokenizer: QwenTokenizer, template: str, messages: Sequence[Message], **extra: Any) -> list[int]:
    """Prompt tokens of ``messages`` rendered with a Jinja chat template, safely.

    The template is rendered with a placeholder for each message's content, so that only markup the
    template wrote is split into special ids; the contents go back in as plain text. When a template
    does more with a content than print it (so placeholders would change the result), the real rendering
    is used, and refused if a message holds special-token text.
    """
    check_messages(messages)
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
    real = render_chat_template(template, [dict(m) for m in messages], add_generation_prompt=True, **extra)
    masked = render_chat_template(template, [{**m, "content": k} for m, k in zip(messages, marks)],
                                  add_generation_prompt=True, **extra)  # fmt: skip
    contents = {k: m["content"] for k, m in zip(marks, messages)}
    pattern = _special_pattern(tokenizer)
    if all(masked.count(k) == 1 for k in marks) and _MARK.sub(lambda m: contents[m[0]], masked) == real:
        tokens: list[int] = []
        for i, piece in enumerate(pattern.split(masked)):
            if i % 2:
                tokens.append(tokenizer.special_tokens[piece])
            elif piece:
                tokens += tokenizer.encode(_MARK.sub(lambda m: contents[m[0]], piece), allowed_special=set())
        return tokens
    for i, m in enumerate(messages):
        found = pattern.search(m["content"])
        if found:
            raise ValueError(
                f"messages[{i}].content contains the special token text {found[0]!r}, and this chat template "
                f"transforms message text, so it cannot be kept as plain text; remove it from the message"
            )
    return tokenizer.encode(real, allowed_special="all")


_MARK = re.compile("\ue000\\d+\ue001")


@lru_cache(maxsize=8)
def _special_pattern_of(specials: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")


def _special_pattern(tokenizer: QwenTokenizer) -> re.Pattern[str]:
    return _special_pattern_of(tuple(tokenizer.special_tokens))


def messages_tokens(
    tokenizer: QwenTokenizer, messages: Sequence[Message], chat_template: str | None = None
) -> list[int]:
    """Prompt tokens for an OpenAI-style message list: the checkpoint's template, else ChatML."""
    if chat_template:
        return template_tokens(tokenizer, chat_template, messages)
    return chatml_tokens(tokenizer, messages)


def conversation_tokens(
    tokenizer: QwenTokenizer,
    query: str,
    history: History | None = None,
    system: str = DEFAULT_SYSTEM,
    chat_template: str | None = None,
    max_window_size: int = DEFAULT_MAX_WINDOW_SIZE,
) -> list[int]:
    """Prompt tokens for ``query`` after ``history``: ``make_context`` (ChatML, history trimmed to
    ``max_window_size`` as the reference does), or the chat template with every turn."""
    if not chat_template:
        return CHATML.make_context(tokenizer, query, history, system, max_window_size).tokens
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in history or []:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": query})
    return template_tokens(tokenizer, chat_template, messages)


# -- replies ------------------------------------------------------------------------------------------------
def stream_reply(
    model: QwenForCausalLM,
    tokenizer: QwenTokenizer,
    prompt: Sequence[int],
    stop: Sequence[str] = (),
    **generation: Any,
) -> Iterator[str]:
    """Generate after ``prompt`` and yield the reply as text deltas (never half a character or a partial
    stop string); ends at a chat stop id, a ``stop`` string or ``max_new_tokens``."""
    import torch

    from qwenlm.generation import stream_generate

    config_eos = model.generation_config.eos_ids if model.generation_config else []
    stop_ids = chat_stop_ids(tokenizer, config_eos)
    generation.setdefault("eos_token_id", stop_ids)
    generation.setdefault("stop_words_ids", [])  # stop ids and strings are handled on the text below
    decoder = StreamDecoder(tokenizer, stop_strings=list(stop), stop_ids=stop_ids)
    steps = stream_generate(model, torch.tensor([list(prompt)], dtype=torch.long), **generation)
    try:
        # ids past the tokenizer's (the embedding has spare rows; only an untrained model picks them) have no text
        known = len(tokenizer)
        yield from decoder.stream(i for ids in steps if (i := int(ids[0])) < known)
    finally:
        steps.close()


def _stripped(deltas: Iterable[str]) -> Iterator[str]:
    """The deltas of ``"".join(deltas).strip()``: leading space dropped, trailing space held back until
    more text follows it."""
    started, held = False, ""
    for delta in deltas:
        if not started:
            delta = delta.lstrip()
            if not delta:
                continue
            started = True
        delta = held + delta
        body = delta.rstrip()
        held = delta[len(body) :]
        if body:
            yield body


def _template_of(tokenizer: QwenTokenizer, chat_template: str | None) -> str | None:
    return chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)


def chat_stream(
    model: QwenForCausalLM,
    tokenizer: QwenTokenizer,
    query: str,
    history: History | None = None,
    system: str = DEFAULT_SYSTEM,
    *,
    stop: Sequence[str] = (),
    chat_template: str | None = None,
    **generation: Any,
) -> Iterator[str]:
    """Yield the reply to ``query`` as text deltas; ``"".join`` of them is ``chat(...)[0]``.

    ``chat_template`` defaults to the tokenizer's (``load_tokenizer`` sets it from the checkpoint);
    other keyword arguments override the generation config (``max_new_tokens``, ``do_sample``, ``seed``...).
    """
    config = model.generation_config
    window = int(config.extra.get("max_window_size", DEFAULT_MAX_WINDOW_SIZE)) if config else DEFAULT_MAX_WINDOW_SIZE
    prompt = conversation_tokens(tokenizer, query, history, system, _template_of(tokenizer, chat_template), window)
    yield from _stripped(stream_reply(model, tokenizer, prompt, stop=stop, **generation))


def chat(
    model: QwenForCausalLM,
    tokenizer: QwenTokenizer,
    query: str,
    history: History | None = None,
    system: str = DEFAULT_SYSTEM,
    *,
    stop: Sequence[str] = (),
    chat_template: str | None = None,
    **generation: Any,
) -> tuple[str, list[tuple[str, str]]]:
    """``(response, history)``: the reply to ``query`` and a new history list ending with this turn."""
    deltas = chat_stream(model, tokenizer, query, history, system, stop=stop, chat_template=chat_template,
                         **generation)  # fmt: skip
    response = "".join(deltas)
    return response, [*(history or []), (query, response)]


__all__ = [
    "DEFAULT_SYSTEM",
    "chat",
    "chat_stop_ids",
    "chat_stream",
    "chatml_tokens",
    "check_messages",
    "conversation_tokens",
    "find_chat_template",
    "messages_tokens",
    "stream_reply",
    "template_tokens",
]
