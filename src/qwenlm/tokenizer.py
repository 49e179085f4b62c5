"""Qwen's byte-level BPE tokenizer (``qwen.tiktoken`` + 208 special tokens) on top of tiktoken.

Reproduces the reference ``QWenTokenizer``: NFC normalisation before encoding, every special-token
string recognised by default (the reference's injection protection is *off* by default), decoding with
``errors="replace"``.
"""

from __future__ import annotations

import base64
import unicodedata
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Literal

import tiktoken

PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VOCAB_FILE = "qwen.tiktoken"
N_QWEN_EXTRA = 205  # <|extra_0|> .. <|extra_204|>


def qwen_special_tokens(first_id: int) -> dict[str, int]:
    """The 208 special tokens of Qwen v1, numbered from ``first_id`` (151643 in Qwen-7B)."""
    names = [ENDOFTEXT, IM_START, IM_END] + [f"<|extra_{i}|>" for i in range(N_QWEN_EXTRA)]
    return {name: first_id + i for i, name in enumerate(names)}


def load_tiktoken_bpe(path: str | Path) -> dict[bytes, int]:
    """Read a ``qwen.tiktoken`` file: one ``base64(token) rank`` pair per line."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as e:
                raise ValueError(
                    f"{path}:{lineno}: not a 'base64-token rank' line ({line[:60]!r}); "
                    f"is this really a qwen.tiktoken file?"
                ) from e
    return ranks


AllOrSet = Literal["all"] | Collection[str]


class QwenTokenizer:
    """Tokenizer of the Qwen family.

    ``mergeable_ranks`` maps token bytes to ids (the id is also the merge priority); ``special_tokens``
    maps surface strings to ids.
    """

    chat_template: str | None = None  # the checkpoint's Jinja chat template, set by ``load_tokenizer``

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_tokens: dict[str, int] | None = None,
        *,
        pat_str: str = PAT_STR,
        eos_token: str = ENDOFTEXT,
        pad_token: str = ENDOFTEXT,
        name: str = "qwen",
    ) -> None:
        if special_tokens is None:
            special_tokens = qwen_special_tokens(len(mergeable_ranks))
        self.mergeable_ranks = mergeable_ranks
        self.special_tokens = dict(special_tokens)
        self._encoding = tiktoken.Encoding(
            name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens
        )
        self._n_tokens = max(max(mergeable_ranks.values()), max(self.special_tokens.values())) + 1
        self.first_special_id = min(self.special_tokens.values())
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens.get(IM_START)
        self.im_end_id = self.special_tokens.get(IM_END)
        self.eos_token_id = self.special_tokens[eos_token]
        self.pad_token_id = self.special_tokens[pad_token]
        self._special_by_id = {i: s for s, i in self.special_tokens.items()}

    @classmethod
    def from_pretrained(cls, path: str | Path) -> QwenTokenizer:
        """Load from a checkpoint folder holding ``qwen.tiktoken``, or from that file itself."""
        path = Path(path)
        vocab = path / VOCAB_FILE if path.is_dir() else path
        if not vocab.is_file():
            where = f"folder {path}" if path.is_dir() else str(path)
            raise FileNotFoundError(
                f"no {VOCAB_FILE} in {where}: a Qwen v1 checkpoint folder must contain the "
                f"tokenizer vocabulary file {VOCAB_FILE} (copy it from the official checkpoint)"
            )
        return cls(load_tiktoken_bpe(vocab))

    # -- sizes and ids ------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n_tokens

    @property
    def vocab_size(self) -> int:
        return self._n_tokens

    def token_to_id(self, token: str | bytes) -> int:
        if isinstance(token, str) and token in self.special_tokens:
            return self.special_tokens[token]
        key = token.encode("utf-8") if isinstance(token, str) else token
        if key not in self.mergeable_ranks:
            raise KeyError(f"{token!r} is not a token of this vocabulary")
        return self.mergeable_ranks[key]

    # -- encoding ---------------------------------------------------------------------------
    def encode(
        self,
        text: str,
        allowed_special: AllOrSet = "all",
        disallowed_special: AllOrSet = (),
    ) -> list[int]:
        """Token ids of ``text`` (NFC-normalised first).

        By default every special-token string becomes its special id, as in the reference. Pass
        ``allowed_special=set()`` to encode them as plain text, and ``disallowed_special="all"`` to
        raise ``ValueError`` when one occurs (use that for untrusted input).
        """
        text = unicodedata.normalize("NFC", text)
        allowed = allowed_special if allowed_special == "all" else set(allowed_special)
        disallowed = disallowed_special if disallowed_special == "all" else set(disallowed_special)
        return self._encoding.encode(text, allowed_special=allowed, disallowed_special=disallowed)

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode with every special-token string treated as plain text."""
        return self.encode(text, allowed_special=set())

    def __call__(
        self,
        texts: str | Sequence[str],
        padding: bool = False,
        padding_side: Literal["left", "right"] = "left",
        return_tensors: Literal["pt"] | None = None,
        allowed_special: AllOrSet = "all",
    ) -> dict:
        """transformers-style batch encoding: ``{"input_ids", "attention_mask"}``.

        Rows are padded with ``pad_token_id`` on ``padding_side``; ``return_tensors="pt"`` needs padding
        (or equal lengths).
        """
        single = isinstance(texts, str)
        batch = [self.encode(t, allowed_special=allowed_special) for t in ([texts] if single else texts)]
        masks = [[1] * len(ids) for ids in batch]
        if padding:
            width = max((len(ids) for ids in batch), default=0)
            for i, ids in enumerate(batch):
                fill = width - len(ids)
                if padding_side == "left":
                    batch[i], masks[i] = [self.pad_token_id] * fill + ids, [0] * fill + masks[i]
                elif padding_side == "right":
                    batch[i], masks[i] = ids + [self.pad_token_id] * fill, masks[i] + [0] * fill
                else:
                    raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if return_tensors == "pt":
            import torch

            if len({len(ids) for ids in batch}) > 1:
                raise ValueError("texts of different lengths need padding=True to become one tensor")
            return {"input_ids": torch.tensor(batch, dtype=torch.long), "attention_mask": torch.tensor(masks)}
        if return_tensors is not None:
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if single:
            return {"input_ids": batch[0], "attention_mask": masks[0]}
        return {"input_ids": batch, "attention_mask": masks}

    # -- decoding ---------------------------------------------------------------------------
    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """Text of ``ids``; bytes are decoded as UTF-8 with the given ``errors`` policy.

        With ``skip_special_tokens`` every id from the first special id up is dropped (also ids the
        tokenizer does not know); otherwise an unknown id raises ``KeyError``.
        """
        if isinstance(ids, int):
            ids = [ids]
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i < self.first_special_id]
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        for i in ids:
            if not 0 <= i < self._n_tokens:
                raise KeyError(f"token id {i} is outside this tokenizer's vocabulary (0..{self._n_tokens - 1})")
        return self._encoding.decode_bytes(ids)

    def id_to_piece(self, token_id: int) -> bytes:
        """The raw bytes of one token (a special token gives its surface text)."""
        return self.decode_bytes([token_id])
