"""``torch.compile`` of the one-token decoding step on CPU, where what runs around the kernels counts.

(The step compiled ahead of time, ``generation.exported``, goes further: no dynamo at all per token. This
one serves where that one does not apply or cannot be built, and with ``compile_inference(ahead_of_time=False)``.)

A step of the demo model in int4 reads ~340 MB in ~20 ms; around its 145 kernel calls, the compiled step
spent ~2 ms in dynamo's guards (4,819 of them, most on the bookkeeping of the 245 modules: empty hook
dicts, attributes not shadowed, the weights' tensor metadata) and ~1.3 ms in the Python wrapper that
inductor writes around its kernels. So the step is compiled

- with inductor's C++ wrapper (``cpp_wrapper``): the kernel calls go from C++, not Python;
- without the guards on the modules' hooks, instance dicts and weight tensors (``skip_module_bookkeeping``).
  The guards on the modules' types and settings, the cache, the inputs and global state stay.
- with the kernel layouts of quantised layers (buffers that are not saved) marked static
  (``mark_layouts_static``), like the weights themselves; the KV cache's buffers are not marked dynamic
  either (``dynamic=True`` makes their capacity dynamic already, one size symbol for all layers' buffers).

Dropping guards is sound only if nothing they checked changes behind the compiled step's back:

- each model compiles a code object of its own (``compile_method``): dynamo keeps its compiled entries per
  code object, so another model's weights never meet this model's entries (and many models in one process
  do not run into dynamo's limit of entries per code object);
- a cast or move of the whole model still recompiles: the KV cache, whose tensors keep their guards,
  follows the model's dtype and device;
- hooks registered, or methods replaced on modules, after ``compile_inference`` are not seen by the compiled
  step (call ``compile_inference()`` again).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

# guards that dynamo puts on each module it traces through and that the model code never changes
_BOOKKEEPING = frozenset({"EMPTY_NN_MODULE_HOOKS_DICT", "NOT_PRESENT_IN_GENERIC_DICT", "TENSOR_MATCH"})


def skip_module_bookkeeping(entries: Sequence[Any]) -> list[bool]:
    """``guard_filter_fn`` for ``torch.compile``: keep every guard except the hook-dict, instance-dict and
    tensor-metadata guards whose value is reached through a module (its weights, buffers, hooks)."""
    return [not (e.guard_type in _BOOKKEEPING and e.orig_guard.source.is_unspecialized_nn_module()) for e in entries]


def compile_method(method: Callable[..., Any], **options: Any) -> Callable[..., Any]:
    """``torch.compile(method, dynamic=True, options=...)`` for a bound method, on a copy of its code object so
    that the compiled entries belong to this one object (dynamo caches them on the code object, which all
    instances of a class share)."""
    func = method.__func__
    code = func.__code__.replace()  # an equal but distinct code object
    fresh = types.FunctionType(code, func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    fresh.__qualname__, fresh.__doc__ = func.__qualname__, func.__doc__
    return torch.compile(types.MethodType(fresh, method.__self__), dynamic=True, options=options)


def mark_layouts_static(model: torch.nn.Module) -> None:
    """Mark static the buffers of layers with a ``prepare`` method (the kernel layouts of quantised linears):
    their shapes never change, and with ``dynamic=True`` each would otherwise bring size symbols into the step,
    to be read and checked on every call."""
    for module in model.modules():
        if callable(getattr(module, "prepare", None)):
            for buffer in module.buffers(recurse=False):
                torch._dynamo.mark_static(buffer)


def compile_decode_step(method: Callable[..., Any]) -> Callable[..., Any]:
    """The CPU decoding step ``method`` (bound to its model, whose layers are prepared) compiled as this module
    describes."""
    mark_layouts_static(method.__self__)
    return compile_method(method, cpp_wrapper=True, guard_filter_fn=skip_module_bookkeeping)
