"""Autoregressive generation: prefill once, then one token per step through the KV cache.

Greedy and sampled decoding follow HF transformers 4.32 as the Qwen reference used it: processors
(repetition penalty, then stop words) on the raw scores, then warpers (temperature, top-k, top-p) when
sampling. Rows that produced an end token are padded with ``pad_token_id`` until all rows are done.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

from ..quant.cpu_kernel import argmax
from .config import GenerationConfig
from .processors import LogitsProcessor, RepetitionPenalty, StopWordsLogitsProcessor, Temperature, TopK, TopP


class Streamer(Protocol):
    def put(self, token_ids: torch.Tensor) -> None: ...
    def end(self) -> None: ...


def build_processors(cfg: GenerationConfig) -> tuple[list[LogitsProcessor], list[LogitsProcessor]]:
    processors: list[LogitsProcessor] = []
    if cfg.repetition_penalty != 1.0:
        processors.append(RepetitionPenalty(cfg.repetition_penalty))
    if cfg.stop_words_ids and cfg.eos_ids:
        stop = StopWordsLogitsProcessor(cfg.stop_words_ids, cfg.eos_ids[0])
        if stop.stop_words_ids:
            processors.append(stop)
    warpers: list[LogitsProcessor] = []
    if cfg.do_sample and cfg.temperature > 0:
        if cfg.temperature != 1.0:
            warpers.append(Temperature(cfg.temperature))
        if cfg.top_k > 0:
            warpers.append(TopK(cfg.top_k))
        if cfg.top_p < 1.0:
            warpers.append(TopP(cfg.top_p))
    return processors, warpers


def resolve_config(model: Any, overrides: dict[str, Any]) -> GenerationConfig:
    base = model.generation_config or GenerationConfig()
    cfg = base.updated(**overrides)
    cfg.validate()
    return cfg


def stream_generate(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, a (B,) tensor per step, until all rows ended or
    ``max_new_tokens`` is reached. Keyword arguments override the model's generation config."""
    cfg = resolve_config(model, kwargs)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    batch, prompt_len = input_ids.shape
    if prompt_len == 0:
        raise ValueError("the prompt is empty: generation needs at least one input token")
    limit = model.config.max_position_embeddings
    if prompt_len >= limit:
        raise ValueError(
            f"the prompt has {prompt_len} tokens but the model attends to at most {limit} "
            f"(max_position_embeddings); shorten the prompt"
        )
    max_new = min(cfg.max_new_tokens, limit - prompt_len)
    device = model.device
    input_ids = input_ids.to(device)
    if attention_mask is None and batch > 1:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    processors, warpers = build_processors(cfg)
    eos = torch.tensor(cfg.eos_ids, device=device, dtype=torch.long)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_ids[0] if cfg.eos_ids else 0)
    generator = None
    if cfg.do_sample and cfg.temperature > 0:
        generator = torch.Generator(device=device)
        if cfg.seed is not None:
            generator.manual_seed(cfg.seed)
        else:
            generator.seed()

    cache = model.new_cache(capacity=prompt_len + max_new)
    sequences = input_ids
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    with torch.inference_mode():
        logits = model(input_ids, attention_mask, past_key_values=cache, logits_to_keep=1).logits
        for _ in range(max_new):
            scores = logits[:, -1].float()
            for p in processors:
                scores = p(sequences, scores)
            if generator is None:
                next_ids = argmax(scores)
            else:
                for w in warpers:
                    scores = w(sequences, scores)
                probs = scores.softmax(dim=-1)
                next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            next_ids = torch.where(unfinished, next_ids, torch.full_like(next_ids, pad))
            sequences = torch.cat([sequences, next_ids[:, None]], dim=1)
            yield next_ids
            if eos.numel():
                unfinished &= ~torch.isin(next_ids, eos)
                if not bool(unfinished.any()):
                    return
            if sequences.shape[1] - prompt_len == max_new:
                return
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
            logits = model.decode_step(next_ids[:, None], attention_mask, cache)[:, None]


def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    streamer: Streamer | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Generate continuations; returns prompt + new ids, shape (B, L + n).

    Arguments (defaults from the checkpoint's ``generation_config.json``): ``max_new_tokens``,
    ``do_sample``, ``temperature``, ``top_k`` (0 = off), ``top_p``, ``repetition_penalty``,
    ``stop_words_ids``, ``eos_token_id`` (``None`` = never stop at an end token), ``pad_token_id``,
    ``seed``. A ``streamer`` gets each step's ids through ``put`` and ``end()`` at the end.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    steps = []
    for ids in stream_generate(model, input_ids, attention_mask, **kwargs):
        steps.append(ids)
        if streamer is not None:
            streamer.put(ids)
    if streamer is not None:
        streamer.end()
    new = torch.stack(steps, dim=1) if steps else input_ids.new_zeros(input_ids.shape[0], 0)
    return torch.cat([input_ids.to(new.device), new], dim=1)
