"""The Qwen decoder in plain PyTorch: pre-norm blocks of RMSNorm, rotary attention and a SwiGLU MLP.

Module names follow the official Qwen v1 checkpoint (``transformer.h.0.attn.c_attn``…), so those
checkpoints load with no renaming; other formats are mapped onto these names by ``checkpoint``.
The model knows nothing of tokenizers, sampling, chat or quantisation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, AttentionMask
from .cache import KVCache
from .compiling import compile_decode_step
from .config import QwenConfig
from .generation.exported import ExportedDecoder
from .generation.graphs import GraphDecoder
from .longctx import DynamicNTK, LogNScaling, NoLogN, PlainRoPE, WindowSchedule, position_policies, window_schedule
from .quant import cpu_kernel
from .rope import RotaryEmbedding

if TYPE_CHECKING:
    from .generation.config import GenerationConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale. ``own_kernel`` (set by quantisation, whose layers load qwenlm's
    CPU kernels anyway): float32 rows on the CPU without gradients go through ``cpu_kernel.rms_norm``, one
    operation instead of eight (equal to ~1e-7; compiled passes keep PyTorch's, which inductor fuses)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.own_kernel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.own_kernel and cpu_kernel.eager_float_cpu(x) and cpu_kernel.provides("rms_norm"):
            return cpu_kernel.rms_norm(x, self.weight, self.eps)
        # fp32 statistics whatever the input dtype; cast back *before* the weight, as the reference does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class MLP(nn.Module):
    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        width = config.mlp_width
        self.w1 = nn.Linear(config.hidden_size, width, bias=False)  # linear ("up") branch
        self.w2 = nn.Linear(config.hidden_size, width, bias=False)  # SiLU ("gate") branch
        self.c_proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class Block(nn.Module):
    def __init__(self, config: QwenConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, *attn_args: Any) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), *attn_args)
        return x + self.mlp(self.ln_2(x))


class _Embedding(nn.Embedding):
    """``nn.Embedding`` that draws no initial weights on the meta device (a model built to load a checkpoint
    into): PyTorch's ``normal_`` there imports dynamo, 1.5-2 s of every load that would not use it."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class QwenModel(nn.Module):
    """Embedding, decoder blocks and final norm (``transformer.*`` in the official checkpoint).

    Long-context behaviour is three policy objects chosen from the config (``longctx``): ``ntk``
    (plain RoPE or dynamic NTK), ``logn`` (LogN query scaling or none) and ``windows`` (a per-layer
    window schedule, experimental; None = full attention). ``set_long_context`` swaps them.
    """

    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = _Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.rotary = RotaryEmbedding(config.rotary_dim, config.rotary_emb_base, config.max_position_embeddings)
        self.ntk, self.logn = position_policies(config.seq_length, config.use_dynamic_ntk, config.use_logn_attn)
        self.windows: WindowSchedule | None = None

    def ntk_alphas_for(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache | None
    ) -> list[float]:
        """The NTK alphas of a pass (one, or one per row): the cache's when it has them (decoding keeps the
        prefill's, as the reference does; chunked prefill sets them up front from the whole prompt, see
        ``generation.prefill``), else from this input's length, then remembered in the cache."""
        if cache is not None and cache.ntk_alphas is not None:
            return cache.ntk_alphas
        alphas = self.ntk.alphas(input_ids.shape[1], attention_mask, self.training)
        if cache is not None:
            cache.ntk_alphas = alphas
        return alphas

    def set_long_context(
        self, ntk: bool | None = None, logn: bool | None = None, window: str | WindowSchedule | None = None
    ) -> None:
        """Turn dynamic NTK / LogN on or off (None = leave as is) and set the window schedule (a
        ``WindowSchedule`` or its spec, e.g. ``"default"`` or ``"2kx4,4kx4,8k"``; ``"none"`` = full attention,
        None = leave as is). The config's ``use_dynamic_ntk`` / ``use_logn_attn`` follow."""
        c = self.config
        if ntk is not None:
            c.use_dynamic_ntk = ntk
            self.ntk = DynamicNTK(c.seq_length) if ntk else PlainRoPE()
        if logn is not None:
            c.use_logn_attn = logn
            self.logn = LogNScaling(c.seq_length) if logn else NoLogN()
        if window is not None:
            self.windows = window_schedule(window, c.num_hidden_layers, c.seq_length)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, past + T), 1 = token, 0 = padding
        cache: KVCache | None = None,
        ntk_alphas: list[float] | None = None,  # from ``ntk_alphas_for`` (precomputed); None = work them out
    ) -> torch.Tensor:
        t = input_ids.shape[1]
        past = cache.seq_len if cache is not None else 0
        kv_len = past + t
        alphas = ntk_alphas if ntk_alphas is not None else self.ntk_alphas_for(input_ids, attention_mask, cache)
        h = self.drop(self.wte(input_ids))
        logn = self.logn.factors(past, kv_len, self.training)
        if logn is not None:
            logn = logn.to(h.device)
        mask = AttentionMask(attention_mask, t, kv_len, h.dtype, h.device)
        tables: dict[tuple[float, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        for i, block in enumerate(self.h):
            window = self.windows.window(i) if self.windows is not None else None
            # a windowed layer sees at most `window` keys: its NTK alpha is that of its span
            layer_alphas = alphas if window is None else self.ntk.within(alphas, window)
            key = tuple(layer_alphas)
            if key not in tables:
                tables[key] = self.rotary.cos_sin(past, kv_len, layer_alphas, h.device)
            h = block(h, *tables[key], logn, mask, cache, window)
        if cache is not None:
            cache.advance(t)
        return self.ln_f(h)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    past_key_values: KVCache | None = None
    loss: torch.Tensor | None = None


class QwenForCausalLM(nn.Module):
    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = QwenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.generation_config: GenerationConfig | None = None
        self.tokenizer = None  # set by from_pretrained when the checkpoint carries one
        self._compiled: dict[str, Any] | None = None  # set by compile_inference()
        self._graphs: GraphDecoder | None = None  # set by use_cuda_graphs() / compile_inference() on CUDA
        self._exported: ExportedDecoder | None = None  # set by compile_inference() on CPU
        self.kv_cache_dtype: torch.dtype | None = None  # what new caches store; None: the activation dtype

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype = "auto", device: str = "auto", **kwargs: Any):
        """Load a checkpoint folder (Qwen v1 or HF Qwen2 layout) or a GGUF file; see ``qwenlm.checkpoint``."""
        from .checkpoint import load_model

        return load_model(path, dtype=dtype, device=device, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.transformer.ln_f.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (quantised layers and embedding keep their own weight formats)."""
        return self.transformer.ln_f.weight.dtype

    def new_cache(self, capacity: int = 0) -> KVCache:
        """An empty key/value cache for this model, storing ``kv_cache_dtype`` (e.g. ``torch.bfloat16``)."""
        return KVCache(self.config.num_hidden_layers, capacity, self.kv_cache_dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """Logits for every position (or only the last ``logits_to_keep``), the cache, and the loss:
        mean next-token cross-entropy over labels that are not -100."""
        self._check_ids(input_ids)
        cache = past_key_values
        if cache is None and use_cache:
            cache = self.new_cache()
        if self._compiled is not None and "prefill" in self._compiled and not torch.is_grad_enabled():
            # worked out here: values chosen inside the compiled pass would make it recompile for new ones
            if cache is not None:
                self._reserve(cache, input_ids)
            alphas = self.transformer.ntk_alphas_for(input_ids, attention_mask, cache)
            # fresh copies made in the current grad mode: dynamo guards on whether an input is a view and on
            # its dispatch keys (inference tensor or not), which would otherwise compile the pass twice
            input_ids = input_ids.clone()
            attention_mask = attention_mask.clone() if attention_mask is not None else None
            h = self._compiled["prefill"](input_ids, attention_mask, cache, alphas)
        else:
            h = self.transformer(input_ids, attention_mask, cache)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutput(logits=logits, past_key_values=cache, loss=loss)

    def decode_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """Next-token logits (B, vocab) after feeding ``input_ids`` (B, 1) on top of ``cache``: the decoding
        hot path (no id check: the ids come from the model's own sampling). Compiled after ``compile_inference``,
        replayed from CUDA graphs after ``use_cuda_graphs``."""
        if self._graphs is not None and self._graphs.supports(cache):
            return self._graphs.step(input_ids, attention_mask, cache)
        if self._exported is not None and self._exported.supports(cache):
            logits = self._exported.step(input_ids, attention_mask, cache)
            if logits is not None:
                return logits
        if self._compiled is not None and "decode" in self._compiled:
            self._reserve(cache, input_ids)
            return self._compiled["decode"](input_ids, attention_mask, cache)
        return self._decode(input_ids, attention_mask, cache)

    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        return self.lm_head(self.transformer(input_ids, attention_mask, cache)[:, -1])

    def _reserve(self, cache: KVCache, input_ids: torch.Tensor) -> None:
        c = self.config
        cache.reserve(input_ids.shape[0], c.n_kv_heads, c.head_dim, cache.seq_len + input_ids.shape[1], self.dtype,
                      self.device)  # fmt: skip

    def compile_inference(
        self, enabled: bool = True, ahead_of_time: bool = True, prefill: bool | None = None
    ) -> QwenForCausalLM:
        """Compile inference: the one-token ``decode_step`` always (on CPU ahead of time by AOTInductor, see
        below; on CUDA through ``torch.compile`` with static shapes, recorded in CUDA graphs, see
        ``use_cuda_graphs``) and, with ``prefill``, the decoder stack of every ``forward`` without gradients
        (prompts, scoring) through ``torch.compile`` with dynamic shapes. ``prefill`` defaults to on for CUDA
        (1.5x for 512-token prompts of a 7B shape on an H100) and off for CPU, where the compiled prompts of
        the demo model were 0.98-1.22x the eager ones (most within 10 %) and their compilation costs 45-75 s
        in every process on 2 cores (``benchmarks/prefill_compile.py``, RESULTS.md).
        New cache capacities, prompt lengths and a growing attention mask do not recompile on CPU; a new batch
        size does. The CPU decoding step takes ~40-80 s per batch size to build for the demo model and is kept
        on disk (``generation.program_store``: ~1 s in a later process); ``qwenlm bench --compile`` shows
        whether the faster passes repay it. ``enabled=False``: eager again. ``ahead_of_time=False``, or where
        that step does not apply (window attention) or cannot be built, the CPU step goes through
        ``torch.compile``, skipping dynamo's guards on the modules' hooks and weights (``qwenlm.compiling``).
        Either way, hooks registered afterwards are not run by it (call ``compile_inference()`` again). Call
        it after moving the model to its device."""
        if enabled:
            # the rotary table exists before the first compiled pass, which would otherwise build it and so
            # be compiled for a state that the next pass no longer sees
            self.transformer.rotary.cos_sin(0, 1, [1.0], self.device)
            self.prepare_layers()
            if prefill is None:
                prefill = self.device.type == "cuda"
            self._compiled = {"prefill": torch.compile(self.transformer.forward, dynamic=True)} if prefill else {}
            if self.device.type == "cuda":
                self._graphs = GraphDecoder(self, compile=True)
            else:
                self._compiled["decode"] = compile_decode_step(self._decode)
                self._exported = ExportedDecoder(self) if ahead_of_time else None
        else:
            self._compiled = self._graphs = self._exported = None
        return self

    def use_cuda_graphs(self, enabled: bool = True) -> QwenForCausalLM:
        """Decode by replaying CUDA graphs (``generation.graphs``): one launch per token, recorded once per
        batch size and cache capacity (a fraction of a second, no compilation). CUDA models only."""
        if enabled and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {self.device}")
        self._graphs = GraphDecoder(self) if enabled else None
        return self

    def prepare_layers(self, again: bool = True) -> None:
        """Let layers that choose a kernel per device (quantised linears) do so now, outside compiled or
        recorded passes, which would otherwise capture the choosing. ``again=False``: only layers that have
        not chosen yet (new, moved or cast ones), so that the others keep their layouts."""
        for module in self.modules():
            prepare = getattr(module, "prepare", None)
            if callable(prepare) and module is not self and (again or not getattr(module, "prepared", False)):
                prepare()

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    @property
    def cuda_graphs(self) -> bool:
        """Whether decoding replays CUDA graphs (``use_cuda_graphs``, or ``compile_inference`` on CUDA)."""
        return self._graphs is not None

    def __deepcopy__(self, memo: dict[int, Any]) -> QwenForCausalLM:
        # compiled passes are bound to this model: the copy starts in eager mode (compile it again if wanted)
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = None if key in ("_compiled", "_graphs", "_exported") else copy.deepcopy(value, memo)
        return clone

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        if input_ids.numel() and (int(input_ids.max()) >= self.config.vocab_size or int(input_ids.min()) < 0):
            bad = int(input_ids.max()) if int(input_ids.max()) >= self.config.vocab_size else int(input_ids.min())
            raise ValueError(f"token id {bad} is outside the model's vocabulary 0..{self.config.vocab_size - 1}")

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """Generate continuations; see ``qwenlm.generation.generate`` for the arguments."""
        from .generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    def stream_generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """Yield the new token ids (one tensor of shape (B,) per step) as they are produced."""
        from .generation import stream_generate

        return stream_generate(self, input_ids, attention_mask, **kwargs)

    def chat(self, tokenizer: Any, query: str, history: Any = None, system: str = "You are a helpful assistant.",
             **kwargs: Any) -> tuple[str, list[tuple[str, str]]]:  # fmt: skip
        """``(response, history)`` for ``query``; see ``qwenlm.chat.session.chat``."""
        from .chat.session import chat

        return chat(self, tokenizer, query, history, system, **kwargs)

    def chat_stream(self, tokenizer: Any, query: str, history: Any = None,
                    system: str = "You are a helpful assistant.", **kwargs: Any):  # fmt: skip
        """Yield the reply to ``query`` as text deltas; see ``qwenlm.chat.session.chat_stream``."""
        from .chat.session import chat_stream

        return chat_stream(self, tokenizer, query, history, system, **kwargs)
