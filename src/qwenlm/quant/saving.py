"""Quantised checkpoints: a folder like any other (``config.json`` + safetensors + tokenizer files) whose
config carries ``"quantization": {"bits": 8|4, "group_size": …}``; ``load_model`` rebuilds the quantised
layers before assigning the saved tensors, so nothing is dequantised and requantised on the way."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_model, load_tokenizer
from ..convert import save_safetensors, save_tiktoken_bpe
from ..generation.config import GENERATION_CONFIG_FILE
from ..hf_tokenizer import save_hf_tokenizer
from ..tokenizer import VOCAB_FILE, qwen_special_tokens
from . import GGUF, gguf_embedding, gguf_grids, quantize

QUANT_KEY = "quantization"


def quantize_checkpoint(src: str | Path, dst: str | Path, bits: int | str = 8, group_size: int = 32,
                        calibration: Iterable[str] | None = None, calibration_tokens: int = 16_384,
                        calibration_dtype: str = "float32") -> Path:  # fmt: skip
    """Load ``src`` (any supported checkpoint) in fp32, quantise it and write it to the new folder ``dst``.
    ``bits``: 8, 4, or ``"gguf"`` for a GGUF file (``load_model(quantize="gguf")``: each layer about as
    precise as the file stores it).

    ``calibration`` (int4 only): texts to calibrate the 4-bit weights on (GPTQ, ``gptq.quantize_calibrated``),
    up to ``calibration_tokens`` tokens of them, with the model loaded in ``calibration_dtype`` ("bfloat16"
    halves the memory: a 7B model then needs ~15 GB); without it each weight is rounded on its own."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists and is not an empty folder; choose a new folder or remove it")
    if bits == GGUF and group_size != 32:
        raise ValueError(f"bits={GGUF!r} keeps a GGUF's groups of 32; got group_size={group_size}")
    if calibration is not None and bits != 4:
        raise ValueError(f"calibration is for --bits 4 (int8 weights lose nothing measurable), got bits={bits}")
    tokenizer = load_tokenizer(src)
    if calibration is not None:
        from .gptq import calibration_batches, quantize_calibrated

        batches = calibration_batches(tokenizer, calibration, tokens=calibration_tokens)
        model = load_model(src, dtype=calibration_dtype, device="cpu")
        model = quantize_calibrated(model, batches, group_size, grids=gguf_grids(src, bits, group_size),
                                    prebuilt=gguf_embedding(src))  # fmt: skip
    elif group_size == 32:  # quantised while loading: the full-precision model never exists at once
        model = load_model(src, dtype="float32", device="cpu", quantize=bits)
    else:
        model = quantize(load_model(src, dtype="float32", device="cpu"), bits, group_size, prebuilt=gguf_embedding(src))
    dst.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_safetensors(state, dst)
    config = model.config.to_dict()
    config[QUANT_KEY] = model.quantization
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _save_tokenizer(src, dst, tokenizer)
    gen = {k: v for k, v in dataclasses.asdict(model.generation_config).items() if k != "extra" and v is not None}
    (dst / GENERATION_CONFIG_FILE).write_text(json.dumps(gen, indent=2) + "\n")
    return dst


def _save_tokenizer(src: Path, dst: Path, tokenizer) -> None:
    if src.is_dir():
        for name in (VOCAB_FILE, "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
            if (src / name).is_file():
                shutil.copy(src / name, dst / name)
        return
    if tokenizer.special_tokens == qwen_special_tokens(tokenizer.first_special_id):
        save_tiktoken_bpe(tokenizer.mergeable_ranks, dst / VOCAB_FILE)
        return
    chat_template = None
    if src.suffix == ".gguf":
        from ..gguf import read_gguf_field

        chat_template = read_gguf_field(src, "tokenizer.chat_template")
    save_hf_tokenizer(tokenizer, dst, chat_template=chat_template)


def quantization_of(config_extra: dict) -> tuple[int, int, list[str], list[str], dict[str, Any] | None] | None:
    """(bits, group size, layers saved in 5 bits, layers saved in 8 bits, the int8 embedding's group size and
    whether it has offsets) of a quantised checkpoint's config (the middle two: of an int4 model; the last
    None for a float embedding, as saved before the embedding was quantised too), or None."""
    q = config_extra.get(QUANT_KEY)
    if not q:
        return None
    bits, group = q.get("bits"), q.get("group_size") or 32
    if bits not in (4, 8):
        raise ValueError(f"config.json: quantization bits {bits!r} is not supported (8 or 4)")
    wider = {key: list(q.get(key) or []) for key in ("five_bit", "eight_bit")}
    for key, layers in wider.items():
        if layers and bits != 4:
            raise ValueError(f"config.json: quantization {key} is for bits 4, got bits {bits}")
    embedding = q.get("embedding")
    if embedding is not None:
        if not (isinstance(embedding, dict) and isinstance(embedding.get("group_size"), int)
                and embedding["group_size"] > 0 and isinstance(embedding.get("affine"), bool)):  # fmt: skip
            raise ValueError(f'config.json: quantization embedding must be {{"group_size": a positive integer, '
                             f'"affine": true or false}}, got {embedding!r}')  # fmt: skip
        embedding = {"group_size": embedding["group_size"], "affine": embedding["affine"]}
    return bits, group, wider["five_bit"], wider["eight_bit"], embedding


def is_quantized(model: torch.nn.Module) -> bool:
    return getattr(model, "quantization", None) is not None
