"""Turning generated ids into text as they come, without ever showing half a UTF-8 character."""

from __future__ import annotations

import codecs
import sys
from typing import TextIO

import torch

from ..tokenizer import QwenTokenizer


class TextStreamer:
    """A ``generate`` streamer for one sequence that writes text to ``out`` as soon as it is complete.

    Token bytes go through an incremental UTF-8 decoder, which holds back an unfinished multi-byte
    character until the token that completes it arrives. Special tokens are skipped unless asked.
    """

    def __init__(self, tokenizer: QwenTokenizer, out: TextIO | None = None, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.out = out if out is not None else sys.stdout
        self.skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""

    def put(self, token_ids: torch.Tensor) -> None:
        ids = [int(i) for i in token_ids.reshape(-1)[:1]]  # first row only
        if self.skip_special_tokens:
            ids = [i for i in ids if i < self.tokenizer.first_special_id]
        self._emit(self._decoder.decode(self.tokenizer.decode_bytes(ids)))

    def end(self) -> None:
        self._emit(self._decoder.decode(b"", final=True))

    def _emit(self, text: str) -> None:
        if text:
            self.text += text
            self.out.write(text)
            self.out.flush()
