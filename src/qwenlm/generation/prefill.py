"""Chunked prefill: run a long prompt through the model ``chunk_size`` tokens at a time into the KV cache.

Peak memory is the KV cache plus one chunk's activations (chunk x hidden, chunk x MLP width, and the
chunk x keys additive mask that SDPA's CPU/flash kernels read without building a score matrix), so it
grows linearly with the prompt: no T x T mask or score matrix exists at any length.

The NTK alphas are fixed from the *whole* prompt before the first chunk (the reference picks them from
the length of the call), and each chunk attends causally to the cache and to itself, so the logits
equal one-shot prefill up to float rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..attention import check_mask_covers
from ..cache import KVCache

DEFAULT_CHUNK = 1024


def prefill_chunks(
    model: Any,
    input_ids: torch.Tensor,  # (B, T)
    cache: KVCache,
    chunk_size: int = DEFAULT_CHUNK,
    attention_mask: torch.Tensor | None = None,  # (B, cached + T), 1 = token, 0 = padding
) -> Iterator[tuple[int, torch.Tensor]]:
    """Feed ``input_ids`` into ``cache`` chunk by chunk; yield ``(start, hidden)`` per chunk, where
    ``hidden`` (B, c, hidden_size) holds the final-norm states of tokens ``start..start+c-1`` (apply
    ``model.lm_head`` for logits). An empty cache gets the NTK alphas of the whole prompt first."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    model._check_ids(input_ids)
    t = input_ids.shape[1]
    past = cache.seq_len
    check_mask_covers(attention_mask, past + t)
    if past == 0 and cache.ntk_alphas is None:
        cache.ntk_alphas = model.transformer.ntk.alphas(t, attention_mask, model.training)
    for start in range(0, t, chunk_size):
        end = min(t, start + chunk_size)
        mask = None if attention_mask is None else attention_mask[:, : past + end]
        yield start, model.transformer(input_ids[:, start:end], mask, cache)


def prefill(
    model: Any,
    input_ids: torch.Tensor,
    cache: KVCache | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    attention_mask: torch.Tensor | None = None,
    all_logits: bool = False,
) -> tuple[torch.Tensor, KVCache]:
    """Prefill ``input_ids`` in chunks; return the logits of the last token (B, 1, V), or of every token
    with ``all_logits`` (B, T, V), and the cache, ready for decoding. A new cache is sized to the prompt."""
    if cache is None:
        cache = model.new_cache(capacity=input_ids.shape[1])
    logits, last = [], None
    for _, h in prefill_chunks(model, input_ids, cache, chunk_size, attention_mask):
        if all_logits:
            logits.append(model.lm_head(h))
        last = h
    if last is None:
        raise ValueError("the prompt is empty: prefill needs at least one token")
    return (torch.cat(logits, dim=1) if all_logits else model.lm_head(last[:, -1:])), cache
