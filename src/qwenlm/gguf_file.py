"""A GGUF file's metadata and tensor directory, parsed straight from a memory map of the file.

The layout (ggml's ``docs/gguf.md``, versions 2 and 3, little-endian): ``GGUF``, a uint32 version, uint64 counts
of tensors and of metadata pairs; the pairs (a string key, a uint32 value type, the value); per tensor its name,
uint32 number of dimensions, uint64 dimensions (innermost first), uint32 ggml type and uint64 offset into the
data section, which starts at the next multiple of ``general.alignment`` (32 by default).

``gguf.GGUFReader`` gives the same, but makes numpy views per part of every value: 9 s for the 151,936 tokens
and 151,387 merges of a Qwen vocabulary (~3 s over a plain ndarray instead of its memmap, as qwenlm used it),
paid three times when a model, its int4 grids and its tokenizer are read. Here each value is read once into
plain Python (strings decoded, numeric arrays through ``numpy``): 0.25 s (``benchmarks/load_gguf.py``).
Tensor data stay in the map (read-only arrays, no copy) until they are dequantised. The table of ggml types
(names, bytes per block) is the gguf package's.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
KEEP_HEADERS = 2  # parsed headers kept (see read_gguf_file)

# metadata value types (GGUFValueType): struct format of the scalar ones
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_LENGTH = struct.Struct("<Q")  # a string's byte count
# ggml types whose data GGUFReader (and so gguf.quants.dequantize) hands out as typed arrays, not bytes
_TYPED = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16, "I32": np.int32,
          "I64": np.int64}  # fmt: skip


_HEADERS: dict[tuple, tuple[int, dict[str, Any], list[tuple], int]] = {}


class GGUFFormatError(ValueError):
    """The bytes do not make a GGUF file this reader understands (a short or damaged file, another version)."""


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: innermost dimension first
    type_name: str  # ggml type, e.g. "Q4_K"
    n_elements: int
    data: np.ndarray  # read-only view of the map: typed for F32/F16/..., else (..., bytes per row) uint8


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]
    identity: tuple = ()  # (path, device, inode, size, mtime): the file as it was read


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.at = buf, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        end = self.at + n
        if end > len(self.buf):
            raise GGUFFormatError(f"the header ends early: a string of {n:,} bytes at byte {self.at:,} runs past it")
        text = self.buf[self.at : end].decode("utf-8")
        self.at = end
        return text

    def strings(self, n: int) -> list[str]:
        """``n`` strings in a row (a vocabulary's ~150K tokens and merges): ``string``'s loop without its calls."""
        buf, at, size, out = self.buf, self.at, len(self.buf), []
        length_at = _LENGTH.unpack_from
        for _ in range(n):
            if at + 8 > size:
                break
            (length,) = length_at(buf, at)
            end = at + 8 + length
            if end > size:
                break
            out.append(buf[at + 8 : end].decode("utf-8"))
            at = end
        self.at = at
        if len(out) < n:  # the header ends early: the usual errors, at the string that runs past it
            out.append(self.string())
        return out

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.scalar("I"), self.scalar("Q")
            if item == _STRING:
                return self.strings(n)
            if item in _NUMPY:
                end = self.at + n * np.dtype(_NUMPY[item]).itemsize
                if end > len(self.buf):  # (numpy's own error would not say which file or where)
                    raise GGUFFormatError(f"the header ends early: an array of {n:,} values at byte {self.at:,} "
                                          "runs past it")  # fmt: skip
                array = np.frombuffer(self.buf, dtype=_NUMPY[item], count=n, offset=self.at)
                self.at += array.nbytes
                return array.tolist()
            if item == _ARRAY:
                return [self.value(_ARRAY) for _ in range(n)]
            raise GGUFFormatError(f"unknown array item type {item} at byte {self.at:,}")
        raise GGUFFormatError(f"unknown metadata value type {kind} at byte {self.at:,}")


def read_gguf_file(path: str | Path) -> GGUFFile:
    """Parse ``path``'s header; ``GGUFFormatError`` where it is short, damaged or not version 2/3. The parsed
    header of the last few files is kept, keyed by the file's identity, size and modification time: loading a
    model reads it for the tokenizer, the weights and the int4 grids (each ~1 s of parsing for Qwen's
    vocabulary). Its metadata values are shared between the calls: read them, do not change them."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # the ggml type table

    path = Path(path)
    with path.open("rb") as f:
        st = os.fstat(f.fileno())
        if st.st_size == 0:
            raise GGUFFormatError("the file is empty")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays open while arrays view it
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    header = _HEADERS.pop(key, None) or _parse_header(buf)
    _HEADERS[key] = header  # the most recent last
    while len(_HEADERS) > KEEP_HEADERS:
        _HEADERS.pop(next(iter(_HEADERS)))
    version, metadata, directory, end = header
    metadata = dict(metadata)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFFormatError(f"general.alignment is {alignment!r}, not a power of two")
    start = -(-end // alignment) * alignment
    tensors, seen = [], set()
    for name, dims, type_id, offset in directory:
        if name in seen:
            raise GGUFFormatError(f"tensor {name!r} is listed twice")
        seen.add(name)
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise GGUFFormatError(f"tensor {name!r} has ggml type {type_id}, unknown to the gguf package") from None
        per_block, block_bytes = GGML_QUANT_SIZES[qtype]
        n = int(np.prod(dims, dtype=np.int64))
        rows = tuple(reversed(dims))
        if n % per_block or (rows and rows[-1] % per_block):
            raise GGUFFormatError(f"tensor {name!r}: {list(dims)} does not divide into {qtype.name} blocks")
        nbytes, at = n // per_block * block_bytes, start + offset
        if at + nbytes > len(buf):
            raise GGUFFormatError(f"tensor {name!r} ends at byte {at + nbytes:,}, past the end of the file")
        if qtype.name in _TYPED:
            data = np.frombuffer(buf, dtype=_TYPED[qtype.name], count=n, offset=at).reshape(rows)
        else:
            data = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=at)
            data = data.reshape(*rows[:-1], rows[-1] // per_block * block_bytes) if rows else data
        tensors.append(GGUFTensor(name, dims, qtype.name, n, data))
    return GGUFFile(path, version, metadata, tensors, key)


def _parse_header(buf: mmap.mmap) -> tuple[int, dict[str, Any], list[tuple], int]:
    """The version, metadata, tensor directory (name, dims, ggml type id, offset) and where the header ends."""
    c = _Cursor(buf)
    try:
        if buf[:4] != MAGIC:
            raise GGUFFormatError(f"it starts with {bytes(buf[:4])!r}, not {MAGIC!r}")
        c.at = 4
        version = c.scalar("I")
        if version not in VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            hint = " (a big-endian file)" if swapped in VERSIONS else ""
            raise GGUFFormatError(f"GGUF version {version}{hint} is not supported, only {VERSIONS}")
        n_tensors, n_pairs = c.scalar("Q"), c.scalar("Q")
        metadata = {}
        for _ in range(n_pairs):
            key = c.string()
            metadata[key] = c.value(c.scalar("I"))
        directory = []
        for _ in range(n_tensors):
            name = c.string()
            dims = tuple(c.scalar("Q") for _ in range(c.scalar("I")))
            directory.append((name, dims, c.scalar("I"), c.scalar("Q")))
    except (struct.error, UnicodeDecodeError) as e:
        raise GGUFFormatError(f"the header ends early or is damaged at byte {c.at:,} ({e})") from e
    return version, metadata, directory, c.at
