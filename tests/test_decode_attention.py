"""qwenlm's CPU kernel for the attention of one new token (``cpu_kernel.decode_attention``): equal to SDPA up
to fp32 summation order for grouped and plain heads, masks, bf16 caches and KV-cache views, and used by the
model's one-token steps where it applies (the same logits as with PyTorch's SDPA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenlm.quant import cpu_kernel, quantize
from tests.builders import random_model, tiny_config
from tests.kernels import needs_attention


def _sdpa(q, k, v, bias):
    g = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=None if bias is None else bias.float())


@needs_attention
@pytest.mark.parametrize("batch,heads,kv_heads,length,dim", [(1, 14, 2, 544, 64), (1, 14, 2, 1, 64),
                                                              (2, 4, 2, 17, 128), (3, 8, 8, 100, 128),
                                                              (1, 7, 1, 33, 64)])  # fmt: skip
@pytest.mark.parametrize("masked", [False, True])
def test_equal_to_sdpa_on_cache_views(batch, heads, kv_heads, length, dim, masked):
    g = torch.Generator().manual_seed(0)
    cache_k = torch.randn(batch, kv_heads, length + 9, dim, generator=g)  # a cache with room left: views
    cache_v = torch.randn(batch, kv_heads, length + 9, dim, generator=g)
    k, v = cache_k[:, :, :length], cache_v[:, :, :length]
    q = 3 * torch.randn(batch, heads, 1, dim, generator=g)
    bias = None
    if masked:  # padding at the front of the later rows, as batched prompts have
        bias = torch.zeros(batch, 1, 1, length)
        for row in range(1, batch):
            bias[row, ..., : min(row * 3, length - 1)] = torch.finfo(torch.float32).min
    got = cpu_kernel.decode_attention(q, k, v, bias)
    assert got.shape == q.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, _sdpa(q, k, v, bias), atol=2e-6, rtol=1e-5)


@needs_attention
@pytest.mark.parametrize("masked", [False, True])
def test_a_length_attends_the_first_keys_of_a_whole_buffer(masked):
    # a static cache's buffers go in whole, with the filled length in a tensor (the exported decoding step)
    g = torch.Generator().manual_seed(2)
    k, v = (torch.randn(2, 2, 48, 64, generator=g) for _ in range(2))
    q = 3 * torch.randn(2, 14, 1, 64, generator=g)
    bias = torch.zeros(2, 1, 1, 48)
    if masked:
        bias[1, ..., :5] = torch.finfo(torch.float32).min
    for n in (1, 17, 48):
        got = cpu_kernel.decode_attention(q, k, v, bias, torch.tensor([n]))
        want = cpu_kernel.decode_attention(q, k[:, :, :n], v[:, :, :n], bias[..., :n].contiguous())
        assert torch.equal(got, want)
    for bad in (0, 49):
        with pytest.raises(RuntimeError, match=f"length {bad} outside 1..48"):
            cpu_kernel.decode_attention(q, k, v, bias, torch.tensor([bad]))
    with pytest.raises(RuntimeError, match="one int64"):
        cpu_kernel.decode_attention(q, k, v, bias, torch.tensor([3.0]))


@needs_attention
def test_bf16_cache():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, 1, 64, generator=g).bfloat16()
    k, v = (torch.randn(2, 2, 40, 64, generator=g).bfloat16() for _ in range(2))
    got = cpu_kernel.decode_attention(q, k, v)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), _sdpa(q, k, v, None), atol=1e-2, rtol=1e-2)  # bf16 output rounding


@needs_attention
@pytest.mark.parametrize("head_dim", [64, 128])
def test_fp16_cache_is_read_as_stored(head_dim):
    # a float16 cache under float32 queries: the kernel converts each key and value as it reads it, which is the
    # cache cast to float32 first (the casting path) up to the kernel's own rounding
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 8, 1, head_dim, generator=g)
    k, v = (torch.randn(2, 2, 37, head_dim, generator=g).half() for _ in range(2))
    bias = torch.zeros(2, 1, 1, 37)
    bias[1, ..., :5] = torch.finfo(torch.float32).min  # a padded row
    got = cpu_kernel.decode_attention(q, k, v, bias)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _sdpa(q, k.float(), v.float(), bias), atol=2e-5, rtol=1e-4)


@needs_attention
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_a_long_cache_goes_in_blocks(dtype, head_dim):
    # 1,000 keys: several of the kernel's key blocks (32 KB of fp32 rows) and a partial last one, 7 query heads
    # per key/value head (an odd last head), a bias on some of every block's keys; the keys in a cache view
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 14, 1, head_dim, generator=g)
    cache_k, cache_v = (torch.randn(1, 2, 1024, head_dim, generator=g).to(dtype) for _ in range(2))
    k, v = cache_k[:, :, :1000], cache_v[:, :, :1000]
    bias = torch.zeros(1, 1, 1, 1000)
    bias[..., ::7] = -3.0
    got = cpu_kernel.decode_attention(q, k, v, bias)
    torch.testing.assert_close(got, _sdpa(q, k.float(), v.float(), bias), atol=2e-6, rtol=1e-5)
    length = torch.tensor([777])  # a filled part ending inside a block
    got = cpu_kernel.decode_attention(q, cache_k, cache_v, torch.zeros(1, 1, 1, 1024), length)
    torch.testing.assert_close(got, _sdpa(q, cache_k[:, :, :777].float(), cache_v[:, :, :777].float(), None),
                               atol=2e-6, rtol=1e-5)  # fmt: skip


@needs_attention
def test_checks_its_arguments():
    q, k = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 8, 64)
    with pytest.raises(RuntimeError, match="head size must be 64 or 128"):
        cpu_kernel.decode_attention(torch.randn(1, 4, 1, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32))
    with pytest.raises(RuntimeError, match="q \\(B, H, 1, D\\)"):
        cpu_kernel.decode_attention(torch.randn(1, 4, 2, 64), k, k)
    with pytest.raises(RuntimeError, match="H a multiple of KVH"):
        cpu_kernel.decode_attention(torch.randn(1, 3, 1, 64), k, k)
    with pytest.raises(RuntimeError, match="bias"):
        cpu_kernel.decode_attention(q, k, k, torch.zeros(1, 1, 1, 7))
    with pytest.raises(RuntimeError, match="rows must be contiguous"):
        columns = torch.randn(1, 2, 64, 8).transpose(2, 3)  # (1, 2, 8, 64) with strided rows
        cpu_kernel.decode_attention(q, columns, columns)


def _greedy_logits(model, ids, mask, steps=5):
    """Each step's logits of greedy decoding a padded batch through the KV cache."""
    out = []
    with torch.inference_mode():
        cache = model.new_cache(ids.shape[1] + steps)
        logits = model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1]
        for _ in range(steps):
            out.append(logits)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            logits = model(logits.argmax(-1, keepdim=True), attention_mask=mask, past_key_values=cache).logits[:, -1]
    return torch.stack(out)


@needs_attention
@pytest.mark.parametrize("kv_heads", [None, 1])
def test_model_decodes_through_it_with_sdpas_logits(kv_heads, monkeypatch):
    """A quantised model with 64-wide heads (plain and grouped): one-token steps take the kernel, and greedy
    decoding of a padded batch gives SDPA's logits."""
    config = tiny_config(hidden_size=128, num_attention_heads=2, kv_channels=64, num_key_value_heads=kv_heads)
    model = quantize(random_model(config), 8)
    calls = []
    kernel = cpu_kernel.decode_attention
    monkeypatch.setattr(cpu_kernel, "decode_attention", lambda *a: calls.append(a[0].shape) or kernel(*a))
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # the second row is padded at the front
    own = _greedy_logits(model, ids, mask)
    assert len(calls) == 5 * config.num_hidden_layers and all(s[2] == 1 for s in calls)
    for layer in model.transformer.h:
        layer.attn._own_decode = False
    ref = _greedy_logits(model, ids, mask)
    assert len(calls) == 5 * config.num_hidden_layers
    # equal up to summation order, which the int8 layers' rounding of their inputs can amplify to ~1e-4 of
    # the logits' range (1.02e-4 at two of 1.5 M logits on a Zen 4); the greedy tokens are the same (else later
    # steps would differ by whole logits)
    torch.testing.assert_close(own, ref, atol=2e-4 * float(ref.abs().max()), rtol=0)


def test_float_models_keep_sdpa(monkeypatch):
    """A float model does not build qwenlm's kernels for its attention alone."""
    model = random_model(tiny_config(hidden_size=128, num_attention_heads=2, kv_channels=64))
    monkeypatch.setattr(cpu_kernel, "decode_attention", lambda *a: pytest.fail("kernel used"))
    with torch.inference_mode():
        cache = model.new_cache(4)
        model(torch.tensor([[1, 2]]), past_key_values=cache)
        model(torch.tensor([[3]]), past_key_values=cache)
    assert model.transformer.h[0].attn._own_decode is False


@needs_attention
def test_not_used_when_gradients_are_needed():
    model = quantize(random_model(tiny_config(hidden_size=128, num_attention_heads=2, kv_channels=64)), 8).train()
    model.config.attn_dropout_prob = 0.0
    for layer in model.transformer.h:
        layer.attn.dropout = 0.0
    ids = torch.randint(0, 1000, (1, 1))
    model(ids).logits.sum().backward()  # one token with gradients: SDPA, which has a backward
    grad = model.transformer.h[0].ln_1.weight.grad  # the first norm feeds only the attention
    assert grad is not None and grad.abs().sum() > 0


@needs_attention
def test_compiles_with_a_growing_cache():
    compiled = torch.compile(cpu_kernel.decode_attention, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 1, 64, generator=g)
    cache = torch.randn(1, 2, 64, 64, generator=g)
    for length in (5, 6, 40):
        k = cache[:, :, :length]
        torch.testing.assert_close(compiled(q, k, k), _sdpa(q, k, k, None), atol=2e-6, rtol=1e-5)
