"""Chat formats: how a conversation becomes prompt tokens, and how generated tokens become a reply.

A chat format is an object that owns its prompt layout, its stop tokens and its reply decoding
(``CHATML``, ``RAW``). The module-level ``make_context``, ``decode_tokens`` and ``get_stop_words_ids``
keep the signatures and results of the reference ``qwen_generation_utils`` helpers, quirks included.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from qwenlm.chat.stream import StreamDecoder
from qwenlm.tokenizer import ENDOFTEXT, IM_END, IM_START

if TYPE_CHECKING:
    from qwenlm.tokenizer import QwenTokenizer

History = Sequence[tuple[str, str]]  # (user, assistant) pairs, oldest first
DEFAULT_MAX_WINDOW_SIZE = 6144


@dataclass(frozen=True)
class Prompt:
    """A built prompt: the text it stands for, its token ids, and how many history turns fit."""

    raw_text: str
    tokens: list[int]
    history_turns_kept: int = 0


class Reply(NamedTuple):
    """A decoded reply and why generation ended (``"Gen '<|im_end|>'"``, ``"Gen length N"``...)."""

    text: str
    end_reason: str


def _as_id_list(tokens: Iterable[int]) -> list[int]:
    # A 1-D tensor or array is accepted as in the reference; ``tolist`` avoids importing torch here.
    if hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    return [int(t) for t in tokens]


class ChatFormat(ABC):
    """Prompt layout, stop sequences and reply decoding of one chat format."""

    name: str

    @abstractmethod
    def make_context(
        self,
        tokenizer: QwenTokenizer,
        query: str,
        history: History | None = None,
        system: str = "",
        max_window_size: int = DEFAULT_MAX_WINDOW_SIZE,
    ) -> Prompt:
        """The prompt that asks the model to answer ``query`` after ``history``."""

    @abstractmethod
    def decode(
        self,
        tokens: Iterable[int],
        tokenizer: QwenTokenizer,
        raw_text_len: int,
        context_length: int,
        errors: str = "replace",
    ) -> Reply:
        """The reply in ``tokens`` (prompt followed by generated ids); ``raw_text_len`` is in characters."""

    @abstractmethod
    def stop_words_ids(self, tokenizer: QwenTokenizer) -> list[list[int]]:
        """Id sequences that end a reply (for ``StopWordsLogitsProcessor``)."""

    def stream(
        self, tokenizer: QwenTokenizer, stop_strings: Sequence[str] = (), errors: str = "replace"
    ) -> StreamDecoder:
        """A ``StreamDecoder`` for generated ids that stops where this format's stop words do.

        Single-token stop words stop on their id; longer ones are matched as text, which also catches
        them when the model spells them with other tokens.
        """
        stop_ids, stop_texts = [], list(stop_strings)
        for seq in self.stop_words_ids(tokenizer):
            if len(seq) == 1:
                stop_ids.append(seq[0])
            else:
                stop_texts.append(tokenizer.decode(seq))
        return StreamDecoder(tokenizer, stop_strings=stop_texts, stop_ids=stop_ids, errors=errors)

    def __repr__(self) -> str:
        return f"<ChatFormat {self.name!r}>"


class ChatML(ChatFormat):
    """``<|im_start|>role\\ncontent<|im_end|>`` blocks joined by ``\\n``, ending with an open assistant block.

    Tokens are built block by block rather than by encoding the prompt text: the two markers are
    inserted as ids and every role and message is encoded with no special tokens allowed, so a message
    that contains ``<|im_end|>`` cannot close its block.
    """

    name = "chatml"

    def _block(self, tokenizer: QwenTokenizer, role: str, content: str) -> tuple[str, list[int]]:
        text = f"{IM_START}{role}\n{content}{IM_END}"
        tokens = [
            tokenizer.im_start_id,
            *tokenizer.encode(role, allowed_special=set()),
            *tokenizer.encode("\n"),
            *tokenizer.encode(content, allowed_special=set()),
            tokenizer.im_end_id,
        ]
        return text, tokens

    def _fit_history(
        self, tokenizer: QwenTokenizer, history: History, system_len: int, max_window_size: int
    ) -> tuple[str, list[int], int]:
        """Newest turns that fit beside a system block of ``system_len`` tokens: (text, tokens, count)."""
        nl = tokenizer.encode("\n")
        text, tokens, kept = "", [], 0
        for user, assistant in reversed(history):
            user_text, user_tokens = self._block(tokenizer, "user", user)
            bot_text, bot_tokens = self._block(tokenizer, "assistant", assistant)
            turn = nl + user_tokens + nl + bot_tokens
            # The reference's rule: strictly less, the query is not counted, stop at the first misfit.
            if system_len + len(turn) + len(tokens) >= max_window_size:
                break
            text = f"\n{user_text}\n{bot_text}" + text
            tokens = turn + tokens
            kept += 1
        return text, tokens, kept

    def make_context(
        self,
        tokenizer: QwenTokenizer,
        query: str,
        history: History | None = None,
        system: str = "",
        max_window_size: int = DEFAULT_MAX_WINDOW_SIZE,
    ) -> Prompt:
        nl = tokenizer.encode("\n")
        system_text, system_tokens = self._block(tokenizer, "system", system)
        history_text, history_tokens, kept = self._fit_history(
            tokenizer, history or [], len(system_tokens), max_window_size
        )
        query_text, query_tokens = self._block(tokenizer, "user", query)
        raw_text = f"{system_text}{history_text}\n{query_text}\n{IM_START}assistant\n"
        tokens = (
            system_tokens
            + history_tokens
            + nl
            + query_tokens
            + nl
            + [tokenizer.im_start_id, *tokenizer.encode("assistant"), *nl]
        )
        return Prompt(raw_text, tokens, kept)

    def decode(
        self,
        tokens: Iterable[int],
        tokenizer: QwenTokenizer,
        raw_text_len: int,
        context_length: int,
        errors: str = "replace",
    ) -> Reply:
        tokens = _as_id_list(tokens)
        ends = {tokenizer.im_start_id, tokenizer.im_end_id}
        end_reason = f"Gen length {len(tokens)}"
        # Without an end marker the reference still drops the last token (its search loop leaves the
        # index on it), unless nothing was generated.
        stop = len(tokens) - 1 if len(tokens) > context_length else context_length
        for i in range(context_length, len(tokens)):
            if tokens[i] in ends:
                stop, end_reason = i, f"Gen {tokenizer.decode([tokens[i]])!r}"
                break
        # ``raw_text_len`` counts characters of the prompt *text*; the decoded prompt may differ (NFC,
        # special strings), and the reference slices anyway.
        text = tokenizer.decode(tokens[:stop], errors=errors)[raw_text_len:]
        return Reply(text.strip(), end_reason)

    def stop_words_ids(self, tokenizer: QwenTokenizer) -> list[list[int]]:
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]


class Raw(ChatFormat):
    """No chat markup: the prompt is the query itself (history and system are ignored)."""

    name = "raw"

    def make_context(
        self,
        tokenizer: QwenTokenizer,
        query: str,
        history: History | None = None,
        system: str = "",
        max_window_size: int = DEFAULT_MAX_WINDOW_SIZE,
    ) -> Prompt:
        # The default encoding, as in the reference: special-token strings in the query become ids.
        return Prompt(query, tokenizer.encode(query), 0)

    def decode(
        self,
        tokens: Iterable[int],
        tokenizer: QwenTokenizer,
        raw_text_len: int,
        context_length: int,
        errors: str = "replace",
    ) -> Reply:
        tokens = _as_id_list(tokens)
        text = tokenizer.decode(tokens, errors=errors)[raw_text_len:]
        # The reference deletes every <|endoftext|> before it cuts at the first one, so the cut never
        # happens and text generated after an <|endoftext|> is kept.
        return Reply(text.replace(ENDOFTEXT, "").strip(), f"Gen length {len(tokens)}")

    def stop_words_ids(self, tokenizer: QwenTokenizer) -> list[list[int]]:
        return [tokenizer.encode("Human:"), [tokenizer.eod_id]]


CHATML = ChatML()
RAW = Raw()
CHAT_FORMATS: dict[str, ChatFormat] = {f.name: f for f in (CHATML, RAW)}


def get_chat_format(chat_format: str | ChatFormat) -> ChatFormat:
    """The format named ``chat_format`` (a ``ChatFormat`` is returned as is)."""
    if isinstance(chat_format, ChatFormat):
        return chat_format
    try:
        return CHAT_FORMATS[chat_format]
    except (KeyError, TypeError):
        known = ", ".join(repr(name) for name in CHAT_FORMATS)
        raise ValueError(f"unknown chat format {chat_format!r}; known formats: {known}") from None


# -- reference-compatible functions ---------------------------------------------------------------
def make_context(
    tokenizer: QwenTokenizer,
    query: str,
    history: History | None = None,
    system: str = "",
    max_window_size: int = DEFAULT_MAX_WINDOW_SIZE,
    chat_format: str | ChatFormat = "chatml",
) -> tuple[str, list[int]]:
    """``(raw_text, context_tokens)`` of a conversation, as the reference builds them."""
    prompt = get_chat_format(chat_format).make_context(tokenizer, query, history, system, max_window_size)
    return prompt.raw_text, prompt.tokens


def decode_tokens(
    tokens: Iterable[int],
    tokenizer: QwenTokenizer,
    raw_text_len: int,
    context_length: int,
    chat_format: str | ChatFormat = "chatml",
    verbose: bool = False,
    return_end_reason: bool = False,
    errors: str = "replace",
) -> str | tuple[str, str]:
    """The reply in ``tokens``; with ``return_end_reason`` also why it ended, as the reference does."""
    reply = get_chat_format(chat_format).decode(tokens, tokenizer, raw_text_len, context_length, errors)
    if verbose:
        print(f"\nEnd Reason: {reply.end_reason}\n\nGenerate: {reply.text}")
    return (reply.text, reply.end_reason) if return_end_reason else reply.text


def get_stop_words_ids(chat_format: str | ChatFormat, tokenizer: QwenTokenizer) -> list[list[int]]:
    """Stop sequences of ``chat_format``: ChatML ends at either marker, raw at ``Human:`` or end of text."""
    return get_chat_format(chat_format).stop_words_ids(tokenizer)
