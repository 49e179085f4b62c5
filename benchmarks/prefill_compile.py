"""Prompt processing through ``torch.compile`` against eager PyTorch, in one process, per precision.

    python benchmarks/prefill_compile.py [--precisions int4,int8,fp32] [--lengths 32,128,512,2048]
                                         [--rounds 3] [--threads 2] [--json OUT]

The demo model at each precision; the prefill (``model(ids, past_key_values=cache)``, a fresh cache each
time) is timed eagerly (a copy of the model) and through ``compile_inference(prefill=True)``: dynamo/inductor,
``torch.compile(dynamic=True)`` of the decoder stack (before 2026-12-02 the default on CPU too), alternating
between the two for --rounds rounds per length so that drift of the machine hits both; the fastest run of each
is kept.
The first compiled call (its compilation, inductor's cache as it is) is printed too. Prints tok/s and the
ratio compiled / eager.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def prefill_s(model, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        cache = model.new_cache(ids.shape[1] + 1)
        t = time.perf_counter()
        model(ids, past_key_values=cache, logits_to_keep=1)
        return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="int4,int8,fp32")
    parser.add_argument("--lengths", default="32,128,512,2048")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()

    from qwenlm.bench import load_at_precision
    from qwenlm.demo import demo_model_path

    torch.set_num_threads(args.threads)
    path = demo_model_path(progress_bar=False)
    lengths = [int(n) for n in args.lengths.split(",")]
    rows = []
    for precision in args.precisions.split(","):
        compiled = load_at_precision(path, precision).compile_inference(prefill=True)
        eager = copy.deepcopy(compiled)  # (a copy starts eager)
        ids = {n: torch.randint(0, 151643, (1, n), generator=torch.Generator().manual_seed(n)) for n in lengths}
        prefill_s(eager, ids[lengths[0]])
        first = prefill_s(compiled, ids[lengths[0]])
        for n in lengths[1:]:  # a dynamic pass may still compile once more for a new range of lengths
            prefill_s(compiled, ids[n])
        for n in lengths:
            best = {"eager": float("inf"), "compiled": float("inf")}
            for _ in range(args.rounds):
                best["eager"] = min(best["eager"], prefill_s(eager, ids[n]))
                best["compiled"] = min(best["compiled"], prefill_s(compiled, ids[n]))
            rows.append({"precision": precision, "tokens": n, "first_compiled_call_s": first,
                         "eager_tok_s": n / best["eager"], "compiled_tok_s": n / best["compiled"]})  # fmt: skip
            print(f"{precision:>5} {n:>6} tokens: eager {n / best['eager']:8.1f} tok/s, compiled "
                  f"{n / best['compiled']:8.1f} tok/s, compiled/eager {best['eager'] / best['compiled']:.2f}",
                  flush=True)  # fmt: skip
        print(f"{precision:>5} first compiled call (compilation included): {first:.1f} s", flush=True)
        del eager, compiled
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
