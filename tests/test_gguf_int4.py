"""GGUF 4-bit tensors (Q4_0, Q4_1, Q4_K) become int4 layers with their codes unchanged (no second rounding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwenlm import QwenForCausalLM
from qwenlm.checkpoint import load_model
from qwenlm.gguf import read_gguf_int4
from qwenlm.gguf_int4 import dequantize_grid, int4_grid
from qwenlm.quant import Int4Linear, Int8Linear, gguf_grids, quantize
from tests.tiny_gguf import Q, TinySpec, gguf, write_tiny_gguf

BLOCK = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144)}


def _random_blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes in the block layout, with finite f16 scales: every bit pattern of the rest is valid."""
    rng = np.random.default_rng(seed)
    per, size = BLOCK[type_name]
    raw = rng.integers(0, 256, (rows * cols // per, size), dtype=np.uint8)
    for offset in (0,) if type_name == "Q4_0" else (0, 2):
        scales = rng.uniform(-0.1, 0.1, raw.shape[0]).astype(np.float16)
        raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K"])
def test_grid_reproduces_ggufs_own_dequantisation(type_name):
    rows, cols = 6, 512
    data = _random_blocks(type_name, rows, cols)
    expected = gguf.quants.dequantize(data, getattr(Q, type_name)).reshape(rows, cols)
    grid = int4_grid(data, type_name, (rows, cols))
    assert grid.codes.dtype == torch.uint8 and int(grid.codes.max()) <= 15
    assert grid.scale.shape == (rows, cols // 32)
    torch.testing.assert_close(dequantize_grid(grid), torch.from_numpy(np.asarray(expected)), atol=1e-6, rtol=1e-6)


def test_other_types_are_refused():
    with pytest.raises(ValueError, match="Q5_0 is not a 4-bit GGUF type"):
        int4_grid(np.zeros((1, 22), np.uint8), "Q5_0", (1, 32))


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory):
    """A Qwen2 GGUF whose q/k/v and MLP up/down are 4-bit, gate and output 8-bit."""
    spec = TinySpec(types={"attn_q.weight": Q.Q4_0, "attn_k.weight": Q.Q4_1, "attn_v.weight": Q.Q4_0,
                           "ffn_up.weight": Q.Q4_1, "ffn_down.weight": Q.Q4_0, "ffn_gate.weight": Q.Q8_0,
                           "token_embd.weight": Q.Q8_0, "output.weight": Q.Q8_0})  # fmt: skip
    path = tmp_path_factory.mktemp("q4") / "tiny-q4.gguf"
    write_tiny_gguf(path, spec)
    return path


def test_read_gguf_int4_names_the_models_layers(tiny_q4):
    grids = read_gguf_int4(tiny_q4)
    assert sorted(grids) == sorted(
        f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "mlp.w1", "mlp.c_proj")
    )
    assert grids["transformer.h.0.attn.c_attn"].codes.shape == (64 + 2 * 32, 64)  # q, k, v stacked


def test_int4_model_from_gguf_keeps_the_4bit_codes(tiny_q4):
    model = QwenForCausalLM.from_pretrained(tiny_q4, dtype="float32", device="cpu")
    fp32 = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    grids = gguf_grids(tiny_q4, bits=4)
    quantize(model, 4, grids=grids)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    assert len(layers) == 2 * 5 + 1
    for name in grids:
        # the loaded fp32 weights are exactly the grid's values; the layer keeps the codes (scales in bf16)
        torch.testing.assert_close(dequantize_grid(grids[name]), fp32[name], atol=0, rtol=0)
        assert torch.equal(layers[name]._values(), grids[name].codes)
        torch.testing.assert_close(layers[name].dequantize(torch.float32), fp32[name], atol=2e-4, rtol=1e-2)
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()


def test_gguf_grids_only_for_int4_in_groups_of_32(tiny_q4, tmp_path):
    assert gguf_grids(tiny_q4, bits=8) is None
    assert gguf_grids(tiny_q4, bits=4, group_size=64) is None
    assert gguf_grids(tmp_path, bits=4) is None  # a checkpoint folder has no 4-bit grids
    model = QwenForCausalLM.from_pretrained(tiny_q4, dtype="float32", device="cpu")
    quantize(model, 8, grids=read_gguf_int4(tiny_q4))  # int8 ignores 4-bit grids
    assert all(not isinstance(m, Int4Linear) for m in model.modules())
    assert any(isinstance(m, Int8Linear) for m in model.modules())


def test_quantise_while_loading_a_gguf_keeps_its_4bit_codes_and_a_tied_head(tmp_path):
    path = tmp_path / "tied.gguf"
    write_tiny_gguf(path, TinySpec(tied=True, types={"ffn_down.weight": Q.Q4_1, "token_embd.weight": Q.Q8_0}))
    model = load_model(path, dtype="float32", device="cpu", quantize=4)
    assert model.lm_head.weight is model.transformer.wte.weight  # the tied head stays the embedding
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 2 * 5
    grids = read_gguf_int4(path)
    assert sorted(grids) == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    for name, grid in grids.items():
        assert torch.equal(model.get_submodule(name)._values(), grid.codes)
