"""Skip markers for tests of qwenlm's CPU kernels: a build of them loaded for this CPU (``needs_kernel``), or
operations that only some builds have (``needs_ops``: the AVX2 build has no prompt-sized products); and how close
the loaded build's int4 decoding product comes to the dequantised weights' (``int4_decoding_error``)."""

from __future__ import annotations

import pytest

from qwenlm.quant import cpu_kernel

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason=f"CPU kernels: {cpu_kernel.status()}")


def needs_ops(*ops: str) -> pytest.MarkDecorator:
    missing = [op for op in ops if not cpu_kernel.provides(op)]
    if cpu_kernel.available():
        why = f"the {cpu_kernel.isa()} build of the CPU kernels has no {', '.join(missing)}"
    else:
        why = f"CPU kernels: {cpu_kernel.status()}"
    return pytest.mark.skipif(bool(missing), reason=why)


needs_attention = needs_ops("decode_attention")


def int4_decoding_error() -> float:
    """The relative error (of the norm) that an int4 or int5 decoding product may have against the dequantised
    weights' on Gaussian activations: the AVX2 build rounds the activations to int8 per block of 8 (~0.4 %); the
    AVX-512 build to ~15 bits, PyTorch's kernels to bf16 (~0.1 %)."""
    return 6e-3 if cpu_kernel.available() and cpu_kernel.isa() == "avx2" else 2e-3
