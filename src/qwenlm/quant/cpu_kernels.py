"""The AVX-512 int8 matrix-vector kernel of ``gemv.c``, compiled once with the system C compiler and called
through ctypes. Optional: without a compiler, without AVX-512, or with ``QWENLM_NO_KERNELS=1`` the
int8 linears use PyTorch's packed-weight kernel instead. (4-bit decoding uses PyTorch's int4 kernel, which
measured faster here than a plain AVX-512 one.)"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def _cpu_has_avx512() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512f" in flags and " avx512bw" in flags


def _cache_dir() -> Path:
    root = os.environ.get("QWENLM_CACHE") or Path.home() / ".cache" / "qwenlm"
    return Path(root) / "kernels"


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be used (the reason goes to stderr once)."""
    if os.environ.get("QWENLM_NO_KERNELS") == "1" or sys.platform != "linux" or not _cpu_has_avx512():
        return None
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        print("qwenlm: no C compiler found; quantised decoding uses PyTorch's kernels", file=sys.stderr)
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"gemv-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            result = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
            if result.returncode != 0:
                print(f"qwenlm: compiling {SOURCE.name} failed; quantised decoding uses PyTorch's kernels:\n"
                      f"{result.stderr[-2000:]}", file=sys.stderr)  # fmt: skip
                return None
            os.replace(out, target)  # atomic: a concurrent process sees the whole file or none
    lib = ctypes.CDLL(str(target))
    ptr, long_ = ctypes.c_void_p, ctypes.c_long
    lib.qwenlm_gemv_i8.argtypes = [ptr, ptr, ptr, ptr, long_, long_, long_, ctypes.c_int]
    return lib


def _p(t: torch.Tensor) -> int:
    return t.data_ptr()


def gemv_i8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) fp32 contiguous, weight (N, K) int8, scale (N,) fp32 -> (M, N) fp32."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    library().qwenlm_gemv_i8(_p(x), _p(weight), _p(scale), _p(y), m, n, k, torch.get_num_threads())
    return y
