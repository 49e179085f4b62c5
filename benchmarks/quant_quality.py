"""Perplexity of the demo model at each precision (quality next to speed for weight-only quantisation).

    python benchmarks/quant_quality.py --data FILES [--length 1024] [--budget 8192]

Same samples for every precision: the documents concatenated (joined with <|endoftext|>), cut into
``--length``-token samples, ``--budget`` tokens in all.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

from qwenlm.bench import with_precision
from qwenlm.checkpoint import load_model, load_tokenizer
from qwenlm.demo import demo_model_path
from qwenlm.eval.perplexity import make_samples, perplexity, read_documents, tokenize_documents


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=8192)
    args = ap.parse_args()
    path = demo_model_path(progress_bar=False)
    tok = load_tokenizer(path)
    docs = tokenize_documents(tok, read_documents(args.data), limit=args.budget)
    samples = make_samples(docs, args.length, args.budget, eod_id=tok.eod_id)
    base = load_model(path, dtype="float32", device="cpu")
    print(f"{samples.shape[0]} samples x {args.length} tokens")
    print(f"{'precision':9s} {'perplexity':>10s} {'vs fp32':>8s} {'vs bf16':>8s} {'seconds':>8s}")
    ppl = {}
    for precision in ("fp32", "bf16", "int8", "int4"):
        model = with_precision(copy.deepcopy(base), precision, source=path)
        t = time.perf_counter()
        ppl[precision] = perplexity(model, samples)

        def rel(ref: str, precision: str = precision) -> str:
            return f"{(ppl[precision] / ppl[ref] - 1) * 100:+.2f}%" if ref in ppl else "-"

        print(
            f"{precision:9s} {ppl[precision]:10.4f} {rel('fp32'):>8s} {rel('bf16'):>8s} {time.perf_counter() - t:8.1f}"
        )
        del model
    assert all(math.isfinite(v) for v in ppl.values())


if __name__ == "__main__":
    main()
