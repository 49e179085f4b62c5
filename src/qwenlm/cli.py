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


def _add_kv_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-dtype", choices=["bfloat16", "float16", "float32"],
                   help="what the key/value cache stores: bfloat16 or float16 halve its memory and what decoding "
                        "reads per cached token (qwenlm's CPU kernel reads them as they are; the logits move by the "
                        "rounding: float16 keeps 3 more bits, bfloat16 the range), float32; default: the model's "
                        "dtype")  # fmt: skip


def _kv_dtype(args: argparse.Namespace) -> Any:
    import torch

    return getattr(torch, args.kv_dtype) if getattr(args, "kv_dtype", None) else None


def _add_model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--model", "-m", required=required,
                   help="checkpoint folder or .gguf file (default: the demo model, see README)")  # fmt: skip
    p.add_argument("--dtype", default="auto", help="auto (default), float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--quantize", choices=["8", "4", "gguf", "none"],
                   help="weight-only quantisation of the linear layers while loading: 8 (int8 per output channel), "
                        "4 (int4 in groups of 32; a GGUF's 4- and 5-bit tensors keep their codes, its 6- and 8-bit "
                        "ones are rounded to 4 bits: the fastest), gguf (a GGUF's 4- and 5-bit tensors keep their "
                        "codes, the others become int8: about the file's own precision) or none (the weights as "
                        "floats, a GGUF's dequantised). Default: gguf for a GGUF file on CPU, else none. Several "
                        "times faster decoding on CPU than floats, within ~1 %% of their perplexity "
                        "(benchmarks/RESULTS.md)")  # fmt: skip
    p.add_argument(
        "--ntk",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="dynamic NTK rotary scaling beyond the training length (default: the checkpoint's config)",
    )
    p.add_argument(
        "--logn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="LogN query scaling beyond the training length (default: the checkpoint's config)",
    )
    p.add_argument("--window", metavar="SCHEDULE",
                   help="window attention, EXPERIMENTAL: 'default' or per-layer windows like 2kx4,4kx4,8k "
                        "(see README, Long context)")  # fmt: skip
    _add_kv_dtype_arg(p)


def _add_compile_arg(p: argparse.ArgumentParser, graphs_by_default: bool = True) -> None:
    p.add_argument("--compile", action="store_true",
                   help="compile the decoding step (on CPU ahead of time, kept on disk: the first run waits ~1 "
                        "minute per batch size for the demo model on 2 cores, later ones seconds) and, on CUDA, "
                        "prompt processing with torch.compile (on CPU prompts stay eager: compiling them paid "
                        "0-10 %%; see benchmarks/RESULTS.md)")  # fmt: skip
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=graphs_by_default,
                   help="on a CUDA device, decode by replaying CUDA graphs (recorded once per batch size and "
                        f"cache size; default: {'on' if graphs_by_default else 'off'}; no effect on CPU)")  # fmt: skip


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


def _quantize(args: argparse.Namespace, path: Path) -> int | str | None:
    """``--quantize`` as ``load_model`` takes it; unset: ``gguf`` for a GGUF file on CPU (its own precision,
    several times faster than dequantised floats), else None."""
    choice = getattr(args, "quantize", None)
    if choice is None:
        from .checkpoint import resolve_device

        on_cpu = resolve_device(getattr(args, "device", "auto")).type == "cpu"
        return "gguf" if on_cpu and path.is_file() and path.suffix == ".gguf" else None
    return None if choice == "none" else int(choice) if choice.isdigit() else choice


def _load(args: argparse.Namespace):
    from .checkpoint import describe, load_model, load_tokenizer

    path = _resolve_model_path(args.model)
    start = time.perf_counter()
    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype=args.dtype, device=args.device, ntk=getattr(args, "ntk", None),
                       logn=getattr(args, "logn", None), window=getattr(args, "window", None),
                       quantize=_quantize(args, path))  # fmt: skip
    model.kv_cache_dtype = _kv_dtype(args)
    from .bench import fast_paths

    compile = getattr(args, "compile", False)
    if not compile:  # quantised layers make their kernels' layouts now (~1 s for int4), not in the first token
        model.prepare_layers()  # (compile_inference prepares them itself)
    fast_paths(model, compile, getattr(args, "cuda_graphs", False))
    described = describe(model)
    kinds = described["linear_weights"]
    weights = f"{'/'.join(kinds)} linears, " if kinds != ["float"] else ""
    weights += "int8 embedding, " if described["embedding"] == "int8" else ""
    print(f"qwenlm: loaded {path.name} ({weights}{model.dtype}, {model.device}) in {time.perf_counter() - start:.1f} s",
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
            "position_policies": [repr(model.transformer.ntk), repr(model.transformer.logn),
                                  repr(model.transformer.windows)],
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
    print(f"window attention {info['position_policies'][2] if model.transformer.windows else 'off'}")
    print(f"dtype / device   {info['dtype']} / {info['device']}")
    print(f"linear weights   {', '.join(info['linear_weights'])}")
    print(f"embedding        {info['embedding']}")
    print(f"weight memory    {info['weight_bytes'] / 2**20:,.1f} MiB")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    convert(args.src, args.dst, layout=args.layout)
    print(f"qwenlm: wrote {args.layout} checkpoint to {args.dst}", file=sys.stderr)
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    from .eval.perplexity import Setting, evaluate, parse_lengths, parse_settings, read_documents

    lengths = parse_lengths(args.lengths)
    docs = read_documents(args.data)  # bad files fail before the model loads
    model, tokenizer = _load(args)
    if args.settings:
        settings = parse_settings(args.settings, args.window)
    else:
        c = model.config
        settings = [Setting(c.use_dynamic_ntk, c.use_logn_attn, args.window)]
    if args.model:
        name = Path(args.model).name.removesuffix(".gguf")
    else:
        from .demo import DEMO_NAME as name
    report = evaluate(model, tokenizer, docs, lengths, settings, samples=args.samples, sampling=args.sampling,
                      chunk_size=args.chunk_size, model_name=name,
                      data_names=[Path(d).name for d in args.data])  # fmt: skip
    print(report.markdown())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2) + "\n")
        print(f"qwenlm: wrote {args.json}", file=sys.stderr)
    if args.plot:
        report.plot(args.plot)
        print(f"qwenlm: wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat.session import DEFAULT_SYSTEM
    from .chat.terminal import run_chat

    model, tokenizer = _load(args)
    generation = _sampling_overrides(args)
    model.generation_config.updated(**generation).validate()  # bad values fail before the first message
    return run_chat(model, tokenizer, args.system or DEFAULT_SYSTEM, generation)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.app import run_server

    model, tokenizer = _load(args)
    if args.model_name or args.model:
        name = args.model_name or Path(args.model).name.removesuffix(".gguf")
    else:
        from .demo import DEMO_NAME as name
    run_server(model, tokenizer, name, host=args.host, port=args.port, api_key=args.api_key,
               max_batch=args.max_batch, max_queue=args.max_queue)  # fmt: skip
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .quant.saving import quantize_checkpoint

    texts = None
    if args.calibration:
        from .quant.gptq import read_texts

        texts = read_texts(args.calibration)
    bits = int(args.bits) if args.bits.isdigit() else args.bits
    quantize_checkpoint(args.src, args.dst, bits=bits, group_size=args.group_size, calibration=texts,
                        calibration_tokens=args.calibration_tokens,
                        calibration_dtype=args.calibration_dtype)  # fmt: skip
    label = f"int{bits}" if isinstance(bits, int) else "int4/int5/int8 (a GGUF's own precision)"
    print(f"qwenlm: wrote {label} checkpoint to {args.dst}", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_checkpoint

    path = _resolve_model_path(args.model)
    device = "cpu" if args.device == "auto" else args.device
    result = bench_checkpoint(path, args.precision, device=device, prompt_tokens=args.prompt_tokens,
                              new_tokens=args.new_tokens, batch=args.batch, runs=args.runs,
                              compile=args.compile, cuda_graphs=args.cuda_graphs, kv_dtype=_kv_dtype(args))  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:14s} {value:.2f}" if isinstance(value, float) else f"{key:14s} {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenlm", description="Run Qwen models in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="continue a prompt, streaming the text")
    p.add_argument("prompt")
    _add_model_args(p)
    _add_compile_arg(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="describe a checkpoint: config, parameters, dtype, memory")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("ppl", help="perplexity by context length (the model card's long-context table)")
    _add_model_args(p)
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="FILE",
        help=".jsonl / .jsonl.gz files (one document per record, field 'text') or plain text files",
    )
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768", help="comma-separated sample lengths")
    p.add_argument(
        "--settings",
        help="rows to compare, e.g. plain,ntk,ntk+logn,ntk+logn+window "
        "(default: one row from --ntk/--logn/--window and the config)",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=1,
        help="samples at the longest length; every length gets the same token budget (default 1)",
    )
    p.add_argument(
        "--sampling",
        choices=["concat", "document"],
        default="concat",
        help="concat: documents joined and cut (default); document: first L tokens of each long one",
    )
    p.add_argument("--chunk-size", type=int, default=1024, help="prefill chunk, in tokens (memory vs speed)")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="plot perplexity against length (needs matplotlib)")
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("convert", help="write an HF-format safetensors folder from a GGUF file or another layout")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--layout", choices=["qwen2", "qwen"], default="qwen2")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("chat", help="chat in the terminal, streaming the replies (/help inside)")
    _add_model_args(p)
    _add_compile_arg(p)
    _add_sampling_args(p)
    p.add_argument("--system", help='the system prompt (default: "You are a helpful assistant.")')
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    _add_model_args(p)
    _add_compile_arg(p, graphs_by_default=False)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default: 8000")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--max-batch", type=int, default=16, help="requests generated together (default: 16)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default: 64)")
    p.add_argument("--model-name", help="the model id clients see (default: the checkpoint's name)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("quantize", help="write a weight-only int8/int4 checkpoint")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--bits", choices=["8", "4", "gguf"], default="8",
                   help="8 (default), 4, or gguf (SRC a GGUF file: its 4- and 5-bit tensors keep their codes, the "
                        "others become int8, as --quantize gguf)")  # fmt: skip
    p.add_argument("--group-size", type=int, default=32, help="input features per 4-bit group (default 32)")
    p.add_argument("--calibration", action="append", metavar="FILE",
                   help="int4: calibrate the weights on this text (GPTQ; repeatable; .txt, or .jsonl[.gz] with a "
                        "'text' field per line); without it each weight is rounded on its own")  # fmt: skip
    p.add_argument("--calibration-tokens", type=int, default=16_384,
                   help="tokens of calibration text to use, in sequences of 512 (default 16384)")  # fmt: skip
    p.add_argument("--calibration-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="precision of the model while calibrating; bfloat16 halves the memory (a 7B model: "
                        "~15 GB instead of ~30 GB) (default float32)")  # fmt: skip
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("bench", help="prefill and decode speed at one precision (medians after a warm-up)")
    p.add_argument("--model", "-m", help="checkpoint folder or .gguf file (default: the demo model)")
    p.add_argument("--precision", choices=["fp32", "bf16", "int8", "int4", "gguf", "auto"], default="auto",
                   help="auto (default): bf16 on a GPU; on CPU gguf for a GGUF file (its 4- and 5-bit codes, int8 "
                        "for the rest), else int8")  # fmt: skip
    _add_kv_dtype_arg(p)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_compile_arg(p)
    p.set_defaults(func=cmd_bench)
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
