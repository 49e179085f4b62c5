"""Skip markers for tests of qwenlm's CPU kernels: a build of them loaded for this CPU (``needs_kernel``), or
operations that only some builds have (``needs_ops``: the AVX2 build has no prompt-sized products)."""

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
