"""qwenlm's int4/int8 decoding kernel against PyTorch's on every quantised layer of the demo model, by batch rows.

One process, the kernels alternating per round; medians of --rounds; ms per step over all layers (int4: the
4-bit layers only, the ones PyTorch's ``_weight_int4pack_mm_for_cpu`` takes; int8: all, against
``_weight_int8pack_mm``), PyTorch's kernels getting bf16 activations as ``Int4Linear``/``Int8Linear`` give
them. For int8 also qwenlm's int8 product (``int8_matmul``, where the build has it), which ``Int8Linear`` takes
from ``cpu_kernel.gemv_rows(8)`` rows on. int5: the 5-bit layers (the GGUF's Q5_0 codes in an int4 load), qwenlm's
kernel alone (PyTorch has none for them). Which build of qwenlm's kernels runs (AVX-512 or AVX2) follows the CPU.

    python benchmarks/kernel_rows.py --precision int8 --rows 1,2,3,4,8,16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qwenlm.bench import load_at_precision
from qwenlm.demo import demo_model_path
from qwenlm.quant import Int4Linear, Int5Linear, Int8Linear, cpu_kernel


def own(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, Int8Linear):
        return cpu_kernel.int8_gemv(x, layer.weight, layer.scales)
    return cpu_kernel.int4_gemv(x, layer.qweight, layer._scales_nk, layer._high_nk)


def pytorch(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, Int8Linear):
        return torch.ops.aten._weight_int8pack_mm(x.bfloat16(), layer.weight, layer.scales)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), layer._kernel_weight(), layer.group_size,
                                                      layer.scales_and_zeros)  # fmt: skip


def product(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return cpu_kernel.int8_matmul(x, layer.weight, layer.scales.float())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=("int4", "int5", "int8"), default="int4")
    parser.add_argument("--rows", default="1,4,8", help="comma-separated activation rows (1-16)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not cpu_kernel.available():
        raise SystemExit(f"qwenlm's CPU kernels do not run here: {cpu_kernel.status()}")
    model = load_at_precision(demo_model_path(), "int4" if args.precision == "int5" else args.precision)
    model.prepare_layers()
    kind = {"int4": Int4Linear, "int5": Int5Linear, "int8": Int8Linear}[args.precision]
    layers = [m for m in model.modules() if type(m) is kind]  # (int4: not the 5-bit layers)
    mb = sum((m.weight if kind is Int8Linear else m.qweight).numel() for m in layers) / 1e6
    print(f"{args.precision}: {len(layers)} layers, {mb:.0f} MB of codes, qwenlm's {cpu_kernel.isa()} build")
    runs = {"qwenlm": own} if kind is Int5Linear else {"qwenlm": own, "pytorch": pytorch}
    if kind is Int8Linear and cpu_kernel.provides("int8_matmul"):
        runs["product"] = product
    for rows in (int(r) for r in args.rows.split(",")):
        xs = [torch.randn(rows, m.in_features) for m in layers]
        times: dict[str, list[float]] = {name: [] for name in runs}
        with torch.inference_mode():
            for _ in range(args.rounds):
                for name, run in runs.items():
                    t = time.perf_counter()
                    for m, x in zip(layers, xs):
                        run(m, x)
                    times[name].append((time.perf_counter() - t) * 1e3)
        ms = {name: statistics.median(t) for name, t in times.items()}
        q = ms["qwenlm"]
        line = f"rows {rows:2d}: qwenlm {q:7.2f} ms ({mb / q:5.1f} GB/s)"
        if "pytorch" in ms:
            p = ms["pytorch"]
            line += f"   PyTorch {p:7.2f} ms ({mb / p:5.1f} GB/s)   PyTorch / qwenlm {p / q:.2f}"
        if "product" in ms:
            line += f"   qwenlm product {ms['product']:7.2f} ms (PyTorch / product {p / ms['product']:.2f})"
        print(line)


if __name__ == "__main__":
    main()
