"""qwenlm's own GGUF header parser (``gguf_file``) reads what ``gguf.GGUFReader`` reads, and says what is wrong
with a file it cannot read."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from qwenlm.gguf_file import GGUFFormatError, read_gguf_file
from tests.shared import demo_model_or_skip
from tests.tiny_gguf import Q, TinySpec, write_tiny_gguf

gguf = pytest.importorskip("gguf")


def _same_as_gguf_reader(path):
    ours = read_gguf_file(path)
    reader = gguf.GGUFReader(path)
    theirs = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours.metadata[key] == value and type(ours.metadata[key]) is type(value), key
    assert [t.name for t in ours.tensors] == [t.name for t in reader.tensors]
    for mine, t in zip(ours.tensors, reader.tensors):
        assert mine.shape == tuple(int(d) for d in t.shape) and mine.type_name == t.tensor_type.name, t.name
        assert mine.n_elements == t.n_elements and mine.data.dtype == t.data.dtype, t.name
        assert mine.data.shape == t.data.shape and np.array_equal(mine.data, t.data, equal_nan=True), t.name
        assert not mine.data.flags.writeable  # a view of the map, not a copy
    return ours


def test_reads_what_gguf_reader_reads(tmp_path):
    types = {"token_embd.weight": Q.Q8_0, "attn_v.weight": Q.F16, "ffn_down.weight": Q.Q4_0, "attn_q.weight": Q.Q5_0}
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, TinySpec(types=types))
    ours = _same_as_gguf_reader(path)
    assert ours.version == 3 and ours.metadata["general.architecture"] == "qwen2"
    assert isinstance(ours.metadata["tokenizer.ggml.tokens"], list)


@pytest.mark.slow
def test_reads_the_demo_model_as_gguf_reader_does():
    _same_as_gguf_reader(demo_model_or_skip())


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path.read_bytes()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b[:200], r"the header ends early"),
        (lambda b: b[:30], r"the header ends early or is damaged at byte"),
        (lambda b: b[:-100], r"ends at byte [\d,]+, past the end of the file"),
        (lambda b: b[:4] + struct.pack("<I", 7) + b[8:], r"GGUF version 7 is not supported"),
        (lambda b: b[:4] + struct.pack(">I", 3) + b[8:], r"version 50331648 \(a big-endian file\)"),
        (lambda b: b"GGUX" + b[4:], r"starts with b'GGUX'"),
        (lambda b: b"", r"empty"),
    ],
)
def test_a_damaged_file_is_refused_with_the_reason(tiny_bytes, tmp_path, change, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(change(tiny_bytes))
    with pytest.raises(GGUFFormatError, match=message):
        read_gguf_file(path)


def test_a_file_cut_anywhere_in_its_header_is_refused(tiny_bytes, tmp_path):
    """Cuts inside every kind of value, the vocabulary's string arrays included (read in one loop of their own)."""
    path = tmp_path / "cut.gguf"
    header = read_gguf_file_header_size(tiny_bytes, tmp_path)
    for cut in range(24, header, max(1, header // 400)):
        path.write_bytes(tiny_bytes[:cut])
        with pytest.raises(GGUFFormatError, match="ends early|damaged|past the end"):
            read_gguf_file(path)


def read_gguf_file_header_size(data: bytes, tmp_path) -> int:
    """About where the tiny file's tensor data begins: its size less the tensors' bytes (alignment padding is
    in the header's share)."""
    path = tmp_path / "whole.gguf"
    path.write_bytes(data)
    return len(data) - sum(t.data.nbytes for t in read_gguf_file(path).tensors)


def test_a_header_is_parsed_once_per_version_of_the_file(tmp_path, monkeypatch):
    import qwenlm.gguf_file

    path = tmp_path / "m.gguf"
    write_tiny_gguf(path)
    parses = []
    parse = qwenlm.gguf_file._parse_header
    monkeypatch.setattr(qwenlm.gguf_file, "_parse_header", lambda buf: parses.append(1) or parse(buf))
    first = read_gguf_file(path)
    first.metadata["general.architecture"] = "changed by a caller"
    second = read_gguf_file(path)
    assert len(parses) == 1 and second.metadata["general.architecture"] == "qwen2"
    assert [t.name for t in second.tensors] == [t.name for t in first.tensors]
    write_tiny_gguf(path, TinySpec(types={"ffn_down.weight": Q.Q4_0}))  # rewritten: parsed again, its new types
    third = read_gguf_file(path)
    assert len(parses) == 2 and {t.name: t.type_name for t in third.tensors}["blk.0.ffn_down.weight"] == "Q4_0"
