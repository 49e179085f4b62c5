"""Tiny synthetic GGUF files, written with ``gguf.GGUFWriter`` the way llama.cpp's converter lays them out.

The vocabulary is the first ``N_REGULAR`` ranks of Qwen's ``qwen.tiktoken`` (a valid BPE table on its own:
every merge's parts have lower ranks) plus a few special and padding tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from qwenlm.byte_level import derive_merges, token_to_text
from qwenlm.tokenizer import load_tiktoken_bpe
from tests.shared import shared_path

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

N_REGULAR = 300
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>"]
SPECIAL_TYPES = [3, 3, 3, 4]  # CONTROL x3, USER_DEFINED
N_PAD = 2  # UNUSED rows that round the embedding up, like [PAD151665]...
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


@lru_cache(maxsize=1)
def tiny_ranks() -> dict[bytes, int]:
    ranks = load_tiktoken_bpe(shared_path("qwen-7b", "qwen.tiktoken"))
    return {token: rank for token, rank in ranks.items() if rank < N_REGULAR}


@dataclass
class TinySpec:
    arch: str = "qwen2"
    n_layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 96  # the MLP width (Qwen v1's config stores twice this)
    tied: bool = False
    context: int = 256
    rope_base: float = 1_000_000.0
    eps: float = 1e-6
    seed: int = 0
    pre: str = "qwen2"
    eos: str = "<|im_end|>"
    # GGUF tensor name suffix -> storage type; everything else is F32 (1-D) or the default type below
    types: dict[str, int] = field(
        default_factory=lambda: {"token_embd.weight": Q.Q8_0, "attn_v.weight": Q.F16, "ffn_down.weight": Q.Q8_0}
    )
    default_type: int = Q.F32
    merges_reversed: bool = False  # a broken merge list, for error tests
    extra_tensor: tuple[str, np.ndarray, int] | None = None

    @property
    def vocab(self) -> int:
        return N_REGULAR + len(SPECIALS) + N_PAD

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def _shapes(spec: TinySpec) -> dict[str, tuple[int, ...]]:
    """GGUF name -> [out, in] shape."""
    h, hd, ff = spec.hidden, spec.head_dim, spec.ffn
    q, kv = spec.heads * hd, spec.kv_heads * hd
    shapes = {"token_embd.weight": (spec.vocab, h), "output_norm.weight": (h,)}
    if not spec.tied:
        shapes["output.weight"] = (spec.vocab, h)
    for i in range(spec.n_layers):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm.weight": (h,), b + "ffn_norm.weight": (h,), b + "attn_output.weight": (h, q)})
        shapes.update({b + "ffn_gate.weight": (ff, h), b + "ffn_up.weight": (ff, h), b + "ffn_down.weight": (h, ff)})
        if spec.arch == "qwen2":
            shapes.update({b + "attn_q.weight": (q, h), b + "attn_q.bias": (q,)})
            shapes.update({b + "attn_k.weight": (kv, h), b + "attn_k.bias": (kv,)})
            shapes.update({b + "attn_v.weight": (kv, h), b + "attn_v.bias": (kv,)})
        else:
            shapes.update({b + "attn_qkv.weight": (3 * q, h), b + "attn_qkv.bias": (3 * q,)})
    return shapes


def write_tiny_gguf(path: Path, spec: TinySpec | None = None) -> dict[str, torch.Tensor]:
    """Write a GGUF file; returns GGUF name -> the float32 values a correct reader must produce."""
    spec = spec or TinySpec()
    rng = np.random.default_rng(spec.seed)
    a = spec.arch
    w = gguf.GGUFWriter(str(path), a)
    w.add_name(f"tiny {a}")
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.context)
    w.add_embedding_length(spec.hidden)
    w.add_feed_forward_length(spec.ffn if a == "qwen2" else 2 * spec.ffn)  # llama.cpp copies v1's doubled size
    w.add_head_count(spec.heads)
    if a == "qwen2":
        w.add_head_count_kv(spec.kv_heads)
    else:
        w.add_rope_dimension_count(spec.head_dim)
    w.add_rope_freq_base(spec.rope_base)
    w.add_layer_norm_rms_eps(spec.eps)

    ranks = tiny_ranks()
    tokens = [token_to_text(t) for t in sorted(ranks, key=ranks.__getitem__)]
    tokens += SPECIALS + [f"[PAD{spec.vocab - N_PAD + i}]" for i in range(N_PAD)]
    merges = [f"{token_to_text(x)} {token_to_text(y)}" for x, y in derive_merges(ranks)]
    if spec.merges_reversed:
        merges.reverse()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(spec.pre)
    w.add_token_list(tokens)
    w.add_token_types([1] * N_REGULAR + SPECIAL_TYPES + [5] * N_PAD)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index(spec.eos))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    expected = {}
    for name, shape in _shapes(spec).items():
        values = (rng.standard_normal(shape) * (0.02 if len(shape) == 2 else 1.0)).astype(np.float32)
        if len(shape) == 1 and name.endswith("norm.weight"):
            values = 1.0 + 0.1 * values
        kind = next((t for suffix, t in spec.types.items() if name.endswith(suffix)), None)
        kind = Q.F32 if len(shape) == 1 else (spec.default_type if kind is None else kind)
        stored = gguf.quants.quantize(values, kind)
        w.add_tensor(name, stored, raw_dtype=kind)
        expected[name] = torch.from_numpy(gguf.quants.dequantize(stored, kind).reshape(shape).copy())
    if spec.extra_tensor:
        name, data, kind = spec.extra_tensor
        w.add_tensor(name, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


# GGUF -> HF names, written out independently of qwenlm.gguf's tables.
def hf_name(gguf_name: str, arch: str = "qwen2") -> str:
    top = {
        "qwen2": {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"},
        "qwen": {"token_embd": "transformer.wte", "output_norm": "transformer.ln_f", "output": "lm_head"},
    }[arch]
    block = {
        "qwen2": {
            "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
            "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
        },
        "qwen": {
            "attn_norm": "ln_1", "ffn_norm": "ln_2", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
            "ffn_gate": "mlp.w2", "ffn_up": "mlp.w1", "ffn_down": "mlp.c_proj",
        },
    }[arch]  # fmt: skip
    stem, kind = gguf_name.rsplit(".", 1)
    if stem.startswith("blk."):
        _, i, part = stem.split(".", 2)
        prefix = "model.layers" if arch == "qwen2" else "transformer.h"
        return f"{prefix}.{i}.{block[part]}.{kind}"
    return f"{top[stem]}.{kind}"
