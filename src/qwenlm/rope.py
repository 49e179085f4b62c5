"""Rotary position embedding in Qwen's "rotate-half" layout, with per-alpha cached tables.

Tables are computed exactly as the reference does (fp32 inverse frequencies from a double base,
fp32 positions, ``outer`` product, cos/sin of the angles repeated twice) so logits match bit for bit
in fp32. The NTK alpha rescales the base: ``base' = base * alpha ** (d / (d - 2))``.
"""

from __future__ import annotations

import torch


class RotaryEmbedding:
    """cos/sin tables for the first ``dim`` features of each head; one table per NTK alpha."""

    def __init__(self, dim: int, base: float, min_positions: int = 0) -> None:
        self.dim = dim
        self.base = base
        # one table for every position up to the model's limit: it then never grows during decoding,
        # which also keeps a compiled decoding step from recompiling for a longer table
        self.min_positions = min_positions
        self._tables: dict[tuple[float, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def inv_freq(self, alpha: float = 1.0, device: torch.device | None = None) -> torch.Tensor:
        base = self.base * alpha ** (self.dim / (self.dim - 2))
        exponents = torch.arange(0, self.dim, 2, device=device).float() / self.dim
        return 1.0 / (base**exponents)

    def _table(self, alpha: float, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (alpha, device)
        cached = self._tables.get(key)
        if cached is None or cached[0].shape[0] < end:
            n = max(2 * end, 16, self.min_positions)  # beyond the limit, grow geometrically
            inv_freq = self.inv_freq(alpha, device)
            angles = torch.outer(torch.arange(n, device=device).float(), inv_freq)
            emb = torch.cat((angles, angles), dim=-1)  # (n, d)
            cached = (emb.cos(), emb.sin())
            self._tables[key] = cached
        return cached

    def cos_sin(
        self, start: int, end: int, alphas: list[float], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for positions ``start..end-1``: shape (len(alphas), 1, end-start, dim), fp32."""
        cos, sin = zip(*(self._table(a, end, device) for a in alphas))
        return (
            torch.stack([c[start:end] for c in cos])[:, None],
            torch.stack([s[start:end] for s in sin])[:, None],
        )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` features of ``x`` (B, H, T, D, or any layout that ``cos`` and ``sin``
    broadcast against) in fp32; the rest pass through."""
    d = cos.shape[-1]
    rot = x[..., :d].float()
    rot = rot * cos + rotate_half(rot) * sin
    if d == x.shape[-1]:
        return rot.type_as(x)
    return torch.cat((rot, x[..., d:].float()), dim=-1).type_as(x)


def apply_rotary_bthd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary`` of ``x`` (B, T, H, D), positions before heads (e.g. a view of the QKV projection), by the
    tables as ``RotaryEmbedding.cos_sin`` gives them, (1 or B, 1, T, d)."""
    return apply_rotary(x, cos.transpose(1, 2), sin.transpose(1, 2))
