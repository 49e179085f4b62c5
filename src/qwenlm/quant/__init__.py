"""Quantisation as a rewrite of a built model: every ``nn.Linear`` of the decoder blocks and the LM head
is swapped for a quantised linear. The model code does not know; embeddings and norms stay as they are."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from .linear import Int4Linear, Int5Linear, Int8Linear

__all__ = [
    "GGUF",
    "Int4Linear",
    "Int5Linear",
    "Int8Linear",
    "Quantizer",
    "gguf_grids",
    "quantize",
    "quantized_structure",
]

GGUF = "gguf"  # load_model(quantize=GGUF): each linear layer about as precise as its GGUF tensor (Quantizer, others=8)


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
    """

    def __init__(self, model: nn.Module, bits: int, group_size: int = 32, grids: dict[str, Any] | None = None,
                 others: int | None = None):  # fmt: skip
        _check(bits)
        if others not in (None, bits) and not (bits == 4 and others == 8):
            raise ValueError(f"others (the bits of layers without a 4-bit grid) must be 8 with bits 4, got {others}")
        self.bits, self.group_size = bits, group_size
        self.others = others or bits
        self.grids = grids if bits == 4 and group_size == 32 else None
        tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
        # the tied head shares the embedding matrix; quantising it would untie them
        self.pending = {full: (parent, name) for parent, name, _, full in _targets(model)
                        if not (tied and name == "lm_head")}  # fmt: skip
        model.quantization = {"bits": bits, "group_size": group_size if bits == 4 else None}
        self.quantization = model.quantization

    def loaded(self, tensor_name: str) -> None:
        """Called as each tensor is loaded: quantise its layer once the weight (and bias) are all in."""
        layer = tensor_name.rpartition(".")[0]
        if layer in self.pending and not any(p.is_meta for p in self.linear(layer).parameters()):
            self.swap(layer)

    def keeps_codes(self, layer: str) -> bool:
        """Whether ``layer`` takes over 4-bit codes from ``grids`` rather than being rounded here."""
        return bool(self.grids) and layer in self.grids

    def swap(self, layer: str, fit: Callable[[nn.Linear], nn.Module] | None = None) -> None:
        """Replace ``layer`` with its quantised form: its grid's codes, else ``fit(linear)`` when given (e.g.
        calibrated rounding, ``gptq``), else each weight rounded on its own."""
        linear = self.linear(layer)
        grid = self.grids.get(layer) if self.grids else None
        if grid is not None:
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
            if self.bits == 4:
                self.quantization["eight_bit"] = sorted([*self.quantization.get("eight_bit", []), layer])
        else:
            q = Int4Linear.from_linear(linear, self.group_size)
        parent, name = self.pending.pop(layer)
        setattr(parent, name, q)

    def linear(self, layer: str) -> nn.Linear:
        """The not yet quantised linear ``layer``."""
        parent, name = self.pending[layer]
        return getattr(parent, name)


def quantize(model: nn.Module, bits: int = 8, group_size: int = 32, grids: dict[str, Any] | None = None,
             others: int | None = None) -> nn.Module:  # fmt: skip
    """Quantise ``model`` in place (weight-only int8 per channel, or int4 in groups) and return it; ``grids``
    and ``others`` as for ``Quantizer``. To quantise while loading (never holding the full-precision model),
    use ``load_model(path, quantize=bits)``."""
    q = Quantizer(model, bits, group_size, grids, others)
    for layer in list(q.pending):
        q.swap(layer)
    return model


def gguf_grids(path: str | Path, bits: int, group_size: int = 32) -> dict[str, Any] | None:
    """The 4-bit tensors of ``path`` when it is a GGUF file and the target is int4 in groups of 32 (what
    ``quantize(..., grids=)`` takes over as they are); None otherwise."""
    path = Path(path)
    if bits != 4 or group_size != 32 or not (path.is_file() and path.suffix == ".gguf"):
        return None
    from ..gguf import read_gguf_int4

    return read_gguf_int4(path)


def quantized_structure(model: nn.Module, bits: int, group_size: int = 32, five_bit: list[str] = (),
                        eight_bit: list[str] = ()) -> nn.Module:  # fmt: skip
    """Swap in empty quantised linears (same device as the model, e.g. meta) to load saved weights into;
    ``five_bit`` / ``eight_bit``: the layers of an int4 model saved as ``Int5Linear`` / ``Int8Linear``."""
    q = Quantizer(model, bits, group_size)
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
