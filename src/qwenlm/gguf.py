"""Read a GGUF checkpoint (llama.cpp's format) as Hugging Face-named float tensors, a config and a tokenizer.

Two architectures are understood, named by ``general.architecture``:

* ``qwen2`` (Qwen1.5 / Qwen2 / Qwen2.5): tensors get ``Qwen2ForCausalLM`` names. llama.cpp's converter
  stores Qwen2's q/k rows as they are (the LLaMA row permutation is not applied, since Qwen2 uses the same
  rotate-half rotary as HF), so nothing is un-permuted here.
* ``qwen`` (Qwen v1, as llama.cpp's ``QwenModel`` converter writes it): tensors get the official
  ``QWenLMHeadModel`` names. llama.cpp's tensor map (``gguf.tensor_mapping``) sends v1's ``mlp.w1`` to
  ``ffn_up`` and ``mlp.w2`` to ``ffn_gate``: in v1, ``w2`` is the SiLU (gate) branch and ``w1`` the linear
  (up) branch, so ``ffn_gate -> mlp.w2`` and ``ffn_up -> mlp.w1``.

Every tensor comes out in PyTorch ``Linear`` layout ``[out_features, in_features]`` (GGUF lists dimensions
innermost first, i.e. the reverse).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwenlm import gguf_dequant, progress
from qwenlm.gguf_file import GGUFFile, GGUFFormatError, GGUFTensor, read_gguf_file
from qwenlm.gguf_vocab import tokenizer_from_metadata
from qwenlm.tokenizer import QwenTokenizer

try:
    import gguf as _gguf
except ImportError:  # optional dependency; read_gguf says how to install it
    _gguf = None

ARCHITECTURES = ("qwen2", "qwen")
_MAGIC = b"GGUF"

# GGUF tensor name (per block: "blk.{i}." + suffix) -> HF name.
_QWEN2_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_QWEN2_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_QWEN_NAMES = {
    "token_embd.weight": "transformer.wte.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output.weight": "lm_head.weight",
}
_QWEN_BLOCK = {
    "attn_norm.weight": "ln_1.weight",
    "attn_qkv.weight": "attn.c_attn.weight",
    "attn_qkv.bias": "attn.c_attn.bias",
    "attn_output.weight": "attn.c_proj.weight",
    "ffn_norm.weight": "ln_2.weight",
    "ffn_gate.weight": "mlp.w2.weight",  # SiLU branch
    "ffn_up.weight": "mlp.w1.weight",  # linear branch
    "ffn_down.weight": "mlp.c_proj.weight",
}
# Tensors llama.cpp may write that carry nothing these models need.
_IGNORED = {"rope_freqs.weight"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")


@dataclass
class GGUFCheckpoint:
    """Everything :func:`read_gguf` takes out of one GGUF file."""

    path: Path
    architecture: str  # "qwen2" or "qwen"
    general_name: str | None
    config: dict[str, Any]  # an HF-style config.json (Qwen2Config keys, or official Qwen v1 keys)
    tensors: dict[str, torch.Tensor]  # HF names, [out, in] layout (empty when read with tensors=False)
    tokenizer: QwenTokenizer
    chat_template: str | None
    eos_token_id: int
    stream: Callable[..., Iterator[tuple[str, torch.Tensor]]] = field(repr=False, default=lambda kept=(): iter(()))


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32, *, progress_bar: bool = True,
              tensors: bool = True) -> GGUFCheckpoint:  # fmt: skip
    """Read and dequantise a Qwen GGUF file.

    ``dtype`` is the floating type of every returned tensor (dequantisation itself runs in float32).
    ``tensors=False`` reads only the metadata: ``stream()`` then dequantises one tensor at a time.
    """
    path = Path(path)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype}")
    reader = open_gguf(path)
    meta = reader.metadata
    source = str(path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{source}: general.architecture is {arch!r}; only {' and '.join(ARCHITECTURES)} (Qwen) GGUF files "
            f"can be read"
        )
    shapes = {t.name: _shape(t) for t in reader.tensors}
    config = (_qwen2_config if arch == "qwen2" else _qwen_config)(meta, shapes, source)
    names = _hf_names(arch, shapes, config["num_hidden_layers"], source)
    _check_shapes(names, shapes, _expected_shapes(arch, config), source)
    _check_types(reader, source)

    tokenizer = _tokenizer(reader, source)
    config.update(
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id", tokenizer.eod_id),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    if len(tokenizer) > config["vocab_size"]:
        raise ValueError(
            f"{source}: the vocabulary has {len(tokenizer)} tokens but token_embd.weight only "
            f"{config['vocab_size']} rows; the file is inconsistent"
        )

    def stream(kept: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
        """Each tensor by its HF name, dequantised; those named in ``kept`` (taken over as 4-bit grids, see
        ``read_gguf_int4``) only as zeros of their shape, a view of one value (not worth dequantising)."""
        todo = [t for t in reader.tensors if t.name in names]
        # Counted in weights, not tensors: the two embedding matrices are a third of the work.
        bar = progress.bar(sum(int(t.n_elements) for t in todo), f"dequantising {path.name}", "w", progress_bar,
                           unit_scale=True)  # fmt: skip
        try:
            for t in todo:
                if names[t.name] in kept:
                    yield names[t.name], torch.zeros((), dtype=dtype).expand(shapes[t.name])
                else:
                    yield names[t.name], _dequantize(t, dtype)
                bar.update(int(t.n_elements))
        finally:
            bar.close()

    return GGUFCheckpoint(
        path=path,
        architecture=arch,
        general_name=meta.get("general.name"),
        config=config,
        tensors=dict(stream()) if tensors else {},
        tokenizer=tokenizer,
        chat_template=meta.get("tokenizer.chat_template"),
        eos_token_id=tokenizer.eos_token_id,
        stream=stream,
    )


def read_gguf_tokenizer(path: str | Path) -> QwenTokenizer:
    """Only the tokenizer of a GGUF file (no tensor is read)."""
    path = Path(path)
    reader = open_gguf(path)
    meta = reader.metadata
    tokenizer = _tokenizer(reader, str(path))
    tokenizer.chat_template = meta.get("tokenizer.chat_template") or None
    return tokenizer


_TOKENIZERS: dict[tuple, QwenTokenizer] = {}


def _tokenizer(reader: GGUFFile, source: str) -> QwenTokenizer:
    """The file's tokenizer (``tokenizer_from_metadata``), built once per file (as it is now) in a process: ~1 s
    for Qwen's vocabulary, which loading a model and loading its tokenizer both need. A copy each time."""
    built = _TOKENIZERS.get(reader.identity) if reader.identity else None
    if built is None:
        built = tokenizer_from_metadata(reader.metadata, source)
        _TOKENIZERS.clear()  # the last file's only
        _TOKENIZERS[reader.identity] = built
    tokenizer = copy.copy(built)
    tokenizer.special_tokens = dict(built.special_tokens)
    return tokenizer


def read_gguf_field(path: str | Path, key: str) -> Any:
    """One metadata value of a GGUF file (e.g. ``tokenizer.chat_template``), or None; no tensor is read."""
    return open_gguf(Path(path)).metadata.get(key)


def open_gguf(path: Path) -> GGUFFile:
    """The metadata and tensor directory of ``path`` (``gguf_file``), with errors that name the file and say
    what is wrong with it."""
    if _gguf is None:
        raise ImportError('reading GGUF files needs the gguf package: pip install "qwenlm[gguf]" (or pip install gguf)')
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist (or is not a file)")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise ValueError(
            f"{path} is not a GGUF file: it starts with {magic!r}, not {_MAGIC!r} "
            f"(a .safetensors or .bin checkpoint needs a checkpoint folder instead)"
        )
    try:
        return read_gguf_file(path)
    except GGUFFormatError as e:
        raise ValueError(
            f"{path} is truncated or corrupt ({path.stat().st_size:,} bytes: {e}); download or build it again"
        ) from e


def read_gguf_int4(path: str | Path) -> dict[str, Any]:
    """The 4-bit tensors (Q4_0, Q4_1, Q4_K) and 5-bit ones (Q5_0, Q5_1) of a Qwen GGUF file as
    ``gguf_int4.Int4Grid`` by the name of the model's linear layer (``transformer.h.0.mlp.c_proj``…), for
    ``quant.quantize`` to take over as they are. Qwen2's q/k/v are stacked into ``c_attn`` only when all three
    have the same bits (4 or 5); other tensors are left out."""
    from .checkpoint import qwen2_to_v1_names
    from .gguf_int4 import INT4_TYPES, Int4Grid, int4_grid

    path = Path(path)
    reader = open_gguf(path)
    arch = reader.metadata["general.architecture"]
    shapes = {t.name: _shape(t) for t in reader.tensors}
    n_layers = 1 + max((int(m.group(1)) for n in shapes if (m := _BLOCK_RE.fullmatch(n))), default=-1)
    names = _hf_names(arch, shapes, n_layers, str(path))
    grids = {
        names[t.name]: int4_grid(t.data, t.type_name, shapes[t.name])
        for t in reader.tensors
        if t.type_name in INT4_TYPES
        and t.name in names
        and names[t.name].endswith(".weight")
        and not names[t.name].endswith(_EMBEDDINGS)  # (an embedding is looked up, not multiplied)
    }
    if arch == "qwen2":
        qkv = re.compile(r"model\.layers\.(\d+)\.self_attn\.[qkv]_proj\.weight")
        bits: dict[str, list[int]] = {}
        for n, g in grids.items():
            if m := qkv.fullmatch(n):
                bits.setdefault(m.group(1), []).append(g.bits)
        mixed = {layer for layer, b in bits.items() if len(b) < 3 or len(set(b)) > 1}
        for name in [n for n in grids if (m := qkv.fullmatch(n)) and m.group(1) in mixed]:
            del grids[name]  # a c_attn with parts in other types is quantised as a whole instead
        sources = set(grids)
        parts = [qwen2_to_v1_names({n: g[i] for n, g in grids.items()}) for i in range(3)]
        high = qwen2_to_v1_names({n: g.high for n, g in grids.items() if g.high is not None})
        grids = {n: Int4Grid(*(p[n] for p in parts), high.get(n)) for n in parts[0]}
    else:
        sources = set(grids)
    return Int4Grids({name.removesuffix(".weight"): grid for name, grid in grids.items()}, sources=sources)


def read_gguf_prebuilt(path: str | Path, head_bits: int | None = None) -> tuple[dict[str, Any], frozenset[str]]:
    """Layers of a GGUF file's model in quantised form, by layer name, for ``quant.Quantizer(prebuilt=...)``,
    and the HF names of the tensors they stand for (what ``read_gguf``'s ``stream(kept=...)`` need not
    dequantise). The file must be of an untied model (one with ``output.weight``).

    * ``transformer.wte``: a block-quantised embedding (``gguf_dequant.BLOCKS``) as a ``quant.Int8Embedding``
      of the file's own codes, scales and offsets: its rows bit for bit as dequantising the file gives them.
      A table stored as floats is left out (``Quantizer`` rounds its rows itself).
    * ``lm_head`` (``head_bits`` 8 or 4): an ``Int8Linear`` or ``Int4Linear`` (groups of 32), rounded as from
      the dequantised weight, but dequantised a block of rows at a time, so the float32 head (545 MB for the
      demo model) never exists whole.
    """
    from .quant.embedding import Int8Embedding
    from .quant.linear import Int4Linear, Int8Linear

    path = Path(path)
    reader = open_gguf(path)
    by_name = {t.name: t for t in reader.tensors}
    hf_name = _QWEN2_NAMES if reader.metadata["general.architecture"] == "qwen2" else _QWEN_NAMES
    prebuilt: dict[str, Any] = {}
    kept = set()
    embedding = by_name.get("token_embd.weight")
    if embedding is not None and embedding.type_name in gguf_dequant.BLOCKS:
        shape = _shape(embedding)
        prebuilt["transformer.wte"] = Int8Embedding.from_codes(
            *gguf_dequant.codes_of(embedding.data, embedding.type_name, shape)
        )
        kept.add(hf_name[embedding.name])
    head = by_name.get("output.weight")
    if head_bits is not None and head is not None:
        rows, cols = _shape(head)
        kind = Int8Linear if head_bits == 8 else Int4Linear
        step = kind.block_rows(cols)
        blocks = (_dequantize(head, torch.float32, slice(i, i + step)) for i in range(0, rows, step))
        prebuilt["lm_head"] = kind.from_row_blocks(blocks, (rows, cols))
        kept.add(hf_name[head.name])
    return prebuilt, frozenset(kept)


_EMBEDDINGS = ("embed_tokens.weight", "wte.weight")  # the input embedding's HF (Qwen2) and Qwen v1 names


class Int4Grids(dict):
    """``read_gguf_int4``'s grids by layer, and ``sources``: the file's tensors they hold, by HF name (what
    ``read_gguf``'s ``stream(kept=...)`` need not dequantise)."""

    def __init__(self, grids: dict[str, Any], sources: set[str]) -> None:
        super().__init__(grids)
        self.sources = frozenset(sources)


def supported_types() -> list[str]:
    """Names of the GGUF tensor types the ``gguf`` package can dequantise."""
    traits = getattr(_gguf.quants, "_type_traits", {})  # private in gguf 0.19; fall back to the plain types
    types = {_gguf.GGMLQuantizationType.F32, _gguf.GGMLQuantizationType.F16, *traits}
    return sorted({t.name for t in types} | set(gguf_dequant.BLOCKS))


def _check_types(reader: GGUFFile, source: str) -> None:
    # Before any work: dequantising the rest of a file only to fail on its last tensor wastes seconds.
    supported = set(supported_types())
    for t in reader.tensors:
        if t.type_name not in supported:
            raise ValueError(
                f"{source}: tensor {t.name} is stored as {t.type_name}, which cannot be dequantised; "
                f"supported types: {', '.join(supported_types())}"
            )


def _shape(t: GGUFTensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape))  # GGUF lists the innermost dimension first


def _dequantize(t: GGUFTensor, dtype: torch.dtype, rows: slice | None = None) -> torch.Tensor:
    """``t`` as a tensor of ``dtype`` (only ``rows`` of a 2-D one, when given)."""
    shape, data = _shape(t), t.data
    if rows is not None:
        data = data[rows]  # a 2-D tensor's data is (rows, bytes or values per row)
        shape = (len(range(*rows.indices(shape[0]))), *shape[1:])
    if t.type_name in gguf_dequant.BLOCKS:  # most of a quantised file: ~4x the gguf package's speed
        return gguf_dequant.dequantize(data, t.type_name, shape).to(dtype)
    array = _gguf.quants.dequantize(data, _gguf.GGMLQuantizationType[t.type_name])
    array = np.ascontiguousarray(array, dtype=np.float32).reshape(shape)
    if not array.flags.writeable:  # F32 tensors come back as a view of the read-only memory map
        array = array.copy()
    return torch.from_numpy(array).to(dtype)


# -- names and shapes ---------------------------------------------------------------------------------
def _hf_names(arch: str, shapes: dict[str, tuple[int, ...]], n_layers: int, source: str) -> dict[str, str]:
    top, block = (_QWEN2_NAMES, _QWEN2_BLOCK) if arch == "qwen2" else (_QWEN_NAMES, _QWEN_BLOCK)
    prefix = "model.layers" if arch == "qwen2" else "transformer.h"
    names = {}
    for name in shapes:
        if name in _IGNORED:
            continue
        m = _BLOCK_RE.fullmatch(name)
        if name in top:
            names[name] = top[name]
        elif m and m.group(2) in block and int(m.group(1)) < n_layers:
            names[name] = f"{prefix}.{m.group(1)}.{block[m.group(2)]}"
        else:
            raise ValueError(
                f"{source}: unexpected tensor {name!r} for a {arch} model with {n_layers} layers; "
                f"is general.architecture right?"
            )
    return names


def _expected_shapes(arch: str, c: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """GGUF name -> [out, in] shape; ``output.weight`` is optional (absent = tied to the embedding)."""
    h, vocab = c["hidden_size"], c["vocab_size"]
    if arch == "qwen2":
        hd = c.get("head_dim", h // c["num_attention_heads"])
        q, kv, ff = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd, c["intermediate_size"]
        block = {
            "attn_norm.weight": (h,), "attn_q.weight": (q, h), "attn_q.bias": (q,),
            "attn_k.weight": (kv, h), "attn_k.bias": (kv,), "attn_v.weight": (kv, h), "attn_v.bias": (kv,),
            "attn_output.weight": (h, q), "ffn_norm.weight": (h,),
            "ffn_gate.weight": (ff, h), "ffn_up.weight": (ff, h), "ffn_down.weight": (h, ff),
        }  # fmt: skip
    else:
        q, ff = c["num_attention_heads"] * c["kv_channels"], c["intermediate_size"] // 2
        block = {
            "attn_norm.weight": (h,), "attn_qkv.weight": (3 * q, h), "attn_qkv.bias": (3 * q,),
            "attn_output.weight": (h, q), "ffn_norm.weight": (h,),
            "ffn_gate.weight": (ff, h), "ffn_up.weight": (ff, h), "ffn_down.weight": (h, ff),
        }  # fmt: skip
    shapes = {"token_embd.weight": (vocab, h), "output_norm.weight": (h,)}
    for i in range(c["num_hidden_layers"]):
        shapes.update({f"blk.{i}.{k}": v for k, v in block.items()})
    return shapes


def _check_shapes(
    names: dict[str, str], shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], source: str
) -> None:
    missing = sorted(set(expected) - set(names), key=_natural)
    if missing:
        raise ValueError(f"{source}: {len(missing)} tensors are missing (first: {missing[0]}); the file is incomplete")
    expected = {**expected, "output.weight": expected["token_embd.weight"]}
    for name in names:
        if shapes[name] != expected[name]:
            raise ValueError(
                f"{source}: tensor {name} has shape {list(shapes[name])} ([out, in]) but the metadata implies "
                f"{list(expected[name])}; the file's metadata and tensors disagree"
            )


def _natural(name: str) -> list[Any]:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


# -- config -------------------------------------------------------------------------------------------
def _need(meta: dict[str, Any], key: str, source: str, what: str = "metadata key") -> Any:
    if key not in meta:
        raise ValueError(f"{source}: GGUF {what} {key!r} is missing; the file cannot describe its model")
    return meta[key]


def _f32(value: float) -> float:
    # GGUF stores floats as float32: 1e-6 reads back as 9.99999997e-07; keep the number the author wrote.
    return float(str(np.float32(value)))


def _rope_scaling(meta: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling = {"type": kind, "rope_type": kind, "factor": _f32(meta.get(f"{arch}.rope.scaling.factor", 1.0))}
    if f"{arch}.rope.scaling.original_context_length" in meta:
        scaling["original_max_position_embeddings"] = int(meta[f"{arch}.rope.scaling.original_context_length"])
    return scaling


def _qwen2_config(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], source: str) -> dict[str, Any]:
    heads = int(_need(meta, "qwen2.attention.head_count", source))
    hidden = int(_need(meta, "qwen2.embedding_length", source))
    config: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": _need(shapes, "token_embd.weight", source, "tensor")[0],
        "hidden_size": hidden,
        "intermediate_size": int(_need(meta, "qwen2.feed_forward_length", source)),
        "num_hidden_layers": int(_need(meta, "qwen2.block_count", source)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("qwen2.attention.head_count_kv", heads)),
        "rope_theta": _f32(meta.get("qwen2.rope.freq_base", 10000.0)),
        "rms_norm_eps": _f32(_need(meta, "qwen2.attention.layer_norm_rms_epsilon", source)),
        "max_position_embeddings": int(_need(meta, "qwen2.context_length", source)),
        "tie_word_embeddings": "output.weight" not in shapes,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "use_sliding_window": False,
    }
    head_dim = int(meta.get("qwen2.attention.key_length", hidden // heads))
    if head_dim != hidden // heads:
        config["head_dim"] = head_dim
    if scaling := _rope_scaling(meta, "qwen2"):
        config["rope_scaling"] = scaling
    return config


def _qwen_config(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], source: str) -> dict[str, Any]:
    heads = int(_need(meta, "qwen.attention.head_count", source))
    qkv_rows = _need(shapes, "blk.0.attn_qkv.weight", source, "tensor")[0]
    gate_rows = _need(shapes, "blk.0.ffn_gate.weight", source, "tensor")[0]
    context = int(_need(meta, "qwen.context_length", source))
    return {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "vocab_size": _need(shapes, "token_embd.weight", source, "tensor")[0],
        "hidden_size": int(_need(meta, "qwen.embedding_length", source)),
        # Qwen v1's config holds twice the MLP width (w1 and w2 are each half of it); llama.cpp's converter
        # copies that number into feed_forward_length, so the tensor shape is the safer source.
        "intermediate_size": 2 * gate_rows,
        "num_hidden_layers": int(_need(meta, "qwen.block_count", source)),
        "num_attention_heads": heads,
        "kv_channels": qkv_rows // (3 * heads),
        "rotary_emb_base": _f32(meta.get("qwen.rope.freq_base", 10000.0)),
        "rotary_pct": 1.0,
        "layer_norm_epsilon": _f32(_need(meta, "qwen.attention.layer_norm_rms_epsilon", source)),
        "max_position_embeddings": context,
        # The GGUF does not keep v1's training length (8192 for Qwen-7B); with the context length in its
        # place, dynamic NTK and LogN (on, as in the official configs) only act beyond the stored context.
        "seq_length": context,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "no_bias": True,
        "tie_word_embeddings": "output.weight" not in shapes,
    }
