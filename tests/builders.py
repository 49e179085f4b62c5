"""Small checkpoints built by the tests themselves, in the official layouts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from qwenlm import QwenConfig, QwenForCausalLM
from tests.shared import shared_path


def tiny_config(**overrides) -> QwenConfig:
    values = dict(vocab_size=151936, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, kv_channels=8,
                  intermediate_size=64, seq_length=64, max_position_embeddings=512, use_dynamic_ntk=True,
                  use_logn_attn=True)  # fmt: skip
    values.update(overrides)
    return QwenConfig(**values)


def random_model(config: QwenConfig, seed: int = 0) -> QwenForCausalLM:
    torch.manual_seed(seed)
    model = QwenForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.uniform_(0.75, 1.25)
            else:
                p.normal_(0, 0.5 if "wte" in name or "lm_head" in name else 0.2)
    return model.eval()


def write_checkpoint(model: QwenForCausalLM, folder: Path, shards: int = 1, tokenizer: bool = True,
                     generation_config: dict | None = None) -> Path:  # fmt: skip
    """Write ``model`` as an official Qwen v1 folder: config.json, (sharded) safetensors, qwen.tiktoken."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = list(state)
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        per = -(-len(names) // shards)
        for i in range(shards):
            part = names[i * per : (i + 1) * per]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k] for k in part}, str(folder / fname))
            weight_map.update({k: fname for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer:
        shutil.copy(shared_path("qwen-7b", "qwen.tiktoken"), folder / "qwen.tiktoken")
    gen = generation_config or {"eos_token_id": 151643, "pad_token_id": 151643, "stop_words_ids": [[151643]],
                                "max_new_tokens": 16, "do_sample": False}  # fmt: skip
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


def tiny_checkpoint(folder: Path, shards: int = 1, **config) -> Path:
    return write_checkpoint(random_model(tiny_config(**config)), folder, shards=shards)


def teacher_forced(model: QwenForCausalLM, ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor,
                   step=None) -> torch.Tensor:  # fmt: skip
    """Prefill ``ids`` then feed ``tokens`` (B, n) one at a time through ``step`` (default the model's
    ``decode_step``): the logits (B, n + 1, V) in fp32. Every model gets the same tokens, so that a near-tie
    decided differently in bf16 does not send two models down different paths."""
    step = step or model.decode_step
    with torch.inference_mode():
        cache = model.new_cache(ids.shape[1] + tokens.shape[1])
        out = [model(ids, mask, past_key_values=cache, logits_to_keep=1).logits[:, -1]]
        for i in range(tokens.shape[1]):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out.append(step(tokens[:, i : i + 1], mask, cache))
    return torch.stack(out, 1).float()


def greedy_decode(model: QwenForCausalLM, ids: torch.Tensor, mask: torch.Tensor | None, steps: int, step=None,
                  capacity: int = 0) -> tuple[torch.Tensor, Any]:  # fmt: skip
    """Prefill ``ids`` into a cache of ``capacity`` (0: grown as needed), then feed the greedy token ``steps``
    times through ``step(tok, mask, cache)`` (default the model's ``decode_step``): the last prefill logits
    and every step's, (B, steps + 1, V), and the cache."""
    step = step or model.decode_step
    with torch.inference_mode():
        cache = model.new_cache(capacity)
        logits = model(ids, mask, past_key_values=cache, logits_to_keep=1).logits[:, -1]
        out = [logits]
        for _ in range(steps):
            tok = logits.argmax(-1, keepdim=True)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            logits = step(tok, mask, cache)
            out.append(logits)
    return torch.stack(out, dim=1), cache


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return float((actual - reference).norm() / reference.norm())
