"""The CPU decoding step compiled ahead of time (``generation.exported``): the eager step's tokens and logits for
padded batches and growing caches from one program, bound to the model's own tensors, compiled again when
they change layout, and stepping aside (with a warning) where it cannot be built or does not apply."""

from __future__ import annotations

import pytest
import torch

from qwenlm.quant import quantize
from tests.builders import greedy_decode, random_model, relative_error, tiny_config
from tests.kernels import needs_kernel


def _decode(model, ids, mask, steps, capacity):
    """The logits (steps, B, V) before each of ``steps`` greedy steps on a padded batch, from a cache that starts
    with ``capacity``."""
    return greedy_decode(model, ids, mask, steps, capacity=capacity)[0][:, :steps].transpose(0, 1)


@pytest.fixture(scope="module")
def int4_model():
    # head size 64: attention through qwenlm's kernel (the first `length` keys of the whole buffers)
    config = tiny_config(hidden_size=128, num_attention_heads=2, kv_channels=64, intermediate_size=256)
    return quantize(random_model(config, seed=5), 4)


@pytest.fixture(scope="module")
def ids_and_mask():
    ids = torch.randint(0, 151643, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    return ids, mask


@needs_kernel
def test_matches_eager_across_a_growing_cache_from_one_program(int4_model, ids_and_mask):
    ids, mask = ids_and_mask
    eager = _decode(int4_model, ids, mask, 12, capacity=16)  # grows 16 -> 32 at the 8th new token
    m = int4_model.compile_inference()
    try:
        exported = _decode(m, ids, mask, 12, capacity=16)
        again = _decode(m, ids, mask, 5, capacity=48)  # another capacity, later generation: the same program
        assert m._exported.failure is None
        assert list(m._exported._programs) == [(2, 1, False, torch.float32)]
        assert relative_error(exported, eager) < 1e-3  # (fused float ops round the activations a hair differently)
        assert torch.equal(exported.argmax(-1), eager.argmax(-1))
        torch.testing.assert_close(again, exported[:5])
    finally:
        m.compile_inference(False)


@needs_kernel
def test_runs_on_the_models_own_tensors(int4_model, ids_and_mask):
    ids, mask = ids_and_mask
    m = int4_model.compile_inference()
    kept = m.transformer.ln_f.weight
    saved = kept.detach().clone()
    try:
        _decode(m, ids, mask, 2, capacity=16)
        (program,) = m._exported._programs.values()
        assert any(w is kept for w in program.weights)  # no copy of the weights in the program
        with torch.no_grad():
            kept.zero_()  # seen in place: the final norm's output, so the logits, become 0
            try:
                assert _decode(m, ids, mask, 2, capacity=16)[1:].abs().max() == 0
            finally:
                kept.copy_(saved)
        # a tensor of the same layout put in its place: the program takes it at the next cache
        m.transformer.ln_f.weight = torch.nn.Parameter(torch.zeros_like(saved))
        assert _decode(m, ids, mask, 2, capacity=16)[1:].abs().max() == 0
        assert list(m._exported._programs.values()) == [program]
        # one of another layout (a cast): the program is dropped, to be compiled again
        m.transformer.ln_f.weight = torch.nn.Parameter(saved.double())
        m._exported._forget_stale()
        assert not m._exported._programs
    finally:
        m.transformer.ln_f.weight = torch.nn.Parameter(saved)
        m.compile_inference(False)


def test_steps_aside_with_a_warning_where_it_cannot_be_built(monkeypatch):
    from qwenlm.generation.exported import ExportedDecoder

    m = random_model(tiny_config(), seed=6)
    ids = torch.randint(0, 151643, (1, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    eager = _decode(m, ids, mask, 3, capacity=16)

    def fail(self, cache, tables, by_step_key=True):
        raise RuntimeError("no C++ compiler\nmore detail")

    monkeypatch.setattr(ExportedDecoder, "_export_and_compile", fail)
    m.compile_inference()
    with pytest.warns(UserWarning, match=r"could not be compiled \(RuntimeError: no C\+\+ compiler\)"):
        got = _decode(m, ids, mask, 3, capacity=16)
    assert m._exported.failure == "RuntimeError: no C++ compiler"
    torch.testing.assert_close(got, eager, atol=2e-4, rtol=1e-4)  # through torch.compile


def test_does_not_take_window_attention_or_training():
    m = random_model(tiny_config(), seed=7).compile_inference()
    cache = m.new_cache(16)
    with torch.inference_mode():
        m(torch.tensor([[1, 2, 3]]), past_key_values=cache)
        assert m._exported.supports(cache)
        m.transformer.set_long_context(window="16")
        assert not m._exported.supports(cache)
        m.transformer.set_long_context(window="none")
        m.train()
        assert not m._exported.supports(cache)
    assert not m.eval().compile_inference(ahead_of_time=False)._exported
