"""Attention paths that must agree with plain SDPA: one decoding token under grouped-query attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenlm.attention import attention_bias, single_query_grouped
from tests.builders import random_model, tiny_config


@pytest.mark.parametrize("padded", [False, True])
def test_single_query_grouped_equals_sdpa_with_gqa(padded):
    g = torch.Generator().manual_seed(0)
    b, h, kvh, d, n = 2, 14, 2, 16, 37
    q = torch.randn(b, h, 1, d, generator=g)
    k, v = torch.randn(2, b, kvh, n, d, generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    if padded:
        mask[1, :5] = 0  # a left-padded row: its first keys are hidden
    bias, causal = attention_bias(mask if padded else None, 1, n, q.dtype, q.device)
    assert not causal
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    torch.testing.assert_close(single_query_grouped(q, k, v, bias), expected, atol=1e-6, rtol=1e-6)


def test_gqa_decoding_equals_the_full_forward_pass():
    """Through the model: each cached decoding step (the grouped single-query path) gives the logits that a
    full pass over the whole sequence (the ordinary SDPA path) gives at that position."""
    model = random_model(tiny_config(num_key_value_heads=2, use_dynamic_ntk=False, use_logn_attn=False), seed=3)
    ids = torch.randint(0, 151643, (2, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = model.new_cache()
        model(ids[:, :8], attention_mask=mask[:, :8], past_key_values=cache)
        for pos in range(8, 12):
            step = model.decode_step(ids[:, pos : pos + 1], mask[:, : pos + 1], cache)
            torch.testing.assert_close(step, full[:, pos], atol=1e-5, rtol=1e-5)
