"""Position policies for long context: dynamic NTK (which rotary base a call uses) and LogN
attention scaling (how much queries beyond the training length are sharpened).

Both are objects chosen once from the config; the model asks them per call and knows no flags.
"""

from __future__ import annotations

import math

import torch


def ntk_alpha(length: int, seq_length: int) -> float:
    """The reference's alpha: 1 up to S, then 3, 7, 15… for each doubling (2^ceil(log2(n/S)+1) - 1)."""
    if length <= 0:
        return 1.0
    return float(max(2 ** math.ceil(math.log(length / seq_length, 2) + 1) - 1, 1))


class PlainRoPE:
    """Rotary with its trained base at every length."""

    def alphas(self, length: int, attention_mask: torch.Tensor | None, training: bool) -> list[float]:
        return [1.0]

    def __repr__(self) -> str:
        return "PlainRoPE()"


class DynamicNTK:
    """Dynamic NTK interpolation as Qwen v1 does it.

    Per call without a cache: one alpha from the call length, or, when a mask is given and the call is
    longer than S, one alpha per row from that row's true length (its number of mask ones). Decoding
    reuses the prefill's alphas (the cache holds them), so they never change mid-generation.
    """

    def __init__(self, seq_length: int) -> None:
        self.seq_length = seq_length

    def alphas(self, length: int, attention_mask: torch.Tensor | None, training: bool) -> list[float]:
        if training:
            return [1.0]
        if attention_mask is not None and length > self.seq_length:
            return [ntk_alpha(int(n), self.seq_length) for n in attention_mask.sum(dim=-1).tolist()]
        return [ntk_alpha(length, self.seq_length)]

    def __repr__(self) -> str:
        return f"DynamicNTK(seq_length={self.seq_length})"


class NoLogN:
    def factors(self, start: int, end: int, training: bool) -> torch.Tensor | None:
        return None

    def __repr__(self) -> str:
        return "NoLogN()"


class LogNScaling:
    """Scale the query at position p by log(p+1)/log(S) once p+1 > S (eval mode only, and only when
    the key length exceeds S). Factors are computed in double precision, stored as fp32."""

    def __init__(self, seq_length: int) -> None:
        self.seq_length = seq_length
        self._table = torch.ones(0)

    def factors(self, start: int, end: int, training: bool) -> torch.Tensor | None:
        """Factors for query positions ``start..end-1`` (end = key length), or None when unscaled."""
        if training or end <= self.seq_length:
            return None
        if self._table.numel() < end:
            n = max(2 * end, 1024)
            s = self.seq_length
            self._table = torch.tensor([math.log(i, s) if i > s else 1.0 for i in range(1, n + 1)], dtype=torch.float32)
        return self._table[start:end]

    def __repr__(self) -> str:
        return f"LogNScaling(seq_length={self.seq_length})"


def position_policies(
    seq_length: int, use_dynamic_ntk: bool, use_logn_attn: bool
) -> tuple[PlainRoPE | DynamicNTK, NoLogN | LogNScaling]:
    ntk = DynamicNTK(seq_length) if use_dynamic_ntk else PlainRoPE()
    logn = LogNScaling(seq_length) if use_logn_attn else NoLogN()
    return ntk, logn
