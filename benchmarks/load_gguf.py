"""Loading the demo GGUF: qwenlm's header parser and dequantiser against the gguf package's, and whole loads
(tokenizer + model, per precision) against llama.cpp's, in one run, with each whole load's peak resident
memory (VmHWM) and what stays resident after it.

    python benchmarks/load_gguf.py [--runs 3] [--threads 2] [--json OUT]

Each number is the median of --runs after one untimed pass (so the file is in the page cache for all); each
whole load runs in a fresh process, as a user's first command does. llama.cpp (llama-cpp-python) memory-maps
the file and dequantises nothing, so its load is the floor; it is left out when not installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

LOAD = r"""
import sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
t = time.perf_counter()
if sys.argv[2] == "llamacpp":
    from llama_cpp import Llama
    model = Llama(model_path=sys.argv[1], n_threads=int(sys.argv[3]), n_ctx=512, verbose=False)
else:
    from qwenlm.checkpoint import load_model, load_tokenizer
    tokenizer = load_tokenizer(sys.argv[1])  # kept, with the model, for the resident memory after loading
    quantize = {"fp32": None, "int8": 8, "int4": 4, "gguf": "gguf"}[sys.argv[2]]
    model = load_model(sys.argv[1], dtype="float32", device="cpu", quantize=quantize)
seconds = time.perf_counter() - t
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(seconds, int(status["VmHWM"].split()[0]) / 1024, int(status["VmRSS"].split()[0]) / 1024)
"""


def timed(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()

    import gguf
    import torch

    from qwenlm import gguf_dequant, gguf_file
    from qwenlm.demo import demo_model_path
    from qwenlm.gguf_file import read_gguf_file

    torch.set_num_threads(args.threads)
    path = demo_model_path(progress_bar=False)
    rows = []

    def header_gguf():
        reader = gguf.GGUFReader(path)
        return {k: f.contents() for k, f in reader.fields.items()}

    def header_ours():
        gguf_file._HEADERS.clear()  # parsed each time, not the kept header of the last call
        return read_gguf_file(path)

    rows.append(("header + metadata", timed(header_ours, args.runs), timed(header_gguf, args.runs),
                 "gguf.GGUFReader"))  # fmt: skip
    tensors = [t for t in read_gguf_file(path).tensors if t.type_name in gguf_dequant.BLOCKS]

    def ours():
        for t in tensors:
            gguf_dequant.dequantize(t.data, t.type_name, tuple(reversed(t.shape)))

    def theirs():
        for t in tensors:
            gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType[t.type_name])

    rows.append(("dequantise all blocks", timed(ours, args.runs), timed(theirs, args.runs), "gguf.quants"))

    def fresh(engine: str) -> tuple[float, float, float]:
        """Median seconds, peak MB and resident MB after loading, of --runs loads in fresh processes."""
        runs = []
        for _ in range(args.runs):
            out = subprocess.run([sys.executable, "-c", LOAD, str(path), engine, str(args.threads)],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            runs.append([float(v) for v in out.stdout.split()[-3:]])
        return tuple(statistics.median(column) for column in zip(*runs))

    memory = {}
    try:
        import llama_cpp  # noqa: F401

        floor, *memory["llamacpp"] = fresh("llamacpp")
    except ImportError:
        floor = None
    for precision in ("fp32", "int8", "int4", "gguf"):
        s, *memory[precision] = fresh(precision)
        rows.append((f"whole load, {precision}", s, floor, "llama.cpp"))

    print(f"{'step':<24} {'qwenlm s':>9} {'peer s':>9} {'peer/qwenlm':>12}  peer")
    for step, mine, peer, who in rows:
        ratio = f"{peer / mine:.2f}" if peer else "-"
        print(f"{step:<24} {mine:9.2f} {peer if peer is not None else float('nan'):9.2f} {ratio:>12}  {who}")
    print(f"{'whole load of':<24} {'peak MB':>9} {'after MB':>9}")
    for engine, (peak, after) in memory.items():
        print(f"{engine:<24} {peak:9.0f} {after:9.0f}")
    if args.json:
        with open(args.json, "w") as f:
            steps = [dict(step=s, qwenlm_s=m, peer_s=p, peer=w) for s, m, p, w in rows]
            peaks = {engine: dict(peak_mb=peak, after_mb=after) for engine, (peak, after) in memory.items()}
            json.dump({"steps": steps, "memory": peaks}, f, indent=1)


if __name__ == "__main__":
    main()
