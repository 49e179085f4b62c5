"""Peak resident memory while loading a synthetic sharded Qwen checkpoint (>= 2 GB), versus its size.

    python benchmarks/load_memory.py [--gb 2.5] [--shards 4]

Builds a Qwen-7B-shaped checkpoint (real hidden/MLP/head sizes, fewer layers, smaller vocabulary) in a
temporary folder, then loads it in a fresh process and reports peak RSS after loading and after a forward
pass that touches every weight, as a multiple of the weights' size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
from qwenlm import QwenForCausalLM

def rss():  # peak resident set of this process (VmHWM; ru_maxrss would include the parent's peak)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
base = rss()
t = time.perf_counter()
model = QwenForCausalLM.from_pretrained(sys.argv[1], dtype=sys.argv[2], device="cpu")
load_s = time.perf_counter() - t
after_load = rss()
with torch.no_grad():
    model(torch.tensor([[1, 2, 3]]))
print(json.dumps({"load_s": load_s, "base": base, "after_load": after_load, "after_forward": rss()}))
"""


def build(folder: Path, gb: float, shards: int) -> int:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.builders import random_model, write_checkpoint

    from qwenlm import QwenConfig

    per_layer = 4096 * 12288 + 12288 + 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    heads = 2 * 32000 * 4096
    layers = max(1, round((gb * 1e9 / 4 - heads) / per_layer))
    config = QwenConfig(vocab_size=32000, num_hidden_layers=layers)
    with torch.device("cpu"):
        model = random_model(config)
    write_checkpoint(model, folder, shards=shards, tokenizer=False)
    return sum(p.numel() * 4 for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.5)
    ap.add_argument("--shards", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        t = time.perf_counter()
        weight_bytes = build(folder, args.gb, args.shards)
        print(
            f"built {weight_bytes / 1e9:.2f} GB checkpoint in {args.shards} shards in {time.perf_counter() - t:.0f} s"
        )
        gib = 2**30
        print(f"weights (fp32 on disk) {weight_bytes / gib:.2f} GiB")
        print("load as    load s   RSS before   peak RSS loaded   peak RSS +forward   (x size of loaded weights)")
        for dtype, size in (("float32", weight_bytes), ("bfloat16", weight_bytes // 2)):
            out = subprocess.run([sys.executable, "-c", CHILD, str(folder), dtype], capture_output=True, text=True,
                                 check=True)  # fmt: skip
            r = json.loads(out.stdout)
            print(
                f"{dtype:9s} {r['load_s']:7.2f} {r['base'] / gib:9.2f} GiB {r['after_load'] / gib:9.2f} GiB "
                f"({r['after_load'] / size:.2f}x) {r['after_forward'] / gib:9.2f} GiB "
                f"({r['after_forward'] / size:.2f}x)"
            )


if __name__ == "__main__":
    main()
