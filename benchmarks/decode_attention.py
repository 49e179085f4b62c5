"""qwenlm's attention kernel for one new token against the path the model takes without it, by cache length.

The demo model's shapes (24 layers, 14 query heads sharing 2 key/value heads of 64): one decoding step's
attention over every layer's cache, qwenlm's ``decode_attention`` against ``attention.single_query_grouped``
(SDPA once per key/value head, what the model runs where the kernel does not). One process, the two
alternating per round; medians of --rounds; ms per step. Which build runs follows the CPU, or
``QWENLM_CPU_KERNEL=avx2``.

    python benchmarks/decode_attention.py --lengths 512,2048,8192 --dtype float32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qwenlm.attention import single_query_grouped
from qwenlm.quant import cpu_kernel

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 24, 14, 2, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048,8192", help="comma-separated cache lengths")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="the KV cache's dtype")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if not cpu_kernel.provides("decode_attention"):
        raise SystemExit(f"qwenlm's attention kernel does not run here: {cpu_kernel.status()}")
    dtype = getattr(torch, args.dtype)
    print(f"{LAYERS} layers of {HEADS}/{KV_HEADS} heads of {HEAD_DIM}, {args.dtype} cache, "
          f"qwenlm's {cpu_kernel.isa()} build, {torch.get_num_threads()} threads")  # fmt: skip
    for length in (int(n) for n in args.lengths.split(",")):
        g = torch.Generator().manual_seed(length)
        qs = [torch.randn(1, HEADS, 1, HEAD_DIM, generator=g) for _ in range(LAYERS)]
        shape = (1, KV_HEADS, length, HEAD_DIM)
        caches = [(torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype))
                  for _ in range(LAYERS)]  # fmt: skip
        bias = torch.zeros(1, 1, 1, length)
        runs = {
            "qwenlm": lambda q, k, v, bias=bias: cpu_kernel.decode_attention(q, k, v, bias),
            # the model's path without the kernel: the cache cast to the queries' dtype, then SDPA
            "pytorch": lambda q, k, v, bias=bias: single_query_grouped(q, k.float(), v.float(), bias),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        with torch.inference_mode():
            for _ in range(args.rounds):
                for name, run in runs.items():
                    t = time.perf_counter()
                    for q, (k, v) in zip(qs, caches):
                        run(q, k, v)
                    times[name].append((time.perf_counter() - t) * 1e3)
        own, ref = statistics.median(times["qwenlm"]), statistics.median(times["pytorch"])
        print(f"length {length:5d}: qwenlm {own:7.3f} ms   PyTorch {ref:7.3f} ms   PyTorch / qwenlm {ref / own:.2f}")


if __name__ == "__main__":
    main()
