"""The int8 input embedding (``quant.embedding``): a float table rounded per row, a GGUF file's block-quantised
table kept as its own codes (rows bit for bit as the file dequantises them), saved and loaded, and loading
that never holds the float embedding or LM head whole."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import qwenlm.checkpoint
import qwenlm.gguf
from qwenlm import QwenForCausalLM
from qwenlm.checkpoint import load_model
from qwenlm.quant import Int4Linear, Int8Embedding, Int8Linear, quantize
from qwenlm.quant import linear as linear_module
from qwenlm.quant.saving import quantization_of, quantize_checkpoint
from tests.builders import tiny_checkpoint
from tests.tiny_gguf import Q, TinySpec, write_tiny_gguf


def _table(rows: int = 40, dim: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=g) * torch.logspace(-3, 1, rows)[:, None]  # rows of very unlike sizes


def test_a_float_table_is_rounded_per_row_by_its_largest_weight(monkeypatch):
    monkeypatch.setattr("qwenlm.quant.embedding.ROUND_ROWS", 7)  # several passes, the last one short
    w = _table()
    e = Int8Embedding.from_weight(w)
    assert e.codes.dtype == torch.int8 and e.scale.shape == (40, 1) and not e.affine
    assert torch.equal(e.codes.abs().amax(dim=1), torch.full((40,), 127, dtype=torch.int8))
    error = (e.dequantize() - w).abs().amax(dim=1)
    assert (error <= e.scale[:, 0] / 2 * (1 + 1e-5)).all()  # at most half a step of its own row


def test_lookups_give_the_tables_rows_in_its_dtype_whatever_the_shape_of_the_ids():
    w = _table().to(torch.bfloat16)
    e = Int8Embedding.from_weight(w)
    ids = torch.tensor([[3, 0, 39], [3, 3, 17]])
    rows = e(ids)
    assert rows.dtype == torch.bfloat16 and rows.shape == (2, 3, 64)
    assert torch.equal(rows, e.dequantize()[ids].to(torch.bfloat16))
    assert e.to(torch.float32)(ids).dtype == torch.float32  # a model moved to float32 gets float32 rows


def test_groups_must_split_the_rows():
    with pytest.raises(ValueError, match="embedding_dim 48 does not split into groups of 32"):
        Int8Embedding(10, 48, group_size=32)


# -- loading -------------------------------------------------------------------------------------------
# the types the gguf package can write (K types: test_gguf_dequant checks their codes against its dequantisation)
EMBEDDING_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


@pytest.mark.parametrize("type_name", EMBEDDING_TYPES)
def test_a_gguf_embedding_keeps_its_codes_and_gives_the_files_rows_bit_for_bit(tmp_path, type_name):
    path = tmp_path / "m.gguf"
    types = {"token_embd.weight": getattr(Q, type_name), "output.weight": Q.Q8_0}
    write_tiny_gguf(path, TinySpec(types=types))
    fp32 = load_model(path, dtype="float32", device="cpu")
    model = load_model(path, dtype="float32", device="cpu", quantize="gguf")
    e = model.transformer.wte
    group = 16 if type_name == "Q6_K" else 32
    assert (
        isinstance(e, Int8Embedding) and e.group_size == group and e.affine == (type_name in ("Q4_1", "Q5_1", "Q4_K"))
    )
    assert model.quantization["embedding"] == {"group_size": group, "affine": e.affine}
    ids = torch.arange(fp32.config.vocab_size).reshape(3, -1)
    assert torch.equal(e(ids), fp32.transformer.wte(ids))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids[:1, :12]).logits, fp32(ids[:1, :12]).logits, atol=0.05, rtol=0.05)


def test_a_float_gguf_embedding_is_rounded_per_row(tmp_path):
    path = tmp_path / "f32.gguf"
    write_tiny_gguf(path, TinySpec(types={"token_embd.weight": Q.F32, "output.weight": Q.Q8_0}))
    fp32 = load_model(path, dtype="float32", device="cpu")
    model = load_model(path, dtype="float32", device="cpu", quantize=8)
    expected = Int8Embedding.from_weight(fp32.transformer.wte.weight)
    assert torch.equal(model.transformer.wte.codes, expected.codes)
    assert torch.equal(model.transformer.wte.scale, expected.scale)


def _load_in_head_blocks(path, monkeypatch, chunk: str, quantize) -> tuple[QwenForCausalLM, QwenForCausalLM, list]:
    """The fp32 model and ``path`` loaded at ``quantize`` with the linears' ``chunk`` constant set to 100 rows
    of the tiny head, and the (tensor name, rows) of every dequantisation of that load; asserts that the
    head was dequantised in blocks of at most 100 rows, every row once."""
    fp32 = load_model(path, dtype="float32", device="cpu")
    calls = []
    real = qwenlm.gguf._dequantize
    monkeypatch.setattr(qwenlm.gguf, "_dequantize",
                        lambda t, dtype, rows=None: calls.append((t.name, rows)) or real(t, dtype, rows))  # fmt: skip
    monkeypatch.setattr(linear_module, chunk, 64 * 100)  # blocks of 100 rows of the head
    model = load_model(path, dtype="float32", device="cpu", quantize=quantize)
    head_blocks = [rows for n, rows in calls if n == "output.weight"]
    assert head_blocks and all(r is not None and r.stop - r.start <= 100 for r in head_blocks)
    assert len(head_blocks) == -(-fp32.config.vocab_size // 100)  # every row, in blocks
    return fp32, model, calls


def test_gguf_loading_never_dequantises_the_embedding_or_the_int8_head_whole(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, TinySpec(types={"token_embd.weight": Q.Q5_0, "output.weight": Q.Q8_0}))
    fp32, model, calls = _load_in_head_blocks(path, monkeypatch, "INT8_CHUNK_ELEMENTS", "gguf")
    assert not [n for n, _ in calls if n == "token_embd.weight"]
    # the same head as rounding the whole dequantised weight
    whole = Int8Linear.from_linear(fp32.lm_head)
    assert torch.equal(model.lm_head.weight, whole.weight) and torch.equal(model.lm_head.scales, whole.scales)
    assert "lm_head" in model.quantization["eight_bit"]


def test_an_int4_load_fits_the_gguf_head_a_block_of_rows_at_a_time(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, TinySpec(types={"token_embd.weight": Q.Q8_0, "output.weight": Q.Q8_0}))
    fp32, model, _ = _load_in_head_blocks(path, monkeypatch, "ROWS_PER_CHUNK_ELEMENTS", 4)
    whole = Int4Linear.from_linear(fp32.lm_head)  # the same head as fitting the whole dequantised weight
    assert type(model.lm_head) is Int4Linear
    assert torch.equal(model.lm_head.qweight, whole.qweight)
    assert torch.equal(model.lm_head.scales_and_zeros, whole.scales_and_zeros)
    assert "eight_bit" not in model.quantization


def test_row_blocks_must_cover_the_weight():
    w = torch.randn(10, 64)
    for kind in (Int8Linear, Int4Linear):
        with pytest.raises(ValueError, match="row blocks gave 6 rows, the weight has 10"):
            kind.from_row_blocks([w[:6]], (10, 64))


def test_a_tied_model_keeps_its_float_embedding_as_its_head(tmp_path):
    path = tmp_path / "tied.gguf"
    write_tiny_gguf(path, TinySpec(tied=True, types={"token_embd.weight": Q.Q8_0}))
    model = load_model(path, dtype="float32", device="cpu", quantize="gguf")
    assert type(model.transformer.wte) is not Int8Embedding and "embedding" not in model.quantization
    assert model.lm_head.weight is model.transformer.wte.weight


def test_bf16_activations_get_bf16_rows_of_the_files_values(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, TinySpec(types={"token_embd.weight": Q.Q5_0, "output.weight": Q.Q8_0}))
    fp32 = load_model(path, dtype="float32", device="cpu")
    model = load_model(path, dtype="bfloat16", device="cpu", quantize="gguf")
    ids = torch.tensor([[5, 6, 7]])
    assert model.dtype == torch.bfloat16 and model.transformer.wte.scale.dtype == torch.float32
    assert torch.equal(model.transformer.wte(ids), fp32.transformer.wte(ids).to(torch.bfloat16))


def test_loading_gives_back_what_it_freed(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(qwenlm.checkpoint, "release_freed_memory", lambda: calls.append(1))
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, TinySpec())
    load_model(path, dtype="float32", device="cpu", quantize="gguf")
    assert calls == [1]


# -- saved checkpoints ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("e") / "tiny", hidden_size=64, kv_channels=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_saved_int8_embedding_loads_as_it_was(ckpt, tmp_path, dtype):
    dst = quantize_checkpoint(ckpt, tmp_path / "q8", bits=8)
    assert json.loads((dst / "config.json").read_text())["quantization"]["embedding"] == {"group_size": 64,
                                                                                          "affine": False}  # fmt: skip
    direct = quantize(QwenForCausalLM.from_pretrained(ckpt, dtype="float32", device="cpu"), 8)
    loaded = load_model(dst, dtype=dtype, device="cpu")
    e = loaded.transformer.wte
    assert isinstance(e, Int8Embedding) and e.dtype == dtype
    assert torch.equal(e.codes, direct.transformer.wte.codes) and torch.equal(e.scale, direct.transformer.wte.scale)


def test_a_checkpoint_saved_before_the_embedding_was_quantised_keeps_its_float_one(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    dst = quantize_checkpoint(ckpt, tmp_path / "old", bits=8)
    config = json.loads((dst / "config.json").read_text())
    del config["quantization"]["embedding"]
    (dst / "config.json").write_text(json.dumps(config))
    (shard,) = dst.glob("*.safetensors")
    tensors = load_file(shard)
    table = Int8Embedding.from_codes(tensors.pop("transformer.wte.codes"), tensors.pop("transformer.wte.scale"))
    tensors["transformer.wte.weight"] = table.dequantize()
    save_file(tensors, shard, metadata={"format": "pt"})
    loaded = load_model(dst, dtype="float32", device="cpu")
    assert type(loaded.transformer.wte) is not Int8Embedding
    assert torch.equal(loaded.transformer.wte.weight, tensors["transformer.wte.weight"])


@pytest.mark.parametrize(
    "bad", [{"group_size": "32", "affine": False}, {"group_size": 32}, {"group_size": 0, "affine": True}, 7]
)
def test_a_bad_embedding_entry_in_config_json_is_named(bad):
    with pytest.raises(ValueError, match="config.json: quantization embedding must be"):
        quantization_of({"quantization": {"bits": 8, "embedding": bad}})


def test_quantising_a_loaded_model_swaps_the_embedding_once(ckpt):
    model = quantize(load_model(ckpt, dtype="float32", device="cpu"), 4)
    assert isinstance(model.transformer.wte, Int8Embedding)
    assert not any(isinstance(m, nn.Embedding) for m in model.modules())
