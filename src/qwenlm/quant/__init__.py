"""Quantisation as a rewrite of a built model: every ``nn.Linear`` of the decoder blocks and the LM head
is swapped for a quantised linear, and the input embedding for an int8 table (``Int8Embedding``; not when the
LM head shares it). The model code does not know; norms keep their weights, and their float32 rows on the CPU
go through qwenlm's kernel (``RMSNorm.own_kernel``; the quantised layers load those kernels anyway)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .embedding import Int8Embedding
from .linear import Int4Linear, Int5Linear, Int8Linear

__all__ = [
    "EMBEDDING",
    "GGUF",
    "Int4Linear",
    "Int5Linear",
    "Int8Embedding",
    "Int8Linear",
    "Quantizer",
    "gguf_embedding",
    "gguf_grids",
    "quantize",
    "quantized_structure",
]

GGUF = "gguf"  # load_model(quantize=GGUF): each linear layer about as precise as its GGUF tensor (Quantizer, others=8)
EMBEDDING = "transformer.wte"  # the input embedding, quantised with the linears unless the LM head is tied to it


def _targets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear, str]]:
    found = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and (parent_name.startswith("transformer.h") or name == "lm_head"):
                found.append((parent, name, child, f"{parent_name}.{name}" if parent_name else name))
    return found


def _check(bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits}")


class Quantizer:
    """Swaps a model's linears (decoder blocks and an untied LM head) for quantised ones, one at a time.

    ``grids`` (int4 with groups of 32): weights that already are 4-bit, by layer name, taken over without a
    second rounding, e.g. ``gguf.read_gguf_int4(path)`` of the GGUF the model is loaded from. 5-bit grids
    (GGUF Q5_0, Q5_1) become ``Int5Linear`` layers, listed in ``model.quantization["five_bit"]``: rounding
    them to 4 bits would lose a bit that the checkpoint has (+1.5 % perplexity for each MLP projection of the
    demo model, benchmarks/RESULTS.md).

    ``others=8`` (int4 only): the layers without a grid become ``Int8Linear`` (per channel) instead of being
    rounded to 4 bits, listed in ``model.quantization["eight_bit"]``: with a GGUF's grids, each layer keeps
    about the bits its file gives it (its 6- and 8-bit tensors: Q6_K, Q8_0), ``load_model(quantize="gguf")``.

    The input embedding becomes an ``Int8Embedding`` (its rows rounded to int8), recorded as
    ``model.quantization["embedding"]``; a tied model keeps its float embedding, which is also its LM head.

    ``prebuilt``: layers already in their quantised form, by name, taken over as they are when their tensors
    come in, e.g. ``gguf.read_gguf_prebuilt(path)``: a GGUF's embedding as its own codes and its LM head
    rounded (int8 or int4) a block of rows at a time, so neither exists whole in float32.
    """

    def __init__(self, model: nn.Module, bits: int, group_size: int = 32, grids: dict[str, Any] | None = None,
                 others: int | None = None, prebuilt: dict[str, nn.Module] | None = None):  # fmt: skip
        _check(bits)
        if others not in (None, bits) and not (bits == 4 and others == 8):
            raise ValueError(f"others (the bits of layers without a 4-bit grid) must be 8 with bits 4, got {others}")
        self.bits, self.group_size = bits, group_size
        self.others = others or bits
        # its own dict of them: each grid is dropped as its layer takes the codes over (250 MB for the demo)
        self.grids = dict(grids) if grids and bits == 4 and group_size == 32 else None
        tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
        # the tied head shares the embedding matrix; quantising it would untie them
        self.pending = {full: (parent, name) for parent, name, _, full in _targets(model)
                        if not (tied and name == "lm_head")}  # fmt: skip
        self.model, self.prebuilt = model, dict(prebuilt or {})
        self.embedding_pending = not tied and isinstance(model.get_submodule(EMBEDDING), nn.Embedding)
        model.quantization = {"bits": bits, "group_size": group_size if bits == 4 else None}
        for module in model.modules():
            if hasattr(module, "own_kernel"):  # model.RMSNorm (which imports this package)
                module.own_kernel = True
        self.quantization = model.quantization

    def loaded(self, tensor_name: str) -> None:
        """Called as each tensor is loaded: quantise its layer once the weight (and bias) are all in."""
        layer = tensor_name.rpartition(".")[0]
        if layer == EMBEDDING and self.embedding_pending:
            self.swap_embedding()
        elif layer in self.pending and not any(p.is_meta for p in self.linear(layer).parameters()):
            self.swap(layer)

    def swap_embedding(self) -> None:
        """Replace the float embedding with its prebuilt int8 table, else its rows rounded to int8."""
        table = self.model.get_submodule(EMBEDDING).weight
        q = self.prebuilt.pop(EMBEDDING, None)
        q = Int8Embedding.from_weight(table) if q is None else q
        if (q.num_embeddings, q.embedding_dim) != tuple(table.shape):
            raise ValueError(f"{EMBEDDING}: int8 table of shape {(q.num_embeddings, q.embedding_dim)} does not fit "
                             f"the embedding {tuple(table.shape)}")  # fmt: skip
        parent, _, name = EMBEDDING.rpartition(".")
        setattr(self.model.get_submodule(parent), name, q.returning(table.dtype))
        self.quantization["embedding"] = {"group_size": q.group_size, "affine": q.affine}
        self.embedding_pending = False

    def keeps_codes(self, layer: str) -> bool:
        """Whether ``layer`` takes over 4-bit codes from ``grids`` rather than being rounded here."""
        return bool(self.grids) and layer in self.grids

    def swap(self, layer: str, fit: Callable[[nn.Linear], nn.Module] | None = None) -> None:
        """Replace ``layer`` with its quantised form: its grid's codes, else ``fit(linear)`` when given (e.g.
        calibrated rounding, ``gptq``), else each weight rounded on its own."""
        linear = self.linear(layer)
        grid = self.grids.pop(layer, None) if self.grids else None
        if layer in self.prebuilt:
            q = self.prebuilt.pop(layer)
        elif grid is not None:
            if tuple(grid.shape) != tuple(linear.weight.shape):
                raise ValueError(f"{layer}: 4-bit grid of shape {tuple(grid.shape)} does not fit "
                                 f"the layer's weight {tuple(linear.weight.shape)}")  # fmt: skip
            q = Int4Linear.from_grid(grid, linear.bias)
            if isinstance(q, Int5Linear):
                self.quantization["five_bit"] = sorted([*self.quantization.get("five_bit", []), layer])
        elif fit is not None:
            q = fit(linear)
        elif self.others == 8:
            q = Int8Linear.from_linear(linear)
        else:
            q = Int4Linear.from_linear(linear, self.group_size)
        if self.bits == 4 and isinstance(q, Int8Linear):
            self.quantization["eight_bit"] = sorted([*self.quantization.get("eight_bit", []), layer])
        parent, name = self.pending.pop(layer)
        setattr(parent, name, q)

    def linear(self, layer: str) -> nn.Linear:
        """The not yet quantised linear ``layer``."""
        parent, name = self.pending[layer]
        return getattr(parent, name)


def quantize(model: nn.Module, bits: int = 8, group_size: int = 32, grids: dict[str, Any] | None = None,
             others: int | None = None, prebuilt: dict[str, nn.Module] | None = None) -> nn.Module:  # fmt: skip
    """Quantise ``model`` in place (weight-only int8 per channel, or int4 in groups) and return it; ``grids``,
    ``others`` and ``prebuilt`` as for ``Quantizer``. To quantise while loading (never holding the
    full-precision model), use ``load_model(path, quantize=bits)``."""
    q = Quantizer(model, bits, group_size, grids, others, prebuilt)
    for layer in list(q.pending):
        q.swap(layer)
    if q.embedding_pending:
        q.swap_embedding()
    return model


def gguf_grids(path: str | Path, bits: int, group_size: int = 32) -> dict[str, Any] | None:
    """The 4-bit tensors of ``path`` when it is a GGUF file and the target is int4 in groups of 32 (what
    ``quantize(..., grids=)`` takes over as they are); None otherwise."""
    path = Path(path)
    if bits != 4 or group_size != 32 or not (path.is_file() and path.suffix == ".gguf"):
        return None
    from ..gguf import read_gguf_int4

    return read_gguf_int4(path)


def gguf_embedding(path: str | Path | None) -> dict[str, nn.Module]:
    """``{"transformer.wte": Int8Embedding}`` of a GGUF file's own embedding codes (``gguf.read_gguf_prebuilt``)
    when ``path`` is a GGUF file with a block-quantised embedding, for ``quantize(..., prebuilt=)``; else {}."""
    if path is None or not (Path(path).is_file() and Path(path).suffix == ".gguf"):
        return {}
    from ..gguf import read_gguf_prebuilt

    return read_gguf_prebuilt(path)[0]


def quantized_structure(model: nn.Module, bits: int, group_size: int = 32, five_bit: list[str] = (),
                        eight_bit: list[str] = (), embedding: dict[str, Any] | None = None,
                        dtype: torch.dtype = torch.float32) -> nn.Module:  # fmt: skip
    """Swap in empty quantised linears (same device as the model, e.g. meta) to load saved weights into;
    ``five_bit`` / ``eight_bit``: the layers of an int4 model saved as ``Int5Linear`` / ``Int8Linear``;
    ``embedding``: the saved ``Int8Embedding``'s ``group_size`` and ``affine`` (None: a float embedding),
    its lookups returning ``dtype``."""
    q = Quantizer(model, bits, group_size)
    if embedding is not None and q.embedding_pending:  # (a tied model's embedding stays float)
        table = model.get_submodule(EMBEDDING).weight
        empty = Int8Embedding(*table.shape, embedding["group_size"], embedding["affine"], device=table.device)
        q.prebuilt[EMBEDDING] = empty
        q.swap_embedding()
        empty.returning(dtype)
    for key, layers in (("five_bit", five_bit), ("eight_bit", eight_bit)):
        unknown = sorted(set(layers) - set(q.pending))
        if unknown:
            raise ValueError(f"quantization.{key} names layers the model does not have: {', '.join(unknown[:5])}")
        if layers:
            q.quantization[key] = sorted(layers)
    if set(five_bit) & set(eight_bit):
        raise ValueError(f"quantization: {sorted(set(five_bit) & set(eight_bit))[0]} is in both five_bit and eight_bit")
    for layer in list(q.pending):
        parent, name = q.pending.pop(layer)
        linear = getattr(parent, name)
        bias, device = linear.bias is not None, linear.weight.device
        if bits == 8 or layer in eight_bit:
            empty = Int8Linear(linear.in_features, linear.out_features, bias, device=device)
        else:
            cls = Int5Linear if layer in five_bit else Int4Linear
            empty = cls(linear.in_features, linear.out_features, bias, group_size, device=device)
        setattr(parent, name, empty)
    return model
