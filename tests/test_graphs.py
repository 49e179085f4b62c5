"""The static decoding step of ``generation.graphs`` (run eagerly here: no GPU needed) gives the logits of
the eager ``decode_step``: padding, dynamic NTK, LogN, grouped-query attention, interleaved caches. The CUDA
recording itself is checked in ``test_cuda.py`` where a GPU exists."""

from __future__ import annotations

import copy

import pytest
import torch

from qwenlm.generation import graphs
from qwenlm.generation.graphs import GraphDecoder
from tests.builders import greedy_decode, random_model, relative_error, teacher_forced, tiny_config


def _prefill(model, ids, mask):
    logits, cache = greedy_decode(model, ids, mask, 0, capacity=ids.shape[1] + 8)
    return cache, logits[:, 0]


def _run(model, ids, mask, steps, step_fn):
    """Prefill, then ``steps`` greedy steps through ``step_fn(tok, mask, cache)``; all logits (B, steps+1, V)."""
    return greedy_decode(model, ids, mask, steps, step_fn, capacity=ids.shape[1] + 8)


@pytest.mark.parametrize(
    "config, prompt",
    [
        (dict(), 7),  # plain
        (dict(use_dynamic_ntk=True, use_logn_attn=True), 90),  # beyond seq_length 64: NTK alpha > 1 and LogN
        (dict(num_key_value_heads=2), 7),  # grouped-query attention (Qwen2 layout)
    ],
    ids=["plain", "ntk-logn", "gqa"],
)
def test_static_step_matches_eager_decode(config, prompt):
    model = random_model(tiny_config(**config), seed=5)
    ids = torch.randint(0, 151643, (2, prompt), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    eager, _ = _run(model, ids, mask, 6, model.decode_step)
    static, cache = _run(model, ids, mask, 6, GraphDecoder(model, capture=False).step)
    torch.testing.assert_close(static, eager, atol=1e-5, rtol=1e-5)
    assert cache.seq_len == prompt + 6
    if prompt > 64:
        assert cache.ntk_alphas[0] > 1.0  # the long prompt did pick a larger NTK alpha


def test_static_step_without_mask_and_slot_capacity():
    model = random_model(tiny_config(), seed=2)
    ids = torch.randint(0, 151643, (1, 5), generator=torch.Generator().manual_seed(2))
    eager, _ = _run(model, ids, None, 4, model.decode_step)
    decoder = GraphDecoder(model, capture=False)
    static, cache = _run(model, ids, None, 4, decoder.step)
    torch.testing.assert_close(static, eager, atol=1e-5, rtol=1e-5)
    # the cache now lives in the slot's buffers, sized to a multiple of CAPACITY_STEP
    assert cache.capacity == graphs.CAPACITY_STEP and cache._k[0].shape[2] == graphs.CAPACITY_STEP
    with torch.inference_mode():  # the eager path keeps working on the adopted buffers
        more = model(ids[:, :2], past_key_values=cache).logits
    assert more.shape == (1, 2, model.config.vocab_size) and cache.seq_len == 11


def test_interleaved_generations_keep_their_own_keys():
    """Two live caches of one shape share a slot: the one that is not running gets its own copy."""
    model = random_model(tiny_config(), seed=4)
    decoder = GraphDecoder(model, capture=False)
    a_ids = torch.randint(0, 151643, (1, 6), generator=torch.Generator().manual_seed(3))
    b_ids = torch.randint(0, 151643, (1, 6), generator=torch.Generator().manual_seed(4))
    ref_a, _ = _run(model, a_ids, None, 3, model.decode_step)
    ref_b, _ = _run(model, b_ids, None, 3, model.decode_step)
    cache_a, la = _prefill(model, a_ids, None)
    cache_b, lb = _prefill(model, b_ids, None)
    out_a, out_b = [la], [lb]
    with torch.inference_mode():
        for _ in range(3):
            out_a.append(decoder.step(out_a[-1].argmax(-1, keepdim=True), None, cache_a))
            out_b.append(decoder.step(out_b[-1].argmax(-1, keepdim=True), None, cache_b))
    torch.testing.assert_close(torch.stack(out_a, 1), ref_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(out_b, 1), ref_b, atol=1e-5, rtol=1e-5)


def test_old_slots_are_released_with_a_copy_for_their_cache(monkeypatch):
    monkeypatch.setattr(graphs, "MAX_SLOTS", 1)
    model = random_model(tiny_config(), seed=6)
    decoder = GraphDecoder(model, capture=False)
    ids = torch.randint(0, 151643, (1, 4), generator=torch.Generator().manual_seed(5))
    ref, _ = _run(model, ids, None, 2, model.decode_step)
    cache, logits = _prefill(model, ids, None)
    with torch.inference_mode():
        first = decoder.step(logits.argmax(-1, keepdim=True), None, cache)
        other, _ = _prefill(model, torch.cat([ids, ids], 0), None)  # batch 2: a new slot evicts the first
        decoder.step(torch.tensor([[1], [2]]), None, other)
        second = decoder.step(first.argmax(-1, keepdim=True), None, cache)
    assert len(decoder._slots) == 1
    torch.testing.assert_close(torch.stack([logits, first, second], 1), ref, atol=1e-5, rtol=1e-5)


def test_mask_of_the_wrong_length_is_refused():
    model = random_model(tiny_config(), seed=1)
    cache, _ = _prefill(model, torch.tensor([[1, 2, 3]]), None)
    with pytest.raises(ValueError, match="attention_mask covers 3 positions but the cached \\+ new tokens are 4"):
        GraphDecoder(model, capture=False).step(torch.tensor([[4]]), torch.ones(1, 3, dtype=torch.long), cache)


def test_windows_and_training_use_the_eager_step():
    model = random_model(tiny_config(), seed=1)
    decoder = GraphDecoder(model, capture=False)
    cache, _ = _prefill(model, torch.tensor([[1, 2, 3]]), None)
    assert decoder.supports(cache)
    model.transformer.set_long_context(window="16")
    assert not decoder.supports(cache)
    model.transformer.set_long_context(window="none")
    model.train()
    assert not decoder.supports(cache)


def test_cuda_graphs_refuse_a_cpu_model_and_copies_drop_them():
    model = random_model(tiny_config(), seed=1)
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device; it is on cpu"):
        model.use_cuda_graphs()
    model._graphs = GraphDecoder(model, capture=False)
    assert copy.deepcopy(model)._graphs is None
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        via_decoder = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
    model.use_cuda_graphs(False)
    with torch.inference_mode():
        eager = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(via_decoder, eager)


def test_compiled_static_step_in_bf16_is_as_accurate_as_eager():
    """What ``compile_inference`` runs on CUDA (compiled static step), here without the graph recording:
    its bf16 error against the fp32 model is no larger than eager bf16's (they differ from each other by
    as much as either differs from fp32, so they are not compared directly)."""
    config = tiny_config(hidden_size=128, kv_channels=32, intermediate_size=256)
    reference = random_model(config, seed=7)
    model = copy.deepcopy(reference).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    ids, tokens = torch.randint(0, 151643, (2, 9), generator=g), torch.randint(0, 151643, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    exact = teacher_forced(reference, ids, mask, tokens)
    eager = teacher_forced(model, ids, mask, tokens)
    compiled = teacher_forced(model, ids, mask, tokens, GraphDecoder(model, compile=True, capture=False).step)
    assert relative_error(compiled, exact) <= 1.25 * relative_error(eager, exact) + 1e-3
    assert (compiled.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.9


def test_fast_paths_choose_compile_or_graphs_and_ignore_graphs_on_cpu():
    from qwenlm.bench import fast_paths

    model = random_model(tiny_config(), seed=1)
    assert not fast_paths(model, cuda_graphs=True).cuda_graphs  # a CPU model decodes eagerly
    assert fast_paths(model, compile=True).compiled and not model.cuda_graphs  # on CPU: the dynamic decode step
    model.compile_inference(False)
    assert not model.compiled and not model.cuda_graphs
