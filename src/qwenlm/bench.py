"""``qwenlm bench``: prefill and decode speed of one model at one precision, medians after a warm-up."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .cache import KVCache
from .checkpoint import describe, load_model
from .model import QwenForCausalLM
from .quant import cpu_kernel
from .quant.cpu_kernel import argmax

PRECISIONS = ("fp32", "bf16", "int8", "int4", "gguf", "auto")


def peak_rss_mb() -> float:
    """Peak resident set of this process in MiB (VmHWM; falls back to getrusage off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_bandwidth_gb_s(gib: float = 2.0, runs: int = 5) -> float:
    """The memory read bandwidth this process reaches with its torch threads, in GB/s: the best of ``runs``
    sums over a ``gib`` GiB buffer (much larger than any cache) after a first touch. Batch-1 decoding reads
    every weight once per token, so this bounds its speed: the bound of a benchmark, measured where it runs."""
    if gib <= 0 or runs < 1:
        raise ValueError(f"gib must be > 0 and runs >= 1, got gib={gib}, runs={runs}")
    buf = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    buf.sum()  # pages touched, threads started
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * 4 / best / 1e9


QUANT_BITS = {"int8": 8, "int4": 4, "gguf": "gguf"}  # precision -> load_model(quantize=)


def _is_gguf(source: str | Path | None) -> bool:
    return source is not None and Path(source).is_file() and Path(source).suffix == ".gguf"


def resolve_precision(precision: str, device: torch.device | str, source: str | Path | None = None) -> str:
    """Check ``precision``; ``auto`` becomes bf16 on GPU and, on CPU, ``gguf`` for a GGUF file ``source``
    (its 4- and 5-bit tensors' codes, int8 for the rest), else int8 weights. ``gguf`` needs a GGUF file."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if torch.device(device).type != "cpu":
            return "bf16"
        return "gguf" if _is_gguf(source) else "int8"
    if precision == "gguf" and not _is_gguf(source):
        raise ValueError(f"precision 'gguf' keeps the precision of a .gguf file's tensors; {source} is not a GGUF "
                         "file: choose int8 or int4")  # fmt: skip
    return precision


def with_precision(model: QwenForCausalLM, precision: str, source: str | Path | None = None) -> QwenForCausalLM:
    """The model at ``precision`` (see ``resolve_precision``). ``source``: the checkpoint the model came
    from; a GGUF file's 4-bit tensors then become int4 layers without a second rounding."""
    precision = resolve_precision(precision, model.device, source)
    if precision == "fp32":
        return model.float()
    if precision == "bf16":
        return model.to(torch.bfloat16)
    from .quant import GGUF, gguf_embedding, gguf_grids, quantize

    bits, others = (4, 8) if precision == GGUF else (QUANT_BITS[precision], None)
    grids = gguf_grids(source, bits) if source is not None else None
    return quantize(model, bits, grids=grids, others=others, prebuilt=gguf_embedding(source))


def load_at_precision(path: str | Path, precision: str, device: str = "cpu") -> QwenForCausalLM:
    """Load ``path`` at ``precision``; int8/int4/gguf are quantised while loading (peak memory ~ quantised
    size)."""
    precision = resolve_precision(precision, device, path)
    if precision in QUANT_BITS:
        return load_model(path, dtype="float32", device=device, quantize=QUANT_BITS[precision])
    return with_precision(load_model(path, dtype="float32", device=device), precision)


def fast_paths(model: QwenForCausalLM, compile: bool = False, cuda_graphs: bool = False) -> QwenForCausalLM:
    """``compile``: ``compile_inference`` (on CUDA it records its decoding step in graphs too); else
    ``cuda_graphs``: decode from CUDA graphs where the model is on a CUDA device (ignored on CPU)."""
    if compile:
        return model.compile_inference()
    if cuda_graphs and model.device.type == "cuda":
        return model.use_cuda_graphs()
    return model


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs them asynchronously) before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(model: QwenForCausalLM, cache: KVCache, steps: int) -> float:
    """Seconds per one-token ``decode_step`` (the same token, on top of ``cache``), over ``steps`` steps; for the
    benchmarks that time the step itself."""
    token = torch.tensor([[5]], device=model.device)
    sync_device(model.device)
    t = time.perf_counter()
    for _ in range(steps):
        model.decode_step(token, None, cache)
    sync_device(model.device)
    return (time.perf_counter() - t) / steps


def _one_run(
    model: QwenForCausalLM, ids: torch.Tensor, new_tokens: int, capacity: int = 0
) -> tuple[float, float, float]:
    with torch.inference_mode():
        cache = model.new_cache(max(capacity, ids.shape[1] + new_tokens))
        sync_device(ids.device)
        t0 = time.perf_counter()
        logits = model(ids, past_key_values=cache, logits_to_keep=1).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)
        sync_device(ids.device)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            tok = argmax(model.decode_step(tok, None, cache))[:, None]
        sync_device(ids.device)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, t1 - t0


def run_bench(model: QwenForCausalLM, prompt_tokens: int = 512, new_tokens: int = 128, batch: int = 1,
              runs: int = 3, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Time prefill of ``prompt_tokens`` random ids and greedy decoding of ``new_tokens``; medians of ``runs``."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 to time decoding, got {new_tokens}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(model.config.vocab_size, 151643), (batch, prompt_tokens), generator=g)
    ids = ids.to(model.device)
    t = time.perf_counter()
    # warm-up (and compilation, with compile_inference) on a cache of the timed runs' size: CUDA-graph
    # decoding records one graph per cache capacity
    _one_run(model, ids[:, : min(prompt_tokens, 32)], 4, capacity=prompt_tokens + new_tokens)
    warmup_s = time.perf_counter() - t
    results = [_one_run(model, ids, new_tokens) for _ in range(runs)]
    prefill = statistics.median(r[0] for r in results)
    decode = statistics.median(r[1] for r in results)
    return {
        "prefill_tok_s": batch * prompt_tokens / prefill,
        "decode_tok_s": batch * (new_tokens - 1) / decode,
        "ttft_s": statistics.median(r[2] for r in results),
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "compiled": bool(getattr(model, "compiled", False)),
        "cuda_graphs": bool(getattr(model, "cuda_graphs", False)),
        "warmup_s": warmup_s,  # with compile_inference: the compilation, less where a program was stored
        "programs_from_disk": exported.programs_from_store if (exported := getattr(model, "_exported", None)) else 0,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "batch": batch,
        "runs": runs,
    }


def saved_weight_bytes(model: torch.nn.Module, skip: str | None = None) -> int:
    """Bytes of the model's saved tensors (its state dict: not the kernels' extra layouts), each shared tensor
    once, leaving out those whose name contains ``skip``: what one decoding step reads when ``skip`` names the
    embedding (one row of it is read)."""
    seen: dict[tuple[int, torch.dtype], int] = {}
    for name, t in model.state_dict().items():
        if skip is None or skip not in name:
            seen[(t.data_ptr(), t.dtype)] = t.numel() * t.element_size()
    return sum(seen.values())


def bench_checkpoint(path: str | Path, precision: str = "auto", device: str = "cpu", compile: bool = False,
                     cuda_graphs: bool = False, kv_dtype: torch.dtype | None = None,
                     **kwargs: Any) -> dict[str, Any]:  # fmt: skip
    """Load ``path``, convert it to ``precision`` and time it (``compile``, ``cuda_graphs``: see
    ``fast_paths``; compilation and graph recording show in ``warmup_s``; ``kv_dtype``: the cache's dtype,
    see ``KVCache``)."""
    t = time.perf_counter()
    model = load_at_precision(path, precision, device)
    model.kv_cache_dtype = kv_dtype
    model = fast_paths(model, compile, cuda_graphs)
    load_s = time.perf_counter() - t
    out = run_bench(model, **kwargs)
    facts = describe(model)
    quant = getattr(model, "quantization", None)
    precision_name = f"int{quant['bits']}" if quant else str(model.dtype).replace("torch.", "")
    if resolve_precision(precision, model.device, path) == "gguf":
        precision_name = "gguf"
    out.update(precision=precision_name, kv_dtype=facts["kv_dtype"], load_s=load_s,
               weight_mb=facts["weight_bytes"] / 2**20, model=os.path.basename(str(path)),
               device=str(model.device), cpu_kernels=cpu_kernel.isa())  # fmt: skip
    return out
