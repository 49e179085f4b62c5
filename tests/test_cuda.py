"""The CUDA paths: reference fixtures on the GPU, CUDA-graph and compiled decoding, the int8/int4 kernels and
bf16. Skipped without a CUDA device (CI has none; they were run on a lent GPU, see benchmarks/RESULTS.md).

GPU tolerances: fp32 logits within 1e-3 of the reference (different kernels and summation order than the
CPU, no TF32); bf16 against fp32 within the bf16 rounding of a few layers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from qwenlm import QwenForCausalLM
from qwenlm.quant import Int4Linear, Int8Linear, quantize
from tests.builders import random_model, relative_error, teacher_forced, tiny_config
from tests.shared import fixtures

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
GPU_TOL = dict(atol=1e-3, rtol=1e-3)


@pytest.fixture(autouse=True)
def _no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _fixture(variant: str):
    from safetensors.torch import load_file

    folder = fixtures("model", variant)
    model = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cuda")
    cases = {c["name"]: c for c in json.loads((folder / "cases.json").read_text())["cases"]}
    tensors = {k: v.cuda() for k, v in load_file(str(folder / "cases.safetensors")).items()}
    return model, tensors, cases


@pytest.mark.parametrize("variant", ["tiny", "tiny-long", "tiny-partial-rotary"])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_reference_fixtures_on_the_gpu(variant, graphs):
    model, t, cases = _fixture(variant)
    if graphs:
        model.use_cuda_graphs()
    with torch.inference_mode():
        for name, case in cases.items():
            if case["type"] == "forward":
                torch.testing.assert_close(model(t[f"{name}.input_ids"]).logits, t[f"{name}.logits"], **GPU_TOL)
            elif case["type"].startswith("incremental_decode"):
                ids, mask = t[f"{name}.input_ids"], t.get(f"{name}.attention_mask")
                prefill = case.get("P", case.get("T"))
                cache = model.new_cache()
                out = model(ids[:, :prefill], None if mask is None else mask[:, :prefill], past_key_values=cache)
                torch.testing.assert_close(out.logits[:, -1], t[f"{name}.prefill_last_logits"], **GPU_TOL)
                for step in range(ids.shape[1] - prefill):
                    pos = prefill + step
                    logits = model.decode_step(ids[:, pos : pos + 1], None if mask is None else mask[:, : pos + 1],
                                               cache)  # fmt: skip
                    keep = slice(None) if mask is None else mask[:, pos].bool()
                    torch.testing.assert_close(logits[keep], t[f"{name}.step_logits"][:, step][keep], **GPU_TOL)
            elif case["type"] == "greedy_generate":
                for i, _ in enumerate(case["prompts"]):
                    out = model.generate(t[f"generate.prompt{i}"], max_new_tokens=40, do_sample=False,
                                         eos_token_id=None, repetition_penalty=case["repetition_penalty"])  # fmt: skip
                    assert torch.equal(out, t[f"{name}.output{i}"]), f"{name} prompt {i}"
            elif case["type"] == "greedy_generate_batched_left_padded":
                out = model.generate(t[f"{name}.input_ids"], t[f"{name}.attention_mask"], max_new_tokens=40,
                                     do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
                assert torch.equal(out, t[f"{name}.output"]), name
    if graphs:
        assert model._graphs._slots and all(s.graph is not None for s in model._graphs._slots.values())


@pytest.mark.parametrize("precision", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("mode", ["cuda-graphs", "compile"])
def test_fast_decoding_is_as_accurate_as_eager_on_the_gpu(precision, mode):
    """Against the fp32 model: bf16 (and quantisation) error of the fast path <= 1.25 x that of eager bf16.
    (Compared with each other directly, two bf16 paths differ by up to ~5% of the largest logit on this
    random model, as much as either differs from fp32.)"""
    config = tiny_config(hidden_size=128, kv_channels=32, intermediate_size=256)
    reference = random_model(config, seed=7).cuda()
    model = copy.deepcopy(reference).to(torch.bfloat16)
    if precision != "bf16":
        model = quantize(model, 8 if precision == "int8" else 4)
    ids = torch.randint(0, 151643, (2, 9), device="cuda")
    tokens = torch.randint(0, 151643, (2, 10), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    exact = teacher_forced(reference, ids, mask, tokens)
    eager = teacher_forced(model, ids, mask, tokens)
    fast = copy.deepcopy(model)
    fast.use_cuda_graphs() if mode == "cuda-graphs" else fast.compile_inference()
    got = teacher_forced(fast, ids, mask, tokens)
    assert relative_error(got, exact) <= 1.25 * relative_error(eager, exact) + 1e-3
    assert (got.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.9
    assert fast._graphs._slots and all(s.graph is not None for s in fast._graphs._slots.values())


def test_bf16_on_the_gpu_is_close_to_fp32():
    model = random_model(tiny_config(), seed=3).cuda()
    ids = torch.randint(0, 151643, (2, 12), device="cuda")
    with torch.inference_mode():
        ref = model(ids).logits
        got = copy.deepcopy(model).to(torch.bfloat16)(ids).logits.float()
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("in_features", [64, 128, 4096])
def test_quantised_kernels_on_the_gpu_equal_the_dequantised_matmul(cls, in_features):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 96, bias=True).cuda()
    q = cls.from_linear(linear)
    for rows in (1, 3, 40):
        x = torch.randn(rows, in_features, device="cuda")
        expected = (x.bfloat16() @ q.dequantize().t()).float() + linear.bias
        torch.testing.assert_close(q(x), expected, atol=0.05, rtol=0.02)
