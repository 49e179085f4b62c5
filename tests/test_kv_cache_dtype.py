"""A key/value cache that stores another dtype than the model computes in (``KVCache(dtype=...)``,
``model.kv_cache_dtype``): bf16 under an fp32 model halves the cache; every attention path reads it, qwenlm's
CPU kernel as it is, the others cast; the compiled steps take it."""

from __future__ import annotations

import pytest
import torch

from qwenlm.cache import KVCache
from qwenlm.quant import quantize
from tests.builders import greedy_decode, random_model, relative_error, tiny_config
from tests.kernels import needs_attention


def _logits(model, ids, mask, steps, kv_dtype):
    """Prefill logits, then each greedy step's, from a cache storing ``kv_dtype``."""
    model.kv_cache_dtype = kv_dtype
    try:
        return greedy_decode(model, ids, mask, steps, capacity=8)  # grows while decoding: the doubling keeps the dtype
    finally:
        model.kv_cache_dtype = None


@pytest.fixture(scope="module")
def ids_and_mask():
    ids = torch.randint(0, 151643, (2, 7), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    return ids, mask


def test_a_bf16_cache_under_an_fp32_model_halves_the_memory_and_keeps_the_logits(ids_and_mask):
    ids, mask = ids_and_mask
    m = random_model(tiny_config(), seed=9)
    full, full_cache = _logits(m, ids, mask, 6, None)
    half, half_cache = _logits(m, ids, mask, 6, torch.bfloat16)
    assert full_cache._k[0].dtype == torch.float32 and half_cache._k[0].dtype == torch.bfloat16
    assert half_cache._k[0].shape == full_cache._k[0].shape and half_cache.capacity == 16  # grew from 8
    assert half_cache.memory_bytes() * 2 == full_cache.memory_bytes()
    assert 0 < relative_error(half, full) < 1e-2  # rounded keys and values, attended in fp32


@needs_attention
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float16])
def test_the_cpu_kernel_reads_a_16_bit_cache_as_the_casting_path_does(ids_and_mask, kv_dtype):
    ids, mask = ids_and_mask
    # head size 64 and quantised linears: decoding attention through qwenlm's kernel. int8 weights: their ~15-bit
    # activations pass the attention's difference on as it is, where the AVX2 build's int4 layers (int8
    # activations per block of 8) amplified it to ~1.5e-3 by rounding some activations the other way
    config = tiny_config(hidden_size=128, num_attention_heads=2, kv_channels=64, intermediate_size=256)
    m = quantize(random_model(config, seed=10), 8)
    m.prepare_layers()
    assert all(block.attn._own_decode for block in m.transformer.h)
    kernel, _ = _logits(m, ids, mask, 5, kv_dtype)
    for block in m.transformer.h:
        block.attn._own_decode = False  # through single_query_grouped, the cache cast to fp32
    try:
        cast, _ = _logits(m, ids, mask, 5, kv_dtype)
    finally:
        m.prepare_layers()
    # the kernel's exp is a polynomial: ~1e-4 apart with an fp32 cache too; a misread cache would be far off
    assert relative_error(kernel, cast) < 1e-3
    assert torch.equal(kernel.argmax(-1), cast.argmax(-1))


@needs_attention
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float16])
def test_the_compiled_step_takes_a_16_bit_cache(ids_and_mask, kv_dtype):
    ids, mask = ids_and_mask
    config = tiny_config(hidden_size=128, num_attention_heads=2, kv_channels=64, intermediate_size=256)
    m = quantize(random_model(config, seed=12), 4)
    eager, _ = _logits(m, ids, mask, 5, kv_dtype)
    m.compile_inference()
    try:
        compiled, cache = _logits(m, ids, mask, 5, kv_dtype)
        assert m._exported.failure is None and list(m._exported._programs) == [(2, 1, False, kv_dtype)]
    finally:
        m.compile_inference(False)
    assert cache._k[0].dtype == kv_dtype
    assert relative_error(compiled, eager) < 1e-3
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))


def test_window_attention_reads_a_bf16_cache():
    m = random_model(tiny_config(), seed=13)
    m.transformer.set_long_context(window="4")
    ids = torch.randint(0, 151643, (1, 9), generator=torch.Generator().manual_seed(14))
    mask = torch.ones_like(ids)
    full, _ = _logits(m, ids, mask, 3, None)
    half, _ = _logits(m, ids, mask, 3, torch.bfloat16)
    assert relative_error(half, full) < 1e-2


def test_a_cache_of_integers_is_refused():
    with pytest.raises(ValueError, match="floating-point numbers, not torch.int8"):
        KVCache(2, dtype=torch.int8)
