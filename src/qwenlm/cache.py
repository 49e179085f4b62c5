"""Key/value caches. A cache is handed to the model and returned as ``past_key_values``; the model
writes each layer's new keys (after rotary, before LogN) and values into it and then advances it."""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated per-layer buffers of shape (B, kv_heads, capacity, head_dim), written in place.

    The capacity grows by doubling when a call needs more (amortised O(1) per token, never a
    ``torch.cat`` per step); pass ``capacity`` up front (prompt + new tokens) to never grow at all.
    The cache also remembers the NTK alphas chosen at prefill, which decoding must reuse.
    """

    def __init__(self, n_layers: int, capacity: int = 0) -> None:
        self.n_layers = n_layers
        self.capacity = capacity
        self.seq_len = 0
        self.ntk_alphas: list[float] | None = None
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []

    def __len__(self) -> int:
        return self.seq_len

    def _reserve(self, like: torch.Tensor, needed: int) -> None:
        if self._k and needed <= self._k[0].shape[2]:
            return
        capacity = max(needed, self.capacity, 2 * (self._k[0].shape[2] if self._k else 0), 16)
        b, h, _, d = like.shape
        k_new = [like.new_zeros(b, h, capacity, d) for _ in range(self.n_layers)]
        v_new = [like.new_zeros(b, h, capacity, d) for _ in range(self.n_layers)]
        for old, new in zip(self._k + self._v, k_new + v_new):
            new[:, :, : self.seq_len] = old[:, :, : self.seq_len]
        self._k, self._v = k_new, v_new
        self.capacity = capacity

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` (B, kv_heads, T, D) after the cached tokens; return all keys and values."""
        end = self.seq_len + k.shape[2]
        self._reserve(k, end)
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
