"""A Qwen-7B-shaped model with random bf16 weights on one GPU: qwenlm (bf16, bf16 compiled, int8, int4) vs HF.

    python benchmarks/gpu.py [--layers 32] [--prompt 512] [--new 128] [--runs 3] [--hbm-gb-s auto]
                             [--variants bf16,bf16+compile,int8,int4,int4+compile,hf] [--json OUT]

The real Qwen-7B dimensions (``QwenConfig.from_preset("qwen-7b")``: 32 layers, hidden 4096, MLP 11008,
vocabulary 151,936). Batch-1 decode reads every weight once per token, so the limit is the HBM bandwidth:
achieved GB/s = weight bytes read per token (embedding excluded) x tokens/s, printed against ``--hbm-gb-s``
(auto: from the device name; H100 SXM 3,350, H200 4,800, A100 80GB 2,039). HF transformers runs its own
``Qwen2ForCausalLM`` (sdpa) on the same weights. ``--device cpu --layers 1`` checks the script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from qwenlm import QwenConfig, QwenForCausalLM
from qwenlm.bench import run_bench
from qwenlm.quant import quantize

sys.path.insert(0, __file__.rsplit("/", 1)[0])

HBM_GB_S = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L40S": 864.0, "A10": 600.0}


def random_model(config: QwenConfig, device: str) -> QwenForCausalLM:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    model = model.to_empty(device=device).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 1:
                p.fill_(1.0)  # norms
            else:
                p.normal_(0, 0.02)
    return model


def weight_bytes(model: torch.nn.Module, skip: str) -> int:
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return sum(t.numel() * t.element_size() for n, t in tensors if skip not in n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hbm-gb-s", default="auto")
    ap.add_argument("--variants", default="bf16,bf16+compile,int8,int4,int4+compile,hf")
    ap.add_argument("--json")
    args = ap.parse_args()
    config = QwenConfig.from_preset("qwen-7b")
    config.num_hidden_layers = args.layers
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    limit = float(args.hbm_gb_s) if args.hbm_gb_s != "auto" else next(
        (v for k, v in HBM_GB_S.items() if k in name), float("nan"))  # fmt: skip
    print(f"{name}, torch {torch.__version__}, Qwen-7B shape with {args.layers} layers, prompt {args.prompt}, "
          f"decode {args.new}, HBM limit {limit:.0f} GB/s", flush=True)  # fmt: skip
    results = {}
    for variant in args.variants.split(","):
        precision, _, flag = variant.partition("+")
        t = time.perf_counter()
        if precision == "hf":
            from layer_stack import median_runs, time_hf, to_hf

            base = random_model(config, "cpu")
            model = to_hf(base, torch.bfloat16).to(args.device)
            del base
            ids = torch.randint(0, 151643, (1, args.prompt), device=args.device)
            pre, dec = median_runs(time_hf, model, ids, args.new - 1, runs=args.runs)
            r = {"prefill_tok_s": args.prompt / pre, "decode_tok_s": (args.new - 1) / dec, "ttft_s": pre}
            read = weight_bytes(model, "embed_tokens")
        else:
            model = random_model(config, args.device)
            if precision in ("int8", "int4"):
                quantize(model, 8 if precision == "int8" else 4)
            if flag == "compile":
                model.compile_inference()
            r = run_bench(model, prompt_tokens=args.prompt, new_tokens=args.new, runs=args.runs)
            read = weight_bytes(model, "wte")
        r.update(setup_s=time.perf_counter() - t, bytes_per_token=read, gb_s=read * r["decode_tok_s"] / 1e9)
        results[variant] = r
        print(f"{variant:14s} prefill {r['prefill_tok_s']:9.1f} tok/s  decode {r['decode_tok_s']:8.2f} tok/s  "
              f"{r['gb_s']:7.1f} GB/s = {r['gb_s'] / limit:5.1%} of HBM  (setup+warm-up {r['setup_s']:.0f} s)",
              flush=True)  # fmt: skip
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if "bf16" in results:
        base = results["bf16"]["decode_tok_s"]
        for variant, r in results.items():
            print(f"{variant:14s} decode vs qwenlm bf16: {r['decode_tok_s'] / base:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "hbm_gb_s": limit, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
