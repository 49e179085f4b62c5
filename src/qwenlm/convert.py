"""Convert a GGUF checkpoint into a Hugging Face-format safetensors folder (``qwenlm convert SRC DST``).

Two output layouts:

* ``"qwen2"``: ``Qwen2ForCausalLM`` names and config, with the HF tokenizer files (``tokenizer.json``,
  ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` holding the chat template).
* ``"qwen"``: the official Qwen v1 (``QWenLMHeadModel``) names and config, with ``qwen.tiktoken``. v1 has
  no grouped-query attention, so a Qwen2 model converts only when it has as many key/value heads as query
  heads. The official v1 tokenizer numbers its own 208 special tokens after the 151,643 regular ones, so
  specials beyond ``<|im_end|>`` keep their ids but not their Qwen2 names there.

Qwen2 -> v1 mapping, per layer: ``c_attn = cat(q_proj, k_proj, v_proj)`` (weights and biases),
``gate_proj -> w2`` (SiLU branch), ``up_proj -> w1``, ``down_proj -> mlp.c_proj``, ``o_proj -> attn.c_proj``,
``input_layernorm -> ln_1``, ``post_attention_layernorm -> ln_2``; v1's ``intermediate_size`` is twice the
MLP width. A v1 GGUF converts to the Qwen2 layout the other way round (its dynamic NTK / LogN settings have
no Qwen2 equivalent and are dropped).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from qwenlm.gguf import GGUFCheckpoint, read_gguf
from qwenlm.hf_tokenizer import save_hf_tokenizer
from qwenlm.tokenizer import VOCAB_FILE

LAYOUTS = ("qwen2", "qwen")
MAX_SHARD_BYTES = 2 * 1024**3
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# The official v1 files load through remote code; this points transformers at it once its .py files are
# copied into the folder (our own loader ignores it).
_V1_AUTO_MAP = {
    "AutoConfig": "configuration_qwen.QWenConfig",
    "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
}


def convert(
    src: str | Path,
    dst: str | Path,
    layout: str = "qwen2",
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress_bar: bool = True,
) -> Path:
    """Write GGUF file (or checkpoint folder) ``src`` as an HF checkpoint folder ``dst`` (created; must be
    empty if it exists).

    ``layout`` is ``"qwen2"`` or ``"qwen"`` (Qwen v1), ``dtype`` the stored weight type (float32 keeps the
    dequantised values exactly). Weights over ``max_shard_bytes`` are split into numbered shards with a
    ``model.safetensors.index.json``. Returns ``dst``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists and is not an empty folder; choose a new folder or remove it")
    src = Path(src)
    read = read_folder if src.is_dir() else lambda p, d: read_gguf(p, d, progress_bar=progress_bar)
    ckpt = read(src, dtype)
    if layout == "qwen2":
        tensors, config = to_qwen2(ckpt)
    else:
        tensors, config = to_qwen(ckpt)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")

    dst.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, dst, max_shard_bytes)
    _write_json(dst / "config.json", config)
    tokenizer = ckpt.tokenizer
    if layout == "qwen2":
        save_hf_tokenizer(tokenizer, dst, chat_template=ckpt.chat_template,
                          model_max_length=config["max_position_embeddings"])  # fmt: skip
        eos = [tokenizer.eos_token_id] + ([tokenizer.eod_id] if tokenizer.eod_id != tokenizer.eos_token_id else [])
        generation = {"bos_token_id": config.get("bos_token_id", tokenizer.eod_id), "eos_token_id": eos,
                      "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    else:
        save_tiktoken_bpe(tokenizer.mergeable_ranks, dst / VOCAB_FILE)
        _write_json(dst / "tokenizer_config.json", {
            "model_max_length": config["max_position_embeddings"], "tokenizer_class": "QWenTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
        })  # fmt: skip
        chat = ckpt.chat_template is not None or tokenizer.eos_token_id == tokenizer.im_end_id
        generation = {"chat_format": "chatml" if chat else "raw", "eos_token_id": tokenizer.eod_id,
                      "pad_token_id": tokenizer.eod_id,
                      "stop_words_ids": sorted({(tokenizer.eod_id,), (tokenizer.eos_token_id,)})}  # fmt: skip
    _write_json(dst / "generation_config.json", generation)
    return dst


def read_folder(folder: Path, dtype: torch.dtype = torch.float32) -> GGUFCheckpoint:
    """A checkpoint folder (official Qwen v1 or HF Qwen2 layout) in the form ``convert`` takes, so a folder
    converts between layouts the same way a GGUF file does."""
    from qwenlm.checkpoint import load_tokenizer, read_tensors

    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else None
    if config is None:
        raise FileNotFoundError(f"no config.json in folder {folder}: it is not a checkpoint folder")
    arch = config.get("model_type", "qwen")
    tokenizer = load_tokenizer(folder)
    tensors = {name: t.to(dtype) for name, t in read_tensors(folder)}
    return GGUFCheckpoint(path=folder, architecture=arch, general_name=None, config=config, tensors=tensors,
                          tokenizer=tokenizer, chat_template=getattr(tokenizer, "chat_template", None),
                          eos_token_id=tokenizer.eos_token_id)  # fmt: skip


# -- layouts ------------------------------------------------------------------------------------------
def to_qwen2(ckpt: GGUFCheckpoint) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and config of ``ckpt`` in the ``Qwen2ForCausalLM`` layout."""
    if ckpt.architecture == "qwen2":
        return dict(ckpt.tensors), dict(ckpt.config)
    return v1_to_qwen2(ckpt.tensors, ckpt.config)


def v1_to_qwen2(t: dict[str, torch.Tensor], c: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors under Qwen v1 names (``transformer.h.N.attn.c_attn``…) and a config with Qwen v1 keys (an
    official config.json, or ``QwenConfig.to_dict()`` of any loaded model, grouped-query ones included) in
    the ``Qwen2ForCausalLM`` layout: c_attn split into q/k/v, w2 -> gate_proj, w1 -> up_proj."""
    from qwenlm.config import QwenConfig

    cfg = QwenConfig.from_dict(c)
    q_size, kv_size = cfg.num_attention_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    tensors = {
        "model.embed_tokens.weight": t["transformer.wte.weight"],
        "model.norm.weight": t["transformer.ln_f.weight"],
    }
    if "lm_head.weight" in t:
        tensors["lm_head.weight"] = t["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        v1, hf = f"transformer.h.{i}.", f"model.layers.{i}."
        q, k, v = t[v1 + "attn.c_attn.weight"].split([q_size, kv_size, kv_size])  # (q + 2 kv, hidden)
        qb, kb, vb = t[v1 + "attn.c_attn.bias"].split([q_size, kv_size, kv_size])
        tensors.update({
            hf + "input_layernorm.weight": t[v1 + "ln_1.weight"],
            hf + "self_attn.q_proj.weight": q.contiguous(), hf + "self_attn.q_proj.bias": qb.contiguous(),
            hf + "self_attn.k_proj.weight": k.contiguous(), hf + "self_attn.k_proj.bias": kb.contiguous(),
            hf + "self_attn.v_proj.weight": v.contiguous(), hf + "self_attn.v_proj.bias": vb.contiguous(),
            hf + "self_attn.o_proj.weight": t[v1 + "attn.c_proj.weight"],
            hf + "post_attention_layernorm.weight": t[v1 + "ln_2.weight"],
            hf + "mlp.gate_proj.weight": t[v1 + "mlp.w2.weight"],
            hf + "mlp.up_proj.weight": t[v1 + "mlp.w1.weight"],
            hf + "mlp.down_proj.weight": t[v1 + "mlp.c_proj.weight"],
        })  # fmt: skip
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.mlp_width,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.n_kv_heads, "rope_theta": cfg.rotary_emb_base,
        "rms_norm_eps": cfg.layer_norm_epsilon, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu", "attention_dropout": 0.0,
        "use_sliding_window": False,
        **{k: c[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in c},
    }  # fmt: skip
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        config["head_dim"] = cfg.head_dim
    return tensors, config


def to_qwen(ckpt: GGUFCheckpoint) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and config of ``ckpt`` in the official Qwen v1 (``QWenLMHeadModel``) layout."""
    c, t = ckpt.config, ckpt.tensors
    if ckpt.architecture == "qwen":
        tensors, config = dict(t), dict(c)
    else:
        heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
        if kv_heads != heads:
            raise ValueError(
                f"{ckpt.path}: this model has {heads} query heads but {kv_heads} key/value heads (grouped-query "
                f"attention), which the Qwen v1 layout cannot hold; convert with layout='qwen2' instead"
            )
        if "rope_scaling" in c:
            raise ValueError(
                f"{ckpt.path}: rope_scaling {c['rope_scaling']} has no Qwen v1 equivalent; use layout='qwen2'"
            )
        from qwenlm.checkpoint import qwen2_to_v1_names

        tensors = qwen2_to_v1_names(t)  # the loader's own mapping: c_attn = cat(q, k, v), gate -> w2, up -> w1
        config = {
            "architectures": ["QWenLMHeadModel"], "auto_map": _V1_AUTO_MAP, "model_type": "qwen",
            "vocab_size": c["vocab_size"], "hidden_size": c["hidden_size"],
            "intermediate_size": 2 * c["intermediate_size"], "num_hidden_layers": c["num_hidden_layers"],
            "num_attention_heads": heads, "kv_channels": c.get("head_dim", c["hidden_size"] // heads),
            "rotary_emb_base": c["rope_theta"], "rotary_pct": 1.0, "layer_norm_epsilon": c["rms_norm_eps"],
            "max_position_embeddings": c["max_position_embeddings"], "seq_length": c["max_position_embeddings"],
            "use_dynamic_ntk": False, "use_logn_attn": False, "no_bias": True, "scale_attn_weights": True,
            "attn_dropout_prob": 0.0, "emb_dropout_prob": 0.0, "initializer_range": 0.02,
            "bf16": False, "fp16": False, "fp32": False, "use_flash_attn": "auto", "use_cache": True,
            "onnx_safe": None, "tokenizer_class": "QWenTokenizer",
        }  # fmt: skip
    if "lm_head.weight" not in tensors:
        # The official v1 model always has its own output matrix: store a copy of the embedding.
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    config["tie_word_embeddings"] = False
    return tensors, config


# -- files --------------------------------------------------------------------------------------------
def save_safetensors(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """``model.safetensors``, or numbered shards of at most ``max_shard_bytes`` plus their index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name].contiguous()
        size += nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], str(folder / SAFETENSORS), metadata=metadata)
        return
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        filename = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / filename), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(folder / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def save_tiktoken_bpe(ranks: dict[bytes, int], path: Path) -> None:
    """Write a ``qwen.tiktoken`` file (``base64(token) rank`` per line, in rank order)."""
    lines = [
        f"{base64.b64encode(token).decode('ascii')} {rank}" for token, rank in sorted(ranks.items(), key=lambda x: x[1])
    ]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
