"""Loading checkpoints: official Qwen v1 folders, HF Qwen2-family folders and GGUF files.

The model is built on the meta device and each tensor is assigned as it is read (safetensors shards
are memory-mapped), so loading never holds two copies of the weights. Every checkpoint format is a
*name mapping* onto the model's own (Qwen v1) parameter names; nothing else about the model changes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .allocator import keep_freed_memory, release_freed_memory
from .config import QwenConfig
from .generation.config import GenerationConfig
from .model import QwenForCausalLM
from .tokenizer import VOCAB_FILE, QwenTokenizer

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # buffers some exporters save; recomputed here

# HF Qwen2 names -> ours. Qwen2's q/k/v projections are stacked into c_attn (see _QKV).
_QWEN2_RENAMES = [
    (re.compile(r"model\.embed_tokens\.weight"), "transformer.wte.weight"),
    (re.compile(r"model\.layers\.(\d+)\.input_layernorm\.weight"), r"transformer.h.\1.ln_1.weight"),
    (re.compile(r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight"), r"transformer.h.\1.attn.c_proj.weight"),
    (re.compile(r"model\.layers\.(\d+)\.post_attention_layernorm\.weight"), r"transformer.h.\1.ln_2.weight"),
    (re.compile(r"model\.layers\.(\d+)\.mlp\.up_proj\.weight"), r"transformer.h.\1.mlp.w1.weight"),
    (re.compile(r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight"), r"transformer.h.\1.mlp.w2.weight"),
    (re.compile(r"model\.layers\.(\d+)\.mlp\.down_proj\.weight"), r"transformer.h.\1.mlp.c_proj.weight"),
    (re.compile(r"model\.norm\.weight"), "transformer.ln_f.weight"),
    (re.compile(r"lm_head\.weight"), "lm_head.weight"),
]
_QKV = re.compile(r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and the fix."""


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it, else fp16 on GPU; fp32 on CPU (see README)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


# -- reading tensors --------------------------------------------------------------------------
def _weight_files(folder: Path) -> list[Path]:
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(
                    f"{index} is not a valid shard index ({e}); restore it from the checkpoint"
                ) from e
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"shard(s) {', '.join(missing)} listed in {index_name} are missing from folder {folder}; "
                    f"download the complete checkpoint"
                )
            return files
    for pattern in ("model*.safetensors", "pytorch_model*.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(
        f"no weights in folder {folder}: expected {SAFETENSORS_INDEX}, model*.safetensors or pytorch_model*.bin"
    )


def _read_shard(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"shard {path} is corrupt or truncated ({e}); download it again") from e
    else:
        try:
            state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises several types for a damaged zip/pickle
            raise CheckpointError(f"shard {path} is corrupt or truncated ({e}); download it again") from e
        yield from state.items()


def read_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint folder under its stored name, shard by shard."""
    for f in _weight_files(Path(folder)):
        yield from _read_shard(f)


class _NameMapper:
    """Maps checkpoint tensor names (official Qwen v1, HF Qwen2) onto the model's and stacks q/k/v."""

    def __init__(self, qwen2: bool) -> None:
        self.qwen2 = qwen2
        self._pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if _IGNORED.match(name):
            return
        if not self.qwen2:
            yield name, tensor
            return
        m = _QKV.fullmatch(name)
        if m:
            layer, part, kind = m.groups()
            group = self._pending.setdefault((layer, kind), {})
            group[part] = tensor
            if len(group) == 3:
                del self._pending[(layer, kind)]
                yield f"transformer.h.{layer}.attn.c_attn.{kind}", torch.cat([group["q"], group["k"], group["v"]])
            return
        for pattern, target in _QWEN2_RENAMES:
            if pattern.fullmatch(name):
                yield pattern.sub(target, name), tensor
                return
        yield name, tensor  # unknown: reported as unexpected

    def incomplete(self) -> list[str]:
        return [f"model.layers.{layer}.self_attn.{{q,k,v}}_proj.{kind}" for layer, kind in self._pending]


def qwen2_to_v1_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Qwen2 tensors under the official Qwen v1 names (q/k/v stacked into ``c_attn``), the mapping the
    loader uses; names it does not know pass through unchanged."""
    mapper = _NameMapper(qwen2=True)
    out = {n: t for name, tensor in tensors.items() for n, t in mapper(name, tensor)}
    if mapper.incomplete():
        raise CheckpointError(f"incomplete q/k/v projections: {', '.join(mapper.incomplete())}")
    return out


def _assign(model: QwenForCausalLM, tensors: Iterator[tuple[str, torch.Tensor]], source: str,
            dtype: torch.dtype, device: torch.device, on_loaded: Any = None) -> None:  # fmt: skip
    expected = dict(model.state_dict(keep_vars=True))
    # Buffers (quantised weights and their scales) keep their stored dtype; parameters take ``dtype``.
    keep_dtype = {name for name, _ in model.named_buffers()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    loaded: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    for name, tensor in tensors:
        if name not in expected:
            unexpected.append(name)
            continue
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            mismatched.append(f"{name}: checkpoint {tuple(tensor.shape)}, config expects {want}")
            continue
        # Packed-weight kernels need aligned memory, which a mapped file does not promise: copy those.
        keep = name in keep_dtype
        value = tensor.to(device=device, copy=True) if keep else tensor.to(device=device, dtype=dtype)
        owner, _, leaf = name.rpartition(".")  # loaded into its own module: the whole tree once per tensor was
        model.get_submodule(owner).load_state_dict({leaf: value}, strict=False, assign=True)  # ~0.9 s of a load
        loaded.add(name)
        if on_loaded is not None:
            on_loaded(name)
    problems = []
    if mismatched:
        problems.append("tensors whose shapes do not fit config.json:\n  " + "\n  ".join(mismatched))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:10])}")
    missing = sorted(set(expected) - loaded)
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {', '.join(missing[:10])}")
    if problems:
        raise CheckpointError(
            f"{source} does not match its config ({model.config.model_type}, {model.config.num_hidden_layers} "
            f"layers, hidden {model.config.hidden_size}):\n" + "\n".join(problems)
        )
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.transformer.wte.weight


def _build(config: QwenConfig, tensors: Iterator[tuple[str, torch.Tensor]], source: str,
           dtype: torch.dtype, device: torch.device, quantizer: Any = None) -> QwenForCausalLM:  # fmt: skip
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    from .quant.saving import quantization_of

    quant = quantization_of(config.extra)
    on_loaded = None
    if quant is not None:
        from .quant import quantized_structure

        quantized_structure(model, *quant, dtype=dtype)
    elif quantizer is not None:
        on_loaded = quantizer(model).loaded
    mapper = _NameMapper(config.is_qwen2)
    _assign(model, (m for name, t in tensors for m in mapper(name, t)), source, dtype, device, on_loaded)
    if mapper.incomplete():
        raise CheckpointError(f"{source}: incomplete q/k/v projections: {', '.join(mapper.incomplete())}")
    return model.eval()


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    *,
    ntk: bool | None = None,
    logn: bool | None = None,
    window: Any = None,
    quantize: int | str | None = None,
) -> QwenForCausalLM:
    """Load a model from a checkpoint folder (official Qwen v1 or HF Qwen2 layout, safetensors or
    ``pytorch_model*.bin``, single or sharded) or a ``.gguf`` file.

    ``ntk`` / ``logn`` override the config's ``use_dynamic_ntk`` / ``use_logn_attn``; ``window`` sets a
    window-attention schedule (experimental; a ``longctx.WindowSchedule`` or its spec, e.g. ``"default"``).
    ``quantize`` (8 or 4): weight-only quantisation of each linear layer as soon as it is read, so the
    full-precision model never exists at once (``dtype`` is then the precision of the rest: embedding,
    norms, activations); a GGUF file's 4-bit tensors keep their codes. ``quantize="gguf"`` (GGUF files
    only): each linear layer about as precise as the file stores it: 4- and 5-bit tensors keep their codes,
    the others (Q6_K, Q8_0, floats) become int8 per channel instead of being rounded to 4 bits. A
    checkpoint saved quantised (``qwenlm quantize``) loads as it is.
    """
    path = Path(path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if device.type == "cpu":
        keep_freed_memory()  # prompts reuse freed blocks instead of page-faulting fresh ones (see allocator)
    model = _load(path, dtype, device, ntk, logn, quantize)
    if window is not None:
        model.transformer.set_long_context(window=window)
    if device.type == "cpu":  # what loading freed (dequantised tensors, GGUF grids taken over): ~340 MB for the demo
        release_freed_memory()
    return model


def _load(path: Path, dtype: torch.dtype, device: torch.device, ntk: bool | None, logn: bool | None,
          quantize: int | str | None) -> QwenForCausalLM:  # fmt: skip
    if path.is_file() and path.suffix == ".gguf":
        from .gguf import read_gguf

        ckpt = read_gguf(path, dtype=dtype, tensors=False)
        config = _with_overrides(QwenConfig.from_dict(ckpt.config, source=str(path)), ntk, logn)
        quantizer, kept = _quantizer(path, quantize, config.tie_word_embeddings)
        model = _build(config, ckpt.stream(kept), str(path), dtype, device, quantizer)
        left = [n for n, p in model.named_parameters() if p.dim() and 0 in p.stride()]
        if left:  # a stand-in for a kept tensor that no quantised layer took over: a bug, never a silent zero
            raise CheckpointError(f"{path}: {', '.join(left[:5])} were not taken over as their codes")
        model.generation_config = GenerationConfig(eos_token_id=ckpt.eos_token_id, pad_token_id=ckpt.eos_token_id)
    elif path.is_dir():
        config = _with_overrides(QwenConfig.from_json(path), ntk, logn)
        quantizer = _quantizer(path, quantize, config.tie_word_embeddings)[0]
        model = _build(config, read_tensors(path), f"checkpoint {path}", dtype, device, quantizer)
        model.generation_config = GenerationConfig.from_folder(path)
    else:
        raise ValueError(f"{path} is neither a checkpoint folder nor a .gguf file")
    return model


def _quantizer(path: Path, bits: int | str | None, tied: bool) -> tuple[Any, frozenset[str]]:
    """What builds the load-time ``quant.Quantizer`` for a model (or None), and the tensors of a GGUF file it
    takes over as their codes (its 4-bit grids, ``gguf.Int4Grids``, and an untied embedding), which the file's
    stream need not dequantise."""
    if bits is None:
        return None, frozenset()
    from .quant import GGUF, Quantizer, gguf_grids

    if bits not in (4, 8, GGUF):
        raise ValueError(f"quantize must be 8 or 4 (bits) or {GGUF!r}, got {bits!r}")
    others = None
    if bits == GGUF:
        if not (path.is_file() and path.suffix == ".gguf"):
            raise ValueError(f"quantize={GGUF!r} keeps the precision of a .gguf file's tensors; {path} is not a "
                             "GGUF file: choose 8 or 4")  # fmt: skip
        bits, others = 4, 8
    grids = gguf_grids(path, bits)
    kept, prebuilt = set(grids.sources) if grids else set(), {}
    if path.is_file() and path.suffix == ".gguf" and not tied:
        from .gguf import read_gguf_prebuilt

        head_bits = None if "lm_head" in (grids or {}) else others or bits
        prebuilt, names = read_gguf_prebuilt(path, head_bits=head_bits)
        kept |= names
    handed = {"grids": grids, "prebuilt": prebuilt}  # to the one Quantizer, which drops each once it is used

    def quantizer(model: QwenForCausalLM) -> Quantizer:
        return Quantizer(model, bits, grids=handed.pop("grids"), others=others, prebuilt=handed.pop("prebuilt"))

    return quantizer, frozenset(kept)


def _with_overrides(config: QwenConfig, ntk: bool | None, logn: bool | None) -> QwenConfig:
    if ntk is not None:
        config.use_dynamic_ntk = ntk
    if logn is not None:
        config.use_logn_attn = logn
    return config


def load_tokenizer(path: str | Path) -> QwenTokenizer:
    """The tokenizer of a checkpoint: ``qwen.tiktoken`` (Qwen v1), HF tokenizer files (Qwen2) or a GGUF's
    own vocabulary; its ``chat_template`` is the checkpoint's own, if it has one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        from .gguf import read_gguf_tokenizer

        return read_gguf_tokenizer(path)
    if path.is_file() or (path / VOCAB_FILE).is_file():
        tokenizer = QwenTokenizer.from_pretrained(path)
    elif (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file():
        from .hf_tokenizer import load_hf_tokenizer

        tokenizer = load_hf_tokenizer(path)
    else:
        raise FileNotFoundError(
            f"no tokenizer in folder {path}: expected {VOCAB_FILE} (Qwen v1) or tokenizer.json / vocab.json + "
            f"merges.txt (Qwen2 family)"
        )
    from .chat.session import find_chat_template

    tokenizer.chat_template = find_chat_template(path)  # None for Qwen v1 folders: they chat in ChatML
    return tokenizer


def describe(model: QwenForCausalLM) -> dict[str, Any]:
    """Parameters (of the float modules), dtype, device, how the linear layers hold their weights (``float``,
    ``int8``, ``int4``, ``int5``) and the embedding its table (``float``, ``int8``), the bytes of all saved
    weights, quantised ones included, and what new key/value caches store."""
    from .bench import saved_weight_bytes

    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    kinds = {"Int8Linear": "int8", "Int4Linear": "int4", "Int5Linear": "int5"}
    linear = sorted({kinds[type(m).__name__] for m in model.modules() if type(m).__name__ in kinds})
    return {"parameters": n_params, "dtype": str(model.dtype).replace("torch.", ""), "device": str(model.device),
            "linear_weights": linear or ["float"],
            "embedding": "int8" if type(model.transformer.wte).__name__ == "Int8Embedding" else "float",
            "weight_bytes": saved_weight_bytes(model),
            "kv_dtype": str(model.kv_cache_dtype or model.dtype).replace("torch.", "")}  # fmt: skip
