"""Calibrated int4 (GPTQ): lower output error than rounding each weight alone, exact on 4-bit grids, and
a calibrated model that tracks fp32 more closely than the uncalibrated one."""

from __future__ import annotations

import copy

import pytest
import torch

from qwenlm import QwenForCausalLM
from qwenlm.checkpoint import load_tokenizer
from qwenlm.gguf_int4 import Int4Grid
from qwenlm.quant import Int4Linear, quantize
from qwenlm.quant.gptq import calibration_batches, gptq_int4, quantize_calibrated, read_texts
from qwenlm.quant.linear import fit_int4_groups
from qwenlm.quant.saving import quantize_checkpoint
from tests.builders import tiny_checkpoint


def correlated_inputs(n: int, k: int, sample_seed: int = 0) -> torch.Tensor:
    """``n`` samples of one fixed distribution over ``k`` channels: mostly in a 32-dimensional subspace, as
    a layer's real inputs are, plus a little noise."""
    basis = torch.randn(32, k, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(sample_seed)
    return torch.randn(n, 32, generator=g) @ basis + 0.1 * torch.randn(n, k, generator=g)


def dequantised(codes, scale, zero, group_size=32):
    n, k = codes.shape
    q = codes.float().view(n, k // group_size, group_size)
    return ((q - 8) * scale[..., None].bfloat16().float() + zero[..., None].bfloat16().float()).view(n, k)


def test_gptq_lowers_the_output_error_of_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    x = correlated_inputs(2048, 256)
    held_out = correlated_inputs(512, 256, sample_seed=1)
    nearest = dequantised(*fit_int4_groups(w, 32))
    calibrated = dequantised(*gptq_int4(w, x.T.double() @ x.double(), 32))
    err_nearest = (held_out @ (nearest - w).T).norm()
    err_gptq = (held_out @ (calibrated - w).T).norm()
    assert err_gptq < 0.5 * err_nearest, (err_gptq, err_nearest)


def test_gptq_keeps_weights_that_already_lie_on_a_4bit_grid():
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (16, 128), generator=g, dtype=torch.uint8)
    codes[:, ::32], codes[:, 1::32] = 0, 15  # every group spans the whole grid
    scale = (torch.rand(16, 4, generator=g) + 0.5).bfloat16().float()
    zero = torch.randn(16, 4, generator=g).bfloat16().float()
    w = dequantised(codes, scale, zero)
    x = correlated_inputs(512, 128)
    got = gptq_int4(w, x.T.double() @ x.double(), 32)
    torch.testing.assert_close(dequantised(*got), w, atol=1e-5, rtol=0)


def test_dead_inputs_do_not_break_the_factorisation():
    w = torch.randn(8, 64)
    x = correlated_inputs(256, 64)
    x[:, 5] = 0  # a channel that never fires: its Hessian row is zero
    codes, scale, zero = gptq_int4(w, x.T.double() @ x.double())
    assert codes.shape == (8, 64) and torch.isfinite(scale).all() and torch.isfinite(zero).all()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("gptq") / "tiny", hidden_size=64, kv_channels=16)


def random_batches(count: int, seed: int) -> list[torch.Tensor]:
    """Text of a small vocabulary (24 tokens), like real text whose inputs fill only part of each layer's space."""
    vocab = torch.randint(0, 151643, (24,), generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(seed)
    return [vocab[torch.randint(0, 24, (2, 32), generator=g)] for _ in range(count)]


def test_calibrated_model_tracks_fp32_more_closely(ckpt):
    model = QwenForCausalLM.from_pretrained(ckpt, dtype="float32", device="cpu")
    plain = quantize(copy.deepcopy(model), 4)
    calibrated = quantize_calibrated(copy.deepcopy(model), random_batches(8, 0), progress_bar=False)
    # the embedding rounded per row (a random checkpoint's hidden size of 64)
    assert calibrated.quantization == {"bits": 4, "group_size": 32, "embedding": {"group_size": 64, "affine": False}}
    assert sum(isinstance(m, Int4Linear) for m in calibrated.modules()) == 2 * 5 + 1
    ids = random_batches(1, 1)[0]  # tokens the calibration did not see
    with torch.no_grad():
        ref = model(ids).logits
        err_plain = (plain(ids).logits - ref).norm() / ref.norm()
        err_calibrated = (calibrated(ids).logits - ref).norm() / ref.norm()
    assert err_calibrated < 0.9 * err_plain, (err_calibrated, err_plain)


def test_calibration_keeps_4bit_grids(ckpt):
    model = QwenForCausalLM.from_pretrained(ckpt, dtype="float32", device="cpu")
    reference = quantize(copy.deepcopy(model), 4)
    layer = "transformer.h.0.mlp.c_proj"
    grid_layer = reference.get_submodule(layer)
    sz = grid_layer.scales_and_zeros.float()
    grid = Int4Grid(grid_layer.qweight, sz[..., 0].t(), sz[..., 1].t())
    calibrated = quantize_calibrated(model, random_batches(2, 0), grids={layer: grid}, progress_bar=False)
    got = calibrated.get_submodule(layer)
    assert torch.equal(got.qweight, grid_layer.qweight)
    assert torch.equal(got.scales_and_zeros, grid_layer.scales_and_zeros)


def test_calibration_batches_cut_text_into_sequences(ckpt):
    tokenizer = load_tokenizer(ckpt)
    text = "def add(a, b):\n    return a + b\n" * 200
    batches = calibration_batches(tokenizer, [text, text], tokens=1000, seq_len=128, batch=3)
    assert [tuple(b.shape) for b in batches] == [(3, 128), (3, 128), (1, 128)]  # 7 sequences of 128 <= 1000
    with pytest.raises(ValueError, match="fewer than one sequence of 128"):
        calibration_batches(tokenizer, ["short"], tokens=1000, seq_len=128)


def test_calibrated_checkpoint_saves_and_loads(ckpt, tmp_path):
    texts = ["x = 1\nprint(x)\n" * 300]
    dst = quantize_checkpoint(ckpt, tmp_path / "gptq", bits=4, calibration=texts, calibration_tokens=512)
    loaded = QwenForCausalLM.from_pretrained(dst, device="cpu")
    assert loaded.quantization["bits"] == 4
    model = QwenForCausalLM.from_pretrained(ckpt, dtype="float32", device="cpu")
    batches = calibration_batches(load_tokenizer(ckpt), texts, tokens=512)
    direct = quantize_calibrated(model, batches, progress_bar=False)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, direct(ids).logits, atol=0, rtol=0)


def test_calibrating_in_bf16_is_close_to_calibrating_in_fp32(ckpt, tmp_path):
    texts = ["x = 1\nprint(x)\n" * 300]
    fp32 = quantize_checkpoint(ckpt, tmp_path / "fp32", bits=4, calibration=texts, calibration_tokens=512)
    bf16 = quantize_checkpoint(ckpt, tmp_path / "bf16", bits=4, calibration=texts, calibration_tokens=512,
                               calibration_dtype="bfloat16")  # fmt: skip
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        ref = QwenForCausalLM.from_pretrained(ckpt, dtype="float32", device="cpu")(ids).logits
        a = QwenForCausalLM.from_pretrained(fp32, dtype="float32", device="cpu")(ids).logits
        b = QwenForCausalLM.from_pretrained(bf16, dtype="float32", device="cpu")(ids).logits
    err_a, err_b = ((a - ref).norm() / ref.norm()).item(), ((b - ref).norm() / ref.norm()).item()
    assert err_b < 1.5 * err_a + 0.01, (err_a, err_b)  # bf16 activations in the statistics cost little


def test_calibration_is_for_int4_only(ckpt, tmp_path):
    with pytest.raises(ValueError, match="calibration is for --bits 4"):
        quantize_checkpoint(ckpt, tmp_path / "q8", bits=8, calibration=["text"])


def test_read_texts_takes_text_files_and_json_lines(tmp_path):
    import gzip
    import json

    (tmp_path / "a.txt").write_text("plain text")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "from the text field", "id": 1}) + "\n\n")
        f.write(json.dumps({"question": "q?", "answer": "a.", "n": 3}) + "\n")
    texts = list(read_texts([tmp_path / "a.txt", tmp_path / "b.jsonl.gz"]))
    assert texts == ["plain text", "from the text field", "q?\na."]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not JSON"):
        list(read_texts([tmp_path / "bad.jsonl"]))
