"""GGUF block-quantised tensors dequantised with PyTorch, vectorised over many blocks at a time.

The arithmetic is the gguf package's (``gguf.quants``), operation for operation in float32, so the weights come
out bit for bit the same (``tests/test_gguf_dequant.py``); the package's numpy code loops over groups of 16 rows:
5.0 s for all blocks of the demo model on 2 cores, against 1.3 s here (``benchmarks/load_gguf.py``). Block
layouts follow ggml (``ggml-quants.c``); ``gguf_int4`` describes the 4- and 5-bit ones. Types not listed in
``BLOCKS`` are left to the gguf package.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

CHUNK_WEIGHTS = 1 << 21  # weights dequantised per pass: small intermediates, whatever the tensor's size


# -- fields of a block, for (n, bytes per block) uint8 tensors of n blocks (also read by gguf_int4) ---------
def f16_at(b: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte ``at`` of each block, as (n, 1) float32."""
    return b[:, at : at + 2].contiguous().view(torch.float16).float()  # (n, 1)


def nibbles(qs: torch.Tensor, run: int) -> torch.Tensor:
    """(n, k * run) bytes -> (n, k, 2, run) codes: each run of bytes gives its low nibbles, then its high ones."""
    qs = qs.reshape(qs.shape[0], -1, 1, run)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2)


def fifth_bits(b: torch.Tensor, at: int) -> torch.Tensor:
    """The 32 fifth bits of a Q5_0/Q5_1 block (a little-endian uint32 at ``at``) as (n, 32) uint8."""
    qh = b[:, at : at + 4].contiguous().view(torch.int32)  # (n, 1); the sign bit shifts down as ones, masked off
    return ((qh >> torch.arange(32, dtype=torch.int32)) & 1).to(torch.uint8)


# -- block types ----------------------------------------------------------------------------------------
def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * f16_at(b, 0)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = nibbles(b[:, 2:], 16).reshape(b.shape[0], 32).to(torch.int8) - 8
    return f16_at(b, 0) * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    q = nibbles(b[:, 4:], 16).reshape(b.shape[0], 32).float()
    return (f16_at(b, 0) * q) + f16_at(b, 2)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = (nibbles(b[:, 6:], 16).reshape(b.shape[0], 32) | (fifth_bits(b, 2) << 4)).to(torch.int8) - 16
    return f16_at(b, 0) * q.float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = (nibbles(b[:, 8:], 16).reshape(b.shape[0], 32) | (fifth_bits(b, 4) << 4)).float()
    return (f16_at(b, 0) * q) + f16_at(b, 2)


def k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: the 8 sub-block scales and mins, 6 bits each, packed in the 12 bytes after d and dmin."""
    s = b[:, 4:16].reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_affine(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: ``d * sc_j * q - dmin * m_j`` per sub-block ``j`` of 32; ``q`` (n, 8, 32) float codes."""
    sc, mn = k_scales(b)
    d = (f16_at(b, 0) * sc.float()).reshape(-1, 8, 1)
    dm = (f16_at(b, 2) * mn.float()).reshape(-1, 8, 1)
    return (d * q - dm).reshape(-1, 256)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    return _k_affine(b, nibbles(b[:, 16:], 32).reshape(-1, 8, 32).float())


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    low = nibbles(b[:, 48:], 32).reshape(-1, 8, 32)
    shifts = torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)
    high = (b[:, 16:48].reshape(-1, 1, 32) >> shifts) & 1  # bit j of byte i: weight i of sub-block j
    return _k_affine(b, (low | (high << 4)).float())


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scale = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (f16_at(b, 208) * scale).reshape(n, 16, 1)
    low = nibbles(b[:, :128], 64).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    high = ((b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, 16, 16).float()).reshape(n, 256)


# type -> (weights per block, bytes per block, blocks (n, bytes) uint8 -> weights (n, per block) float32)
BLOCKS: dict[str, tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "Q8_0": (32, 34, _q8_0),
    "Q4_0": (32, 18, _q4_0),
    "Q4_1": (32, 20, _q4_1),
    "Q5_0": (32, 22, _q5_0),
    "Q5_1": (32, 24, _q5_1),
    "Q4_K": (256, 144, _q4_k),
    "Q5_K": (256, 176, _q5_k),
    "Q6_K": (256, 210, _q6_k),
}


def dequantize(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 tensor of ``shape`` that ``data`` (a tensor's raw bytes, e.g. ``GGUFReader``'s read-only
    map) holds in block type ``type_name`` (one of ``BLOCKS``)."""
    per_block, block_bytes, blocks_to_weights = BLOCKS[type_name]
    numel = int(np.prod(shape))
    if numel % per_block or data.nbytes != numel // per_block * block_bytes:
        raise ValueError(f"{data.nbytes} bytes of {type_name} blocks cannot hold a tensor of shape {list(shape)}")
    blocks = data.reshape(-1).view(np.uint8).reshape(-1, block_bytes)
    out = torch.empty(numel // per_block, per_block)
    step = max(1, CHUNK_WEIGHTS // per_block)
    for start in range(0, blocks.shape[0], step):
        chunk = torch.from_numpy(np.array(blocks[start : start + step]))  # a copy: the map is read-only
        out[start : start + step] = blocks_to_weights(chunk)
    return out.reshape(shape)
