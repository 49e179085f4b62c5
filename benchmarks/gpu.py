"""A Qwen-7B-shaped model with random bf16 weights on one GPU: qwenlm at each precision and decoding mode vs HF.

    python benchmarks/gpu.py [--layers 32] [--prompt 512] [--new 128] [--runs 3] [--hbm-gb-s auto]
                             [--variants bf16,bf16+graphs,int4+graphs,bf16+compile,hf,...] [--json OUT]

A variant is a precision (bf16, int8, int4; or ``hf``) and optional modes: ``+graphs`` decodes by replaying
CUDA graphs (``use_cuda_graphs``), ``+compile`` is ``compile_inference`` (compiled prefill; compiled static
decoding step recorded in CUDA graphs). The real Qwen-7B dimensions (``QwenConfig.from_preset("qwen-7b")``:
32 layers, hidden 4096, MLP 11008, vocabulary 151,936). Batch-1 decode reads every weight once per token, so
the limit is the HBM bandwidth: achieved GB/s = weight bytes read per token (embedding excluded) x tokens/s,
printed against ``--hbm-gb-s`` (auto: from the device name; H100 SXM 3,350, H200 4,800, A100 80GB 2,039) and
against a device-to-device copy measured at the start (bytes read + written). HF transformers runs its own
``Qwen2ForCausalLM`` (sdpa, its default dynamic cache) on the same weights. Results are written to ``--json``
after every variant. ``--device cpu --layers 1 --variants bf16,int4,hf`` checks the script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def copy_gb_s(device: str) -> float:
    """Bandwidth of a 2 GiB device-to-device copy, counting bytes read and written (median of 10)."""
    if device != "cuda":
        return float("nan")
    a = torch.empty(2**30, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 2**31 / statistics.median(times[2:]) / 1e9


def hf_model(config: QwenConfig, device: str) -> torch.nn.Module:
    """HF's Qwen2ForCausalLM built on the device in bf16, holding the weights of ``random_model``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwenlm.convert import v1_to_qwen2

    base = random_model(config, device)
    tensors, hf_config = v1_to_qwen2(base.state_dict(), base.config.to_dict())
    del base
    hf_config.pop("architectures")
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            hf = Qwen2ForCausalLM(Qwen2Config(**hf_config, attn_implementation="sdpa")).eval()
    finally:
        torch.set_default_dtype(before)
    hf.load_state_dict(tensors, strict=True)
    return hf


def run_variant(variant: str, config: QwenConfig, args: argparse.Namespace) -> dict:
    precision, *modes = variant.split("+")
    if precision == "hf":
        from layer_stack import median_runs, time_hf

        model = hf_model(config, args.device)
        ids = torch.randint(0, 151643, (1, args.prompt), device=args.device)
        pre, dec = median_runs(time_hf, model, ids, args.new - 1, runs=args.runs)
        r = {"prefill_tok_s": args.prompt / pre, "decode_tok_s": (args.new - 1) / dec, "ttft_s": pre}
        read = weight_bytes(model, "embed_tokens")
    else:
        model = random_model(config, args.device)
        if precision in ("int8", "int4"):
            quantize(model, 8 if precision == "int8" else 4)
        if "graphs" in modes:
            model.use_cuda_graphs()
        if "compile" in modes:
            model.compile_inference()
        r = run_bench(model, prompt_tokens=args.prompt, new_tokens=args.new, runs=args.runs)
        read = weight_bytes(model, "wte")
    r.update(bytes_per_token=read, gb_s=read * r["decode_tok_s"] / 1e9)
    del model
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hbm-gb-s", default="auto")
    ap.add_argument("--variants", default="bf16,bf16+graphs,int8+graphs,int4,int4+graphs,hf,bf16+compile,"
                                          "int8+compile,int4+compile")  # fmt: skip
    ap.add_argument("--json")
    args = ap.parse_args()
    config = QwenConfig.from_preset("qwen-7b")
    config.num_hidden_layers = args.layers
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    limit = float(args.hbm_gb_s) if args.hbm_gb_s != "auto" else next(
        (v for k, v in HBM_GB_S.items() if k in name), float("nan"))  # fmt: skip
    copy = copy_gb_s(args.device)
    print(f"{name}, torch {torch.__version__}, Qwen-7B shape with {args.layers} layers, prompt {args.prompt}, "
          f"decode {args.new}, HBM limit {limit:.0f} GB/s, measured copy {copy:.0f} GB/s", flush=True)  # fmt: skip
    results = {}
    for variant in args.variants.split(","):
        t = time.perf_counter()
        try:
            r = run_variant(variant, config, args)
        except Exception as e:  # one failing variant must not lose the others' numbers
            print(f"{variant:14s} FAILED: {type(e).__name__}: {e}", flush=True)
            results[variant] = {"error": f"{type(e).__name__}: {e}"}
            r = None
        if args.device == "cuda":
            torch.cuda.empty_cache()
        if r is not None:
            r["setup_s"] = time.perf_counter() - t
            results[variant] = r
            print(f"{variant:14s} prefill {r['prefill_tok_s']:9.1f} tok/s  decode {r['decode_tok_s']:8.2f} tok/s  "
                  f"{r['gb_s']:7.1f} GB/s = {r['gb_s'] / limit:5.1%} of HBM, {r['gb_s'] / copy:5.1%} of copy  "
                  f"(total {r['setup_s']:.0f} s)", flush=True)  # fmt: skip
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": name, "torch": torch.__version__, "hbm_gb_s": limit, "copy_gb_s": copy,
                           "settings": {k: v for k, v in vars(args).items() if k != "json"},
                           "results": results}, f, indent=2)  # fmt: skip
    ok = {v: r for v, r in results.items() if "error" not in r}
    if "bf16" in ok:
        base = ok["bf16"]["decode_tok_s"]
        for variant, r in ok.items():
            print(f"{variant:14s} decode vs qwenlm bf16 eager: {r['decode_tok_s'] / base:.2f}x")
    if "hf" in ok:
        for variant, r in ok.items():
            print(f"{variant:14s} vs HF: decode {r['decode_tok_s'] / ok['hf']['decode_tok_s']:.2f}x, "
                  f"prefill {r['prefill_tok_s'] / ok['hf']['prefill_tok_s']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
