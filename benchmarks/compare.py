"""qwenlm (each precision) vs HF transformers vs llama.cpp on the demo model, in one run.

    python benchmarks/compare.py [--runs 3] [--prompt 512] [--new 128] [--batch8-new 32] [--json OUT]
                                 [--engines qwenlm-fp32,qwenlm-bf16,qwenlm-int8,qwenlm-int4,qwenlm-int4+torchkernel,
                                            qwenlm-int4+compile,qwenlm-gguf,qwenlm-gguf+compile,hf-fp32,hf-bf16,
                                            llamacpp]

Each engine runs in its own process (so peak memory is its own), on the same GGUF weights: qwenlm loads the
GGUF, HF transformers runs its own Qwen2ForCausalLM on the weights dequantised to fp32 (cast for bf16), and
llama.cpp (llama-cpp-python, n_threads=--threads) runs the GGUF as shipped. ``qwenlm-gguf`` is the GGUF at its
own precision (qwenlm's default for a GGUF on CPU: 4- and 5-bit codes kept, the other linears int8). Medians
of --runs after a warm-up.
``+compile`` runs qwenlm's prefill and decode step through torch.compile (compilation time: ``warmup_s`` in the
JSON, shorter where a decoding program was kept on disk by an earlier run: ``programs_from_disk``);
``+torchkernel`` decodes int4 with PyTorch's kernel instead of qwenlm's own (``quant.cpu_kernel``);
``+keepfreed`` on an ``hf-`` engine runs HF with qwenlm's allocator setting (``qwenlm.allocator``; plain ``hf-``
engines keep glibc's defaults, as HF's users do). ``pre/HFbest`` is prefill against the fastest ``hf-`` engine
of the run. Bandwidth fraction = bytes of weights read per decoded token x tokens/s / the machine's read bandwidth,
measured in the same run with the same threads (``qwenlm.bench.read_bandwidth_gb_s``) before the first engine and
after the last; the higher of the two is the limit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def child_qwenlm(variant: str, args) -> dict:
    """``variant``: a precision, optionally with ``+compile`` (prefill and decode step through torch.compile)
    and ``+torchkernel`` (int4 through PyTorch's kernel instead of qwenlm's AVX-512 one)."""
    from qwenlm.bench import load_at_precision, run_bench, saved_weight_bytes
    from qwenlm.demo import demo_model_path
    from qwenlm.quant import cpu_kernel

    precision, *flags = variant.split("+")
    path = demo_model_path(progress_bar=False)
    cpu_kernel.set_enabled("torchkernel" not in flags)
    t = time.perf_counter()
    model = load_at_precision(path, precision)
    if "compile" in flags:
        model.compile_inference()
    load_s = time.perf_counter() - t
    r = run_bench(model, prompt_tokens=args.prompt, new_tokens=args.new, runs=args.runs)
    r8 = run_bench(model, prompt_tokens=64, new_tokens=args.batch8_new, batch=8, runs=args.runs)
    # weights read per decoded token: every linear plus one embedding row
    read = saved_weight_bytes(model, skip="wte")
    r.update(batch8_tok_s=r8["decode_tok_s"], bytes_per_token=read, load_s=load_s, precision=variant,
             batch8_warmup_s=r8["warmup_s"], programs_from_disk=r8["programs_from_disk"])  # fmt: skip
    return r


sys.path.insert(0, __file__.rsplit("/", 1)[0])


def _hf_model(dtype_name: str, keep_freed: bool):
    import os

    import torch
    from layer_stack import to_hf

    # HF as its users run it: glibc's default allocator (loading through qwenlm would otherwise tune it;
    # ``hf-...+keepfreed`` measures HF with qwenlm's setting, see qwenlm.allocator)
    os.environ["QWENLM_KEEP_FREED_MEMORY"] = "1" if keep_freed else "0"

    from qwenlm.checkpoint import load_model
    from qwenlm.demo import demo_model_path

    ours = load_model(demo_model_path(progress_bar=False), dtype="float32", device="cpu")
    return to_hf(ours, getattr(torch, dtype_name))


def child_hf(variant: str, args) -> dict:
    import torch
    from layer_stack import time_hf

    from qwenlm.bench import peak_rss_mb

    precision, *flags = variant.split("+")
    dtype_name = {"fp32": "float32", "bf16": "bfloat16"}[precision]
    hf = _hf_model(dtype_name, "keepfreed" in flags).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151643, (1, args.prompt), generator=g)
    time_hf(hf, ids[:, :32], 4)
    runs = [time_hf(hf, ids, args.new) for _ in range(args.runs)]
    pre, dec = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    ids8 = torch.randint(0, 151643, (8, 64), generator=g)
    runs8 = [time_hf(hf, ids8, args.batch8_new) for _ in range(args.runs)]
    dec8 = statistics.median(r[1] for r in runs8)
    read = sum(p.numel() * p.element_size() for n, p in hf.named_parameters() if "embed_tokens" not in n)
    return {"prefill_tok_s": args.prompt / pre, "decode_tok_s": args.new / dec, "ttft_s": pre,
            "batch8_tok_s": 8 * args.batch8_new / dec8, "peak_rss_mb": peak_rss_mb(),
            "bytes_per_token": read, "precision": dtype_name}  # fmt: skip


def child_llamacpp(args) -> dict:
    import numpy as np
    from llama_cpp import Llama

    from qwenlm.bench import peak_rss_mb
    from qwenlm.demo import demo_model_path

    llm = Llama(model_path=str(demo_model_path(progress_bar=False)), n_ctx=1024, n_batch=512,
                n_threads=args.threads, n_threads_batch=args.threads, verbose=False)  # fmt: skip
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 151643, args.prompt).tolist()

    def last_argmax() -> int:  # the last position's logits, as llama.cpp's own greedy loop reads them
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))))

    def once():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = last_argmax()
        t1 = time.perf_counter()
        for _ in range(args.new - 1):
            llm.eval([tok])
            tok = last_argmax()
        return t1 - t0, time.perf_counter() - t1

    once()
    runs = [once() for _ in range(args.runs)]
    pre, dec = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    return {"prefill_tok_s": args.prompt / pre, "decode_tok_s": (args.new - 1) / dec, "ttft_s": pre,
            "batch8_tok_s": None, "peak_rss_mb": peak_rss_mb(), "bytes_per_token": 491_400_064 - 151936 * 896 * 0.69,
            "precision": "gguf Q4_K_M"}  # fmt: skip


def run_child(engine: str, args) -> dict | str:
    cmd = [sys.executable, __file__, "--child", engine, "--runs", str(args.runs), "--prompt", str(args.prompt),
           "--new", str(args.new), "--batch8-new", str(args.batch8_new), "--threads", str(args.threads)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batch8-new", type=int, default=32)
    ap.add_argument("--engines", default="qwenlm-fp32,qwenlm-bf16,qwenlm-int8,qwenlm-int4,qwenlm-int4+torchkernel,"
                                         "qwenlm-int4+compile,qwenlm-gguf,qwenlm-gguf+compile,hf-fp32,hf-bf16,"
                                         "llamacpp")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.child:
        import torch

        from qwenlm.bench import read_bandwidth_gb_s

        torch.set_num_threads(args.threads)
        kind, _, precision = args.child.partition("-")
        result = {
            "qwenlm": lambda: child_qwenlm(precision, args),
            "hf": lambda: child_hf(precision, args),
            "llamacpp": lambda: child_llamacpp(args),
            "bandwidth": lambda: {"read_gb_s": read_bandwidth_gb_s()},
        }[kind]()
        print(json.dumps(result))
        return
    bandwidth = [run_child("bandwidth", args)]
    results = {}
    for engine in args.engines.split(","):
        print(f"running {engine}…", file=sys.stderr, flush=True)
        results[engine] = run_child(engine, args)
    bandwidth.append(run_child("bandwidth", args))
    read_gb_s = [b["read_gb_s"] for b in bandwidth if isinstance(b, dict)]
    if not read_gb_s:
        sys.exit(f"could not measure the read bandwidth: {bandwidth[0]}")
    limit = max(read_gb_s)
    ok = {k: v for k, v in results.items() if isinstance(v, dict)}
    base_lc = ok.get("llamacpp")
    base_hf = ok.get("hf-fp32")
    # the prefill target is against the best HF setting of the run (bf16 on CPUs with AMX, else fp32)
    hf_runs = [v for k, v in ok.items() if k.startswith("hf-")]
    base_hf_pre = max(hf_runs, key=lambda r: r["prefill_tok_s"]) if hf_runs else None
    print(machine_line())
    print(f"read bandwidth ({args.threads} threads): " + " / ".join(f"{b:.1f}" for b in read_gb_s)
          + " GB/s (before / after the engines); the limit below is the higher")  # fmt: skip
    hdr = (f"{'engine':24s} {'prefill t/s':>11s} {'decode t/s':>10s} {'b8 t/s':>7s} {'TTFT s':>7s} {'peak MB':>8s} "
           f"{'GB/s':>5s} {'of BW':>6s} {'dec/llama':>9s} {'dec/HF32':>8s} {'pre/llama':>9s} "
           f"{'pre/HFbest':>10s}")  # fmt: skip
    print(hdr)
    for engine, r in results.items():
        if not isinstance(r, dict):
            print(f"{engine:24s} unavailable: {r}")
            continue
        gbs = r["bytes_per_token"] * r["decode_tok_s"] / 1e9

        def ratio(key: str, base: dict | None, r: dict = r) -> str:
            return f"{r[key] / base[key]:.2f}x" if base else "-"

        b8 = f"{r['batch8_tok_s']:7.1f}" if r.get("batch8_tok_s") else f"{'-':>7s}"
        print(f"{engine:24s} {r['prefill_tok_s']:11.1f} {r['decode_tok_s']:10.2f} {b8} {r['ttft_s']:7.2f} "
              f"{r['peak_rss_mb']:8.0f} {gbs:5.1f} {gbs / limit:6.0%} "
              f"{ratio('decode_tok_s', base_lc):>9s} "
              f"{ratio('decode_tok_s', base_hf):>8s} {ratio('prefill_tok_s', base_lc):>9s} "
              f"{ratio('prefill_tok_s', base_hf_pre):>10s}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_line(), "read_gb_s": read_gb_s, **results}, f, indent=2)


def machine_line() -> str:
    """The CPU and whether it has AMX (bf16 matrix units): the speed of every bf16 prompt depends on it."""
    from qwenlm.quant import cpu_kernel

    flags = cpu_kernel.cpu_flags()
    with open("/proc/cpuinfo") as f:
        name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    amx, vnni = ("yes" if flag in flags else "no" for flag in ("amx_bf16", "avx512_vnni"))
    build = cpu_kernel.chosen_build()
    return f"machine: {name}, AMX {amx}, AVX-512 VNNI {vnni}, qwenlm's CPU kernels: {build.label if build else 'none'}"


if __name__ == "__main__":
    main()
