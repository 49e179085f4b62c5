"""Compiled decoding programs kept on disk (``generation.program_store``): a later decoder loads what an earlier
one compiled, without exporting the step again, a key that names a wrong program is dropped, a damaged file is
compiled again, an unwritable folder only costs the compiling, and the keys follow what the machine code
depends on."""

from __future__ import annotations

import contextlib
import os
import warnings

import pytest
import torch

from qwenlm.generation import exported, program_store
from qwenlm.quant import quantize
from tests.builders import greedy_decode, random_model, tiny_config
from tests.conftest import USERS_FOLDER


def _decode(model, ids, steps, capacity=16):
    return greedy_decode(model, ids, None, steps, capacity=capacity)[0]


def _through_a_new_decoder(model, ids, steps, warns: str | None = None, capacity=16):
    """``_decode`` after ``compile_inference()`` (a new decoder, as in a new process), expecting a warning that
    matches ``warns``; then eager again. The logits and the decoder that made them."""
    try:
        with pytest.warns(UserWarning, match=warns) if warns else contextlib.nullcontext():
            logits = _decode(model.compile_inference(), ids, steps, capacity)
        return logits, model._exported
    finally:
        model.compile_inference(False)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), seed=11)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 151643, (1, 5), generator=torch.Generator().manual_seed(2))


@pytest.fixture
def store(tmp_path, monkeypatch):
    """The store where users have it, under ``$QWENLM_CACHE`` (the other tests use a folder of the session)."""
    monkeypatch.setattr(program_store, "folder", USERS_FOLDER)
    monkeypatch.setenv("QWENLM_CACHE", str(tmp_path))
    return tmp_path / program_store.FOLDER


def _compiling_fails(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("compiled although a stored program was there")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fail)


def _exporting_fails(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("exported although the stored program's step key was there")

    monkeypatch.setattr(torch.export, "export", fail)


def test_a_later_decoder_loads_the_stored_program(model, ids, store, monkeypatch):
    eager = _decode(model, ids, 3)
    first, decoder = _through_a_new_decoder(model, ids, 3)
    assert len(decoder._programs) == 1 and decoder.programs_from_store == 0
    (stored,) = store.glob("*.pt2")
    (key,) = store.glob("*.key")  # the step key, naming the program
    assert key.read_text().split() == [stored.stem]
    assert not [p for p in store.iterdir() if p.suffix not in (".pt2", ".key")]  # no build folder left behind
    _compiling_fails(monkeypatch)
    _exporting_fails(monkeypatch)  # found by the step key: not even exported
    later, decoder = _through_a_new_decoder(model, ids, 3)
    assert decoder.failure is None and decoder.programs_from_store == 1
    assert all(p.unchecked_key is None for p in decoder._programs.values())  # its first step matched the eager one
    torch.testing.assert_close(first, eager, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(later, first, atol=0, rtol=0)
    assert list(store.glob("*.pt2")) == [stored]


def test_a_step_key_that_names_a_wrong_program_is_dropped(model, ids, store, monkeypatch):
    # a key that misses what sets two models apart (here: all of it) hands one the other's program; its first step
    # disagrees with the eager step, so the key is dropped and the step exported and compiled for this model
    other = random_model(tiny_config(layer_norm_epsilon=0.5), seed=11)  # the same tensors, another graph
    monkeypatch.setattr(program_store, "step_key", lambda *args: "0" * 40)
    _through_a_new_decoder(model, ids, 2)
    (wrong,) = store.glob("*.pt2")
    eager = _decode(other, ids, 2)
    wrong_logits = r"found for this model gave other logits .*exported the step again"
    got, decoder = _through_a_new_decoder(other, ids, 2, wrong_logits)
    assert decoder.failure is None and decoder.programs_from_store == 0
    torch.testing.assert_close(got, eager, atol=2e-4, rtol=1e-4)
    (right,) = set(store.glob("*.pt2")) - {wrong}
    assert (store / f"{'0' * 40}.key").read_text().split() == [right.stem]  # noted again, for the right program


def test_a_step_key_proved_right_by_exporting_is_not_checked_again(model, ids, store, monkeypatch):
    # should the check fail from rounding alone (a tolerance too tight), exporting makes the same program: the key
    # was right, so it is kept, marked checked, and trusted from then on, without a warning
    first, _ = _through_a_new_decoder(model, ids, 2)
    (key,) = store.glob("*.key")
    monkeypatch.setattr(exported, "AGREEMENT", {})
    monkeypatch.setattr(exported, "LOW_PRECISION_AGREEMENT", -1.0)  # every check fails
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again, _ = _through_a_new_decoder(model, ids, 2)
    assert not [w for w in caught if "qwenlm" in str(w.message)]
    assert key.read_text().split() == [next(store.glob("*.pt2")).stem, "checked"]
    _exporting_fails(monkeypatch)
    later, decoder = _through_a_new_decoder(model, ids, 2)
    assert decoder.programs_from_store == 1
    torch.testing.assert_close(later, first, atol=0, rtol=0)
    torch.testing.assert_close(again, first, atol=0, rtol=0)


def test_caches_of_other_capacities_share_the_stored_program(model, ids, store, monkeypatch):
    # the capacity is a dynamic dimension: a cache of 48 and one of 64 slots run one program, so a later process
    # with another prompt or generation length loads it (the traced examples' strides once gave them two keys)
    first, _ = _through_a_new_decoder(model, ids, 3, capacity=48)
    _compiling_fails(monkeypatch)
    later, decoder = _through_a_new_decoder(model, ids, 3, capacity=64)
    assert decoder.failure is None and decoder.programs_from_store == 1 and len(list(store.glob("*.pt2"))) == 1
    torch.testing.assert_close(later, first, atol=2e-4, rtol=1e-4)


def test_a_damaged_file_is_compiled_again_and_replaced(model, ids, store):
    eager = _decode(model, ids, 2)
    _through_a_new_decoder(model, ids, 2)
    (stored,) = store.glob("*.pt2")
    stored.write_bytes(b"not a program")
    damaged = r"stored decoding program .* could not be loaded .*compiling it again"
    got, decoder = _through_a_new_decoder(model, ids, 2, damaged)
    assert decoder.failure is None
    torch.testing.assert_close(got, eager, atol=2e-4, rtol=1e-4)
    assert stored.stat().st_size > 1000  # the new program took the damaged file's place


def test_an_unwritable_folder_only_costs_the_compiling(model, ids, tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setattr(program_store, "folder", USERS_FOLDER)
    monkeypatch.setenv("QWENLM_CACHE", str(blocked))  # its "aoti" folder cannot be made
    eager = _decode(model, ids, 2)
    unwritable = r"cannot keep compiled decoding programs in .*a-file.*QWENLM_CACHE"
    got, decoder = _through_a_new_decoder(model, ids, 2, unwritable)
    assert decoder.failure is None
    torch.testing.assert_close(got, eager, atol=2e-4, rtol=1e-4)


class _Scale(torch.nn.Module):
    def forward(self, x, w):
        return (x * w).sum(-1)


def _export(x, w, dynamic=True):
    n = torch.export.Dim("n", min=2)
    return torch.export.export(_Scale(), (x, w), dynamic_shapes=({0: n}, {0: n}) if dynamic else None)


def test_the_key_follows_shapes_dtypes_layouts_and_code_but_not_values():
    x, w = torch.randn(4, 8), torch.randn(4, 8)
    key = program_store.fingerprint(_export(x, w))
    assert program_store.fingerprint(_export(torch.randn(4, 8), torch.zeros(4, 8))) == key  # values are not in it
    assert program_store.fingerprint(_export(torch.randn(6, 8), torch.randn(6, 8))) == key  # a dynamic size
    assert program_store.fingerprint(_export(x, w, dynamic=False)) != key
    assert program_store.fingerprint(_export(x, w.double())) != key
    assert program_store.fingerprint(_export(x, torch.randn(8, 4).t())) != key  # other strides
    assert program_store.fingerprint(_export(torch.randn(4, 9), torch.randn(4, 9))) != key


def _step_key(model, batch=1, cache_dtype=torch.float32):
    kv = [torch.zeros(batch, 2, 16, 8, dtype=cache_dtype)] * 2
    return program_store.step_key(model, (torch.zeros(batch, 1, dtype=torch.long), kv, kv), frozenset({"_exported"}))


def test_the_step_key_follows_the_modules_and_input_layouts_but_not_values():
    model = random_model(tiny_config(), seed=1)
    key = _step_key(model)
    assert len(key) == 40 and _step_key(random_model(tiny_config(), seed=2)) == key  # other weights
    model.transformer.rotary.cos_sin(0, 300, [1.0], model.device)  # a grown rotary table: not read by the step
    model._exported = object()  # a skipped attribute
    assert _step_key(model) == key
    assert _step_key(model, batch=2) != key
    assert _step_key(model, cache_dtype=torch.bfloat16) != key
    assert _step_key(random_model(tiny_config(layer_norm_epsilon=1e-5))) != key  # a plain attribute of a module
    assert _step_key(random_model(tiny_config(use_logn_attn=False))) != key  # the config, another position policy
    assert _step_key(random_model(tiny_config()).to(torch.bfloat16)) != key  # tensor layouts
    assert _step_key(quantize(random_model(tiny_config()), 8)) != key  # other modules
    hooked = random_model(tiny_config())
    hooked.transformer.ln_f.register_forward_hook(lambda *args: None)
    assert _step_key(hooked) is None  # a hook's effect cannot be named: always exported
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert _step_key(model) is None  # nor that of a hook on every module
    finally:
        handle.remove()
    assert _step_key(model) == key


def test_only_the_most_recently_used_files_are_kept(tmp_path):
    for i in range(program_store.KEEP + 3):
        path = tmp_path / f"{i:02d}.pt2"
        path.write_bytes(b"x")
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
        (tmp_path / f"key{i:02d}.key").write_text(f"{i:02d}\n")
    os.utime(tmp_path / "00.pt2")  # used just now
    program_store._prune(tmp_path)
    kept = sorted(p.name for p in tmp_path.glob("*.pt2"))
    assert len(kept) == program_store.KEEP
    assert "00.pt2" in kept and not {"01.pt2", "02.pt2", "03.pt2"} & set(kept)
    keys = sorted(p.stem[3:] for p in tmp_path.glob("*.key"))  # the step keys of deleted programs go with them
    assert keys == sorted(p[:2] for p in kept)
