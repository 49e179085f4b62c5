"""Chat: prompt formats (ChatML, raw), reply decoding, streaming text, Jinja chat templates, and
``chat`` / ``chat_stream`` (what ``model.chat`` runs)."""

from qwenlm.chat.format import (
    CHAT_FORMATS,
    CHATML,
    RAW,
    ChatFormat,
    ChatML,
    Prompt,
    Raw,
    Reply,
    decode_tokens,
    get_chat_format,
    get_stop_words_ids,
    make_context,
)
from qwenlm.chat.session import chat, chat_stream
from qwenlm.chat.stream import StreamDecoder, find_stop, truncate_at_stop
from qwenlm.chat.template import render_chat_template

__all__ = [
    "CHATML",
    "CHAT_FORMATS",
    "RAW",
    "ChatFormat",
    "ChatML",
    "Prompt",
    "Raw",
    "Reply",
    "StreamDecoder",
    "chat",
    "chat_stream",
    "decode_tokens",
    "find_stop",
    "get_chat_format",
    "get_stop_words_ids",
    "make_context",
    "render_chat_template",
    "truncate_at_stop",
]
