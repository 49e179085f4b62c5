"""GGUF 4-bit tensors (Q4_0, Q4_1, Q4_K) become int4 layers, 5-bit ones (Q5_0, Q5_1) 5-bit layers, with their
codes unchanged (no second rounding)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from qwenlm import QwenForCausalLM
from qwenlm.checkpoint import load_model
from qwenlm.gguf import read_gguf_int4
from qwenlm.gguf_int4 import dequantize_grid, int4_grid
from qwenlm.quant import Int4Linear, Int5Linear, Int8Embedding, Int8Linear, gguf_embedding, gguf_grids, quantize
from tests.kernels import int4_decoding_error
from tests.tiny_gguf import Q, TinySpec, gguf, write_tiny_gguf

BLOCK = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144), "Q5_0": (32, 22), "Q5_1": (32, 24)}


def _random_blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes in the block layout, with finite f16 scales: every bit pattern of the rest is valid."""
    rng = np.random.default_rng(seed)
    per, size = BLOCK[type_name]
    raw = rng.integers(0, 256, (rows * cols // per, size), dtype=np.uint8)
    for offset in (0,) if type_name in ("Q4_0", "Q5_0") else (0, 2):
        scales = rng.uniform(-0.1, 0.1, raw.shape[0]).astype(np.float16)
        raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1"])
def test_grid_reproduces_ggufs_own_dequantisation(type_name):
    rows, cols = 6, 512
    data = _random_blocks(type_name, rows, cols)
    expected = gguf.quants.dequantize(data, getattr(Q, type_name)).reshape(rows, cols)
    grid = int4_grid(data, type_name, (rows, cols))
    bits = 5 if type_name.startswith("Q5") else 4
    assert grid.bits == bits and grid.codes.dtype == torch.uint8 and int(grid.codes.max()) == 2**bits - 1
    assert grid.scale.shape == (rows, cols // 32)
    torch.testing.assert_close(dequantize_grid(grid), torch.from_numpy(np.asarray(expected)), atol=1e-6, rtol=1e-6)


def test_other_types_are_refused():
    with pytest.raises(ValueError, match="Q8_0 is not a 4- or 5-bit GGUF type"):
        int4_grid(np.zeros((1, 34), np.uint8), "Q8_0", (1, 32))


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


@pytest.mark.parametrize("type_name", ["Q5_0", "Q5_1"])
def test_5bit_layer_keeps_the_codes_and_multiplies_like_its_weights(type_name):
    rows, cols = 48, 192  # 1.5 steps of 128 weights per row: the kernel's masked last step too
    grid = int4_grid(_random_blocks(type_name, rows, cols, seed=3), type_name, (rows, cols))
    layer = Int4Linear.from_grid(grid)
    assert isinstance(layer, Int5Linear)
    assert torch.equal(layer._values(), grid.codes)
    w = layer.dequantize(torch.float32)
    exact = dequantize_grid(grid)
    # the scale and offset in bf16 (relative step 2^-8): off by at most a bf16 step of the group's largest
    torch.testing.assert_close(w, exact, atol=float(exact.abs().max()) / 2**8, rtol=0)
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(0))
    for m in (1, 3, 5):  # decoding rows (qwenlm's kernel where it runs, else the dequantised weight)
        with torch.inference_mode():
            y, ref = layer(x[:m]), x[:m] @ w.t()
        assert ((y - ref).norm() / ref.norm()).item() < int4_decoding_error()


@pytest.fixture(scope="module")
def tiny_q5(tmp_path_factory):
    """A Qwen2 GGUF like the demo model's: q/k 5-bit, v 5-bit in layer 0 and 8-bit in layer 1, MLP up and
    gate 5-bit, down 4-bit (the first type whose suffix fits a name decides)."""
    types = {"blk.1.attn_v.weight": Q.Q8_0, "attn_q.weight": Q.Q5_0, "attn_k.weight": Q.Q5_0,
             "attn_v.weight": Q.Q5_0, "ffn_up.weight": Q.Q5_0, "ffn_gate.weight": Q.Q5_1, "ffn_down.weight": Q.Q4_1,
             "token_embd.weight": Q.Q8_0, "output.weight": Q.Q8_0}  # fmt: skip
    spec = TinySpec(types=types)
    path = tmp_path_factory.mktemp("q5") / "tiny-q5.gguf"
    write_tiny_gguf(path, spec)
    return path


def test_int4_from_a_gguf_keeps_its_5bit_tensors_in_5_bits(tiny_q5, tmp_path):
    from qwenlm.quant.saving import quantize_checkpoint

    grids = read_gguf_int4(tiny_q5)
    assert grids["transformer.h.0.attn.c_attn"].bits == 5  # q, k, v all 5-bit: stacked with their fifth bits
    assert "transformer.h.1.attn.c_attn" not in grids  # v is 8-bit there: the whole c_attn is rounded to int4
    assert grids["transformer.h.1.mlp.c_proj"].bits == 4
    model = load_model(tiny_q5, dtype="float32", device="cpu", quantize=4)
    five = {n for n, m in model.named_modules() if isinstance(m, Int5Linear)}
    assert five == {n for n, g in grids.items() if g.bits == 5} == set(model.quantization["five_bit"])
    assert type(model.get_submodule("transformer.h.1.attn.c_attn")) is Int4Linear
    for name in five:
        assert torch.equal(model.get_submodule(name)._values(), grids[name].codes)
    # saved and loaded: the same layers, bit for bit
    saved = quantize_checkpoint(tiny_q5, tmp_path / "q5-int4", bits=4)
    loaded = load_model(saved, dtype="float32", device="cpu")
    assert {n for n, m in loaded.named_modules() if isinstance(m, Int5Linear)} == five
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_loading_at_int4_skips_dequantising_what_it_keeps_and_gives_the_same_model(tmp_path, monkeypatch):
    # the tensors taken over as 4-bit codes, and the 4-bit embedding as its int8 codes, are not dequantised
    # while loading; the rest are, and the model equals quantising the whole fp32 one with the same codes
    import qwenlm.gguf

    path = tmp_path / "q4-embedding.gguf"
    write_tiny_gguf(path, TinySpec(types={"attn_q.weight": Q.Q4_0, "attn_k.weight": Q.Q4_0, "attn_v.weight": Q.Q4_0,
                                          "ffn_down.weight": Q.Q4_1, "token_embd.weight": Q.Q4_0}))  # fmt: skip
    fp32 = QwenForCausalLM.from_pretrained(path, dtype="float32", device="cpu")
    full = quantize(copy.deepcopy(fp32), 4, grids=gguf_grids(path, bits=4), prebuilt=gguf_embedding(path))
    dequantised = []
    real = qwenlm.gguf._dequantize
    monkeypatch.setattr(qwenlm.gguf, "_dequantize",
                        lambda t, dtype, rows=None: dequantised.append(t.name) or real(t, dtype, rows))  # fmt: skip
    model = load_model(path, dtype="float32", device="cpu", quantize=4)
    assert "output.weight" in dequantised  # an F32 head, rounded to 4 bits
    assert not [n for n in dequantised if n.endswith(("attn_q.weight", "attn_k.weight", "ffn_down.weight"))]
    assert "token_embd.weight" not in dequantised and isinstance(model.transformer.wte, Int8Embedding)
    assert torch.equal(model.transformer.wte.dequantize(), fp32.transformer.wte.weight)  # the file's values
    assert full.state_dict().keys() == model.state_dict().keys()
    for name, tensor in full.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def _linears(model) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Int4Linear, Int8Linear))}


def test_gguf_precision_keeps_the_4_and_5_bit_codes_and_makes_the_other_layers_int8(tiny_q5, tmp_path):
    from qwenlm.quant.saving import quantize_checkpoint

    grids = read_gguf_int4(tiny_q5)
    fp32 = QwenForCausalLM.from_pretrained(tiny_q5, dtype="float32", device="cpu")
    model = load_model(tiny_q5, dtype="float32", device="cpu", quantize="gguf")
    kinds = _linears(model)
    others = sorted(set(kinds) - set(grids))
    # the c_attn with an 8-bit v and the Q8_0 LM head, as in the demo model, and the float attention outputs
    assert others == ["lm_head", "transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_attn",
                      "transformer.h.1.attn.c_proj"]  # fmt: skip
    assert all(kinds[n] is Int8Linear for n in others) and model.quantization["eight_bit"] == others
    assert {n for n in grids if kinds[n] is Int5Linear} == set(model.quantization["five_bit"])
    for name, grid in grids.items():
        assert kinds[name] is (Int5Linear if grid.bits == 5 else Int4Linear)
        assert torch.equal(model.get_submodule(name)._values(), grid.codes)
    for name in others:  # int8 per channel of the dequantised weights
        expected = Int8Linear.from_linear(fp32.get_submodule(name))
        assert torch.equal(model.get_submodule(name).weight, expected.weight)
    # closer to the file's own weights than int4, which rounds those layers to 4 bits
    int4 = load_model(tiny_q5, dtype="float32", device="cpu", quantize=4)
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        exact, mixed, four = fp32(ids).logits, model(ids).logits, int4(ids).logits
    assert (mixed - exact).abs().max() < 0.5 * (four - exact).abs().max()
    # saved and loaded: the same layers, bit for bit
    saved = quantize_checkpoint(tiny_q5, tmp_path / "q5-gguf", bits="gguf")
    loaded = load_model(saved, dtype="float32", device="cpu")
    assert _linears(loaded) == kinds and loaded.quantization["eight_bit"] == others
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, mixed, atol=0, rtol=0)


def test_gguf_precision_is_for_gguf_files(tmp_path):
    from qwenlm.bench import resolve_precision
    from qwenlm.quant.saving import quantization_of, quantize_checkpoint
    from tests.builders import tiny_checkpoint

    folder = tiny_checkpoint(tmp_path / "tiny")
    with pytest.raises(ValueError, match=r"quantize='gguf' keeps the precision of a \.gguf file's tensors; .*tiny"):
        load_model(folder, quantize="gguf")
    with pytest.raises(ValueError, match="precision 'gguf' .* choose int8 or int4"):
        resolve_precision("gguf", "cpu", folder)
    with pytest.raises(ValueError, match="groups of 32; got group_size=64"):
        quantize_checkpoint(folder, tmp_path / "out", bits="gguf", group_size=64)
    with pytest.raises(ValueError, match="eight_bit is for bits 4, got bits 8"):
        quantization_of({"quantization": {"bits": 8, "eight_bit": ["lm_head"]}})
    with pytest.raises(ValueError, match="others .* must be 8 with bits 4, got 4"):
        quantize(QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu"), 8, others=4)


def test_auto_precision_of_a_gguf_on_cpu_is_its_own(tiny_q5, tmp_path):
    from qwenlm.bench import resolve_precision

    assert resolve_precision("auto", "cpu", tiny_q5) == "gguf"
    assert resolve_precision("auto", "cpu", tmp_path) == "int8"  # a checkpoint folder
    assert resolve_precision("auto", "cuda", tiny_q5) == "bf16"


def test_a_saved_layer_list_that_does_not_fit_the_model_is_refused(tiny_q5):
    from qwenlm.quant import quantized_structure

    model = QwenForCausalLM.from_pretrained(tiny_q5, dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="quantization.eight_bit names layers the model does not have: nope"):
        quantized_structure(model, 4, eight_bit=["nope"])
    with pytest.raises(ValueError, match="lm_head is in both five_bit and eight_bit"):
        quantized_structure(model, 4, five_bit=["lm_head"], eight_bit=["lm_head"])
