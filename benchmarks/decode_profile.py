"""Where a decoding step of the demo model goes: qwenlm's kernels, PyTorch's other operations, and the rest
(Python and dispatch between operations), eager and, with --compile, compiled.

    python benchmarks/decode_profile.py [--precision gguf] [--prompt 32] [--steps 20] [--top 10] [--compile]

Times --steps one-token steps after a --prompt-token prompt and five warm-up steps (median-free: one
timed pass, then one pass under ``torch.profiler``, whose own cost inflates the small operations). "kernels"
sums the self time of the ``qwenlm_cpu::`` operations, "other ops" the rest of the profiled operations;
"between" is the profiled step's wall time minus both.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from qwenlm.bench import load_at_precision, step_seconds
from qwenlm.demo import demo_model_path


def report(name: str, model, args) -> None:
    with torch.inference_mode():
        cache = model.new_cache(args.prompt + 3 * args.steps + 8)
        model(torch.randint(0, 1000, (1, args.prompt)), past_key_values=cache)
        step_seconds(model, cache, 5)
        wall = step_seconds(model, cache, args.steps)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            profiled = step_seconds(model, cache, args.steps)
    events = prof.key_averages()
    per_step = 1 / (1e3 * args.steps)  # the profiler counts microseconds
    kernels = sum(e.self_cpu_time_total for e in events if e.key.startswith("qwenlm_cpu::")) * per_step
    others = sum(e.self_cpu_time_total for e in events if not e.key.startswith("qwenlm_cpu::")) * per_step
    between = profiled * 1e3 - kernels - others
    print(f"{name}: {wall * 1e3:.1f} ms per step ({1 / wall:.1f} tok/s); profiled {profiled * 1e3:.1f} ms = "
          f"kernels {kernels:.1f} + other ops {others:.1f} + between {between:.1f}")  # fmt: skip
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(f"  {e.key:34s} {e.self_cpu_time_total * per_step:7.2f} ms/step  {e.count // args.steps:5d} calls")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="gguf")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also the compiled step (compile_inference)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_at_precision(demo_model_path(progress_bar=False), args.precision)
    report(f"{args.precision} eager", model, args)
    if args.compile:
        report(f"{args.precision} compiled", model.compile_inference(), args)


if __name__ == "__main__":
    main()
