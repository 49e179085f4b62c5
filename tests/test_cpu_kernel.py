"""qwenlm's AVX-512 VNNI int4 and int8 kernels (``quant.cpu_kernel``) and its int8 prompt product: exact on
activations their rounding leaves alone, within that rounding otherwise, used by ``Int4Linear`` and
``Int8Linear`` where they apply, traceable by torch.compile, and bypassed cleanly where they cannot be used."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from qwenlm.model import RMSNorm
from qwenlm.quant import Int4Linear, Int5Linear, Int8Linear, cpu_kernel, quantize
from qwenlm.quant.linear import INT4_PRODUCT_ROWS, PREFILL_ROWS, unpack_high
from qwenlm.rope import RotaryEmbedding, apply_rotary_bthd
from tests.builders import random_model, tiny_config
from tests.kernels import int4_decoding_error, needs_kernel, needs_ops


def _layer(k: int, n: int, seed: int = 0) -> Int4Linear:
    torch.manual_seed(seed)
    return Int4Linear.from_linear(nn.Linear(k, n, bias=False))


def _int5_layer(k: int, n: int, seed: int = 0) -> Int5Linear:
    torch.manual_seed(seed)
    return Int5Linear.from_linear(nn.Linear(k, n, bias=False))


def _int8_layer(k: int, n: int, bias: bool = False) -> Int8Linear:
    torch.manual_seed(0)
    return Int8Linear.from_linear(nn.Linear(k, n, bias=bias))


def _int8_blocks(rows: int, k: int) -> torch.Tensor:
    """Activations the kernels' rounding leaves alone: integers with a maximum of 127 in each block of 8 (the
    AVX2 build's int4 activation blocks), hence also in each of 32 (the AVX-512 build's and int8's)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-127, 128, (rows, k), generator=g).float()
    x.view(rows, -1, 8)[..., 0] = 127.0  # every block's maximum is 127: scale exactly 1
    return x


@needs_kernel
# one row against 1, 3 and 33 weight rows: blocks of two rows and a last row on its own, prefetches kept inside
@pytest.mark.parametrize("k,n,rows", [(64, 16, 1), (64, 1, 1), (192, 3, 1), (960, 33, 1), (128, 48, 3), (192, 24, 2),
                                      (896, 160, 15), (960, 33, 5)])  # fmt: skip
def test_exact_when_activations_are_int8_blocks(k, n, rows):
    """Activations already on an int8 grid (each block of 32 holds integers with a maximum of 127) are not
    changed by the kernel's rounding, so it must equal the dequantised product up to fp32 summation."""
    layer = _layer(k, n)
    x = _int8_blocks(rows, k)
    got = cpu_kernel.int4_gemv(x, layer.qweight, layer.scales_and_zeros.transpose(0, 1).contiguous())
    expected = x.double() @ layer.dequantize(torch.float32).double().t()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-3)


@needs_kernel
@pytest.mark.parametrize("k,n,rows", [(64, 16, 1), (64, 1, 1), (960, 33, 1), (192, 24, 2), (896, 160, 15),
                                      (960, 33, 5)])  # fmt: skip
def test_5bit_exact_when_activations_are_int8_blocks(k, n, rows):
    """5-bit weights (the fifth bits in the kernel's layout, a masked last step for K = 64, 192, 960)."""
    layer = _int5_layer(k, n)
    assert int(layer._values().max()) == 31
    x = _int8_blocks(rows, k)
    high = cpu_kernel.high_bits_layout(unpack_high(layer.qhigh))
    assert high.shape == (n, -(-k // 128) * 16)
    got = cpu_kernel.int4_gemv(x, layer.qweight, layer.scales_and_zeros.transpose(0, 1).contiguous(), high)
    expected = x.double() @ layer.dequantize(torch.float32).double().t()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-3)


@needs_ops("int8_matmul")
def test_5bit_layer_uses_the_kernel_for_decoding_and_prompts(monkeypatch):
    layer = _int5_layer(896, 160)
    layer.prepare()
    assert layer._path == "own" and layer._packed is None  # PyTorch has no 5-bit kernel
    calls = []
    product = cpu_kernel.int8_matmul
    monkeypatch.setattr(cpu_kernel, "int8_matmul", lambda *a: calls.append(a[0].shape) or product(*a))
    ref = layer.dequantize(torch.float32).t()
    for rows in (1, 8, 15):  # decoding rows: the matrix-vector kernel, up to PREFILL_ROWS - 1 of them
        x = torch.randn(rows, 896)
        assert ((layer(x) - x @ ref).norm() / (x @ ref).norm()).item() < 2e-3
    assert calls == []
    x = torch.randn(40, 896)
    assert ((layer(x) - x @ ref).norm() / (x @ ref).norm()).item() < 1e-2  # plus the rounding to int8 rows
    assert calls == [(40, 896)]


@needs_kernel
def test_close_to_the_dequantised_product_and_used_by_int4linear():
    layer = _layer(896, 1152)
    x = torch.randn(2, 1, 896)
    y = layer(x)
    assert layer._path == "own"
    ref = x.reshape(2, 896) @ layer.dequantize(torch.float32).t()
    assert ((y.reshape(2, -1) - ref).norm() / ref.norm()).item() < int4_decoding_error()
    # from cpu_kernel.gemv_rows(4) rows on (3 for the AVX-512 build) PyTorch's kernel takes over; both agree
    x8 = torch.randn(8, 896)
    own = cpu_kernel.int4_gemv(x8, layer.qweight, layer._scales_nk)
    torch.testing.assert_close(layer(x8), own, atol=0.05, rtol=0.02)
    assert (layer._packed is None) == (cpu_kernel.gemv_rows(4) == 16)  # (the AVX2 build: no PyTorch layout kept)


@needs_kernel
def test_every_decoding_batch_goes_through_the_kernel_where_the_build_says_so(monkeypatch):
    layer = _layer(896, 160)
    layer.prepare()
    calls = []
    kernel = cpu_kernel.int4_gemv
    monkeypatch.setattr(cpu_kernel, "int4_gemv", lambda *a: calls.append(a[0].shape[0]) or kernel(*a))
    for rows in (1, 2, 3, 4, 5, 8, 15, 16):
        layer(torch.randn(rows, 896))
    assert calls == [r for r in (1, 2, 3, 4, 5, 8, 15) if r < cpu_kernel.gemv_rows(4)]


@needs_kernel
@pytest.mark.parametrize("k,n,rows", [(32, 5, 1), (32, 1, 1), (64, 16, 2), (96, 20, 3), (896, 160, 15), (960, 33, 5)])
def test_int8_exact_when_activations_are_int8_blocks(k, n, rows):
    """The same for int8 weights: a last half line of weights (K = 32, 96, 960) reads as zeros."""
    layer = _int8_layer(k, n)
    x = _int8_blocks(rows, k)
    got = cpu_kernel.int8_gemv(x, layer.weight, layer.scales)
    expected = x.double() @ layer.dequantize(torch.float32).double().t()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-3)


@needs_kernel
def test_int8_close_to_the_dequantised_product_and_used_by_int8linear(monkeypatch):
    layer = _int8_layer(896, 1152, bias=True)
    x = torch.randn(2, 1, 896)
    calls = []
    kernel = cpu_kernel.int8_gemv
    monkeypatch.setattr(cpu_kernel, "int8_gemv", lambda *a: calls.append(a[0].shape) or kernel(*a))
    y = layer(x)
    assert layer._own and calls == [(2, 896)]
    ref = x.reshape(2, 896) @ layer.dequantize(torch.float32).t() + layer.bias
    assert ((y.reshape(2, -1) - ref).norm() / ref.norm()).item() < 1e-4  # ~15-bit activations, exact int8 sums
    if not cpu_kernel.provides("int8_matmul"):  # (the AVX2 build) the kernel takes every decoding batch
        layer(torch.randn(15, 896))
        assert calls == [(2, 896), (15, 896)]
        return
    # from cpu_kernel.gemv_rows(8) rows on, the int8 matrix product (the same two-part rounding, per row); both agree
    x8 = torch.randn(8, 896)
    own = kernel(x8, layer.weight, layer.scales) + layer.bias
    product = cpu_kernel.int8_matmul
    monkeypatch.setattr(cpu_kernel, "int8_matmul", lambda *a: calls.append(("matmul", *a[0].shape)) or product(*a))
    torch.testing.assert_close(layer(x8), own, atol=1e-3, rtol=1e-4)
    below = cpu_kernel.gemv_rows(8) - 1  # the largest batch that still goes through the kernel
    layer(torch.randn(below, 896))
    assert calls == [(2, 896), ("matmul", 8, 896), (below, 896)]


def _two_part_rows(rows: int, k: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations the prompt product's rounding leaves alone, x = d (a + b / 256) with integers a, b in
    -127..127 and each row's maximum exactly 127 d; returns x, a, b (d = 2^-3: exact in fp32)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-126, 127, (rows, k), generator=g).double()
    b = torch.randint(-127, 128, (rows, k), generator=g).double()
    a[:, 0], b[:, 0] = 127.0, 0.0
    return ((a + b / 256) / 8).float(), a, b


@needs_ops("int8_matmul")
@pytest.mark.parametrize("k,n,rows", [(32, 5, 16), (33, 7, 20), (896, 160, 17), (4864, 24, 3)])
def test_int8_matmul_exact_when_activations_are_two_int8_parts(k, n, rows):
    """Activation rows already of the form d (xq + xr / 256) pass the splitting unchanged; the int8 product
    is exact in int32, so the result is the exact product up to fp32 rounding of the combination."""
    x, a, b = _two_part_rows(rows, k)
    w = _int8_layer(k, n).weight
    scales = torch.rand(n) + 0.5
    got = cpu_kernel.int8_matmul(x, w, scales)
    expected = (a @ w.double().t() + b @ w.double().t() / 256) / 8 * scales.double()
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


@needs_ops("int8_matmul")
@pytest.mark.parametrize("k,n", [(33, 7), (96, 41), (896, 160), (4896, 13)])
def test_int8_matmul_of_a_few_rows_is_the_int8_matrix_product_bit_for_bit(k, n):
    """Up to 24 rows go through qwenlm's own loop (groups of 8 activation parts against blocks of 12 weight rows,
    the rest one by one, a masked last line of K), more through PyTorch's int8 matrix product: every row count
    gives, bit for bit, what those rows give in a call of 40 rows; weights over the whole int8 range."""
    torch.manual_seed(6)
    x = torch.randn(40, k)
    x[1, 0], x[2] = 80.0, 0.0  # an outlier; an all-zero row
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    w[0] = -128
    scales = torch.rand(n) + 0.5
    many = cpu_kernel.int8_matmul(x, w, scales)
    for rows in range(1, 25):
        assert torch.equal(cpu_kernel.int8_matmul(x[:rows], w, scales), many[:rows]), rows


@needs_ops("int8_matmul")
@pytest.mark.parametrize("k", [64, 896, 4864])
def test_int8_matmul_error_is_within_the_rounding_of_the_two_parts(k):
    """Any activations: each one is off by at most d / 512 (d = the row's max / 127), so each output by at
    most d / 512 times the weights' absolute row sum times the scale."""
    torch.manual_seed(4)
    x = torch.randn(40, k)
    x[3] *= 0  # an all-zero row
    x[5, 7] = 300.0  # an outlier: that row's steps get coarse
    w = _int8_layer(k, 48).weight
    scales = torch.rand(48) + 0.5
    got = cpu_kernel.int8_matmul(x, w, scales).double()
    exact = x.double() @ w.double().t() * scales.double()
    d = x.double().abs().amax(dim=1, keepdim=True) / 127
    bound = d / 512 * w.double().abs().sum(dim=1) * scales.double() * 1.001 + 1e-6 * exact.abs()
    assert ((got - exact).abs() <= bound).all()
    assert torch.equal(got[3], torch.zeros(48, dtype=torch.float64))


@needs_ops("int8_matmul")
def test_int8_matmul_rows_are_independent_across_its_blocks():
    """Rows go through the int8 product 256 at a time; each row's result is the same whatever it shares a
    block with, and a NaN or an infinity makes only its own row NaN (as in a float product)."""
    torch.manual_seed(5)
    x = torch.randn(600, 96)
    w = _int8_layer(96, 40).weight
    scales = torch.rand(40)
    at_once = cpu_kernel.int8_matmul(x, w, scales)
    pieces = torch.cat([cpu_kernel.int8_matmul(x[i : i + 7], w, scales) for i in range(0, 600, 7)])
    assert torch.equal(at_once, pieces)
    x[10, 3], x[300, 0] = float("nan"), float("inf")
    bad = cpu_kernel.int8_matmul(x, w, scales)
    assert bad[10].isnan().all() and bad[300].isnan().all()
    keep = [i for i in range(600) if i not in (10, 300)]
    assert torch.equal(bad[keep], at_once[keep])


@needs_ops("int4_to_int8")
def test_5bit_kernels_check_the_fifth_bits():
    layer = _int5_layer(192, 8)
    sz = layer.scales_and_zeros.transpose(0, 1).contiguous()
    with pytest.raises(RuntimeError, match="fifth bits"):
        cpu_kernel.int4_gemv(torch.randn(1, 192), layer.qweight, sz, layer.qhigh)  # the saved form, not the kernel's
    with pytest.raises(RuntimeError, match="fifth bits"):
        cpu_kernel.int4_to_int8(layer.qweight, sz, torch.zeros(8, 16, dtype=torch.int8))


@needs_ops("int8_matmul")
def test_int8_matmul_checks_its_arguments():
    w = _int8_layer(64, 8).weight
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernel.int8_matmul(torch.randn(20, 64), w, torch.ones(8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="int8"):
        cpu_kernel.int8_matmul(torch.randn(20, 64), w.float(), torch.ones(8))
    with pytest.raises(RuntimeError, match=r"x \(M, K\)"):
        cpu_kernel.int8_matmul(torch.randn(20, 32), w, torch.ones(8))


@needs_ops("int4_to_int8")
@pytest.mark.parametrize("k,n,make", [(32, 3, _layer), (896, 160, _layer), (64, 5, _int5_layer),
                                      (896, 160, _int5_layer)])  # fmt: skip
def test_int4_weights_as_int8_rows(k, n, make):
    """Each row in 127 steps of its largest magnitude: within half a step of the fp32 dequantisation."""
    layer = make(k, n)
    with torch.no_grad():  # rows of very different magnitudes
        layer.scales_and_zeros.mul_(torch.logspace(-3, 3, n)[None, :, None].bfloat16())
    high = cpu_kernel.high_bits_layout(unpack_high(layer.qhigh)) if isinstance(layer, Int5Linear) else None
    w8, scale = cpu_kernel.int4_to_int8(layer.qweight, layer.scales_and_zeros.transpose(0, 1).contiguous(), high)
    deq = layer.dequantize(torch.float32)
    assert w8.dtype == torch.int8 and scale.dtype == torch.float32
    torch.testing.assert_close(scale, deq.abs().amax(dim=1) / 127, rtol=1e-6, atol=0)
    assert ((w8.float() * scale[:, None] - deq).abs() <= scale[:, None] * (0.5 + 1e-4)).all()
    assert w8.abs().amax(dim=1).eq(127).all()


@needs_ops("int8_matmul", "int4_to_int8")
@pytest.mark.parametrize("make,tol", [(_int8_layer, 1e-4), (_layer, 1e-2)])
def test_prompts_go_through_the_int8_product(make, tol, monkeypatch):
    """Prompt-sized inputs (PREFILL_ROWS rows or more; 4-bit weights that PyTorch's int4 kernel takes:
    INT4_PRODUCT_ROWS) take the int8 matrix product: close to the dequantised fp32 product (int4: plus the
    rounding of its weights to int8 rows)."""
    layer = make(896, 160)
    calls = []
    product = cpu_kernel.int8_matmul
    monkeypatch.setattr(cpu_kernel, "int8_matmul", lambda *a: calls.append(a[0].shape) or product(*a))
    x = torch.randn(2, 20, 896)
    y = layer(x)
    assert calls == [(40, 896)]
    ref = x @ layer.dequantize(torch.float32).t()
    assert ((y - ref).norm() / ref.norm()).item() < tol
    layer(x[:, :1])  # decoding rows do not
    assert len(calls) == 1


@needs_ops("int8_matmul", "int4_to_int8")
def test_big_decoding_batches_of_4bit_weights_take_pytorchs_int4_kernel(monkeypatch):
    """From gemv_rows(4) rows to INT4_PRODUCT_ROWS - 1 (batched decoding), PyTorch's int4 kernel (bf16
    activations, the codes as they are: ~2.7x rounding them to int8 rows for the int8 product at 16 rows); from
    INT4_PRODUCT_ROWS on (prompts) the int8 product. A 5-bit layer, which PyTorch's kernel cannot take, keeps
    the int8 product from PREFILL_ROWS."""
    layer = _layer(896, 160)
    layer.prepare()
    calls = []
    product, packed = cpu_kernel.int8_matmul, torch.ops.aten._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(cpu_kernel, "int8_matmul", lambda *a: calls.append(("int8", a[0].shape[0])) or product(*a))
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu",
                        lambda *a: calls.append(("int4", a[0].shape[0])) or packed(*a))  # fmt: skip
    ref = layer.dequantize(torch.float32).t()
    for rows in (PREFILL_ROWS, 24, INT4_PRODUCT_ROWS - 1, INT4_PRODUCT_ROWS):  # (each row's error: ~bf16's)
        x = torch.randn(rows, 896)
        assert ((layer(x) - x @ ref).norm() / (x @ ref).norm()).item() < 1e-2
    last = INT4_PRODUCT_ROWS
    assert calls == [("int4", PREFILL_ROWS), ("int4", 24), ("int4", last - 1), ("int8", last)]
    five = _int5_layer(896, 160)
    five.prepare()
    five(torch.randn(PREFILL_ROWS, 896))
    assert calls[-1] == ("int8", PREFILL_ROWS)


@needs_kernel
@pytest.mark.parametrize("make", [_layer, _int8_layer])
def test_compiles_as_one_graph(make):
    layer = make(128, 64)
    layer.prepare()
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    for rows in (1, 40):  # the matrix-vector kernel, then the prompt's matrix product
        x = torch.randn(rows, 128)
        torch.testing.assert_close(compiled(x), layer(x))


def test_bypassed_where_it_does_not_apply():
    layer = _layer(96, 32)  # 96 input features: not a multiple of 64
    layer.prepare()
    assert layer._path == "packed"
    odd = _int8_layer(40, 8)  # 40 input features: not a multiple of 32
    odd.prepare()
    assert odd._own is False
    assert odd(torch.randn(1, 40)).shape == (1, 8)  # PyTorch's kernel
    cpu_kernel.set_enabled(False)
    try:
        other = _layer(128, 32)
        other.prepare()
        assert other._path == "packed"
        other8 = _int8_layer(128, 32)
        other8.prepare()
        assert other8._own is False
    finally:
        cpu_kernel.set_enabled(True)


def test_switched_off_by_the_environment():
    code = "from qwenlm.quant import cpu_kernel; print(cpu_kernel.status())"
    env = dict(os.environ, QWENLM_CPU_KERNEL="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "switched off by QWENLM_CPU_KERNEL=0" and out.stderr == ""


def _status_under(value: str) -> list[str]:
    code = "from qwenlm.quant import cpu_kernel; print(cpu_kernel.status()); print(cpu_kernel.isa())"
    env = dict(os.environ, QWENLM_CPU_KERNEL=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split("\n")[:2] + [out.stderr]


def test_a_build_named_by_the_environment():
    status, isa, err = _status_under("avx3")
    assert status == "QWENLM_CPU_KERNEL='avx3' is not one of 0, 1, avx512, avx2" and isa == "None"
    assert "QWENLM_CPU_KERNEL='avx3'" in err  # said once, on stderr
    if cpu_kernel.runs_here(cpu_kernel.AVX2) and cpu_kernel.available():
        assert _status_under("avx2")[:2] == ["available", "avx2"]
    if not cpu_kernel.runs_here(cpu_kernel.AVX512):
        status, isa, _ = _status_under("avx512")
        assert status.startswith("this CPU lacks avx512") and status.endswith("(the avx512 build's flags)")


AVX2_SUITES = [
    "tests/test_cpu_kernel.py",
    "tests/test_decode_attention.py",
    "tests/test_gguf_int4.py",
    "tests/test_kv_cache_dtype.py",
    "tests/test_quant.py",
]


@pytest.mark.skipif(cpu_kernel.isa() != "avx512", reason="the AVX-512 build is not the one loaded: this run tests "
                    "the loaded build")  # fmt: skip
def test_the_avx2_build_passes_the_kernel_tests_on_this_cpu_too():
    # one process holds one build: the kernels' tests again in a process given the AVX2 build, so a machine with
    # AVX-512 tests both builds (a machine without it runs only the AVX2 one in the main run)
    env = dict(os.environ, QWENLM_CPU_KERNEL="avx2")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *AVX2_SUITES]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    summary = out.stdout.strip().splitlines()[-1]
    assert out.returncode == 0, out.stdout[-4000:]
    assert " passed" in summary and " failed" not in summary, summary


def test_moving_a_layer_chooses_its_kernel_again():
    layer = _layer(128, 32)
    layer.prepare()
    layer.to(torch.float32)  # any _apply drops the device-specific layouts
    assert layer._path is None and layer._scales_nk is None and layer._packed is None
    layer8 = _int8_layer(128, 32)
    layer8.prepare()
    layer8.to(torch.float32)
    assert layer8._own is None


@needs_kernel
@pytest.mark.parametrize("n", [1, 15, 16, 17, 33, 151936])
def test_argmax_is_torchs(n):
    # small integers: many ties (the first index wins), NaN (ranked above everything), rows of -inf
    g = torch.Generator().manual_seed(n)
    for trial in range(20):
        x = torch.randint(-3, 3, (3, n), generator=g).float()
        if trial % 4 == 0:
            x[0, int(torch.randint(0, n, (1,), generator=g))] = float("nan")
        if trial % 5 == 0:
            x[1] = float("-inf")
        assert torch.equal(torch.ops.qwenlm_cpu.argmax_rows(x), x.argmax(-1))
        assert torch.equal(cpu_kernel.argmax(x), x.argmax(-1))
    wide = torch.randn(4, 2 * n, generator=g)[:, ::2]  # strided rows
    assert torch.equal(torch.ops.qwenlm_cpu.argmax_rows(wide), wide.argmax(-1))


@needs_kernel
def test_argmax_leaves_other_tensors_to_torch():
    x = torch.randn(2, 40, dtype=torch.bfloat16)
    assert torch.equal(cpu_kernel.argmax(x), x.argmax(-1))
    with pytest.raises(RuntimeError, match=r"argmax_rows: x \(B, V\) float32"):
        torch.ops.qwenlm_cpu.argmax_rows(x)
    with pytest.raises(RuntimeError, match="V >= 1"):
        torch.ops.qwenlm_cpu.argmax_rows(torch.empty(2, 0))


def test_argmax_never_builds_the_kernels():
    # float models never load the kernels; greedy decoding must not build them for the argmax alone
    code = ("import torch; from qwenlm.quant import cpu_kernel; x = torch.randn(2, 50); "
            "assert torch.equal(cpu_kernel.argmax(x), x.argmax(-1)); print(sorted(cpu_kernel._state))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]" and out.stderr == ""


@needs_ops("fit_groups")
@pytest.mark.parametrize("bits", [4, 5])
def test_the_fitting_kernel_rounds_as_the_pytorch_code(bits):
    # the same search with the same float arithmetic; only the order of the sums differs, so a near tie between
    # two steps may go the other way: codes equal nearly everywhere, and never a worse fit than by a rounding
    from qwenlm.quant.linear import fit_int4_groups

    torch.manual_seed(6)
    w = torch.randn(512, 256) * torch.rand(512, 1)
    w[3, 64:96] = -0.5  # a constant group
    kernel = fit_int4_groups(w, 32, bits)
    cpu_kernel.set_enabled(False)
    try:
        plain = fit_int4_groups(w, 32, bits)
    finally:
        cpu_kernel.set_enabled(True)
    assert (kernel[0] == plain[0]).float().mean() > 0.9999

    def error(codes, scale, zero):
        fitted = (codes.float().reshape(512, 8, 32) - (1 << (bits - 1))) * scale[..., None] + zero[..., None]
        return (fitted.reshape(512, 256) - w).square().reshape(512, 8, 32).sum(-1)

    assert torch.all(error(*kernel) <= error(*plain) * (1 + 1e-5) + 1e-12)
    torch.testing.assert_close(error(*kernel).sum(), error(*plain).sum(), rtol=1e-6, atol=0)


def _reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = RMSNorm(weight.shape[0], eps)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm(x)  # own_kernel off: PyTorch's eight operations


@needs_ops("rms_norm")
@pytest.mark.parametrize("shape", [(1, 1, 896), (3, 5, 896), (2, 7), (4, 33), (1, 16)])
def test_rms_norm_is_the_reference_up_to_summation_order(shape):
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g) * 3
    weight = torch.rand(shape[-1], generator=g) + 0.5
    want = _reference_rms_norm(x, weight, 1e-6)
    got = cpu_kernel.rms_norm(x, weight, 1e-6)
    assert got.shape == x.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    strided = torch.randn(shape[-1], 2 * shape[0], generator=g).t()[::2]  # rows of a transposed matrix
    torch.testing.assert_close(cpu_kernel.rms_norm(strided, weight, 1e-6), _reference_rms_norm(strided, weight, 1e-6),
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    zeros = torch.zeros(2, shape[-1])
    assert torch.equal(cpu_kernel.rms_norm(zeros, weight, 1e-6), zeros)  # eps keeps an all-zero row finite


@needs_ops("rms_norm")
def test_rms_norm_checks_its_arguments():
    with pytest.raises(RuntimeError, match=r"rms_norm: x \(\.\.\., K\) and weight \(K,\) float32"):
        cpu_kernel.rms_norm(torch.randn(2, 8, dtype=torch.bfloat16), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match="rms_norm: x"):
        cpu_kernel.rms_norm(torch.randn(2, 8), torch.ones(9), 1e-6)


@needs_ops("rotary")
@pytest.mark.parametrize("rotary_dim,alphas,batch", [(64, [1.0], 2), (32, [1.0], 1), (64, [1.0, 3.0], 2)])
def test_rotary_is_apply_rotary_bit_for_bit(rotary_dim, alphas, batch):
    # queries and keys side by side in a view of a QKV projection's output (strided rows), positions 5..8;
    # a rotary dimension below the head size leaves the rest as it is; one table per row (per-row NTK alphas)
    g = torch.Generator().manual_seed(rotary_dim)
    t, heads, d = 4, 3, 64
    qkv = torch.randn(batch, t, (heads + 1) * d, generator=g)
    qk = qkv[..., : heads * d].view(batch, t, heads, d)
    cos, sin = RotaryEmbedding(rotary_dim, 10000.0).cos_sin(5, 5 + t, alphas, torch.device("cpu"))
    got = cpu_kernel.rotary(qk, cos, sin)
    assert got.is_contiguous() and torch.equal(got, apply_rotary_bthd(qk, cos, sin))
    with pytest.raises(RuntimeError, match=r"rotary: cos and sin \(1 or B, 1, T, d\)"):
        cpu_kernel.rotary(qk, cos[..., :-1], sin[..., :-1])  # an odd d
    with pytest.raises(RuntimeError, match=r"rotary: x \(B, T, H, D\) float32 with contiguous rows"):
        cpu_kernel.rotary(qk.transpose(2, 3), cos, sin)


@needs_ops("rms_norm", "rotary")
def test_a_quantised_model_decodes_through_the_fused_norm_and_rotary(monkeypatch):
    # a quantised model's norms take the kernel (a float model's do not); its prompt and one-token steps go
    # through the fused norm and rotary, whose logits are the reference operations' up to the norms' sums (int8
    # weights: the int4 layers' rounding of their activations amplifies a last-bit change to ~1e-3 of the logits)
    config = tiny_config(hidden_size=128, num_attention_heads=2, kv_channels=64)
    assert not any(m.own_kernel for m in random_model(config).modules() if isinstance(m, RMSNorm))
    model = quantize(random_model(config), 8)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * config.num_hidden_layers + 1 and all(m.own_kernel for m in norms)
    calls = {"rms_norm": 0, "rotary": 0}
    for op in calls:
        kernel = getattr(cpu_kernel, op)
        counted = lambda *a, _k=kernel, _op=op: calls.__setitem__(_op, calls[_op] + 1) or _k(*a)
        monkeypatch.setattr(cpu_kernel, op, counted)
    ids = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(0))

    def greedy_logits():
        with torch.inference_mode():
            cache = model.new_cache(16)
            out = [model(ids, past_key_values=cache).logits[:, -1]]
            for _ in range(4):
                out.append(model(out[-1].argmax(-1, keepdim=True), past_key_values=cache).logits[:, -1])
        return torch.stack(out)

    fused = greedy_logits()
    layers = config.num_hidden_layers
    assert calls["rms_norm"] == 5 * (2 * layers + 1)
    assert calls["rotary"] == 5 * layers
    for m in norms:
        m.own_kernel = False
    monkeypatch.setattr(cpu_kernel, "rotary", apply_rotary_bthd)
    torch.testing.assert_close(fused, greedy_logits(), rtol=0, atol=2e-4 * float(fused.abs().max()))  # seen: 6e-5
    with torch.enable_grad():  # gradients: PyTorch's operations (the kernels have no backward)
        for m in norms:
            m.own_kernel = True
        x = torch.randn(1, 2, 128, requires_grad=True)
        norms[0](x).sum().backward()
        assert x.grad is not None


def test_eager_kernels_are_for_float32_cpu_tensors_without_gradients_outside_compiled_passes():
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert cpu_kernel.eager_float_cpu(x)
        assert not cpu_kernel.eager_float_cpu(x.to(torch.bfloat16))
        assert not cpu_kernel.eager_float_cpu(x.to("meta"))
        assert torch.compile(lambda t: torch.tensor(cpu_kernel.eager_float_cpu(t)), backend="eager")(x).item() is False
    assert not cpu_kernel.eager_float_cpu(x)  # gradients recorded
