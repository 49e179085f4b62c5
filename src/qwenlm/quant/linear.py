"""Weight-only quantised linear layers.

- ``Int8Linear``: per-output-channel symmetric int8 (``aten._weight_int8pack_mm``).
- ``Int4Linear``: group-wise asymmetric 4-bit (``aten._weight_int4pack_mm_for_cpu`` on CPU,
  ``aten._weight_int4pack_mm`` on CUDA).
- ``Int5Linear``: the same with a fifth bit per weight, for GGUF tensors stored in 5 bits (Q5_0, Q5_1),
  whose codes it keeps (PyTorch has no 5-bit kernel: qwenlm's own, else the dequantised weight).

Both decode (a few rows) through qwenlm's own kernels on CPUs with AVX-512 VNNI (``cpu_kernel``), which
round fp32 activations themselves; PyTorch's kernels above get them in bf16 (they are slow with fp32 ones).
Results come back in the caller's dtype. Many rows at once (prefill) go through one matrix product instead:
on those CPUs an int8 one (``cpu_kernel.int8_matmul``: the activations in two int8 parts per row, ~15 bits;
int4 weights rounded to int8 rows per call), elsewhere the weight dequantised once per call (in
``prompt_dtype``: bf16 where matrix units multiply it, else fp32): matrix-vector kernels are for decoding,
matrix products for prompts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernel

KERNEL_DTYPE = torch.bfloat16
PREFILL_ROWS = 16  # from this many rows on, a matrix product (int8, or with the weight dequantised)
# ...except for 4-bit weights where PyTorch's int4 kernel runs next to qwenlm's: on a 2-core Zen 5 it took the demo
# model's 4-bit layers at 16 rows in 34 ms against 92 for rounding them to int8 rows and the int8 product, at 32
# rows 58 against 112 (benchmarks/RESULTS.md); batches below this many rows go through it. (At 64 rows it was
# 132 against 170 ms, but 64-token prompts of the whole model were not faster for it: prompts keep the product.)
INT4_PRODUCT_ROWS = 32
# (below how many rows qwenlm's int4/int8 matrix-vector CPU kernels run depends on their build:
# cpu_kernel.gemv_rows)
ROWS_PER_CHUNK_ELEMENTS = 1 << 20  # 4-bit fitting works on this many weights at a time (memory; ~1.7x faster than 4M)
INT8_CHUNK_ELEMENTS = 1 << 18  # int8 rounding works on this many weights at a time (in cache)
SCALE_STEPS = tuple(x / 5 for x in range(-5, 6))  # offsets to the 15 steps of a group's range that are tried


# read once at import, so that compiled passes see a constant
CPU_HAS_AMX = "amx_bf16" in cpu_kernel.cpu_flags()


def prompt_dtype(device: torch.device) -> torch.dtype:
    """The dtype of prompt-sized products with dequantised weights (where ``cpu_kernel.int8_matmul`` does not
    run): bf16 on GPUs and on CPUs with AMX, whose matrix units multiply it several times faster than fp32;
    fp32 on other CPUs, where oneDNN's bf16 products (AVX-512 BF16 at best) are slower than MKL's fp32 ones
    (0.16 vs 0.22 TFLOP/s on 2 cores without AMX, benchmarks/RESULTS.md)."""
    if device.type != "cpu" or CPU_HAS_AMX:
        return KERNEL_DTYPE
    return torch.float32


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(n, k) codes in 0..15 -> (n, k/2) bytes: weight 2i in the low nibble, 2i + 1 in the high one (the
    layout ``Int4Linear.qweight`` saves)."""
    return codes[:, ::2] | (codes[:, 1::2] << 4)


def pack_high(codes: torch.Tensor) -> torch.Tensor:
    """(n, k) codes in 0..31 -> their fifth bits, (n, k/8) bytes: bit j of byte i for weight 8i + j (the
    layout ``Int5Linear.qhigh`` saves; the low four bits go through ``pack_int4``)."""
    n, k = codes.shape
    return pack_bits(((codes >> 4) & 1).reshape(n, k // 8, 8))


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., 8) zeros and ones -> (...) bytes, the first one in the lowest bit."""
    return (bits << torch.arange(8, device=bits.device, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def unpack_high(high: torch.Tensor) -> torch.Tensor:
    """``pack_high``'s bytes (n, k/8) -> the fifth bits (n, k), zeros and ones."""
    bits = (high[:, :, None] >> torch.arange(8, device=high.device, dtype=torch.uint8)) & 1
    return bits.reshape(high.shape[0], -1)


def fit_int4_groups(w: torch.Tensor, group_size: int,
                    bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """4-bit codes for ``w`` (n, k) in groups of ``group_size`` along k, each group ~ ``(q - 8) * scale + zero``
    (``bits=5``: codes 0..31, ``(q - 16) * scale + zero``).

    Plain min-max rounding wastes the grid on outliers. For each group we try a few grid spacings around
    min-max (``SCALE_STEPS``), round, then refit scale and offset to the chosen codes by least squares, and
    keep the spacing with the smallest squared error (the idea of llama.cpp's k-quant search). A group that
    already lies on a 4-bit grid is recovered exactly. Returns codes (n, k) uint8 and scale, zero (n, k/g).
    """
    if group_size == 32 and w.dtype == torch.float32 and w.device.type == "cpu" and cpu_kernel.provides("fit_groups"):
        return cpu_kernel.fit_groups(w, bits, SCALE_STEPS)  # the same arithmetic, ~20x faster
    n, k = w.shape
    top, middle = (1 << bits) - 1, 1 << (bits - 1)
    g = w.reshape(n, k // group_size, group_size)
    lo = g.amin(dim=-1, keepdim=True)
    span = (g.amax(dim=-1, keepdim=True) - lo).clamp(min=1e-8)
    sum_w = g.sum(dim=-1, keepdim=True)
    # ``(g - lo) * ((top + step) / span)`` as PyTorch computes it (a float over a tensor: reciprocal, then
    # multiply), with the parts that do not change per step made once
    shifted, inverse = g - lo, span.reciprocal()
    best_err = best_step = best_s = best_m = None
    for step in SCALE_STEPS:
        q = torch.clamp(torch.round(shifted * (inverse * (top + step))), 0, top)
        sum_q, sum_qq, sum_qw = q.sum(-1, keepdim=True), (q * q).sum(-1, keepdim=True), (q * g).sum(-1, keepdim=True)
        det = group_size * sum_qq - sum_q * sum_q
        flat = det <= 0  # every code equal: the group is constant
        s = torch.where(flat, span / top, (group_size * sum_qw - sum_q * sum_w) / torch.where(flat, 1.0, det))
        m = (sum_w - s * sum_q) / group_size
        err = (torch.addcmul(m, s, q) - g).square_().sum(-1, keepdim=True)
        if best_err is None:
            best_err, best_step, best_s, best_m = err, torch.full_like(err, step), s, m
        else:  # the best step per group, not its codes: those are made once at the end
            better = err < best_err
            best_err, best_step = torch.where(better, err, best_err), torch.where(better, step, best_step)
            best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
    codes = torch.clamp(torch.round(shifted * (inverse * (top + best_step))), 0, top)
    scale, offset = best_s.squeeze(-1), best_m.squeeze(-1)
    return codes.to(torch.uint8).reshape(n, k), scale, offset + middle * scale


def round_rows(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``block`` rounded to int8 steps of its own scale, max |w| / 127: the codes (as integral floats
    in -127..127) and the (rows,) float32 scales."""
    block = block.float()
    scales = block.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    return block.div(scales[:, None]).round_().clamp_(-127, 127), scales


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=KERNEL_DTYPE, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None
        self._own: bool | None = None  # decode through cpu_kernel.int8_gemv; chosen by prepare()

    def prepare(self) -> None:
        """Choose the decoding kernel for the weights' device now, not inside the first compiled pass:
        qwenlm's own kernel on CPUs it builds for (``cpu_kernel``: AVX-512 VNNI or AVX2), else PyTorch's."""
        self._own = self.weight.device.type == "cpu" and self.in_features % 32 == 0 and cpu_kernel.available()
        self._gemv_rows = cpu_kernel.gemv_rows(8) if self._own else 0  # batches below it go through int8_gemv

    def _apply(self, fn, recurse=True):  # moved or cast: choose again for the new device
        self._own = None
        return super()._apply(fn, recurse)

    @property
    def prepared(self) -> bool:
        return self._own is not None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach()
        rows = cls.block_rows(linear.in_features)
        blocks = (w[i : i + rows] for i in range(0, linear.out_features, rows))
        return cls.from_row_blocks(blocks, tuple(w.shape), linear.bias, device=w.device)

    @staticmethod
    def block_rows(in_features: int) -> int:
        """Rows rounded per block (``from_linear``, ``from_row_blocks``' callers): its temporaries stay in cache."""
        return max(1, INT8_CHUNK_ELEMENTS // in_features)

    @classmethod
    def from_row_blocks(cls, blocks: Iterable[torch.Tensor], shape: tuple[int, int], bias: torch.Tensor | None = None,
                        device: torch.device | str | None = None) -> Int8Linear:  # fmt: skip
        """From the weight's rows, a block of them at a time (e.g. dequantised from a file block by block, so
        the float weight never exists whole), each row rounded with its own scale."""
        out_f, in_f = shape
        out = cls(in_f, out_f, bias is not None, device=device)
        at = 0
        for block in blocks:
            codes, scales = round_rows(block)
            out.weight[at : at + len(block)], out.scales[at : at + len(block)] = codes, scales
            at += len(block)
        if at != out_f:
            raise ValueError(f"row blocks gave {at} rows, the weight has {out_f}")
        if bias is not None:
            out.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return out

    def dequantize(self, dtype: torch.dtype = KERNEL_DTYPE) -> torch.Tensor:
        return self.weight.to(dtype) * self.scales[:, None].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._own is None:
            self.prepare()
        if x.device.type != "cpu":
            # int8 -> bf16 inside the product, the scale after it: torch.compile fuses the conversion into
            # the matrix-vector kernel, so decoding reads one byte per weight (PyTorch's own CUDA int8
            # kernel is a naive fp32 one)
            y = F.linear(x2.to(KERNEL_DTYPE), self.weight.to(KERNEL_DTYPE)) * self.scales
        elif x.requires_grad:  # the CPU kernels have no backward: a differentiable product
            y = F.linear(x2, self.dequantize(x.dtype))
        elif x2.shape[0] < self._gemv_rows:
            y = cpu_kernel.int8_gemv(x2, self.weight, self.scales)  # rounds x itself: no bf16 step
        elif self._own and cpu_kernel.provides("int8_matmul"):  # batches, prompts (1.7x PyTorch's kernel at 8 rows)
            y = cpu_kernel.int8_matmul(x2, self.weight, self.scales.float())
        elif x2.shape[0] >= PREFILL_ROWS:
            dtype = prompt_dtype(x.device)
            y = F.linear(x2.to(dtype), self.dequantize(dtype))
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(KERNEL_DTYPE), self.weight, self.scales)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"


class Int4Linear(nn.Module):
    """4-bit weights in groups of ``group_size`` input features, each group with a scale and a zero point.

    ``qweight`` holds the unpacked 4-bit values two per byte (the portable form that is saved);
    the kernel's packed layout is made on the device at first use.
    """

    BITS = 4
    PYTORCH_KERNEL = True  # PyTorch has a packed kernel for these weights

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = 32, device=None) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of the 4-bit group size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        # (groups, out, 2): scale and zero in the kernel's convention, w = (q - 8) * scale + zero
        self.register_buffer(
            "scales_and_zeros", torch.empty(groups, out_features, 2, dtype=KERNEL_DTYPE, device=device)
        )
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None
        # the kernels' layouts, made by prepare(): buffers, so that compiled and exported steps know them by
        # name (qwenlm.generation.exported binds an exported step to them), but not saved (state_dict)
        for name in ("_packed", "_scales_nk", "_high_nk"):
            self.register_buffer(name, None, persistent=False)
        self._forget_kernel_state()

    def _forget_kernel_state(self) -> None:
        self._path: str | None = None  # "own" (cpu_kernel), "packed" (PyTorch's kernel) or "matmul"; by prepare()
        self._gemv_rows = 0  # batches of fewer rows go through cpu_kernel.int4_gemv (path "own")
        self._product_rows = PREFILL_ROWS  # from this many rows on, a matrix product (int8 or dequantised)
        self._packed: torch.Tensor | None = None  # PyTorch's packed layout
        self._scales_nk: torch.Tensor | None = None  # (out, groups, 2) scales and zeros for cpu_kernel
        self._high_nk: torch.Tensor | None = None  # Int5Linear's fifth bits in cpu_kernel's layout

    def _apply(self, fn, recurse=True):  # moved or cast: kernel layouts are made again for the new device
        self._forget_kernel_state()
        return super()._apply(fn, recurse)

    @property
    def prepared(self) -> bool:
        return self._path is not None

    def _load_from_state_dict(self, *args, **kwargs):  # new weights: likewise
        self._forget_kernel_state()
        return super()._load_from_state_dict(*args, **kwargs)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4Linear:
        w = linear.weight.detach()
        rows = cls.block_rows(linear.in_features)
        blocks = (w[r : r + rows] for r in range(0, linear.out_features, rows))
        return cls.from_row_blocks(blocks, tuple(w.shape), linear.bias, group_size, device=w.device)

    @staticmethod
    def block_rows(in_features: int) -> int:
        """Rows fitted per block (``from_linear``, ``from_row_blocks``' callers)."""
        return max(1, ROWS_PER_CHUNK_ELEMENTS // in_features)

    @classmethod
    def from_row_blocks(cls, blocks: Iterable[torch.Tensor], shape: tuple[int, int], bias: torch.Tensor | None = None,
                        group_size: int = 32, device: torch.device | str | None = None) -> Int4Linear:  # fmt: skip
        """From the weight's rows, a block of them at a time (as ``Int8Linear.from_row_blocks``), each block's
        groups fitted as ``from_linear`` fits them."""
        n, k = shape
        out = cls(k, n, bias is not None, group_size, device=device)
        at = 0
        for block in blocks:
            out._set_codes(at, *fit_int4_groups(block.float(), group_size, cls.BITS))
            at += len(block)
        if at != n:
            raise ValueError(f"row blocks gave {at} rows, the weight has {n}")
        out._set_bias(bias)
        return out

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   bias: torch.Tensor | None = None) -> Int4Linear:  # fmt: skip
        """From codes (n, k) in 0..15 (``Int5Linear``: 0..31) and per-group scale, zero (n, k/g) as
        ``fit_int4_groups`` returns them (e.g. ``gptq.gptq_int4``)."""
        n, k = codes.shape
        out = cls(k, n, bias is not None, k // scale.shape[1], device=codes.device)
        out._set_codes(0, codes, scale, zero)
        out._set_bias(bias)
        return out

    def _set_codes(self, start: int, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Rows ``start``.. from their codes (rows, k) and (rows, groups) scale and zero."""
        self._set_rows(start, pack_int4(codes & 0x0F), scale, zero)

    def _set_rows(self, start: int, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Rows ``start``.. from packed codes (``pack_int4``) and their (rows, groups) scale and zero."""
        end = start + packed.shape[0]
        self.qweight[start:end] = packed
        self.scales_and_zeros[:, start:end] = torch.stack([scale.t(), zero.t()], dim=-1).to(KERNEL_DTYPE)

    def _set_bias(self, bias: torch.Tensor | None) -> None:
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_grid(cls, grid: Any, bias: torch.Tensor | None = None) -> Int4Linear:
        """Take over weights that already are 4-bit codes in groups of 32 (``gguf_int4.Int4Grid``): the
        codes unchanged, scale and offset rounded to the kernel's bf16. A grid with fifth bits (``high``)
        becomes an ``Int5Linear``."""
        if getattr(grid, "high", None) is not None and cls is Int4Linear:
            return Int5Linear.from_grid(grid, bias)
        n, k = grid.shape
        out = cls(k, n, bias is not None, 32)
        out._set_rows(0, grid.packed, grid.scale, grid.zero)
        out._set_bias(bias)
        return out

    def _values(self) -> torch.Tensor:
        q = torch.empty(self.out_features, self.in_features, dtype=torch.uint8, device=self.qweight.device)
        q[:, ::2] = self.qweight & 0x0F
        q[:, 1::2] = self.qweight >> 4
        return q

    def dequantize(self, dtype: torch.dtype = KERNEL_DTYPE) -> torch.Tensor:
        q = self._values().to(dtype).reshape(self.out_features, -1, self.group_size)
        scale = self.scales_and_zeros[..., 0].t()[..., None].to(dtype)
        zero = self.scales_and_zeros[..., 1].t()[..., None].to(dtype)
        return ((q - (1 << (self.BITS - 1))) * scale + zero).reshape(self.out_features, self.in_features)

    def prepare(self) -> None:
        """Choose the decoding kernel for the weights' device and make its layout now, not inside the first
        compiled or recorded step: qwenlm's own AVX-512 kernel on CPUs that have it (``cpu_kernel``), else
        PyTorch's packed kernel where the shape allows, else a dequantised matmul."""
        self._forget_kernel_state()
        device = self.qweight.device.type
        packed_fits = self.PYTORCH_KERNEL and self.out_features % 16 == 0
        if self._own_kernel_fits():
            self._own_layout()
            self._path = "own"
            # batches below _gemv_rows through int4_gemv; larger ones (to PREFILL_ROWS) through PyTorch's kernel
            # where the build says it is faster there and the weights fit it
            self._gemv_rows = cpu_kernel.gemv_rows(4) if packed_fits else PREFILL_ROWS
            if self._gemv_rows < PREFILL_ROWS:
                self._kernel_weight()
                if cpu_kernel.provides("int8_matmul"):  # PyTorch's kernel also for batches of 16-31 rows
                    self._product_rows = INT4_PRODUCT_ROWS
        elif packed_fits and (device == "cpu" or self._cuda_k_tiles()):
            self._kernel_weight()
            self._path = "packed"
        else:
            self._path = "matmul"

    def _own_layout(self) -> None:
        """The weights' extra layout for qwenlm's CPU kernel: scales and zeros by output row."""
        self._scales_nk = self.scales_and_zeros.transpose(0, 1).contiguous()

    def _own_kernel_fits(self) -> bool:
        """Whether qwenlm's CPU kernel takes these weights (groups of 32, rows of a multiple of 64, on a CPU
        where it runs)."""
        return (self.qweight.device.type == "cpu" and self.group_size == 32 and self.in_features % 64 == 0
                and cpu_kernel.available())  # fmt: skip

    def _kernel_weight(self) -> torch.Tensor:
        if self._packed is None:
            q = self._values().to(torch.int32)
            if self.qweight.device.type == "cpu":
                self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            else:  # the CUDA layout: inner k-tiles of 16 weights, as many as divide the row
                packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
                self._packed = torch.ops.aten._convert_weight_to_int4pack(packed, self._cuda_k_tiles())
        return self._packed

    def _cuda_k_tiles(self) -> int:
        return next((t for t in (8, 4, 2) if self.in_features % (16 * t) == 0), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._path is None:
            self.prepare()
        rows = x2.shape[0]
        if x.requires_grad:  # the kernels have no backward: a differentiable product
            return self._finish(F.linear(x2, self.dequantize(x.dtype)), x, shape)
        if self._path == "own" and rows < self._gemv_rows:
            y = cpu_kernel.int4_gemv(x2, self.qweight, self._scales_nk, self._high_nk)  # rounds x: no bf16 step
            return self._finish(y, x, shape)
        if rows >= self._product_rows and self._path == "own" and cpu_kernel.provides("int8_matmul"):
            y = cpu_kernel.int8_matmul(x2, *cpu_kernel.int4_to_int8(self.qweight, self._scales_nk, self._high_nk))
            return self._finish(y, x, shape)
        if rows >= self._product_rows or self._path == "matmul":
            dtype = prompt_dtype(x.device)
            return self._finish(F.linear(x2.to(dtype), self.dequantize(dtype)), x, shape)
        x2 = x2.to(KERNEL_DTYPE)
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self._kernel_weight(), self.group_size,
                                                           self.scales_and_zeros)  # fmt: skip
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2.contiguous(), self._kernel_weight(), self.group_size,
                                                   self.scales_and_zeros)  # fmt: skip
        return self._finish(y, x, shape)

    def _finish(self, y: torch.Tensor, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 groups of {self.group_size}"


class Int5Linear(Int4Linear):
    """``Int4Linear`` with a fifth bit per weight (``qhigh``, (out, in/8) bytes, bit j of byte i for weight
    8i + j), w = (q - 16) * scale + zero: GGUF's 5-bit tensors (Q5_0, Q5_1) keep their codes. Decoded by
    qwenlm's own kernel (``cpu_kernel``, the fifth bits in its layout, made by ``prepare``), else through the
    dequantised weight: PyTorch has no 5-bit kernel."""

    BITS = 5
    PYTORCH_KERNEL = False  # no 5-bit kernel in PyTorch: qwenlm's, else the dequantised weight

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = 32, device=None) -> None:
        super().__init__(in_features, out_features, bias, group_size, device)
        self.register_buffer("qhigh", torch.empty(out_features, in_features // 8, dtype=torch.uint8, device=device))

    def _set_codes(self, start: int, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        super()._set_codes(start, codes, scale, zero)
        self.qhigh[start : start + codes.shape[0]] = pack_high(codes)

    def _values(self) -> torch.Tensor:
        return super()._values() | (unpack_high(self.qhigh) << 4)

    @classmethod
    def from_grid(cls, grid: Any, bias: torch.Tensor | None = None) -> Int5Linear:
        out = super().from_grid(grid, bias)
        out.qhigh.copy_(grid.high)
        return out

    def _own_layout(self) -> None:
        super()._own_layout()
        self._high_nk = cpu_kernel.high_bits_layout(unpack_high(self.qhigh))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, 5-bit groups of {self.group_size}"
