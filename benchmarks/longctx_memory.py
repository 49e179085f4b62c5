"""Peak resident memory of a long prefill: our attention paths next to a naive full-mask one.

    python benchmarks/longctx_memory.py [--lengths 8192,16384,32768] [--modes causal,chunked,full-mask]
                                        [--model PATH | --model qwen-7b:2] [--dtype float32] [--chunk 1024]

Each (mode, length) runs in a fresh process on the demo model, a checkpoint, or ``PRESET:LAYERS`` (a
Qwen-7B-shaped stack with that many layers and random weights); load, then reset the
kernel's peak-RSS counter (``/proc/self/clear_refs``), then one prefill of random token ids, then read the
peak (VmHWM). Reported: RSS after loading, the peak during the prefill, and the difference (what the prefill
itself needed, KV cache included). Modes:

* ``causal``: one call, no mask: SDPA's causal flag, no T x T tensor anywhere (``logits_to_keep=1``);
* ``chunked``: ``generation.prefill`` in chunks of ``--chunk`` tokens into a preallocated KV cache;
* ``full-mask``: the naive way (the reference's, and ours when a mask is given): one call with an all-ones
  attention mask, so a (T, T) additive float mask is built and handed to SDPA.

Linux only (reads /proc). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path


def _status(key: str) -> int:
    """A /proc/self/status field in MiB."""
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024


def child(model_path: str, mode: str, length: int, dtype: str, chunk: int) -> None:
    import gc

    import torch

    from qwenlm import QwenForCausalLM
    from qwenlm.generation.prefill import prefill

    if ":" in model_path:  # a preset-shaped stack with random weights
        from qwenlm import QwenConfig

        preset, layers = model_path.split(":")
        config = QwenConfig.from_preset(preset)
        config.num_hidden_layers = int(layers)
        with torch.device("meta"):
            model = QwenForCausalLM(config)
        model = model.to_empty(device="cpu").to(getattr(torch, dtype)).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
    else:
        model = QwenForCausalLM.from_pretrained(model_path, dtype=dtype, device="cpu")
    ids = torch.randint(0, 150000, (1, length), generator=torch.Generator().manual_seed(0))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the loader's own peak is not the prefill's
    base = _status("VmRSS")
    start = time.perf_counter()
    with torch.inference_mode():
        if mode == "causal":
            model(ids, logits_to_keep=1)
        elif mode == "chunked":
            prefill(model, ids, model.new_cache(capacity=length), chunk_size=chunk)
        elif mode == "full-mask":
            model(ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
        else:
            raise ValueError(f"unknown mode {mode!r}; use causal, chunked or full-mask")
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    print(json.dumps({"mode": mode, "length": length, "rss_after_load_mib": base, "peak_mib": peak,
                      "prefill_mib": peak - base, "seconds": round(seconds, 1)}))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="8192,16384,32768")
    p.add_argument("--modes", default="causal,chunked,full-mask")
    p.add_argument("--model", help="checkpoint (default: the demo model)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--child", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.model is None:
        from qwenlm.demo import demo_model_path

        args.model = str(demo_model_path())
    if args.child:
        child(args.model, args.child[0], int(args.child[1]), args.dtype, args.chunk)
        return
    rows = []
    print("| mode | tokens | RSS after load (MiB) | peak during prefill (MiB) | prefill's own (MiB) | seconds |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        for length in map(int, args.lengths.split(",")):
            cmd = [sys.executable, __file__, "--child", mode, str(length), "--model", args.model,
                   "--dtype", args.dtype, "--chunk", str(args.chunk)]  # fmt: skip
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"| {mode} | {length} | failed (exit {r.returncode}: {r.stderr.strip()[-200:]}) | | | |")
                continue
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"| {mode} | {length} | {row['rss_after_load_mib']:,} | {row['peak_mib']:,} | "
                  f"{row['prefill_mib']:,} | {row['seconds']} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
