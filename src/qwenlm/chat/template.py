"""Jinja chat templates (``chat_template`` in a Hugging Face ``tokenizer_config.json``).

Rendered the way transformers renders them: an immutable sandbox (templates come with downloaded
checkpoints and must not reach Python internals or mutate the messages), ``trim_blocks`` and
``lstrip_blocks``, the loop-control extension, a ``tojson`` filter that does not HTML-escape, and the
``raise_exception`` and ``strftime_now`` globals. jinja2 is optional: ``pip install "qwenlm[chat]"``.

The result is prompt *text*. Encoding it with special tokens allowed turns any marker a user typed into
a real one; ``ChatFormat.make_context`` builds tokens without that risk.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

_INSTALL_HINT = 'chat templates need jinja2: pip install "qwenlm[chat]"'


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    # Jinja's own ``tojson`` HTML-escapes ``<>&'``, which would change tool schemas inside prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str):
    try:
        import jinja2.ext
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    **extra: Any,
) -> str:
    """Render ``messages`` (``{"role", "content", ...}`` dicts) with a Jinja chat template.

    ``extra`` becomes template variables, e.g. ``tools=[...]``, ``bos_token=...``. A template that calls
    ``raise_exception(msg)`` raises ``jinja2.TemplateError``; one that breaks out of the sandbox raises
    ``jinja2.sandbox.SecurityError``.
    """
    return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)
