"""GGUF block-quantised tensors dequantised with PyTorch, vectorised over many blocks at a time.

The arithmetic is the gguf package's (``gguf.quants``), operation for operation in float32, so the weights come
out bit for bit the same (``tests/test_gguf_dequant.py``); the package's numpy code loops over groups of 16 rows:
5.0 s for all blocks of the demo model on 2 cores, against 1.3 s here (``benchmarks/load_gguf.py``). Block
layouts follow ggml (``ggml-quants.c``); ``gguf_int4`` describes the 4- and 5-bit ones. Types not listed in
``BLOCKS`` are left to the gguf package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

CHUNK_WEIGHTS = 1 << 21  # weights dequantised per pass: small intermediates, whatever the tensor's size
Codes = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # codes int8, scale, offset (or None)


# -- fields of a block, for (n, bytes per block) uint8 tensors of n blocks (also read by gguf_int4) ---------
def f16_at(b: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte ``at`` of each block, as (n, 1) float32."""
    return b[:, at : at + 2].contiguous().view(torch.float16).float()  # (n, 1)


def nibbles(qs: torch.Tensor, run: int) -> torch.Tensor:
    """(n, k * run) bytes -> (n, k, 2, run) codes: each run of bytes gives its low nibbles, then its high ones."""
    qs = qs.reshape(qs.shape[0], -1, 1, run)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2)


def fifth_bits(b: torch.Tensor, at: int) -> torch.Tensor:
    """The 32 fifth bits of a Q5_0/Q5_1 block (a little-endian uint32 at ``at``: bit j of its byte i is weight
    8i + j) as (n, 32) uint8. Byte by byte: a view of the bytes as int32 fails on a one-block chunk."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((b[:, at : at + 4, None] >> shifts) & 1).reshape(b.shape[0], 32)


# -- block types: each block's codes, one scale per group of its weights, and an offset per group or None ----
def _q8_0(b: torch.Tensor) -> Codes:
    return b[:, 2:].contiguous().view(torch.int8), f16_at(b, 0), None


def _q4_0(b: torch.Tensor) -> Codes:
    return nibbles(b[:, 2:], 16).reshape(b.shape[0], 32).to(torch.int8) - 8, f16_at(b, 0), None


def _q4_1(b: torch.Tensor) -> Codes:
    return nibbles(b[:, 4:], 16).reshape(b.shape[0], 32).to(torch.int8), f16_at(b, 0), f16_at(b, 2)


def _q5_0(b: torch.Tensor) -> Codes:
    q = nibbles(b[:, 6:], 16).reshape(b.shape[0], 32) | (fifth_bits(b, 2) << 4)
    return q.to(torch.int8) - 16, f16_at(b, 0), None


def _q5_1(b: torch.Tensor) -> Codes:
    q = nibbles(b[:, 8:], 16).reshape(b.shape[0], 32) | (fifth_bits(b, 4) << 4)
    return q.to(torch.int8), f16_at(b, 0), f16_at(b, 2)


def k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: the 8 sub-block scales and mins, 6 bits each, packed in the 12 bytes after d and dmin."""
    s = b[:, 4:16].reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_affine(b: torch.Tensor, q: torch.Tensor) -> Codes:
    """Q4_K/Q5_K: ``d * sc_j * q - dmin * m_j`` per sub-block ``j`` of 32; ``q`` (n, 256) uint8 codes."""
    sc, mn = k_scales(b)
    return q.to(torch.int8), f16_at(b, 0) * sc.float(), -(f16_at(b, 2) * mn.float())  # x + -y is x - y exactly


def _q4_k(b: torch.Tensor) -> Codes:
    return _k_affine(b, nibbles(b[:, 16:], 32).reshape(-1, 256))


def _q5_k(b: torch.Tensor) -> Codes:
    low = nibbles(b[:, 48:], 32).reshape(-1, 8, 32)
    shifts = torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)
    high = (b[:, 16:48].reshape(-1, 1, 32) >> shifts) & 1  # bit j of byte i: weight i of sub-block j
    return _k_affine(b, (low | (high << 4)).reshape(-1, 256))


def _q6_k(b: torch.Tensor) -> Codes:
    n = b.shape[0]
    scale = f16_at(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()  # (n, 16): one per 16 weights
    low = nibbles(b[:, :128], 64).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    high = ((b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 8, 32)
    return ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 256), scale, None


class BlockType(NamedTuple):
    weights: int  # per block
    bytes: int  # per block
    group: int  # weights per scale (and offset)
    codes: Callable[[torch.Tensor], Codes]  # blocks (n, bytes) uint8 -> codes (n, weights), scale, offset


BLOCKS: dict[str, BlockType] = {
    "Q8_0": BlockType(32, 34, 32, _q8_0),
    "Q4_0": BlockType(32, 18, 32, _q4_0),
    "Q4_1": BlockType(32, 20, 32, _q4_1),
    "Q5_0": BlockType(32, 22, 32, _q5_0),
    "Q5_1": BlockType(32, 24, 32, _q5_1),
    "Q4_K": BlockType(256, 144, 32, _q4_k),
    "Q5_K": BlockType(256, 176, 32, _q5_k),
    "Q6_K": BlockType(256, 210, 16, _q6_k),
}


def values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """The float32 weights ``codes * scale + zero`` stand for: ``codes`` (n, k) int8, ``scale`` and ``zero``
    (n, groups) float32 (``zero`` None: no offset). ggml's own arithmetic, so bit for bit its values."""
    n, k = codes.shape
    w = codes.float().reshape(n, scale.shape[1], -1) * scale[..., None]
    if zero is not None:
        w = w + zero[..., None]
    return w.reshape(n, k)


def _blocks(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> tuple[BlockType, np.ndarray, int]:
    block = BLOCKS[type_name]
    numel = int(np.prod(shape))
    if numel % block.weights or data.nbytes != numel // block.weights * block.bytes:
        raise ValueError(f"{data.nbytes} bytes of {type_name} blocks cannot hold a tensor of shape {list(shape)}")
    return block, data.reshape(-1).view(np.uint8).reshape(-1, block.bytes), max(1, CHUNK_WEIGHTS // block.weights)


def _chunk(blocks: np.ndarray, start: int, step: int) -> torch.Tensor:
    return torch.from_numpy(np.array(blocks[start : start + step]))  # a copy: the map is read-only


def dequantize(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 tensor of ``shape`` that ``data`` (a tensor's raw bytes, e.g. ``GGUFReader``'s read-only
    map) holds in block type ``type_name`` (one of ``BLOCKS``)."""
    block, blocks, step = _blocks(data, type_name, shape)
    out = torch.empty(blocks.shape[0], block.weights)
    for start in range(0, blocks.shape[0], step):
        out[start : start + step] = values(*block.codes(_chunk(blocks, start, step)))
    return out.reshape(shape)


def codes_of(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> Codes:
    """A 2-D tensor's codes (rows, cols) int8 and its scales and offsets (rows, cols / group) float32 (offsets
    None for the types without), as ``values`` turns into the weights: nothing rounded."""
    block, blocks, step = _blocks(data, type_name, shape)
    rows, cols = shape
    codes = torch.empty(blocks.shape[0], block.weights, dtype=torch.int8)
    scale, zero = torch.empty(blocks.shape[0], block.weights // block.group), None
    for start in range(0, blocks.shape[0], step):
        q, s, z = block.codes(_chunk(blocks, start, step))
        codes[start : start + step], scale[start : start + step] = q, s
        if z is not None:
            zero = torch.empty_like(scale) if zero is None else zero
            zero[start : start + step] = z
    groups = cols // block.group
    return codes.reshape(rows, cols), scale.reshape(rows, groups), None if zero is None else zero.reshape(rows, groups)
