"""GGUF blocks dequantised by qwenlm (``gguf_dequant``) come out bit for bit as the gguf package dequantises
them, for every block type qwenlm reads itself, and the loader takes that path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwenlm import gguf_dequant

gguf = pytest.importorskip("gguf")


def _random_blocks(type_name: str, n_blocks: int, seed: int) -> np.ndarray:
    block_bytes = gguf_dequant.BLOCKS[type_name].bytes
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    # finite f16 scales (random bytes can spell inf/NaN): exponent bits below the all-ones pattern
    at = [0, 2] if type_name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else [block_bytes - 2] if type_name == "Q6_K" else [0]
    for a in at:
        blocks[:, a + 1] &= 0b1011_1111
    return blocks


@pytest.mark.parametrize("type_name", sorted(gguf_dequant.BLOCKS))
def test_bit_identical_to_the_gguf_package(type_name, monkeypatch):
    per_block = gguf_dequant.BLOCKS[type_name].weights
    rows, blocks_per_row = 6, 3
    data = _random_blocks(type_name, rows * blocks_per_row, seed=len(type_name)).reshape(rows, -1)
    data.flags.writeable = False  # as GGUFReader's map
    monkeypatch.setattr(gguf_dequant, "CHUNK_WEIGHTS", 4 * per_block)  # several chunks, one cut mid-row
    ours = gguf_dequant.dequantize(data, type_name, (rows, blocks_per_row * per_block))
    theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name])
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(theirs, dtype=np.float32)))


@pytest.mark.parametrize("type_name", sorted(gguf_dequant.BLOCKS))
def test_codes_scales_and_offsets_give_back_the_values_bit_for_bit(type_name, monkeypatch):
    # what an int8 embedding keeps of a GGUF table (quant.Int8Embedding.from_codes): nothing rounded
    block = gguf_dequant.BLOCKS[type_name]
    rows, blocks_per_row = 5, 2
    data = _random_blocks(type_name, rows * blocks_per_row, seed=7).reshape(rows, -1)
    monkeypatch.setattr(gguf_dequant, "CHUNK_WEIGHTS", 3 * block.weights)
    shape = (rows, blocks_per_row * block.weights)
    codes, scale, zero = gguf_dequant.codes_of(data, type_name, shape)
    assert codes.dtype == torch.int8 and codes.shape == shape and scale.shape == (rows, shape[1] // block.group)
    assert (zero is not None) == (type_name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"))
    assert torch.equal(gguf_dequant.values(codes, scale, zero), gguf_dequant.dequantize(data, type_name, shape))


@pytest.mark.parametrize("type_name", ["Q5_0", "Q5_1"])
def test_a_last_chunk_of_one_block_is_dequantised(type_name, monkeypatch):
    # its fifth bits were read as an int32 view of the bytes, which a one-block chunk cannot give
    monkeypatch.setattr(gguf_dequant, "CHUNK_WEIGHTS", 3 * 32)
    data = _random_blocks(type_name, 4, seed=3)  # chunks of 3 blocks and 1
    theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name]).reshape(4, 32)
    assert torch.equal(gguf_dequant.dequantize(data, type_name, (4, 32)), torch.from_numpy(theirs.astype(np.float32)))


def test_a_size_that_does_not_fit_the_blocks_is_named():
    data = np.zeros((2, 34), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"68 bytes of Q8_0 blocks cannot hold a tensor of shape \[2, 64\]"):
        gguf_dequant.dequantize(data, "Q8_0", (2, 64))


def test_read_gguf_dequantises_block_types_itself(tmp_path, monkeypatch):
    from qwenlm.gguf import read_gguf
    from tests.tiny_gguf import Q, TinySpec, hf_name, write_tiny_gguf

    types = {"token_embd.weight": Q.Q8_0, "ffn_down.weight": Q.Q4_0, "attn_q.weight": Q.Q5_0}  # ffn 96 = 3 blocks
    expected = write_tiny_gguf(tmp_path / "m.gguf", TinySpec(types=types))
    plain = gguf.quants.dequantize

    def only_plain_types(data, qtype):
        assert qtype.name not in gguf_dequant.BLOCKS, f"{qtype.name} went to the gguf package"
        return plain(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", only_plain_types)
    tensors = read_gguf(tmp_path / "m.gguf", progress_bar=False).tensors
    for name, values in expected.items():
        assert torch.equal(tensors[hf_name(name)], values), name
