"""One configuration object for every Qwen checkpoint we load.

Field names are those of the official Qwen v1 ``config.json``. Qwen2-family configs (``model_type``
``qwen2``) and the early Qwen v1 key scheme (``n_embd``, ``n_head``…) are mapped onto them on load.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"

# Early Qwen v1 checkpoints (and Megatron-style exports) spell some keys differently.
_V1_ALIASES = {
    "n_embd": "hidden_size",
    "n_head": "num_attention_heads",
    "n_layer": "num_hidden_layers",
    "n_positions": "max_position_embeddings",
    "ffn_hidden_size": "intermediate_size",
    "padded_vocab_size": "vocab_size",
}
# Qwen2 / Qwen1.5 / Qwen2.5 (HF ``Qwen2Config``) keys that mean the same as a v1 key.
_QWEN2_ALIASES = {
    "rope_theta": "rotary_emb_base",
    "rms_norm_eps": "layer_norm_epsilon",
    "attention_dropout": "attn_dropout_prob",
}


@dataclass
class QwenConfig:
    """Hyper-parameters of a Qwen model (defaults: the released Qwen-7B)."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    # Key/value heads (grouped-query attention, Qwen2 family); None = one per query head (Qwen v1).
    num_key_value_heads: int | None = None
    kv_channels: int = 128
    # Qwen v1 stores twice the MLP width here (w1 and w2 are each half); Qwen2 stores the width itself.
    intermediate_size: int = 22016
    layer_norm_epsilon: float = 1e-6
    max_position_embeddings: int = 32768
    seq_length: int = 8192  # training context length; dynamic NTK and LogN are measured against it
    rotary_emb_base: float = 10000.0
    rotary_pct: float = 1.0
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    tie_word_embeddings: bool = False
    scale_attn_weights: bool = True
    attn_dropout_prob: float = 0.0
    emb_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    use_flash_attn: Any = "auto"
    use_cache: bool = True
    onnx_safe: Any = None
    model_type: str = "qwen"
    architectures: list[str] = field(default_factory=lambda: ["QWenLMHeadModel"])
    # Keys we read but do not use (auto_map, tokenizer_class, transformers_version…), kept for saving.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- derived quantities ---------------------------------------------------------------
    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size // 2 if self.model_type == "qwen" else self.intermediate_size

    @property
    def rotary_dim(self) -> int:
        return int(self.kv_channels * self.rotary_pct)

    @property
    def is_qwen2(self) -> bool:
        return self.model_type == "qwen2"

    def num_parameters(self) -> int:
        h, v, L = self.hidden_size, self.vocab_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.n_kv_heads * self.head_dim
        attn = h * (q + 2 * kv) + (q + 2 * kv) + q * h
        mlp = 3 * h * self.mlp_width
        per_layer = attn + mlp + 2 * h
        heads = v * h * (1 if self.tie_word_embeddings else 2)
        return L * per_layer + heads + h

    # -- reading and writing -------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> QwenConfig:
        raw = dict(raw)
        model_type = raw.get("model_type", "qwen")
        if model_type not in ("qwen", "qwen2"):
            raise ValueError(
                f"{source}: model_type {model_type!r} is not supported; expected 'qwen' (Qwen v1) or "
                f"'qwen2' (Qwen1.5/Qwen2/Qwen2.5)"
            )
        aliases = dict(_V1_ALIASES)
        if model_type == "qwen2":
            aliases.update(_QWEN2_ALIASES)
        for old, new in aliases.items():
            if old in raw and new not in raw:
                raw[new] = raw.pop(old)
        if model_type == "qwen2":
            heads = raw.get("num_attention_heads")
            if heads and "kv_channels" not in raw:
                raw["kv_channels"] = raw.get("head_dim") or raw["hidden_size"] // heads
            raw.setdefault("seq_length", raw.get("max_position_embeddings", 32768))
            # Qwen2 has no dynamic NTK / LogN unless asked; its biases are on q/k/v only.
            raw.setdefault("use_dynamic_ntk", False)
            raw.setdefault("use_logn_attn", False)
            raw.setdefault("tie_word_embeddings", False)
            raw.setdefault("architectures", ["Qwen2ForCausalLM"])
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in raw.items() if k in names}
        extra = {k: v for k, v in raw.items() if k not in names}
        config = cls(**known, extra=extra)
        config.validate(source)
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> QwenConfig:
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"no {CONFIG_FILE} in folder {path.parent}: a checkpoint folder needs the model's {CONFIG_FILE}"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); restore it from the original checkpoint") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a JSON object, found {type(raw).__name__}")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_preset(cls, name: str) -> QwenConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if self.num_key_value_heads is None:
            del out["num_key_value_heads"]
        return {**self.extra, **out}

    def save(self, folder: str | Path) -> None:
        Path(folder, CONFIG_FILE).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def validate(self, source: str = "config") -> None:
        def need(ok: bool, key: str, value: Any, expected: str) -> None:
            if not ok:
                raise ValueError(f"{source}: {key} = {value!r} is invalid; expected {expected}")

        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_channels"):
            value = getattr(self, key)
            need(isinstance(value, int) and value > 0, key, value, "a positive integer")
        need(self.intermediate_size > 0, "intermediate_size", self.intermediate_size, "a positive integer")
        need(
            self.n_kv_heads > 0 and self.num_attention_heads % self.n_kv_heads == 0,
            "num_key_value_heads",
            self.num_key_value_heads,
            f"a divisor of num_attention_heads ({self.num_attention_heads})",
        )
        need(0 < self.rotary_pct <= 1, "rotary_pct", self.rotary_pct, "a value in (0, 1]")
        need(
            self.rotary_dim >= 2 and self.rotary_dim % 2 == 0,
            "rotary_pct",
            self.rotary_pct,
            f"kv_channels * rotary_pct to be an even number >= 2 (got {self.kv_channels * self.rotary_pct})",
        )
        need(self.seq_length > 0, "seq_length", self.seq_length, "a positive integer")
        need(self.rotary_emb_base > 0, "rotary_emb_base", self.rotary_emb_base, "a positive number")
        need(
            math.isfinite(self.layer_norm_epsilon) and self.layer_norm_epsilon > 0,
            "layer_norm_epsilon",
            self.layer_norm_epsilon,
            "a small positive number",
        )


# Published Qwen v1 sizes (from the official config.json files of Qwen-1.8B/7B/14B/72B).
_V1_COMMON = dict(
    rotary_emb_base=10000.0, rotary_pct=1.0, use_dynamic_ntk=True, use_logn_attn=True,
    layer_norm_epsilon=1e-6, no_bias=True, tie_word_embeddings=False, model_type="qwen",
)  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    "qwen-1.8b": dict(_V1_COMMON, vocab_size=151936, hidden_size=2048, num_hidden_layers=24,
                      num_attention_heads=16, kv_channels=128, intermediate_size=11008,
                      seq_length=8192, max_position_embeddings=8192),
    "qwen-7b": dict(_V1_COMMON, vocab_size=151936, hidden_size=4096, num_hidden_layers=32,
                    num_attention_heads=32, kv_channels=128, intermediate_size=22016,
                    seq_length=8192, max_position_embeddings=32768),
    "qwen-14b": dict(_V1_COMMON, vocab_size=152064, hidden_size=5120, num_hidden_layers=40,
                     num_attention_heads=40, kv_channels=128, intermediate_size=27392,
                     seq_length=2048, max_position_embeddings=8192),
    "qwen-72b": dict(_V1_COMMON, vocab_size=152064, hidden_size=8192, num_hidden_layers=80,
                     num_attention_heads=64, kv_channels=128, intermediate_size=49152,
                     seq_length=32768, max_position_embeddings=32768, rotary_emb_base=1000000.0),
}  # fmt: skip
