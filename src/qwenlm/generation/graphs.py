"""One-token decoding replayed from CUDA graphs: one launch per token instead of ~30 kernel launches per layer.

At batch 1 a GPU finishes each of a 7B model's ~1,000 small kernels faster than Python can launch the next,
so eager decoding is bound by launch overhead, not by memory bandwidth. A graph needs every shape and every
buffer address fixed, so the step recorded is ``static_step.static_decode``: keys and values live in a *slot*,
static buffers of a fixed capacity (the cache's need, rounded up to ``CAPACITY_STEP``) that the ``KVCache``
adopts, and the position is a device tensor (the result is the eager step's).

A slot is recorded once per (batch, capacity, NTK alphas) and replayed for every later token and later
generation of that shape; the recording (two warm-up steps and the capture) takes a fraction of a second,
or the compilation time with ``compile=True`` (the step then goes through ``torch.compile`` with static
shapes before it is recorded). Window attention and training mode use the eager step.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..attention import check_mask_covers
from ..cache import KVCache
from .static_step import applies, position_tables, static_decode

if TYPE_CHECKING:
    from ..model import QwenForCausalLM

CAPACITY_STEP = 256  # slot capacities are multiples of this: few recordings, little attention over empty columns
MAX_SLOTS = 4  # recorded shapes kept (each holds its own keys and values)


@dataclass
class _Slot:
    """The static buffers of one recorded shape."""

    ids: torch.Tensor  # (B, 1) token ids fed this step
    pos: torch.Tensor  # (1,) position of the new token
    valid: torch.Tensor  # (B, capacity) bool: padding mask over the columns up to the position
    cos: torch.Tensor  # (A, capacity, rotary_dim) rotary tables, one per NTK alpha
    sin: torch.Tensor
    logn: torch.Tensor | None  # (capacity,) LogN query factors, or None
    k: list[torch.Tensor]  # per layer (B, KVH, capacity, D)
    v: list[torch.Tensor]
    graph: Any = None  # torch.cuda.CUDAGraph once recorded
    logits: torch.Tensor | None = None  # (B, vocab) output of the recorded step
    owner: Any = field(default=None)  # weakref to the KVCache using k/v

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]


class GraphDecoder:
    """``decode_step`` on recorded CUDA graphs (see the module doc). ``capture=False`` runs the same static
    step eagerly, on any device: what the tests compare with the eager step where no GPU exists."""

    def __init__(self, model: QwenForCausalLM, compile: bool = False, capture: bool = True) -> None:
        self.model = model
        self.capture = capture
        self.compile = compile
        self._run = torch.compile(self._step, dynamic=False) if compile else self._step
        self._slots: OrderedDict[tuple, _Slot] = OrderedDict()

    def supports(self, cache: KVCache) -> bool:
        """Whether this decoder can run the next step on ``cache`` (else the caller uses the eager step)."""
        return applies(self.model, cache)

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """Next-token logits (B, vocab) after ``input_ids`` (B, 1) on top of ``cache``, as ``decode_step``."""
        batch, pos = input_ids.shape[0], cache.seq_len
        check_mask_covers(attention_mask, pos + 1)
        alphas = tuple(cache.ntk_alphas or [1.0])
        # room for the whole generation the cache was sized for, so that one slot serves all of its tokens
        capacity = -(-max(pos + 1, cache.capacity) // CAPACITY_STEP) * CAPACITY_STEP
        key = (batch, capacity, alphas, cache._k[0].dtype)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._new_slot(batch, capacity, alphas, cache._k[0].dtype)
            self._slots[key] = slot
            while len(self._slots) > MAX_SLOTS:
                self._release(self._slots.popitem(last=False)[1])
        self._slots.move_to_end(key)
        self._bind(slot, cache)
        slot.ids.copy_(input_ids)
        slot.pos.fill_(pos)
        if attention_mask is None:
            slot.valid.fill_(True)
        else:
            slot.valid[:, : pos + 1].copy_(attention_mask)
        if slot.graph is None:
            slot.logits = self._record(slot)
        else:
            slot.graph.replay()
        cache.advance(1)
        return slot.logits.clone()

    # -- slots ------------------------------------------------------------------------------------------
    def _new_slot(self, batch: int, capacity: int, alphas: tuple[float, ...], dtype: torch.dtype) -> _Slot:
        m, c = self.model, self.model.config
        device = m.device  # buffers of the cache's dtype (the model's, or e.g. bf16 under fp32)
        with torch.inference_mode(False), torch.no_grad():  # plain tensors: written in and out of inference mode
            cos, sin, logn = position_tables(m, capacity, alphas)
            kv = [torch.zeros(batch, c.n_kv_heads, capacity, c.head_dim, dtype=dtype, device=device)
                  for _ in range(2 * c.num_hidden_layers)]  # fmt: skip
            return _Slot(
                ids=torch.zeros(batch, 1, dtype=torch.long, device=device),
                pos=torch.zeros(1, dtype=torch.long, device=device),
                valid=torch.ones(batch, capacity, dtype=torch.bool, device=device),
                cos=cos,
                sin=sin,
                logn=logn,
                k=kv[: c.num_hidden_layers],
                v=kv[c.num_hidden_layers :],
            )

    def _bind(self, slot: _Slot, cache: KVCache) -> None:
        """Make ``cache`` use the slot's buffers (copying what it holds), first handing the previous user of
        the slot a copy of its own keys and values, so that two interleaved generations never mix."""
        if cache._k[0] is slot.k[0]:
            return
        self._release(slot)
        n = cache.seq_len
        with torch.inference_mode(False), torch.no_grad():
            for mine, theirs in zip(slot.k + slot.v, cache._k + cache._v):
                mine[:, :, :n].copy_(theirs[:, :, :n])
        cache._k, cache._v, cache.capacity = list(slot.k), list(slot.v), slot.capacity
        slot.owner = weakref.ref(cache)

    def _release(self, slot: _Slot) -> None:
        """Give the cache that still uses the slot's buffers (if it lives) its own copy of them."""
        previous = slot.owner() if slot.owner is not None else None
        if previous is not None and previous._k and previous._k[0] is slot.k[0]:
            previous._k = [b.clone() for b in previous._k]
            previous._v = [b.clone() for b in previous._v]

    def _record(self, slot: _Slot) -> torch.Tensor:
        """Run the step (the first token of a new shape) and, on CUDA, record it for replay."""
        self.model.prepare_layers()  # e.g. int4 weights packed for their kernel: outside the graph
        if not self.capture or slot.ids.device.type != "cuda":
            return self._run(slot)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph: packed weights, library handles, compilation
                logits = self._run(slot)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._run(slot)
        graph.replay()  # recording runs nothing: this is the step itself
        slot.graph = graph
        return logits

    def _step(self, slot: _Slot) -> torch.Tensor:
        return static_decode(self.model, slot.ids, slot.pos, slot.valid, slot.cos, slot.sin, slot.logn, slot.k, slot.v)
