"""Prefill and decoding through ``torch.compile`` give the tokens and logits of eager mode, and can be switched off;
on CPU prompts stay eager unless asked for."""

from __future__ import annotations

import copy

import pytest
import torch

from qwenlm.quant import quantize
from tests.builders import greedy_decode, random_model, relative_error, tiny_config


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), seed=3)


@pytest.mark.parametrize(("precision", "prefill"), [("fp32", True), ("int8", None)])
def test_compiled_decode_matches_eager(model, precision, prefill):
    m = copy.deepcopy(model) if precision == "fp32" else quantize(copy.deepcopy(model), 8)
    ids = torch.randint(0, 151643, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row: the growing mask goes through the compiled step too
    eager = greedy_decode(m, ids, mask, 12)[0]
    m.compile_inference(prefill=prefill)
    assert m.compiled
    compiled = greedy_decode(m, ids, mask, 12)[0]
    torch.testing.assert_close(compiled, eager, atol=2e-4 if precision == "fp32" else 2e-2, rtol=1e-4)
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))
    single = m.generate(ids[:1], max_new_tokens=10, do_sample=False, eos_token_id=None)
    m.compile_inference(False)
    assert not m.compiled
    assert torch.equal(single, m.generate(ids[:1], max_new_tokens=10, do_sample=False, eos_token_id=None))


def test_on_cpu_prompts_stay_eager_unless_asked_for(model):
    from torch._dynamo.utils import counters

    ids = torch.randint(0, 151643, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        eager = model(ids).logits
    m = copy.deepcopy(model).compile_inference()
    frames = counters["frames"]["total"]
    with torch.inference_mode():
        assert torch.equal(m(ids).logits, eager)  # the eager pass itself, bit for bit
    assert counters["frames"]["total"] == frames  # nothing went through dynamo
    m.compile_inference(prefill=True)
    with torch.inference_mode():
        torch.testing.assert_close(m(ids).logits, eager, atol=2e-4, rtol=1e-4)
    assert counters["frames"]["total"] > frames


def test_a_copy_of_a_compiled_model_decodes_eagerly_with_its_own_weights(model):
    m = copy.deepcopy(model).compile_inference()
    clone = copy.deepcopy(m)
    assert m.compiled and not clone.compiled
    with torch.no_grad():
        clone.lm_head.weight.zero_()
    cache = clone.new_cache()
    with torch.inference_mode():
        clone(torch.tensor([[1, 2, 3]]), past_key_values=cache)
        assert clone.decode_step(torch.tensor([[4]]), None, cache).abs().max() == 0


def test_new_lengths_and_capacities_do_not_recompile():
    import torch._dynamo

    # head_dim 16 and a first rotary table of 16 rows: sizes that torch.compile would tie together
    m = random_model(tiny_config(hidden_size=64, kv_channels=16), seed=4).compile_inference(prefill=True)
    ids = torch.randint(0, 151643, (1, 40), generator=torch.Generator().manual_seed(1))
    try:
        with torch.inference_mode():
            # slices of ids are views made outside inference mode; the last prompt is a whole tensor made
            # inside it (dynamo guards on both properties: the compiled pass gets fresh copies)
            for capacity, prompt in ((12, ids[:, :7]), (300, ids[:, :37]), (64, torch.tensor(ids.tolist()))):
                cache = m.new_cache(capacity)
                m(prompt, past_key_values=cache)
                for step in range(3):
                    m.decode_step(ids[:, step : step + 1], None, cache)
                torch._dynamo.config.error_on_recompile = True  # from the second cache on, a recompile fails
    finally:
        torch._dynamo.config.error_on_recompile = False


def _forced(model, ids, tokens):
    """Logits of the prefill and of decoding ``tokens`` one by one (the same inputs for every model)."""
    with torch.inference_mode():
        cache = model.new_cache()
        out = [model(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1]]
        out += [model.decode_step(tokens[:, i : i + 1], None, cache) for i in range(tokens.shape[1])]
    return torch.stack(out, dim=1).float()


def test_the_compiled_step_follows_casts_and_swapped_layers(model):
    # the compiled CPU step skips dynamo's guards on the weights (qwenlm.compiling): a cast must still
    # compile again (the cache's guards), and a swapped layer (a kept type guard) must not run the old graph
    ids, tokens = torch.randint(0, 151643, (2, 1, 6), generator=torch.Generator().manual_seed(2))
    m = copy.deepcopy(model).compile_inference()
    _forced(m, ids, tokens)
    m.to(torch.bfloat16)
    assert m.compiled
    eager = copy.deepcopy(m)  # (copies decode eagerly)
    assert relative_error(_forced(m, ids, tokens), _forced(eager, ids, tokens)) < 0.03  # bf16 paths differ ~1 %
    quantize(m.float(), 8)
    quantize(eager.float(), 8)
    torch.testing.assert_close(_forced(m, ids, tokens), _forced(eager, ids, tokens), atol=2e-2, rtol=1e-4)


class _Scale(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(1.0, n + 1))

    def step(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w.sum()


def test_each_compiled_step_has_entries_of_its_own():
    # the decoding step's guards skip the weights' shapes (qwenlm.compiling): a second module whose weight
    # has another shape must not run the first one's graph, which dynamo would offer it on a shared code object
    from qwenlm.compiling import compile_method, skip_module_bookkeeping

    small, large = _Scale(3), _Scale(5)
    x = torch.ones(2)
    with torch.no_grad():
        for m in (small, large):
            assert torch.equal(compile_method(m.step, guard_filter_fn=skip_module_bookkeeping)(x), m.step(x))


def test_kernel_layouts_are_marked_static_for_the_compiled_step():
    # the kernel layouts of quantised layers (unsaved buffers; qwenlm.compiling.mark_layouts_static): with
    # dynamic=True each would otherwise bring its own size symbols into the compiled step
    from qwenlm.quant import cpu_kernel
    from qwenlm.quant.linear import Int4Linear

    if not cpu_kernel.available():
        pytest.skip(f"int4/int8 CPU kernels: {cpu_kernel.status()}")
    m = quantize(random_model(tiny_config(hidden_size=64, kv_channels=16), seed=4), 4).compile_inference()
    layers = [layer for layer in m.modules() if isinstance(layer, Int4Linear) and layer._path == "own"]
    assert layers
    assert all(layer._scales_nk._dynamo_static_indices == {0, 1, 2} for layer in layers)
