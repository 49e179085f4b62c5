"""The input embedding as int8 codes with a scale (and an offset) per group of a row.

A lookup reads a handful of rows, so the table's precision costs no time, only memory: the demo model's
151,936 x 896 table is 545 MB in float32 and 153 MB here. A GGUF file's block-quantised embedding (Q8_0, Q5_0,
Q4_K, Q6_K, ...) is taken over as its codes, scales and offsets (``gguf_dequant.codes_of``), so its rows come
out bit for bit as dequantising the file gives them; a float table is rounded per row (symmetric, 127 steps
each way, as ``Int8Linear`` rounds an output channel).
"""

from __future__ import annotations

import torch
from torch import nn

from ..gguf_dequant import values
from .linear import round_rows

ROUND_ROWS = 1 << 10  # rows rounded per pass: small intermediates, whatever the table's size


class Int8Embedding(nn.Module):
    """``nn.Embedding`` stored as ``codes`` (rows, dim) int8 and ``scale`` (rows, dim / group_size), with
    ``zero`` of the same shape for tables whose groups have an offset (``affine``): row ``r`` is
    ``codes[r] * scale[r] + zero[r]`` group by group, in float32 as dequantising a GGUF file computes it, then
    in ``dtype``, the activations' (which ``model.to(dtype)`` changes with the rest of the model)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int | None = None, affine: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        super().__init__()
        group_size = group_size or embedding_dim
        if embedding_dim % group_size:
            raise ValueError(f"embedding_dim {embedding_dim} does not split into groups of {group_size}")
        self.num_embeddings, self.embedding_dim, self.group_size = num_embeddings, embedding_dim, group_size
        groups = embedding_dim // group_size
        self.register_buffer("codes", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(num_embeddings, groups, device=device))
        self.register_buffer("zero", torch.empty(num_embeddings, groups, device=device) if affine else None)
        self.register_buffer("_dtype", torch.empty(0, dtype=dtype, device=device), persistent=False)  # a dtype only

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the rows a lookup returns."""
        return self._dtype.dtype

    def returning(self, dtype: torch.dtype) -> Int8Embedding:
        """This table, its lookups returning ``dtype`` (the scales stay as they are)."""
        self._dtype = torch.empty(0, dtype=dtype, device=self.codes.device)
        return self

    @property
    def affine(self) -> bool:
        return self.zero is not None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> Int8Embedding:
        """From codes (rows, dim) int8 and (rows, groups) float32 scales and offsets, e.g. a GGUF tensor's
        (``gguf_dequant.codes_of``), taken as they are."""
        rows, dim = codes.shape
        out = cls(rows, dim, dim // scale.shape[1], zero is not None, device="meta")
        out.codes, out.scale, out.zero = codes, scale, zero
        return out.returning(torch.float32)

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> Int8Embedding:
        """Each row of a float table rounded to int8 with its own scale (max |w| / 127); lookups return the
        table's dtype."""
        rows, dim = weight.shape
        out = cls(rows, dim, device=weight.device, dtype=weight.dtype)
        for i in range(0, rows, ROUND_ROWS):
            out.codes[i : i + ROUND_ROWS], scale = round_rows(weight[i : i + ROUND_ROWS])
            out.scale[i : i + ROUND_ROWS] = scale[:, None]
        return out

    def dequantize(self) -> torch.Tensor:
        """The whole table as floats (for checks)."""
        return values(self.codes, self.scale.float(), None if self.zero is None else self.zero.float())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1)
        zero = None if self.zero is None else self.zero[ids]
        rows = values(self.codes[ids], self.scale[ids].float(), None if zero is None else zero.float())
        return rows.to(self.dtype).reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        kind = "affine groups" if self.affine else "groups"
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 in {kind} of {self.group_size}"
