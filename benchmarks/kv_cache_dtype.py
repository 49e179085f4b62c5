"""Decoding speed by context length with the key/value cache in float32, bfloat16 and float16, in one process.

    python benchmarks/kv_cache_dtype.py [--precision int4] [--lengths 256,1024,2048,4096] [--new 32]
                                        [--cache-dtypes fp32,bf16,fp16] [--rounds 2] [--no-compile] [--json OUT]

The demo model at ``--precision`` (activations fp32), compiled (``compile_inference``) unless --no-compile.
For each context length: a prompt of that many random tokens, then --new greedy steps, timed per step;
the cache dtypes alternate (fp32, bf16, fp16, fp32, ...) for --rounds rounds, so that drift of the
machine hits all; the fastest run of each is kept. Prints ms per step, the ratio to the first dtype and
the caches' sizes.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def ms_per_step(model, ids: torch.Tensor, new: int) -> tuple[float, int]:
    with torch.inference_mode():
        cache = model.new_cache(ids.shape[1] + new)
        logits = model(ids, past_key_values=cache).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        model.decode_step(token, None, cache)  # the first step of a new cache shape is not timed
        t = time.perf_counter()
        for _ in range(new - 1):
            token = model.decode_step(token, None, cache).argmax(-1, keepdim=True)
        return (time.perf_counter() - t) / (new - 1) * 1000, cache.memory_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="int4", choices=["fp32", "int8", "int4"])
    parser.add_argument("--lengths", default="256,1024,2048,4096")
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--cache-dtypes", default="fp32,bf16,fp16", help="compared with the first")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per length; the best is kept")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()

    from qwenlm.bench import load_at_precision
    from qwenlm.demo import demo_model_path

    torch.set_num_threads(args.threads)
    model = load_at_precision(demo_model_path(progress_bar=False), args.precision)
    if not args.no_compile:
        model.compile_inference()
    known = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtypes = {name: known[name] for name in args.cache_dtypes.split(",")}
    warm = torch.randint(0, 151643, (1, 16), generator=torch.Generator().manual_seed(0))
    for dtype in dtypes.values():  # compile each cache dtype's program before timing anything
        model.kv_cache_dtype = dtype
        ms_per_step(model, warm, 4)
    rows = []
    for length in (int(n) for n in args.lengths.split(",")):
        ids = torch.randint(0, 151643, (1, length), generator=torch.Generator().manual_seed(length))
        best: dict[str, tuple[float, int]] = {}
        for _ in range(args.rounds):
            for name, dtype in dtypes.items():
                model.kv_cache_dtype = dtype
                ms, size = ms_per_step(model, ids, args.new)
                best[name] = min(best.get(name, (ms, size)), (ms, size))
        rows.append({"context": length, **{f"{n}_ms": v[0] for n, v in best.items()},
                     **{f"{n}_cache_mb": v[1] / 2**20 for n, v in best.items()}})  # fmt: skip
    print(f"{args.precision}, {'compiled' if not args.no_compile else 'eager'}, {args.threads} threads")
    first = next(iter(dtypes))
    print(
        f"{'context':>8}"
        + "".join(f" {n + ' ms':>8}" for n in dtypes)
        + "".join(f" {first + '/' + n:>10}" for n in list(dtypes)[1:])
        + "".join(f" {n + ' MB':>8}" for n in dtypes)
    )
    for r in rows:
        print(f"{r['context']:>8}" + "".join(f" {r[n + '_ms']:8.2f}" for n in dtypes)
              + "".join(f" {r[first + '_ms'] / r[n + '_ms']:10.2f}" for n in list(dtypes)[1:])
              + "".join(f" {r[n + '_cache_mb']:8.1f}" for n in dtypes))  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"precision": args.precision, "compiled": not args.no_compile, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
