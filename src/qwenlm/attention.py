"""Multi-head (and grouped-query) self-attention with a fused QKV projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import QwenConfig
from .rope import apply_rotary


class Attention(nn.Module):
    def __init__(self, config: QwenConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        q_size = self.n_heads * self.head_dim
        kv_size = self.n_kv_heads * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        # Qwen v1's c_attn holds q, k, v stacked; Qwen2's separate q/k/v projections are stacked on load.
        self.c_attn = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=True)
        self.c_proj = nn.Linear(q_size, config.hidden_size, bias=False)
        self.dropout = config.attn_dropout_prob

    def forward(
        self,
        x: torch.Tensor,  # (B, T, hidden)
        cos: torch.Tensor,  # (1 or B, 1, T, rotary_dim), fp32
        sin: torch.Tensor,
        logn: torch.Tensor | None,  # (T,) query scale factors, or None
        bias: torch.Tensor | None,  # (B, 1, T, kv_len) additive mask, or None
        is_causal: bool,
        cache: KVCache | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split(self.split, dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KVH, T, D)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if logn is not None:
            q = q * logn.view(1, 1, t, 1).to(q.dtype)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.c_proj(y)


def attention_bias(
    attention_mask: torch.Tensor | None, new: int, kv_len: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """The additive mask for ``new`` queries over ``kv_len`` keys, and whether SDPA's causal flag is enough.

    Like the reference, masked keys get the most negative finite value (not -inf), so a padding query
    that sees no real key gets a uniform distribution instead of NaN. Queries attend causally; with a
    cache they see every cached key and the new keys up to their own position.
    """
    past = kv_len - new
    if attention_mask is None:
        if new == 1:
            return None, False
        if past == 0:
            return None, True
        allowed = torch.ones(new, kv_len, dtype=torch.bool, device=device).tril(diagonal=past)[None, None]
        return torch.zeros((), dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min), False
    if attention_mask.shape[-1] != kv_len:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} positions but the cached + new tokens are "
            f"{kv_len}; pass a mask for the whole sequence so far"
        )
    allowed = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, kv_len)
    if new > 1:
        causal = torch.ones(new, kv_len, dtype=torch.bool, device=allowed.device).tril(diagonal=past)
        allowed = allowed & causal
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min), False
