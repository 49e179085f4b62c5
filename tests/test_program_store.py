"""Compiled decoding programs kept on disk (``generation.program_store``): a later decoder loads what an earlier
one compiled, a damaged file is compiled again, an unwritable folder only costs the compiling, and the key
follows what the machine code depends on."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from qwenlm.generation import program_store
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


def test_a_later_decoder_loads_the_stored_program(model, ids, store, monkeypatch):
    eager = _decode(model, ids, 3)
    first, decoder = _through_a_new_decoder(model, ids, 3)
    assert len(decoder._programs) == 1 and decoder.programs_from_store == 0
    (stored,) = store.glob("*.pt2")
    assert not [p for p in store.iterdir() if p.suffix != ".pt2"]  # no build folder left behind
    _compiling_fails(monkeypatch)
    later, decoder = _through_a_new_decoder(model, ids, 3)
    assert decoder.failure is None and decoder.programs_from_store == 1
    torch.testing.assert_close(first, eager, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(later, first, atol=0, rtol=0)
    assert list(store.glob("*.pt2")) == [stored]


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


def test_only_the_most_recently_used_files_are_kept(tmp_path):
    for i in range(program_store.KEEP + 3):
        path = tmp_path / f"{i:02d}.pt2"
        path.write_bytes(b"x")
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    os.utime(tmp_path / "00.pt2")  # used just now
    program_store._prune(tmp_path)
    kept = sorted(p.name for p in tmp_path.glob("*.pt2"))
    assert len(kept) == program_store.KEEP
    assert "00.pt2" in kept and not {"01.pt2", "02.pt2", "03.pt2"} & set(kept)
