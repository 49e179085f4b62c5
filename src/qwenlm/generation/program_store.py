"""AOTInductor programs kept on disk (``<cache_dir>/aoti``, see ``qwenlm.user_cache``), so that a later process
loads in a moment the decoding step that took a minute or more to compile.

A program is stored under a hash of everything its machine code follows from: the exported graph (its operators,
and the shapes, strides and dtypes of its inputs), the range of its dynamic dimensions, PyTorch's version and
inductor settings, the CPU's vector instructions, and the source of qwenlm's C++ kernels that it calls. The
weights are inputs of the program, not part of it, so one file serves every checkpoint of the same shapes and
layouts. The ``KEEP`` most recently used files are kept. A file that does not load is compiled again and
replaced; where the folder cannot be written, the program is compiled in a temporary folder, as with no store.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ..quant import cpu_kernel
from ..user_cache import cache_dir

FOLDER = "aoti"
KEEP = 8  # files kept; one decoding step of the demo model is ~9 MB


def folder() -> Path:
    return cache_dir() / FOLDER


def fingerprint(exported: torch.export.ExportedProgram) -> str:
    """A hash of what the compiled program depends on (see the module doc), the weights' values excepted."""
    from torch._inductor import config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    settings = sorted((k, v) for k, v in config.save_config_portable().items() if _plain(v))
    inputs = [(n.name, _describe(n.meta.get("val"))) for n in exported.graph.nodes if n.op == "placeholder"]
    kernels = hashlib.sha256(cpu_kernel.SOURCE.read_bytes()).hexdigest() if cpu_kernel.SOURCE.is_file() else ""
    parts = [torch.__version__, platform.machine(), str(pick_vec_isa()), kernels, repr(settings), repr(inputs),
             repr(sorted((str(k), str(v)) for k, v in exported.range_constraints.items())),
             exported.graph_module.code]  # fmt: skip
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:40]


def load_or_compile(exported: torch.export.ExportedProgram) -> tuple[Any, bool]:
    """The loaded program (``aoti_load_package``'s model) for ``exported`` and whether it came from the store
    (else it was compiled now, and stored for the next process)."""
    store = folder()
    path = store / f"{fingerprint(exported)}.pt2"
    if path.is_file():
        try:
            compiled = torch._inductor.aoti_load_package(str(path))
        except Exception as e:  # damaged or written by another build: compile it again, replacing it
            warnings.warn(f"qwenlm: the stored decoding program {path} could not be loaded ({_reason(e)}); "
                          "compiling it again", stacklevel=4)  # fmt: skip
        else:
            _touch(path)  # recently used: kept by the pruning
            return compiled, True
    try:
        store.mkdir(parents=True, exist_ok=True)
        building, target = tempfile.TemporaryDirectory(prefix=".building-", dir=store), path
    except OSError as e:
        warnings.warn(f"qwenlm: cannot keep compiled decoding programs in {store} ({_reason(e)}); they are compiled "
                      "again in each process. Set QWENLM_CACHE to a writable folder", stacklevel=4)  # fmt: skip
        building, target = tempfile.TemporaryDirectory(prefix="qwenlm-aoti-"), None
    with building as tmp:
        built = Path(torch._inductor.aoti_compile_and_package(exported, package_path=str(Path(tmp) / "step.pt2")))
        if target is not None:
            try:
                os.replace(built, target)  # atomic: another process sees the whole file or none
                built = target
            except OSError as e:
                warnings.warn(f"qwenlm: could not store the compiled decoding program as {target} ({_reason(e)})",
                              stacklevel=4)  # fmt: skip
        compiled = torch._inductor.aoti_load_package(str(built))
    if target is not None:
        _prune(store)
    return compiled, False


def _prune(store: Path) -> None:
    """Delete all but the ``KEEP`` most recently used programs."""
    with contextlib.suppress(OSError):  # another process pruned at the same time: nothing lost
        files = sorted(store.glob("*.pt2"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in files[KEEP:]:
            old.unlink(missing_ok=True)


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only store still serves
        os.utime(path)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {tuple(value.shape)} {tuple(value.stride())} {value.device.type}"
    return repr(value)


def _plain(value: Any) -> bool:
    """A setting whose repr is the same in every process (no functions or objects with addresses)."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__
