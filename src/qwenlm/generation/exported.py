"""One-token decoding on CPU from a step compiled ahead of time by AOTInductor: no dynamo, no Python between
the kernels.

Through ``torch.compile`` a decoding step pays, on every call, dynamo's frame evaluation and guards, the
gathering of its ~500 inputs (each weight reached through the module tree) and the wrapper around the kernels:
~1.5-2 ms of a ~15 ms int4 step of the demo model (benchmarks/RESULTS.md). Here the step
(``static_step.static_decode``) is exported once (``torch.export``), compiled by AOTInductor into a shared
library and called with only its own inputs: the token ids, the position, the padding mask, the rotary
tables and the cache's buffers. Their capacity is a dynamic dimension, so a growing cache, a longer prompt or
a later generation run the same program.

The library holds no copy of the weights: the model's tensors are inputs of the program (inductor's own
constants, such as the group size of PyTorch's int4 kernel, are all it keeps), so memory is not doubled and an
in-place change of a weight is seen. Before the first step on each cache the decoder checks the model's tensors
against the layouts the program was compiled for: a tensor of the same layout put in a weight's place is handed
over; a cast, a move, a swapped layer of another kind or layers prepared again drop the program, which is made
again.

One program is made per (batch size, rows of NTK alphas, LogN table or not, cache dtype). Compiling it takes
~40-80 s for the demo model on 2 cores (its dynamo-compiled step ~3 minutes); it is then kept on disk
(``generation.program_store``). A later process finds it by a key computed without exporting the step
(``program_store.step_key``: ~6 s less) and, before trusting it, runs its first step beside the eager
``static_decode`` on copies of the cache: should they differ (a key that missed something), the key is
dropped and the step exported, as without one. Window attention, training and gradients use the other
steps; where export or compilation fails, the decoder says why (a warning) and steps aside.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..attention import check_mask_covers
from ..cache import KVCache
from . import program_store
from .static_step import applies, position_tables, static_decode

if TYPE_CHECKING:
    from ..model import QwenForCausalLM

MAX_PROGRAMS = 8  # compiled shapes kept per model (as dynamo keeps 8 entries per code object)
EXAMPLE_CAPACITY = 16  # the capacity of the example cache traced (the smallest a KVCache allocates)
# the model's attributes that static_decode does not read: the decoders themselves and generation settings
NOT_IN_THE_STEP = frozenset({"_compiled", "_graphs", "_exported", "tokenizer", "generation_config"})
# how far a program found by its step key may be from the eager step, relative to the largest logit: fused
# float operations round differently (demo model: fp32 4e-7, int8 4e-5, int4 1.4e-4, bf16 0.009-0.016); a
# wrong program is off by far more
AGREEMENT = {torch.float32: 2e-3, torch.float64: 2e-3}
LOW_PRECISION_AGREEMENT = 5e-2


class _Static(nn.Module):
    """``static_decode`` as a module, the model a submodule: its weights are named by their paths."""

    def __init__(self, model: QwenForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids, pos, valid, cos, sin, logn, keys, values):  # (the arguments of static_decode)
        return static_decode(self.model, ids, pos, valid, cos, sin, logn, keys, values)


class _Step(nn.Module):
    """The exported step: ``_Static`` with the model's tensors as inputs (``functional_call``), so that the
    compiled program holds none of them and runs on whichever tensors it is handed."""

    def __init__(self, model: QwenForCausalLM, names: list[str]) -> None:
        super().__init__()
        self.inner = _Static(model)
        self.names = names

    def forward(self, ids, pos, valid, cos, sin, logn, keys, values, weights):
        state = dict(zip(self.names, weights))
        return torch.func.functional_call(self.inner, state, (ids, pos, valid, cos, sin, logn, keys, values))


@dataclass
class _Program:
    run: Any  # the loaded library's boxed_run: a list of input tensors -> a list of outputs
    names: list[str]  # the model's tensors it takes after the step's own inputs, by path
    weights: list[torch.Tensor]  # those tensors
    layouts: list[tuple]  # their layouts when it was compiled (a cast changes a parameter's in place)
    from_store: bool  # loaded from disk, not compiled in this process
    name: str  # its name in the store (``program_store.fingerprint``)
    unchecked_key: str | None = None  # the step key it was found by, until its first step matched the eager one


def _layout(t: torch.Tensor) -> tuple:
    return t.shape, t.stride(), t.dtype, t.device


@dataclass
class _Tables:
    """The inputs that depend only on (batch, capacity, alphas): made once per cache shape."""

    key: tuple
    valid: torch.Tensor  # (B, capacity) all True: no padding
    cos: torch.Tensor  # (A, capacity, rotary_dim)
    sin: torch.Tensor
    logn: torch.Tensor | None  # (capacity,)


class ExportedDecoder:
    """``decode_step`` on AOTInductor-compiled programs (see the module doc); CPU models only."""

    def __init__(self, model: QwenForCausalLM) -> None:
        self.model = model
        self.failure: str | None = None  # why no program could be made; the decoder then steps aside
        self._programs: dict[tuple, _Program] = {}
        self._tables: _Tables | None = None
        self._last_cache: Any = None  # weakref to the cache of the previous step

    def supports(self, cache: KVCache) -> bool:
        m = self.model
        return self.failure is None and m.device.type == "cpu" and not torch.is_grad_enabled() and applies(m, cache)

    @property
    def programs_from_store(self) -> int:
        """How many of the programs in use were loaded from disk rather than compiled in this process."""
        return sum(p.from_store for p in self._programs.values())

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor | None:
        """Next-token logits (B, vocab) after ``input_ids`` (B, 1) on top of ``cache``, as ``decode_step``; None
        (with a warning, once) where no program can be compiled for this model: the caller takes another step."""
        m = self.model
        batch, pos = input_ids.shape[0], cache.seq_len
        check_mask_covers(attention_mask, pos + 1)
        m._reserve(cache, input_ids)
        if self._last_cache is None or self._last_cache() is not cache:  # a new generation: still our weights?
            self._forget_stale()
            self._last_cache = weakref.ref(cache)
        tables = self._tables_for(batch, cache._k[0].shape[2], tuple(cache.ntk_alphas or [1.0]))
        key = (batch, tables.cos.shape[0], tables.logn is not None, cache._k[0].dtype)
        program = self._programs.get(key)
        if program is None:
            program = self._compile(key, cache, tables)
            if program is None:
                return None
        valid = tables.valid
        if attention_mask is not None:
            valid = torch.zeros_like(valid)
            valid[:, : pos + 1] = attention_mask.bool()
        inputs = [input_ids.long().contiguous(), torch.tensor([pos]), valid, tables.cos, tables.sin]
        inputs += [tables.logn] if tables.logn is not None else []
        if program.unchecked_key is not None:
            program = self._checked(key, program, inputs, cache, tables)
            if program is None:
                return None
        (logits,) = program.run([*inputs, *cache._k, *cache._v, *program.weights])
        cache.advance(1)
        return logits

    # -- inputs -----------------------------------------------------------------------------------------
    def _tables_for(self, batch: int, capacity: int, alphas: tuple[float, ...]) -> _Tables:
        key = (batch, capacity, alphas)
        if self._tables is None or self._tables.key != key:
            self._tables = _Tables(key, torch.ones(batch, capacity, dtype=torch.bool),
                                   *position_tables(self.model, capacity, alphas))  # fmt: skip
        return self._tables

    # -- programs ---------------------------------------------------------------------------------------
    def _model_tensors(self) -> tuple[list[str], list[torch.Tensor]]:
        step = _Static(self.model)
        named = [*step.named_parameters(remove_duplicate=False), *step.named_buffers(remove_duplicate=False)]
        return [n for n, _ in named], [t for _, t in named]

    def _forget_stale(self) -> None:
        """Hand the programs the model's current tensors where those were replaced by tensors of the same
        layout (e.g. loaded weights); drop the programs whose tensors changed layout (cast, moved, swapped
        layers, layers not prepared yet), which compile again."""
        names, weights = self._model_tensors()
        for key, program in list(self._programs.items()):
            if program.names != names or program.layouts != [_layout(w) for w in weights]:
                del self._programs[key]
            elif any(a is not b for a, b in zip(program.weights, weights)):
                program.weights = weights

    def _checked(self, key: tuple, program: _Program, inputs: list, cache: KVCache, tables: _Tables) -> _Program | None:
        """``program`` (found by its step key) if its step gives the eager step's logits (on a copy of the
        cache); else the key is dropped and the step exported and compiled as without it."""
        ids, pos, valid, cos, sin, *logn = inputs
        layers = len(cache._k)
        copies = [b.clone() for b in (*cache._k, *cache._v)]
        want = static_decode(self.model, ids, pos, valid, cos, sin, logn[0] if logn else None, copies[:layers],
                             copies[layers:]).float()  # fmt: skip
        try:  # on the cache itself: it writes only the new token's slot, which the step taken next writes again
            (got,) = program.run([*inputs, *cache._k, *cache._v, *program.weights])
            gap = (got.float() - want).abs().max().item() / max(1.0, want.abs().max().item())
        except Exception:  # (it cannot be the program for these inputs)
            gap = float("inf")
        if gap <= AGREEMENT.get(self.model.dtype, LOW_PRECISION_AGREEMENT):
            program.unchecked_key = None
            return program
        program_store.forget(program.unchecked_key)
        del self._programs[key]
        again = self._compile(key, cache, tables, by_step_key=False)
        if again is not None and again.name == program.name:  # the key was right: only the rounding differs
            program_store.note(program.unchecked_key, again.name, checked=True)
        elif again is not None:
            warnings.warn(f"qwenlm: the stored decoding program found for this model gave other logits than its "
                          f"eager step (off by {gap:.2g} of the largest); exported the step again",
                          stacklevel=4)  # fmt: skip
        return again

    def _compile(self, key: tuple, cache: KVCache, tables: _Tables, by_step_key: bool = True) -> _Program | None:
        try:
            program = self._export_and_compile(cache, tables, by_step_key)
        except Exception as e:  # export or the C++ build failed: the dynamo-compiled or eager step still works
            self.failure = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            warnings.warn(f"qwenlm: the ahead-of-time decoding step could not be compiled ({self.failure}); "
                          "decoding through torch.compile instead", stacklevel=3)  # fmt: skip
            return None
        self._programs[key] = program
        while len(self._programs) > MAX_PROGRAMS:
            self._programs.pop(next(iter(self._programs)))
        return program

    def _export_and_compile(self, cache: KVCache, tables: _Tables, by_step_key: bool = True) -> _Program:
        """The program for this cache's shapes: the stored one its step key names (unchecked yet), else
        exported, and loaded from the store or compiled (``by_step_key=False``: exported in any case)."""
        self.model.prepare_layers(again=False)  # new layers choose their kernels outside the export
        names, weights = self._model_tensors()
        capacity = torch.export.Dim("capacity", min=2)
        buffers = [{2: capacity}] * len(cache._k)
        logn = {0: capacity} if tables.logn is not None else None
        shapes = ({}, {}, {1: capacity}, {1: capacity}, {1: capacity}, logn, buffers, buffers, [{}] * len(weights))
        n = EXAMPLE_CAPACITY
        with torch.inference_mode(False), torch.no_grad():  # example inputs: small normal tensors (written in place)
            kv = [torch.zeros(*b.shape[:2], n, b.shape[3], dtype=b.dtype) for b in cache._k]

            # (fresh contiguous copies: a slice's clone keeps its strides, which for a dimension of size 1 (the
            # batch) are the full table's and would give the same program another key in the store)
            def example(t: torch.Tensor) -> torch.Tensor:
                return t.clone(memory_format=torch.contiguous_format)

            args = (torch.zeros(tables.valid.shape[0], 1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                    example(tables.valid[:, :n]), example(tables.cos[:, :n]), example(tables.sin[:, :n]),
                    example(tables.logn[:n]) if tables.logn is not None else None,
                    kv, [k.clone() for k in kv], weights)  # fmt: skip
            step_key = program_store.step_key(self.model, args, NOT_IN_THE_STEP)
            layouts = [_layout(w) for w in weights]
            if by_step_key and step_key is not None and (found := program_store.load_known(step_key)) is not None:
                unchecked = None if found.checked else step_key
                return _Program(found.program.loader.boxed_run, names, weights, layouts, True, found.name, unchecked)
            exported = torch.export.export(_Step(self.model, names).eval(), args, dynamic_shapes=shapes)
        stored = program_store.load_or_compile(exported, known_as=step_key)
        return _Program(stored.program.loader.boxed_run, names, weights, layouts, stored.from_store, stored.name)
