"""GGUF 4-bit tensors (Q4_0, Q4_1, Q4_K) as the codes, scales and offsets of ``quant.Int4Linear``, and 5-bit
ones (Q5_0, Q5_1) as those of ``quant.Int5Linear``.

All three formats are groups of 32 weights ``w = (q - 8) * scale + zero`` with 4-bit codes ``q``, which is
exactly the layout of our 4-bit layer (groups of 32): the codes carry over unchanged, so quantising such a
tensor again from its dequantised values (a second, lossy rounding) is not needed. Only the per-group scale
and offset are rounded once more, to the kernel's bf16. Block layouts follow ggml (``ggml-quants.c``):

* Q4_0, 18 bytes per 32 weights: f16 ``d``, 16 bytes of nibbles; ``w = d * (q - 8)``.
* Q4_1, 20 bytes per 32 weights: f16 ``d``, f16 ``m``, 16 bytes of nibbles; ``w = d * q + m``.
  In both, byte ``i`` holds weight ``i`` in its low nibble and weight ``i + 16`` in its high nibble.
* Q4_K, 144 bytes per 256 weights: f16 ``d``, f16 ``dmin``, 12 bytes of 6-bit sub-block scales and mins,
  128 bytes of nibbles; sub-block ``j`` (32 weights) is ``w = d * sc_j * q - dmin * m_j``; each 32-byte
  run of nibbles holds sub-block ``2c`` in its low and ``2c + 1`` in its high nibbles.
* Q5_0, 22 bytes per 32 weights: f16 ``d``, 4 bytes ``qh`` (a little-endian uint32 of fifth bits: bit ``j``
  for weight ``j``), 16 bytes of nibbles as in Q4_0; ``w = d * (q - 16)``.
* Q5_1, 24 bytes per 32 weights: f16 ``d``, f16 ``m``, ``qh``, nibbles; ``w = d * q + m``.
  Both are ``w = (q - 16) * scale + zero`` with 5-bit codes: ``quant.Int5Linear`` keeps them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .gguf_dequant import BLOCKS, f16_at, k_scales, nibbles
from .quant.linear import pack_int4, unpack_high

INT5_TYPES = ("Q5_0", "Q5_1")
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K") + INT5_TYPES  # the types read as grids (5-bit ones with their fifth bit)


class Int4Grid(NamedTuple):
    packed: torch.Tensor  # (out, in / 2) uint8: code of weight 2i in the low, of 2i + 1 in the high nibble
    scale: torch.Tensor  # (out, in / 32) float32
    zero: torch.Tensor  # (out, in / 32) float32, so that w = (codes - 8) * scale + zero (5-bit: codes - 16)
    high: torch.Tensor | None = None  # 5-bit codes: their fifth bits, (out, in / 8) as quant.linear.pack_high

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], 2 * self.packed.shape[1]

    @property
    def bits(self) -> int:
        return 4 if self.high is None else 5

    @property
    def codes(self) -> torch.Tensor:
        """(out, in) uint8 codes in 0..15 (5-bit grids: 0..31)."""
        codes = torch.stack([self.packed & 0x0F, self.packed >> 4], dim=-1).reshape(self.shape)
        if self.high is not None:
            codes |= unpack_high(self.high) << 4
        return codes


def _q4_0_or_1(b: torch.Tensor, with_min: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = f16_at(b, 0)[:, 0]
    start = 4 if with_min else 2
    codes = nibbles(b[:, start : start + 16], 16).reshape(-1, 32)
    zero = f16_at(b, 2)[:, 0] + 8 * d if with_min else torch.zeros_like(d)
    return codes, d, zero


def _q5_0_or_1(b: torch.Tensor, with_min: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The low four bits of the codes, scale, zero, and the fifth bits as ``pack_high`` lays them out: the
    block's ``qh`` bytes as they are (bit j of byte i is weight 8i + j in both)."""
    d = f16_at(b, 0)[:, 0]
    start = 4 if with_min else 2
    codes = nibbles(b[:, start + 4 : start + 20], 16).reshape(-1, 32)
    zero = f16_at(b, 2)[:, 0] + 16 * d if with_min else torch.zeros_like(d)
    return codes, d, zero, b[:, start : start + 4]


def _q4_k(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, dmin = f16_at(b, 0), f16_at(b, 2)  # (n, 1)
    sc, mn = k_scales(b)
    codes = nibbles(b[:, 16:144], 32).reshape(-1, 32)  # sub-block 2c = low, 2c + 1 = high nibbles
    scale = d * sc.float()
    zero = 8 * scale - dmin * mn.float()
    return codes, scale.reshape(-1), zero.reshape(-1)


def int4_grid(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> Int4Grid:
    """The 4-bit (or 5-bit) grid of one GGUF tensor: ``data`` its raw bytes, ``shape`` (out, in) in Linear
    layout."""
    if type_name not in INT4_TYPES:
        raise ValueError(f"{type_name} is not a 4- or 5-bit GGUF type with groups of 32 ({', '.join(INT4_TYPES)})")
    out_f, in_f = shape
    block_bytes = BLOCKS[type_name].bytes
    blocks = torch.from_numpy(np.array(data, dtype=np.uint8).reshape(-1, block_bytes))  # a copy: maps are read-only
    high = None
    if type_name == "Q4_K":
        codes, scale, zero = _q4_k(blocks)
    elif type_name in INT5_TYPES:
        codes, scale, zero, high = _q5_0_or_1(blocks, with_min=type_name == "Q5_1")
        high = high.reshape(out_f, in_f // 8)
    else:
        codes, scale, zero = _q4_0_or_1(blocks, with_min=type_name == "Q4_1")
    groups = in_f // 32
    return Int4Grid(pack_int4(codes.reshape(out_f, in_f)), scale.reshape(out_f, groups), zero.reshape(out_f, groups),
                    high)  # fmt: skip


def dequantize_grid(grid: Int4Grid) -> torch.Tensor:
    """The float32 weights a grid stands for (for checks)."""
    out_f, in_f = grid.shape
    q = grid.codes.float().reshape(out_f, -1, 32) - (1 << (grid.bits - 1))
    return (q * grid.scale[..., None] + grid.zero[..., None]).reshape(out_f, in_f)
