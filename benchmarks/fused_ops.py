"""Eager decoding of a quantised demo model with its norms and rotary through qwenlm's kernels
(``cpu_kernel.rms_norm``, ``cpu_kernel.rotary``) against PyTorch's operations, in one process.

    python benchmarks/fused_ops.py [--precision int4] [--rounds 8] [--steps 64] [--threads 2]

Each round times --steps one-token steps (after a 32-token prompt and five warm-up steps) once per variant, in
alternating order, so that a drifting memory bandwidth hits both alike; prints the medians and their ratio. The
reference variant turns ``RMSNorm.own_kernel`` off and hands the rotary to ``rope.apply_rotary_bthd``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from qwenlm.bench import load_at_precision, step_seconds
from qwenlm.demo import demo_model_path
from qwenlm.model import RMSNorm
from qwenlm.quant import cpu_kernel
from qwenlm.rope import apply_rotary_bthd


def ms_per_step(model, steps: int) -> float:
    cache = model.new_cache(32 + steps + 8)
    model(torch.randint(0, 1000, (1, 32)), past_key_values=cache)
    step_seconds(model, cache, 5)  # warm-up
    return step_seconds(model, cache, steps) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_at_precision(demo_model_path(progress_bar=False), args.precision)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    fused_rotary = cpu_kernel.rotary
    times: dict[str, list[float]] = {"fused": [], "reference": []}
    with torch.inference_mode():
        for r in range(args.rounds):
            for name in ("fused", "reference") if r % 2 else ("reference", "fused"):
                for norm in norms:
                    norm.own_kernel = name == "fused"
                cpu_kernel.rotary = fused_rotary if name == "fused" else apply_rotary_bthd
                times[name].append(ms_per_step(model, args.steps))
    cpu_kernel.rotary = fused_rotary
    print(f"{args.precision} eager decoding, {cpu_kernel.isa()} kernels, {args.threads} threads, "
          f"{args.rounds} rounds of {args.steps} steps:")  # fmt: skip
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:9s} {median:6.2f} ms per step ({1e3 / median:5.1f} tok/s)  rounds: "
              f"{' '.join(f'{v:.2f}' for v in values)}")  # fmt: skip
    ratio = statistics.median(times["reference"]) / statistics.median(times["fused"])
    print(f"  fused vs reference: {ratio:.3f}x")


if __name__ == "__main__":
    main()
