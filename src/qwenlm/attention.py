"""Multi-head (and grouped-query) self-attention with a fused QKV projection, full or windowed.

Full attention hands SDPA either nothing (one new token), its causal flag (a prompt without padding or
cache: no T x T mask exists) or the additive mask of ``AttentionMask.full``. One new token per row
(decoding) of a quantised model on a CPU with qwenlm's kernels goes through ``cpu_kernel.decode_attention``
instead (PyTorch's CPU SDPA spends most of its time outside the arithmetic at these sizes). Window attention
(experimental, see ``longctx.WindowSchedule``) runs the queries in blocks, each against only the keys its
window can reach, so its memory grows with block x (block + window), never with T x T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import QwenConfig
from .quant import cpu_kernel
from .rope import apply_rotary_bthd

WINDOW_QUERY_BLOCK = 512  # queries per SDPA call in window attention


def check_mask_covers(attention_mask: torch.Tensor | None, kv_len: int) -> None:
    """A padding mask must cover the cached and the new tokens, ``kv_len`` positions."""
    if attention_mask is not None and attention_mask.shape[-1] != kv_len:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} positions but the cached + new tokens are "
            f"{kv_len}; pass a mask for the whole sequence so far"
        )


class AttentionMask:
    """Which keys each of ``new`` queries may see among ``kv_len`` keys (the last ``new`` are the queries'
    own): causal order, the 1/0 padding mask over all ``kv_len`` positions, and per layer a window.

    Built once per forward; the full additive mask is made only if a full-attention layer asks for it.
    """

    def __init__(
        self, attention_mask: torch.Tensor | None, new: int, kv_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        check_mask_covers(attention_mask, kv_len)
        self.attention_mask = attention_mask
        self.new = new
        self.kv_len = kv_len
        self.past = kv_len - new
        self.dtype = dtype
        self.device = device
        self._full: tuple[torch.Tensor | None, bool] | None = None

    def full(self) -> tuple[torch.Tensor | None, bool]:
        """The additive mask for full causal attention, or (None, True) when SDPA's causal flag is enough."""
        if self._full is None:
            self._full = attention_bias(self.attention_mask, self.new, self.kv_len, self.dtype, self.device)
        return self._full

    def window_bias(self, q_start: int, q_end: int, k_start: int, window: int) -> torch.Tensor | None:
        """Additive mask for the queries at absolute positions ``q_start..q_end-1`` over the keys
        ``k_start..q_end-1``: key j is visible to query p when p - window < j <= p and j is not padding.
        None when every key is visible."""
        q_pos = torch.arange(q_start, q_end, device=self.device)[:, None]
        k_pos = torch.arange(k_start, q_end, device=self.device)[None, :]
        allowed = ((k_pos <= q_pos) & (k_pos > q_pos - window))[None, None]  # (1, 1, q, k)
        if self.attention_mask is not None:
            allowed = allowed & self.attention_mask[:, None, None, k_start:q_end].bool().to(self.device)
        if bool(allowed.all()):
            return None
        bias = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        return bias.masked_fill(~allowed, torch.finfo(self.dtype).min)


class Attention(nn.Module):
    def __init__(self, config: QwenConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        q_size = self.n_heads * self.head_dim
        kv_size = self.n_kv_heads * self.head_dim
        # Qwen v1's c_attn holds q, k, v stacked; Qwen2's separate q/k/v projections are stacked on load.
        self.c_attn = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=True)
        self.c_proj = nn.Linear(q_size, config.hidden_size, bias=False)
        self.dropout = config.attn_dropout_prob
        self._own_decode: bool | None = None  # one-token steps through cpu_kernel; chosen by prepare()

    def prepare(self) -> None:
        """Choose now (not inside a compiled pass) whether one-token steps on the CPU use qwenlm's kernel:
        for head sizes 64 and 128 in quantised models, whose layers load qwenlm's kernels anyway (a float
        model does not build them for its attention alone, and keeps PyTorch's SDPA)."""
        quantised = callable(getattr(self.c_attn, "prepare", None))
        self._own_decode = quantised and self.head_dim in (64, 128) and cpu_kernel.provides("decode_attention")

    def _apply(self, fn, recurse=True):  # moved or cast: choose again
        self._own_decode = None
        return super()._apply(fn, recurse)

    @property
    def prepared(self) -> bool:
        return self._own_decode is not None

    def forward(
        self,
        x: torch.Tensor,  # (B, T, hidden)
        cos: torch.Tensor,  # (1 or B, 1, T, rotary_dim), fp32
        sin: torch.Tensor,
        logn: torch.Tensor | None,  # (T,) query scale factors, or None
        mask: AttentionMask,
        cache: KVCache | None,
        window: int | None = None,  # this layer's window (experimental), None = full attention
    ) -> torch.Tensor:
        t = x.shape[1]
        if self._own_decode is None and not torch.compiler.is_compiling():
            self.prepare()
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if logn is not None:
            q = q * logn.view(1, 1, t, 1).to(q.dtype)
        dropout = self.dropout if self.training else 0.0
        gqa = self.n_kv_heads != self.n_heads
        if window is None or window >= mask.kv_len:  # a window longer than the sequence changes nothing
            bias, is_causal = mask.full()
            own_kernel = (
                t == 1
                and self._own_decode
                and x.device.type == "cpu"
                and dropout == 0.0
                and not q.requires_grad  # the kernel has no backward
                and k.dtype in cpu_kernel.ATTENTION_DTYPES
            )
            if own_kernel:  # (it reads a bf16 or fp16 cache as it is)
                y = cpu_kernel.decode_attention(q, k, v, bias)
            else:
                k, v = k.to(q.dtype), v.to(q.dtype)  # a cache of another dtype (e.g. bf16 under fp32)
                if gqa and t == 1:
                    y = single_query_grouped(q, k, v, bias, dropout)
                else:
                    y = F.scaled_dot_product_attention(
                        q, k, v, attn_mask=bias, is_causal=is_causal, dropout_p=dropout, enable_gqa=gqa
                    )
        else:
            y = windowed_attention(q, k.to(q.dtype), v.to(q.dtype), mask, window, dropout, gqa)
        return self.output(y)

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, D), keys and values (B, KVH, T, D) of ``x``, rotary applied to q and k in one pass (they
        lie side by side in ``c_attn``'s output: half the small operations of a decoding step's rotary)."""
        b, t, _ = x.shape
        qkv = self.c_attn(x)
        heads = self.n_heads + self.n_kv_heads
        qk = qkv[..., : heads * self.head_dim].view(b, t, heads, self.head_dim)
        if self._own_decode and cpu_kernel.eager_float_cpu(qk):  # (qwenlm's kernels are loaded)
            qk = cpu_kernel.rotary(qk, cos, sin)  # one operation, the same bits
        else:
            qk = apply_rotary_bthd(qk, cos, sin)
        v = qkv[..., heads * self.head_dim :].view(b, t, self.n_kv_heads, self.head_dim)
        return qk[:, :, : self.n_heads].transpose(1, 2), qk[:, :, self.n_heads :].transpose(1, 2), v.transpose(1, 2)

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """The output projection of the attention result ``y`` (B, H, T, D)."""
        b, _, t, _ = y.shape
        return self.c_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


def single_query_grouped(
    q: torch.Tensor,  # (B, H, 1, D): one new token per row
    k: torch.Tensor,  # (B, KVH, kv_len, D)
    v: torch.Tensor,
    bias: torch.Tensor | None,  # (B, 1, 1, kv_len) or None
    dropout: float = 0.0,
) -> torch.Tensor:
    """Grouped-query attention of one new token (decoding): the H / KVH query heads that share a key/value
    head become that head's queries, so SDPA runs once per key/value head with no repeated keys and
    values (2x faster than ``enable_gqa`` on CPU for the demo model's 14 / 2 heads). Equal up to float
    summation order: one token sees every key, so no causal mask is lost by treating heads as positions."""
    b, h, _, d = q.shape
    kvh = k.shape[1]
    y = F.scaled_dot_product_attention(q.reshape(b, kvh, h // kvh, d), k, v, attn_mask=bias, dropout_p=dropout)
    return y.reshape(b, h, 1, d)


def windowed_attention(
    q: torch.Tensor,  # (B, H, T, D), the queries at positions kv_len - T .. kv_len - 1
    k: torch.Tensor,  # (B, KVH, kv_len, D), every key so far
    v: torch.Tensor,
    mask: AttentionMask,
    window: int,
    dropout: float = 0.0,
    gqa: bool = False,
    block: int = WINDOW_QUERY_BLOCK,
) -> torch.Tensor:
    """Causal sliding-window attention: query p sees keys p - window < j <= p. Queries go in blocks of
    ``block``, each over the keys its window reaches, so no T x kv_len mask or score matrix exists."""
    t = q.shape[2]
    out = []
    for s in range(0, t, block):
        e = min(t, s + block)
        q_start, q_end = mask.past + s, mask.past + e
        k_start = max(0, q_start - window + 1)
        bias = mask.window_bias(q_start, q_end, k_start, window)
        out.append(
            F.scaled_dot_product_attention(
                q[:, :, s:e],
                k[:, :, k_start:q_end],
                v[:, :, k_start:q_end],
                attn_mask=bias,
                dropout_p=dropout,
                enable_gqa=gqa,
            )
        )
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)


def attention_bias(
    attention_mask: torch.Tensor | None, new: int, kv_len: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """The additive mask for ``new`` queries over ``kv_len`` keys, and whether SDPA's causal flag is enough.

    Like the reference, masked keys get the most negative finite value (not -inf), so a padding query
    that sees no real key gets a uniform distribution instead of NaN. Queries attend causally; with a
    cache they see every cached key and the new keys up to their own position. (The reference lets
    several new tokens fed together with a cache see each other; we keep them causal, so that chunked
    prefill equals one-shot prefill.)
    """
    past = kv_len - new
    if attention_mask is None:
        if new == 1:
            return None, False
        if past == 0:
            return None, True
        allowed = torch.ones(new, kv_len, dtype=torch.bool, device=device).tril(diagonal=past)[None, None]
        return torch.zeros((), dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min), False
    check_mask_covers(attention_mask, kv_len)
    allowed = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, kv_len)
    if new > 1:
        causal = torch.ones(new, kv_len, dtype=torch.bool, device=allowed.device).tril(diagonal=past)
        allowed = allowed & causal
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min), False
