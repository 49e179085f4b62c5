"""Key/value caches. A cache is handed to the model and returned as ``past_key_values``; the model
writes each layer's new keys (after rotary, before LogN) and values into it and then advances it."""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated per-layer buffers of shape (B, kv_heads, capacity, head_dim), written in place.

    The capacity grows by doubling when a call needs more (amortised O(1) per token, never a
    ``torch.cat`` per step); pass ``capacity`` up front (prompt + new tokens) to never grow at all.
    The cache also remembers the NTK alphas chosen at prefill, which decoding must reuse.

    ``dtype``: what the buffers store (e.g. ``torch.bfloat16`` under a float32 model: half the memory and half
    of what decoding reads per cached token); keys and values are rounded to it when written and read back in
    it (attention casts them to the queries' dtype, or qwenlm's CPU kernel reads bf16 as it is). None: the
    dtype of the keys written.
    """

    def __init__(self, n_layers: int, capacity: int = 0, dtype: torch.dtype | None = None) -> None:
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"a key/value cache stores floating-point numbers, not {dtype}")
        self.n_layers = n_layers
        self.capacity = capacity
        self.dtype = dtype
        self.seq_len = 0
        self.ntk_alphas: list[float] | None = None
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []

    def __len__(self) -> int:
        return self.seq_len

    def reserve(self, batch: int, kv_heads: int, head_dim: int, needed: int, dtype: torch.dtype,
                device: torch.device) -> None:  # fmt: skip
        """Make room for ``needed`` columns (allocating or doubling the buffers), keeping what is cached."""
        if self._k and needed <= self._k[0].shape[2]:
            return
        dtype = self.dtype or dtype
        capacity = max(needed, self.capacity, 2 * (self._k[0].shape[2] if self._k else 0), 16)
        k_new = [torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
                 for _ in range(self.n_layers)]  # fmt: skip
        v_new = [torch.zeros_like(k) for k in k_new]
        for old, new in zip(self._k + self._v, k_new + v_new):
            new[:, :, : self.seq_len] = old[:, :, : self.seq_len]
        # not marked dynamic for torch.compile: the compiled passes have dynamic shapes already, and unmarked, the
        # capacities of all layers' buffers share one size symbol (marked, each took its own: ~0.6 ms more per
        # compiled decoding step of the demo model, benchmarks/RESULTS.md)
        self._k, self._v = k_new, v_new
        self.capacity = capacity

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` (B, kv_heads, T, D) after the cached tokens; return all keys and values."""
        end = self.seq_len + k.shape[2]
        self.reserve(k.shape[0], k.shape[1], k.shape[3], end, k.dtype, k.device)
        self._k[layer][:, :, self.seq_len : end] = k
        self._v[layer][:, :, self.seq_len : end] = v
        return self._k[layer][:, :, :end], self._v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.seq_len += n

    def keys_values(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._k[layer][:, :, : self.seq_len], self._v[layer][:, :, : self.seq_len]

    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only the given batch rows (e.g. after some sequences finished)."""
        self._k = [k[rows] for k in self._k]
        self._v = [v[rows] for v in self._v]
        if self.ntk_alphas is not None and len(self.ntk_alphas) > 1:
            self.ntk_alphas = [self.ntk_alphas[i] for i in list(rows)]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._k + self._v)

    # -- batch surgery for continuous batching (see ``qwenlm.serve.batch``) ---------------------------
    @property
    def batch_size(self) -> int:
        return self._k[0].shape[0] if self._k else 0

    def start_at(self, n: int) -> None:
        """Make an empty cache begin at column ``n``: the first write lands there, the columns before it
        are zeros that the attention mask must hide (a left-padded row)."""
        if self._k or self.seq_len:
            raise ValueError("start_at needs an empty cache")
        self.seq_len = n

    def append_rows(self, other: KVCache) -> None:
        """Add the rows of ``other`` (same length) below this cache's rows."""
        if not other._k:
            return
        if not self._k:
            self._k, self._v, self.capacity = other._k, other._v, other.capacity
            self.seq_len, self.ntk_alphas = other.seq_len, other.ntk_alphas
            return
        if other.seq_len != self.seq_len:
            raise ValueError(f"cannot join caches of lengths {self.seq_len} and {other.seq_len}; align them first")
        n = self.seq_len
        capacity = max(self._k[0].shape[2], other._k[0].shape[2])
        self._k = [_stack_rows(a, b, n, capacity) for a, b in zip(self._k, other._k)]
        self._v = [_stack_rows(a, b, n, capacity) for a, b in zip(self._v, other._v)]
        self.capacity = capacity
        if self.ntk_alphas is not None or other.ntk_alphas is not None:
            rows = self._k[0].shape[0]
            mine = _per_row(self.ntk_alphas, rows - other.batch_size)
            theirs = _per_row(other.ntk_alphas, other.batch_size)
            alphas = mine + theirs
            self.ntk_alphas = alphas[:1] if len(set(alphas)) == 1 else alphas  # one shared alpha: one table

    def pad_front(self, n: int) -> None:
        """Insert ``n`` zero columns before every row (positions of the cached keys are unchanged)."""
        if n <= 0 or not self._k:
            self.seq_len += max(n, 0)
            return
        end = self.seq_len + n
        capacity = max(self._k[0].shape[2], end)
        for buffers in (self._k, self._v):
            for i, old in enumerate(buffers):
                b, h, _, d = old.shape
                new = old.new_zeros(b, h, capacity, d)
                new[:, :, n:end] = old[:, :, : self.seq_len]
                buffers[i] = new
        self.capacity, self.seq_len = capacity, end

    def drop_front(self, n: int) -> None:
        """Remove the first ``n`` columns of every row."""
        if not 0 <= n <= self.seq_len:
            raise ValueError(f"cannot drop {n} of {self.seq_len} cached columns")
        if n == 0:
            return
        rest = self.seq_len - n
        for t in self._k + self._v:
            t[:, :, :rest] = t[:, :, n : self.seq_len].clone()  # overlapping ranges: copy through a clone
            t[:, :, rest : self.seq_len] = 0
        self.seq_len = rest

    def map_keys(self, fn) -> None:
        """Replace every layer's cached keys ``k`` (B, kv_heads, seq_len, D) by ``fn(k)`` (e.g. a re-rotation)."""
        for k in self._k:
            k[:, :, : self.seq_len] = fn(k[:, :, : self.seq_len])


def _stack_rows(a: torch.Tensor, b: torch.Tensor, n: int, capacity: int) -> torch.Tensor:
    out = a.new_zeros(a.shape[0] + b.shape[0], a.shape[1], capacity, a.shape[3])
    out[: a.shape[0], :, :n] = a[:, :, :n]
    out[a.shape[0] :, :, :n] = b[:, :, :n]
    return out


def _per_row(alphas: list[float] | None, rows: int) -> list[float]:
    if alphas is None:
        return [1.0] * rows
    return list(alphas) if len(alphas) == rows else [alphas[0]] * rows
