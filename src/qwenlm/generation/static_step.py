"""The one-token decoding step over preallocated key/value buffers, with the position held in a tensor.

CUDA graphs record it (``graphs``) and AOTInductor compiles it ahead of time on CPU (``exported``): both need
a step whose shapes do not depend on how many tokens are cached. So, unlike the eager step:

- the new token's keys and values are written into the whole buffers at ``pos`` (``index_copy_``), not at a
  Python slice;
- attention runs over the buffers' whole capacity, columns after the position and padding columns masked
  with the most negative finite value, as the eager mask does (they get weight exactly 0); qwenlm's CPU
  attention kernel instead reads only the first ``pos + 1`` columns, the count handed to it in a tensor;
- the rotary and LogN tables are indexed with the position tensor.

The result is the eager step's up to float summation order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..attention import single_query_grouped
from ..quant import cpu_kernel

if TYPE_CHECKING:
    from ..cache import KVCache
    from ..model import QwenForCausalLM


def applies(model: QwenForCausalLM, cache: KVCache) -> bool:
    """Whether ``static_decode`` can take the next token on ``cache``: inference, full attention (window
    attention is not static), and a cache that holds buffers already (a prompt went first)."""
    return not model.training and model.transformer.windows is None and bool(cache._k)


def position_tables(
    model: QwenForCausalLM, capacity: int, alphas: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fresh rotary tables (A, capacity, rotary_dim) for the NTK ``alphas`` and the LogN query factors
    (capacity,) where the capacity outgrows the training length (else None), as ``static_decode`` takes them."""
    t, device = model.transformer, model.device
    cos, sin = t.rotary.cos_sin(0, capacity, list(alphas), device)  # (A, 1, capacity, d)
    logn = t.logn.factors(0, capacity, False) if capacity > model.config.seq_length else None
    return cos[:, 0].clone(), sin[:, 0].clone(), logn.to(device).clone() if logn is not None else None


def static_decode(
    model: QwenForCausalLM,
    ids: torch.Tensor,  # (B, 1) token ids
    pos: torch.Tensor,  # (1,) int64: the new token's position (= tokens cached before it)
    valid: torch.Tensor,  # (B, capacity) bool: False at padding columns
    cos: torch.Tensor,  # (A, capacity, rotary_dim) rotary tables, A = 1 or one per row (NTK alphas)
    sin: torch.Tensor,
    logn: torch.Tensor | None,  # (capacity,) LogN query factors, or None
    keys: list[torch.Tensor],  # per layer (B, kv_heads, capacity, head_dim), written at pos
    values: list[torch.Tensor],
) -> torch.Tensor:
    """Next-token logits (B, vocab) of ``ids`` on top of the cached keys and values (see the module doc)."""
    with torch.no_grad():
        t = model.transformer
        h = t.drop(t.wte(ids))  # (B, 1, hidden)
        c = cos.index_select(1, pos)[:, None]  # (A, 1, 1, d)
        s = sin.index_select(1, pos)[:, None]
        visible = valid & (torch.arange(valid.shape[1], device=valid.device) <= pos)  # (B, capacity)
        bias = torch.zeros(visible.shape, dtype=h.dtype, device=h.device)
        bias = bias.masked_fill(~visible, torch.finfo(h.dtype).min)[:, None, None, :]  # (B, 1, 1, capacity)
        length = pos + 1
        q_scale = logn.index_select(0, pos) if logn is not None else None
        for i, block in enumerate(t.h):
            attn = block.attn
            q, k, v = attn.project(block.ln_1(h), c, s)
            keys[i].index_copy_(2, pos, k.to(keys[i].dtype))  # (a bf16 cache under fp32: rounded as stored)
            values[i].index_copy_(2, pos, v.to(values[i].dtype))
            if q_scale is not None:
                q = q * q_scale.to(q.dtype)
            if attn._own_decode and h.device.type == "cpu" and keys[i].dtype in cpu_kernel.ATTENTION_DTYPES:
                y = cpu_kernel.decode_attention(q, keys[i], values[i], bias, length)
            else:
                k, v = keys[i].to(q.dtype), values[i].to(q.dtype)  # (a cache of another dtype: cast)
                gqa = attn.n_kv_heads != attn.n_heads
                if gqa and h.device.type == "cpu":
                    y = single_query_grouped(q, k, v, bias)
                else:
                    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa)
            h = h + attn.output(y)
            h = h + block.mlp(block.ln_2(h))
        return model.lm_head(t.ln_f(h)[:, -1])
