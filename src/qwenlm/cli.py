"""The ``qwenlm`` command: ``generate``, ``info``, ``convert``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

EXPECTED_ERRORS = (ValueError, FileNotFoundError, KeyError, ImportError, OSError, TypeError)


def _resolve_model_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from .demo import DEMO_NAME, demo_model_path

    path = demo_model_path()
    print(f"qwenlm: no --model given, using the demo model {DEMO_NAME} ({path})", file=sys.stderr)
    return path


def _add_model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--model", "-m", required=required,
                   help="checkpoint folder or .gguf file (default: the demo model, see README)")  # fmt: skip
    p.add_argument("--dtype", default="auto", help="auto (default), float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, help="default: the checkpoint's generation config (512)")
    p.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None,
                   help="sample instead of greedy decoding (default: the checkpoint's generation config)")  # fmt: skip
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)


def _sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ["max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed"]
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _load(args: argparse.Namespace):
    from .checkpoint import load_model, load_tokenizer

    path = _resolve_model_path(args.model)
    start = time.perf_counter()
    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype=args.dtype, device=args.device)
    print(f"qwenlm: loaded {path.name} ({model.dtype}, {model.device}) in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)  # fmt: skip
    return model, tokenizer


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .generation.streamer import TextStreamer

    model, tokenizer = _load(args)
    kwargs = _sampling_overrides(args)
    kwargs.setdefault("stop_words_ids", model.generation_config.stop_words_ids if model.generation_config else [])
    model.generation_config.updated(**kwargs).validate()  # bad values fail before any work
    ids = torch.tensor([tokenizer.encode(args.prompt)], dtype=torch.long)
    sys.stdout.write(args.prompt)
    streamer = TextStreamer(tokenizer)
    start = time.perf_counter()
    out = model.generate(ids, streamer=streamer, **kwargs)
    elapsed = time.perf_counter() - start
    n = out.shape[1] - ids.shape[1]
    sys.stdout.write("\n")
    print(f"qwenlm: {n} tokens in {elapsed:.1f} s ({n / elapsed:.1f} tok/s)", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import describe

    model, tokenizer = _load(args)
    info = {"config": model.config.to_dict(), **describe(model), "tokenizer_size": len(tokenizer),
            "position_policies": [repr(model.transformer.ntk), repr(model.transformer.logn)],
            "generation_config": {k: v for k, v in vars(model.generation_config).items() if k != "extra"}}  # fmt: skip
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    c = model.config
    print(f"architecture     {c.model_type} ({c.architectures[0]})")
    print(f"parameters       {info['parameters']:,} ({info['parameters'] / 1e9:.2f} B)")
    print(f"layers           {c.num_hidden_layers}, hidden {c.hidden_size}, heads {c.num_attention_heads} "
          f"(kv {c.n_kv_heads}) x {c.head_dim}, MLP {c.mlp_width}")  # fmt: skip
    print(f"vocabulary       {c.vocab_size} rows, tokenizer {len(tokenizer)} ids")
    print(f"context          trained {c.seq_length}, max positions {c.max_position_embeddings}")
    print(f"rotary           base {c.rotary_emb_base}, dims {c.rotary_dim}; {info['position_policies'][0]}, "
          f"{info['position_policies'][1]}")  # fmt: skip
    print(f"dtype / device   {info['dtype']} / {info['device']}")
    print(f"weight memory    {info['weight_bytes'] / 2**20:,.1f} MiB")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    convert(args.src, args.dst, layout=args.layout)
    print(f"qwenlm: wrote {args.layout} checkpoint to {args.dst}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenlm", description="Run Qwen models in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="continue a prompt, streaming the text")
    p.add_argument("prompt")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="describe a checkpoint: config, parameters, dtype, memory")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="write an HF-format safetensors folder from a GGUF file or another layout")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--layout", choices=["qwen2", "qwen"], default="qwen2")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\nqwenlm: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"qwenlm: error: {message}", file=sys.stderr)
        return 2
