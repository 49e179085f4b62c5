"""Quantisation as a rewrite of a built model: every ``nn.Linear`` of the decoder blocks and the LM head
is swapped for a quantised linear. The model code does not know; embeddings and norms stay as they are."""

from __future__ import annotations

from torch import nn

from .linear import Int4Linear, Int8Linear

__all__ = ["Int4Linear", "Int8Linear", "quantize", "quantized_structure"]


def _targets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    found = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and (parent_name.startswith("transformer.h") or name == "lm_head"):
                found.append((parent, name, child))
    return found


def _check(bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits}")


def quantize(model: nn.Module, bits: int = 8, group_size: int = 32) -> nn.Module:
    """Quantise ``model`` in place (weight-only int8 per channel, or int4 in groups) and return it."""
    _check(bits)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for parent, name, linear in _targets(model):
        if tied and name == "lm_head":
            continue  # the tied head shares the embedding matrix; quantising it would untie them
        q = Int8Linear.from_linear(linear) if bits == 8 else Int4Linear.from_linear(linear, group_size)
        setattr(parent, name, q)
    model.quantization = {"bits": bits, "group_size": group_size if bits == 4 else None}
    return model


def quantized_structure(model: nn.Module, bits: int, group_size: int = 32) -> nn.Module:
    """Swap in empty quantised linears (same device as the model, e.g. meta) to load saved weights into."""
    _check(bits)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for parent, name, linear in _targets(model):
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
