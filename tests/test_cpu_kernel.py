"""qwenlm's AVX-512 VNNI int4 and int8 kernels (``quant.cpu_kernel``): exact on int8-representable
activations, close to the dequantised product otherwise, used by ``Int4Linear`` and ``Int8Linear`` where they
apply, traceable by torch.compile, and bypassed cleanly where they cannot be used."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from qwenlm.quant import Int4Linear, Int8Linear, cpu_kernel, linear

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason=f"int4/int8 CPU kernels: {cpu_kernel.status()}")


def _layer(k: int, n: int, seed: int = 0) -> Int4Linear:
    torch.manual_seed(seed)
    return Int4Linear.from_linear(nn.Linear(k, n, bias=False))


def _int8_layer(k: int, n: int, bias: bool = False) -> Int8Linear:
    torch.manual_seed(0)
    return Int8Linear.from_linear(nn.Linear(k, n, bias=bias))


def _int8_blocks(rows: int, k: int) -> torch.Tensor:
    """Activations the kernels' rounding leaves alone: integers in each block of 32 with a maximum of 127."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-127, 128, (rows, k), generator=g).float()
    x.view(rows, -1, 32)[..., 0] = 127.0  # every block's maximum is 127: scale exactly 1
    return x


@needs_kernel
@pytest.mark.parametrize("k,n,rows", [(64, 16, 1), (128, 48, 3), (192, 24, 2), (896, 160, 15), (960, 33, 5)])
def test_exact_when_activations_are_int8_blocks(k, n, rows):
    """Activations already on an int8 grid (each block of 32 holds integers with a maximum of 127) are not
    changed by the kernel's rounding, so it must equal the dequantised product up to fp32 summation."""
    layer = _layer(k, n)
    x = _int8_blocks(rows, k)
    got = cpu_kernel.int4_gemv(x, layer.qweight, layer.scales_and_zeros.transpose(0, 1).contiguous())
    expected = x.double() @ layer.dequantize(torch.float32).double().t()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-3)


@needs_kernel
def test_close_to_the_dequantised_product_and_used_by_int4linear():
    layer = _layer(896, 1152)
    x = torch.randn(2, 1, 896)
    y = layer(x)
    assert layer._path == "own"
    ref = x.reshape(2, 896) @ layer.dequantize(torch.float32).t()
    assert ((y.reshape(2, -1) - ref).norm() / ref.norm()).item() < 2e-3  # ~15-bit activations: ~bf16 rounding
    # from OWN_KERNEL_ROWS rows on PyTorch's kernel is faster and takes over; both agree
    x8 = torch.randn(8, 896)
    own = cpu_kernel.int4_gemv(x8, layer.qweight, layer._scales_nk)
    torch.testing.assert_close(layer(x8), own, atol=0.05, rtol=0.02)


@needs_kernel
@pytest.mark.parametrize("k,n,rows", [(32, 5, 1), (64, 16, 2), (96, 20, 3), (896, 160, 15), (960, 33, 5)])
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
    # from OWN_KERNEL_ROWS rows on, PyTorch's kernel (bf16 activations); both agree
    x8 = torch.randn(8, 896)
    own = kernel(x8, layer.weight, layer.scales) + layer.bias
    torch.testing.assert_close(layer(x8), own, atol=0.05, rtol=0.02)
    assert len(calls) == 1


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k,n", [(32, 3), (896, 160)])
def test_dequantised_in_one_pass_equals_dequantize_bit_for_bit(k, n, dtype):
    layer = _layer(k, n)
    with torch.no_grad():  # scales spanning many magnitudes, so that every rounding step matters
        layer.scales_and_zeros.mul_(torch.logspace(-3, 3, n)[None, :, None].bfloat16())
    got = cpu_kernel.int4_dequant(layer.qweight, layer.scales_and_zeros.transpose(0, 1).contiguous(), dtype)
    assert got.dtype == dtype
    assert torch.equal(got, layer.dequantize(dtype))


def test_dequantisation_dtype_is_checked():
    layer = _layer(64, 16)
    with pytest.raises(ValueError, match="float16"):
        cpu_kernel.int4_dequant(layer.qweight, layer.scales_and_zeros.transpose(0, 1).contiguous(), torch.float16)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prompts_use_the_one_pass_dequantisation(dtype, monkeypatch):
    monkeypatch.setattr(linear, "prompt_dtype", lambda device: dtype)
    layer = _layer(896, 160)
    x = torch.randn(1, 40, 896)  # prompt-sized: dequantise, then one matrix product in the prompt dtype
    y = layer(x)
    assert layer._path == "own"
    expected = torch.nn.functional.linear(x.to(dtype), layer.dequantize(dtype)).float()
    assert torch.equal(y, expected)


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


def test_moving_a_layer_chooses_its_kernel_again():
    layer = _layer(128, 32)
    layer.prepare()
    layer.to(torch.float32)  # any _apply drops the device-specific layouts
    assert layer._path is None and layer._scales_nk is None and layer._packed is None
    layer8 = _int8_layer(128, 32)
    layer8.prepare()
    layer8.to(torch.float32)
    assert layer8._own is None
