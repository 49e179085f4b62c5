"""AOTInductor programs kept on disk (``<cache_dir>/aoti``, see ``qwenlm.user_cache``), so that a later process
loads in a moment the decoding step that took a minute or more to compile.

A program is stored under a hash of everything its machine code follows from: the exported graph (its operators,
and the shapes, strides and dtypes of its inputs), the range of its dynamic dimensions, PyTorch's version and
inductor settings, the CPU's instruction sets, and the source of qwenlm's C++ kernels that it calls. The
weights are inputs of the program, not part of it, so one file serves every checkpoint of the same shapes and
layouts. The ``KEEP`` most recently used files are kept. A file that does not load is compiled again and
replaced; where the folder cannot be written, the program is compiled in a temporary folder, as with no store.

Exporting the step to get that hash takes ~5 s for the demo model, most of a later process's wait. So each
program is also found by a second key, computed without exporting (``step_key``): a hash of what the export
follows from, i.e. qwenlm's Python and C++ source, the same settings, the module tree (classes, plain
attributes, the layouts of parameters and buffers) and the layouts of the example inputs. A small
``<step key>.key`` file names the program's file. The decoder checks a program found this way against the
eager step before it trusts it (``generation.exported``), and ``forget`` drops a key that led astray.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import hashlib
import os
import platform
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..quant import cpu_kernel
from ..user_cache import cache_dir

FOLDER = "aoti"
KEEP = 8  # files kept; one decoding step of the demo model is ~9 MB


def folder() -> Path:
    return cache_dir() / FOLDER


def fingerprint(exported: torch.export.ExportedProgram) -> str:
    """A hash of what the compiled program depends on (see the module doc), the weights' values excepted."""
    inputs = [(n.name, _describe(n.meta.get("val"))) for n in exported.graph.nodes if n.op == "placeholder"]
    ranges = sorted((str(k), str(v)) for k, v in exported.range_constraints.items())
    return _hash([*_environment(), repr(inputs), repr(ranges), exported.graph_module.code])


def step_key(module: nn.Module, example: Any, skip: frozenset[str] = frozenset()) -> str | None:
    """A hash of what exporting ``module`` on inputs laid out as ``example`` follows from, computed without
    exporting it (see the module doc); ``skip``: attributes that the exported code does not read (e.g. the
    decoders kept on the model). None where a module has hooks (or hooks are registered for all modules),
    whose effect a key cannot name."""
    from torch.nn.modules import module as module_hooks

    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return None
    modules = []
    for name, m in module.named_modules(remove_duplicate=False):
        attributes = {k: v for k, v in vars(m).items() if k not in _MODULE_INTERNALS and k not in skip}
        if any(isinstance(v, dict) and v for k, v in attributes.items() if k.endswith(_HOOKS)):
            return None
        tensors = {k: _describe(v) for k, v in (*m._parameters.items(), *m._buffers.items())}
        modules.append((name, f"{type(m).__module__}.{type(m).__qualname__}", _state(attributes), tensors))
    globals_ = [torch.get_default_dtype(), torch.get_float32_matmul_precision(),
                torch.are_deterministic_algorithms_enabled(), torch.backends.mkldnn.enabled]  # fmt: skip
    return _hash(["step", *_environment(), _sources(), repr(globals_), repr(modules), _state(example)])


_MODULE_INTERNALS = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})
_HOOKS = ("hooks", "hooks_with_kwargs", "hooks_always_called")


def _state(value: Any, depth: int = 0) -> str:
    """What ``value`` is, as the same text in every process: plain values by repr, tensors by layout (a tensor
    that is not a parameter or buffer by its kind only: such tables grow with use, and the step reads none),
    containers by their contents, objects by their public attributes, three levels deep (their private ones
    are caches, such as the rotary tables, which the step does not read), functions by name."""
    if isinstance(value, torch.Tensor):
        return _describe(value) if depth == 0 else "tensor"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_state(v, depth) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_state(v, depth + 1)}" for k, v in sorted(value.items(), key=repr)) + "}"
    if value is None or isinstance(value, (bool, int, float, str, enum.Enum, torch.dtype, torch.device)):
        return repr(value)
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if depth < 3 and hasattr(value, "__dict__"):
        return f"{kind}({_state({k: v for k, v in vars(value).items() if not k.startswith('_')}, depth + 1)})"
    return kind


@functools.cache
def _sources() -> str:
    """A hash of qwenlm's Python source, which builds the exported graph."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()  # (the C++ kernels it calls are hashed in _environment)


@functools.cache
def _kernels() -> str:
    digest = hashlib.sha256()
    for path in cpu_kernel.SOURCES:
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()


def _environment() -> list[str]:
    from torch._inductor import config

    settings = sorted((k, v) for k, v in config.save_config_portable().items() if _plain(v))
    return [torch.__version__, _cpu(), _kernels(), repr(settings)]


@functools.cache
def _cpu() -> str:
    """The CPU the machine code is for: its architecture, PyTorch's vector level and (on Linux) every instruction
    set flag, so that a store shared between machines never hands one a program with instructions it lacks.
    (Inductor's ``pick_vec_isa`` builds test programs to tell: ~1 s in every process.)"""
    flags = ""
    with contextlib.suppress(OSError):
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()} {' '.join(sorted(flags.split()))}"


def _hash(parts: list[str]) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:40]


@dataclass
class Stored:
    """A loaded program (``aoti_load_package``'s model) and what the store knows of it."""

    program: Any
    name: str  # its file's stem, the hash of its exported graph (``fingerprint``)
    from_store: bool  # loaded from disk, not compiled in this process
    checked: bool = True  # found by a step key: whether exporting proved that key right (no check needed)


def load_known(key: str) -> Stored | None:
    """The stored program that ``key`` (a ``step_key``) names, loaded; None where there is none (or it does
    not load: the decoder then exports the step, which replaces a damaged file)."""
    note = folder() / f"{key}.key"
    try:
        name, *checked = note.read_text().split()
        path = folder() / f"{name}.pt2"
        program = torch._inductor.aoti_load_package(str(path)) if path.is_file() else None
    except Exception:  # no key, an unreadable one or a program that does not load: exported and compiled anew
        return None
    if program is None:
        return None
    _touch(path)
    _touch(note)
    return Stored(program, name, True, checked == ["checked"])


def note(key: str, name: str, checked: bool = False) -> None:
    """Note that the ``step_key`` ``key`` names the program ``name``; ``checked``: exporting proved it."""
    path = folder() / f"{key}.key"
    with contextlib.suppress(OSError):  # a read-only store still serves; the next process exports again
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(f"{name} checked\n" if checked else f"{name}\n")
        os.replace(tmp, path)  # atomic, as the programs


def forget(key: str) -> None:
    """Drop the ``step_key`` ``key`` (its program stays, found again through its own key)."""
    with contextlib.suppress(OSError):
        (folder() / f"{key}.key").unlink(missing_ok=True)


def load_or_compile(exported: torch.export.ExportedProgram, known_as: str | None = None) -> Stored:
    """The program for ``exported``: from the store, else compiled now and stored for the next process;
    ``known_as``: its ``step_key``, noted so that a later process finds it without exporting."""
    store = folder()
    name = fingerprint(exported)
    path = store / f"{name}.pt2"
    program, from_store = _load_or_compile(exported, store, path)
    if known_as is not None and path.is_file():
        note(known_as, name)
    return Stored(program, name, from_store)


def _load_or_compile(exported: torch.export.ExportedProgram, store: Path, path: Path) -> tuple[Any, bool]:
    if path.is_file():
        try:
            compiled = torch._inductor.aoti_load_package(str(path))
        except Exception as e:  # damaged or written by another build: compile it again, replacing it
            warnings.warn(f"qwenlm: the stored decoding program {path} could not be loaded ({_reason(e)}); "
                          "compiling it again", stacklevel=5)  # fmt: skip
        else:
            _touch(path)  # recently used: kept by the pruning
            return compiled, True
    try:
        store.mkdir(parents=True, exist_ok=True)
        building, target = tempfile.TemporaryDirectory(prefix=".building-", dir=store), path
    except OSError as e:
        warnings.warn(f"qwenlm: cannot keep compiled decoding programs in {store} ({_reason(e)}); they are compiled "
                      "again in each process. Set QWENLM_CACHE to a writable folder", stacklevel=5)  # fmt: skip
        building, target = tempfile.TemporaryDirectory(prefix="qwenlm-aoti-"), None
    with building as tmp:
        built = Path(torch._inductor.aoti_compile_and_package(exported, package_path=str(Path(tmp) / "step.pt2")))
        if target is not None:
            try:
                os.replace(built, target)  # atomic: another process sees the whole file or none
                built = target
            except OSError as e:
                warnings.warn(f"qwenlm: could not store the compiled decoding program as {target} ({_reason(e)})",
                              stacklevel=5)  # fmt: skip
        compiled = torch._inductor.aoti_load_package(str(built))
    if target is not None:
        _prune(store)
    return compiled, False


def _prune(store: Path) -> None:
    """Delete all but the ``KEEP`` most recently used programs, and the step keys that name a deleted one."""
    with contextlib.suppress(OSError):  # another process pruned at the same time: nothing lost
        files = sorted(store.glob("*.pt2"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in files[KEEP:]:
            old.unlink(missing_ok=True)
        kept = {p.stem for p in files[:KEEP]}
        for note in store.glob("*.key"):
            with contextlib.suppress(OSError):
                if note.read_text().split()[0] not in kept:
                    note.unlink(missing_ok=True)


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
