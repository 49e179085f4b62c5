"""Quantisation as a rewrite of a built model: every ``nn.Linear`` of the decoder blocks and the LM head
is swapped for a quantised linear. The model code does not know; embeddings and norms stay as they are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .linear import Int4Linear, Int8Linear

__all__ = ["Int4Linear", "Int8Linear", "gguf_grids", "quantize", "quantized_structure"]


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


def quantize(model: nn.Module, bits: int = 8, group_size: int = 32, grids: dict[str, Any] | None = None) -> nn.Module:
    """Quantise ``model`` in place (weight-only int8 per channel, or int4 in groups) and return it.

    ``grids`` (int4 with groups of 32): weights that already are 4-bit, by layer name, taken over without a
    second rounding, e.g. ``gguf.read_gguf_int4(path)`` of the GGUF the model was loaded from."""
    _check(bits)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    grids = grids if bits == 4 and group_size == 32 else None
    for parent, name, linear, full_name in _targets(model):
        if tied and name == "lm_head":
            continue  # the tied head shares the embedding matrix; quantising it would untie them
        if grids and full_name in grids:
            grid = grids[full_name]
            if tuple(grid.codes.shape) != tuple(linear.weight.shape):
                raise ValueError(f"{full_name}: 4-bit grid of shape {tuple(grid.codes.shape)} does not fit "
                                 f"the layer's weight {tuple(linear.weight.shape)}")  # fmt: skip
            q = Int4Linear.from_grid(grid, linear.bias)
        elif bits == 8:
            q = Int8Linear.from_linear(linear)
        else:
            q = Int4Linear.from_linear(linear, group_size)
        setattr(parent, name, q)
    model.quantization = {"bits": bits, "group_size": group_size if bits == 4 else None}
    return model


def gguf_grids(path: str | Path, bits: int, group_size: int = 32) -> dict[str, Any] | None:
    """The 4-bit tensors of ``path`` when it is a GGUF file and the target is int4 in groups of 32 (what
    ``quantize(..., grids=)`` takes over as they are); None otherwise."""
    path = Path(path)
    if bits != 4 or group_size != 32 or not (path.is_file() and path.suffix == ".gguf"):
        return None
    from ..gguf import read_gguf_int4

    return read_gguf_int4(path)


def quantized_structure(model: nn.Module, bits: int, group_size: int = 32) -> nn.Module:
    """Swap in empty quantised linears (same device as the model, e.g. meta) to load saved weights into."""
    _check(bits)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for parent, name, linear, _ in _targets(model):
        if tied and name == "lm_head":
            continue
        bias = linear.bias is not None
        device = linear.weight.device
        if bits == 8:
            q = Int8Linear(linear.in_features, linear.out_features, bias, device=device)
        else:
            q = Int4Linear(linear.in_features, linear.out_features, bias, group_size, device=device)
        setattr(parent, name, q)
    model.quantization = {"bits": bits, "group_size": group_size if bits == 4 else None}
    return model
