"""Prefill and decode speed of a Qwen-7B-shaped layer stack, qwenlm vs HF transformers, same weights.

    python benchmarks/layer_stack.py [--layers 2] [--prompt 512] [--new 64] [--dtypes float32,bfloat16]

Real Qwen-7B dimensions (hidden 4096, 32 heads x 128, MLP 11008, vocabulary 151,936) with fewer layers and
random weights. HF runs its own ``Qwen2ForCausalLM`` (sdpa attention) on the same weights (q/k/v split out of
c_attn, w2 -> gate_proj, w1 -> up_proj). Prints medians of 3 runs after a warm-up, and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qwenlm import QwenConfig, QwenForCausalLM
from qwenlm.bench import sync_device


def to_hf(model: QwenForCausalLM, dtype: torch.dtype):
    """HF's own Qwen2ForCausalLM holding ``model``'s weights (through qwenlm's Qwen v1 -> Qwen2 mapping)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwenlm.convert import v1_to_qwen2

    tensors, config = v1_to_qwen2(model.state_dict(), model.config.to_dict())
    config.pop("architectures")
    hf = Qwen2ForCausalLM(Qwen2Config(**config, attn_implementation="sdpa")).to(dtype).eval()
    hf.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=True)
    return hf


def time_ours(model, ids, new):
    with torch.inference_mode():
        t0 = time.perf_counter()
        cache = model.new_cache(ids.shape[1] + new)
        logits = model(ids, past_key_values=cache, logits_to_keep=1).logits
        t1 = time.perf_counter()
        tok = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new):
            tok = model(tok, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def time_hf(hf, ids, new):
    """Prefill ``ids`` and greedy-decode ``new`` tokens with HF's own cache: (prefill s, decode s)."""
    with torch.inference_mode():
        sync_device(ids.device)
        t0 = time.perf_counter()
        out = hf(ids, use_cache=True, logits_to_keep=1)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        sync_device(ids.device)
        t1 = time.perf_counter()
        for _ in range(new):
            out = hf(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        sync_device(ids.device)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def median_runs(fn, *args, runs=3):
    fn(*args)  # warm-up
    results = [fn(*args) for _ in range(runs)]
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    torch.manual_seed(0)
    config = QwenConfig.from_preset("qwen-7b")
    config.num_hidden_layers = args.layers
    base = QwenForCausalLM(config).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.02)
    ids = torch.randint(0, 151643, (1, args.prompt))
    print(f"Qwen-7B-shaped stack, {args.layers} layers, prompt {args.prompt}, decode {args.new}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'dtype':9s} {'engine':13s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        ours = QwenForCausalLM(config).eval()
        ours.load_state_dict({k: v.to(dtype) for k, v in base.state_dict().items()}, assign=True)
        hf = to_hf(base, dtype)
        with torch.no_grad():
            diff = (ours(ids[:, :64]).logits.float() - hf(ids[:, :64]).logits.float()).abs().max().item()
        rows = {}
        for engine, fn, m in (("qwenlm", time_ours, ours), ("transformers", time_hf, hf)):
            pre, dec = median_runs(fn, m, ids, args.new)
            rows[engine] = (args.prompt / pre, args.new / dec)
            print(f"{name:9s} {engine:13s} {rows[engine][0]:14.1f} {rows[engine][1]:13.2f}")
        (op, od), (hp, hd) = rows["qwenlm"], rows["transformers"]
        print(f"{name:9s} {'ratio':13s} {op / hp:13.2f}x {od / hd:12.2f}x   (max |dlogit| vs HF {diff:.1e})")
        del ours, hf


if __name__ == "__main__":
    main()
