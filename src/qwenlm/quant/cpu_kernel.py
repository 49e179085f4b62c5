"""qwenlm's own int4 and int8 decoding kernels for x86 CPUs with AVX-512 VNNI (``cpu_kernels.cpp``).

PyTorch's ``_weight_int4pack_mm_for_cpu`` reaches 9-16 GB/s on the small matrices of a small model at batch
1, its ``_weight_int8pack_mm`` ~7 GB/s; these kernels read the weights in ``Int4Linear``'s and
``Int8Linear``'s own layouts, prefetch ahead of the hardware, and multiply them on the VNNI byte dot-product
unit with activations split into two int8 parts per block of 32 (llama.cpp's Q8 blocks plus their rounding
residual: ~15 bits; int4 decoding through it scored text as well as the bf16 matmul, see
benchmarks/RESULTS.md). For prompt-sized products it splits activation rows the same way for PyTorch's int8
matrix product (``int8_matmul``; int4 weights go in as int8 rows, ``int4_to_int8``). And the attention of one
new token against the KV cache (``decode_attention``), which PyTorch's CPU SDPA does 3-4x slower at these sizes,
and the rounding of fp32 weights to 4-bit codes while loading (``fit_groups``).
It is compiled on first use with the machine's C++ compiler through ``torch.utils.cpp_extension`` (a few
seconds; cached afterwards) and needs ``ninja`` (``pip install ninja``, in the ``demo`` and ``cpu-kernel``
extras). Without AVX-512 VNNI, a compiler or ninja, or with ``QWENLM_CPU_KERNEL=0``, ``Int4Linear`` and
``Int8Linear`` use PyTorch's kernels; ``status()`` says which and why.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
NAME = "qwenlm_cpu_kernels"
FLAGS = ["-O3", "-march=x86-64-v4", "-mavx512vnni", "-fopenmp", "-ffp-contract=off"]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")

SWITCHED_OFF = "switched off by QWENLM_CPU_KERNEL=0"

_state: dict[str, object] = {}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as /proc/cpuinfo lists them (empty where it cannot be read); read once."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _build() -> str | None:
    """Compile and load the kernel; None on success, else the reason it is not used."""
    if os.environ.get("QWENLM_CPU_KERNEL", "1") == "0":
        return SWITCHED_OFF
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    try:
        import ninja  # noqa: F401  (torch.utils.cpp_extension builds with it)
    except ImportError:
        return "ninja is not installed (pip install ninja)"
    from torch.utils import cpp_extension

    try:
        built = Path(cpp_extension._get_build_directory(NAME, False)) / f"{NAME}.so"
        if not built.exists():
            print("qwenlm: compiling the int4/int8 CPU kernels (once, a few seconds)", file=sys.stderr)
        cpp_extension.load(name=NAME, sources=[str(SOURCE)], extra_cflags=FLAGS, is_python_module=False,
                           verbose=False)  # fmt: skip
    except Exception as e:  # no compiler, headers, ...: the PyTorch kernel still works
        return f"building {SOURCE.name} failed ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200]})"

    @torch.library.register_fake("qwenlm_cpu::int4_gemv")
    def _(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, high: torch.Tensor | None = None
          ) -> torch.Tensor:  # fmt: skip
        return x.new_empty(x.shape[0], packed.shape[0], dtype=torch.float32)

    @torch.library.register_fake("qwenlm_cpu::int8_gemv")
    def _(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)

    @torch.library.register_fake("qwenlm_cpu::int8_matmul")
    def _(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)

    @torch.library.register_fake("qwenlm_cpu::decode_attention")
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("qwenlm_cpu::decode_attention_upto")
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, length: torch.Tensor
          ) -> torch.Tensor:  # fmt: skip
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("qwenlm_cpu::argmax_rows")
    def _(x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], dtype=torch.int64)

    @torch.library.register_fake("qwenlm_cpu::fit_groups")
    def _(w: torch.Tensor, bits: int, steps: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, k = w.shape
        return w.new_empty(n, k, dtype=torch.uint8), w.new_empty(n, k // 32), w.new_empty(n, k // 32)

    @torch.library.register_fake("qwenlm_cpu::int4_to_int8")
    def _(packed: torch.Tensor, scales_zeros: torch.Tensor, high: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        n, half_k = packed.shape
        return packed.new_empty(n, 2 * half_k, dtype=torch.int8), packed.new_empty(n, dtype=torch.float32)

    return None


def status() -> str:
    """'available', or why the kernel is not used (built on the first call)."""
    if "reason" not in _state:
        _state["reason"] = _build()
        if _state["reason"] not in (None, SWITCHED_OFF):  # a deliberate switch needs no notice
            print(f"qwenlm: int4/int8 CPU kernels not used: {_state['reason']}; using PyTorch's", file=sys.stderr)
    return "available" if _state["reason"] is None else str(_state["reason"])


def available() -> bool:
    return _state.get("enabled", True) and status() == "available"


def set_enabled(enabled: bool) -> None:
    """Use (the default where it builds) or bypass the kernel in this process, e.g. to compare the two."""
    _state["enabled"] = enabled


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor,
              high: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``x`` (M <= 16, K) times the int4 weights (N, K/2 codes; (N, K/32, 2) bf16 scale and zero): (M, N) fp32.
    ``high``: 5-bit weights' fifth bits in the kernel's layout (``high_bits_layout``), w = (q - 16) s + z."""
    return torch.ops.qwenlm_cpu.int4_gemv(x, packed, scales_zeros, high)


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x`` (M <= 16, K, K a multiple of 32) times int8 weights (N, K) with one scale per output row (N,):
    (M, N) fp32."""
    return torch.ops.qwenlm_cpu.int8_gemv(x, weight, scales)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x`` (M, K) times int8 weights (N, K) with an fp32 scale per output row (N,): (M, N) fp32, for
    prompt-sized M. Each activation row becomes two int8 parts with one scale, x = d (xq + xr / 256) (~15
    bits, as in the decoding kernels), and the 2M rows go through PyTorch's int8 matrix product
    (``torch._int_mm``: oneDNN's VNNI/AMX kernels, ~4x MKL's fp32 product on 2 cores without AMX, so ~2x with
    the two parts), 256 rows at a time."""
    return torch.ops.qwenlm_cpu.int8_matmul(x, weight, scales)


def int4_to_int8(packed: torch.Tensor, scales_zeros: torch.Tensor,
                 high: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The int4 weights (N, K/2 codes; (N, K/32, 2) bf16 scale and zero; ``high`` as for ``int4_gemv``) as int8
    (N, K) with one fp32 scale per row (N,), for ``int8_matmul``: each row dequantised in fp32, then rounded
    to steps of max|w| / 127."""
    return torch.ops.qwenlm_cpu.int4_to_int8(packed, scales_zeros, high)


def fit_groups(w: torch.Tensor, bits: int, steps: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``linear.fit_int4_groups(w, 32, bits)`` for fp32 CPU weights (N, K), K a multiple of 32, trying the step
    offsets ``steps``: codes (N, K) uint8, scale and zero (N, K/32) fp32, with the same arithmetic, ~20x
    faster (its sums run in another order, so a near tie between two steps may go the other way)."""
    return torch.ops.qwenlm_cpu.fit_groups(w, bits, list(steps))


def high_bits_layout(bits: torch.Tensor) -> torch.Tensor:
    """5-bit weights' fifth bits (N, K) as zeros and ones (``linear.unpack_high``) in the kernels' layout
    (N, ceil(K/128) * 16) bytes: per 128 weights a 64-bit mask of the even positions, then of the odd ones."""
    from .linear import pack_bits  # (linear imports this module)

    n, k = bits.shape
    steps = -(-k // 128)
    bits = torch.cat([bits, bits.new_zeros(n, steps * 128 - k)], dim=1).reshape(n, steps, 64, 2)
    planes = bits.permute(0, 1, 3, 2).reshape(n, steps, 2, 8, 8)  # (..., even|odd, byte, bit)
    return pack_bits(planes).reshape(n, steps * 16).contiguous()


ATTENTION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the caches decode_attention reads as they are


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
                     length: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Attention of one new token per row: ``q`` (B, H, 1, D), ``k``/``v`` (B, KVH, L, D) of one of
    ``ATTENTION_DTYPES`` (a float16 or bfloat16 cache is read as it is, not cast per step) with contiguous rows
    (KV-cache views), H a multiple of KVH (grouped queries), D 64 or 128; ``bias`` (B or 1, 1, 1, L) added to
    the scores. ``length``: one int64 n (1 <= n <= L) in a tensor: only the first n keys are attended (a
    preallocated cache's filled part, read from the tensor when the kernel runs, so a compiled step need not
    know it). Scale 1/sqrt(D), as SDPA's default; (B, H, 1, D) in q's dtype."""
    if length is None:
        return torch.ops.qwenlm_cpu.decode_attention(q, k, v, bias)
    return torch.ops.qwenlm_cpu.decode_attention_upto(q, k, v, bias, length)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` of logits (B, V): with qwenlm's kernel for float32 rows on CPU once the kernels
    are loaded (by a quantised model; never built for this alone), else PyTorch's. PyTorch's CPU argmax
    takes ~0.33 ms for Qwen's vocabulary, ~1 % of an int4 decoding step; the kernel ~0.03 ms."""
    loaded = _state.get("reason", SWITCHED_OFF) is None  # built in this process, not building it now
    if (loaded and _state.get("enabled", True) and x.dim() == 2
            and x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[1] > 0):  # fmt: skip
        return torch.ops.qwenlm_cpu.argmax_rows(x)
    return x.argmax(dim=-1)
