"""Perplexity of the demo model at each precision (quality next to speed for weight-only quantisation).

    python benchmarks/quant_quality.py --data FILES [--length 1024] [--budget 8192] [--per-kind]
        [--calibration FILES [--calibration-tokens 16384]]

Same samples for every precision: the documents concatenated (joined with <|endoftext|>), cut into
``--length``-token samples, ``--budget`` tokens in all. ``--per-kind`` then quantises one kind of linear
layer at a time to int4 (the rest bf16), to show where the int4 loss comes from. ``--calibration`` adds
int4 calibrated with GPTQ on those files (``qwenlm quantize --bits 4 --calibration``); use text other than
``--data``. ``--precisions int8,int8-row-embedding`` shows what rounding a float embedding per row costs.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch

from qwenlm.bench import with_precision
from qwenlm.checkpoint import load_model, load_tokenizer
from qwenlm.demo import demo_model_path
from qwenlm.eval.perplexity import make_samples, perplexity, read_documents, tokenize_documents
from qwenlm.quant import Int8Embedding, Quantizer, gguf_grids
from qwenlm.quant.gptq import calibration_batches, quantize_calibrated, read_texts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--per-kind", action="store_true", help="also int4 for one kind of layer at a time")
    ap.add_argument("--decode-tokens", type=int, default=0,
                    help="also score this many tokens one at a time through decode_step (the int4 "
                         "decoding kernels: qwenlm's AVX-512 one and PyTorch's) and at once")  # fmt: skip
    ap.add_argument("--calibration", nargs="+", help="also int4 calibrated (GPTQ) on these files")
    ap.add_argument("--calibration-tokens", type=int, default=16_384)
    ap.add_argument("--precisions", default="fp32,bf16,int8,int4",
                    help="comma-separated (default: the first four): fp32, bf16, int8, int4, gguf, or "
                         "int8-row-embedding (int8 with the input embedding rounded per row from the "
                         "dequantised floats instead of taken over as the GGUF's codes)")  # fmt: skip
    args = ap.parse_args()
    path = demo_model_path(progress_bar=False)
    tok = load_tokenizer(path)
    docs = tokenize_documents(tok, read_documents(args.data), limit=args.budget)
    samples = make_samples(docs, args.length, args.budget, eod_id=tok.eod_id)
    base = load_model(path, dtype="float32", device="cpu")
    print(f"{samples.shape[0]} samples x {args.length} tokens")
    print(f"{'precision':18s} {'perplexity':>10s} {'vs fp32':>8s} {'vs bf16':>8s} {'seconds':>8s}")
    ppl = {}
    precisions = args.precisions.split(",") + (["int4-gptq"] if args.calibration else [])
    for precision in precisions:
        t = time.perf_counter()
        if precision == "int4-gptq":
            batches = calibration_batches(tok, read_texts(args.calibration), tokens=args.calibration_tokens)
            model = quantize_calibrated(copy.deepcopy(base), batches, grids=gguf_grids(path, 4))
            print(f"(calibrated on {sum(b.numel() for b in batches)} tokens in {time.perf_counter() - t:.0f} s)")
            t = time.perf_counter()
        elif precision == "int8-row-embedding":  # int8, the embedding rounded per row from its floats
            model = with_precision(copy.deepcopy(base), "int8", source=path)
            model.transformer.wte = Int8Embedding.from_weight(base.transformer.wte.weight)
        else:
            model = with_precision(copy.deepcopy(base), precision, source=path)
        ppl[precision] = perplexity(model, samples)

        def rel(ref: str, precision: str = precision) -> str:
            return f"{(ppl[precision] / ppl[ref] - 1) * 100:+.2f}%" if ref in ppl else "-"

        print(
            f"{precision:18s} {ppl[precision]:10.4f} {rel('fp32'):>8s} {rel('bf16'):>8s} {time.perf_counter() - t:8.1f}"
        )
        del model
    assert all(math.isfinite(v) for v in ppl.values())
    if args.decode_tokens:
        decode_path(base, path, samples, args.decode_tokens)
    if args.per_kind:
        grids = gguf_grids(path, 4)
        print(f"{'int4 only for':16s} {'perplexity':>10s} {'vs bf16':>8s}")
        for kind in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj", "lm_head"):
            model = copy.deepcopy(base).to(torch.bfloat16)
            q = Quantizer(model, 4, grids=grids)
            for layer in [name for name in q.pending if name.endswith(kind)]:
                q.swap(layer)
            p = perplexity(model, samples)
            print(f"{kind:16s} {p:10.4f} {(p / ppl['bf16'] - 1) * 100:+7.2f}%")
            del model


def decode_path(base: torch.nn.Module, path, samples: torch.Tensor, tokens: int) -> None:
    """Perplexity of the first samples (``tokens`` in all) scored token by token through ``decode_step``,
    i.e. through the matrix-vector kernels that generation uses, next to the same tokens scored at once."""
    from qwenlm.quant import cpu_kernel

    per = samples.shape[1]
    rows = samples[: max(1, tokens // per)]
    print(f"decode path: {rows.shape[0]} x {per} tokens, one at a time")
    print(f"{'int4 scoring':28s} {'perplexity':>10s} {'vs at once':>10s}")
    model = with_precision(copy.deepcopy(base), "int4", source=path)
    at_once = perplexity(model, rows)
    print(f"{'all tokens at once (matmul)':28s} {at_once:10.4f} {'':>10s}")
    for own in (True, False):
        cpu_kernel.set_enabled(own)
        model.prepare_layers()
        nll, count = 0.0, 0
        with torch.inference_mode():
            for row in rows:
                cache = model.new_cache(per)
                logits = model(row[None, :1], past_key_values=cache).logits[:, -1]
                for i in range(1, per):
                    nll -= torch.log_softmax(logits.float(), -1)[0, row[i]].item()
                    count += 1
                    logits = model.decode_step(row[None, i : i + 1], None, cache)
        p = math.exp(nll / count)
        name = "one at a time, " + ("qwenlm kernel" if own else "PyTorch kernel")
        print(f"{name:28s} {p:10.4f} {(p / at_once - 1) * 100:+9.2f}%")
    cpu_kernel.set_enabled(True)


if __name__ == "__main__":
    main()
