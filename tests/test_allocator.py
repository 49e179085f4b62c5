"""The C allocator keeps freed megabyte blocks for reuse when a model is loaded on the CPU (``allocator``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qwenlm import allocator
from qwenlm.checkpoint import load_model
from tests.builders import tiny_checkpoint


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.trims = 0

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.trims += 1
        return 1


def test_raises_both_thresholds(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(allocator, "_LIBC", libc)
    monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    assert allocator.keep_freed_memory()
    assert libc.calls == [(allocator.M_MMAP_THRESHOLD, 32 << 20), (allocator.M_TRIM_THRESHOLD, 1 << 30)]
    allocator.release_freed_memory()
    assert libc.trims == 1


def test_switched_off_by_the_environment_or_without_glibc(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(allocator, "_LIBC", libc)
    monkeypatch.setenv(allocator.ENV_SWITCH, "0")
    assert not allocator.keep_freed_memory() and libc.calls == []
    monkeypatch.setattr(allocator, "_LIBC", None)
    monkeypatch.delenv(allocator.ENV_SWITCH)
    assert not allocator.keep_freed_memory()
    allocator.release_freed_memory()  # nothing to call: no error


def test_loading_on_the_cpu_keeps_freed_memory(tmp_path, monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(allocator, "_LIBC", libc)
    monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    load_model(tiny_checkpoint(tmp_path), device="cpu")
    assert (allocator.M_MMAP_THRESHOLD, 32 << 20) in libc.calls


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_the_real_mallopt_accepts_the_values():
    code = "from qwenlm import allocator; print(allocator.keep_freed_memory())"
    env = {k: v for k, v in os.environ.items() if k != allocator.ENV_SWITCH}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ("True" if allocator._LIBC is not None else "False")
