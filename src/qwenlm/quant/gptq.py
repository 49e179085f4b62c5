"""Calibrated 4-bit weights: GPTQ (Frantar et al., 2022) on sample text, one decoder block at a time.

Rounding each weight to its nearest 4-bit code (``fit_int4_groups``) ignores what the layer's inputs look like.
GPTQ rounds the columns of a weight one after another and moves each column's rounding error onto the columns
not yet rounded, in proportion to how the inputs correlate (the Hessian ``H = X^T X`` of the layer's inputs on
calibration text), so the layer's *outputs* change as little as possible. Group scales and offsets are fitted
as in ``fit_int4_groups``, when a group's first column comes up (after earlier errors moved onto it).

Blocks go in order: block i is calibrated on the outputs of the already quantised blocks before it, which
holds only one block's Hessians at a time (a 7B model's down projection alone is 11,008² floats). The LM head
comes last, on the final norm of the quantised stack. Weights that are already 4-bit (``grids``, e.g. a GGUF's
Q4_K tensors) keep their codes.

Damping: GPTQ usually adds 1 % of the Hessian's mean diagonal. With a few thousand tokens of calibration text
that fits the sample too closely: on the demo model, calibrated on code and maths word problems, 1 % made
layer outputs on a LaTeX paper *worse* than plain rounding while 30 % still halved the error on held-out text
like the sample and helped a little on the paper (benchmarks/RESULTS.md). Calibrate on text like the model's
real input: the gain shrinks the further the text is from the sample.
"""

from __future__ import annotations

import contextlib
import gzip
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..progress import bar
from .linear import KERNEL_DTYPE, Int4Linear, fit_int4_groups

DAMPING = 0.3  # added to the Hessian's diagonal, as a fraction of its mean (see the note below)
BLOCK_COLUMNS = 128  # columns whose errors are applied to the rest of the matrix at once (lazy batch updates)


def read_texts(paths: Iterable[str | Path]) -> Iterator[str]:
    """The texts of calibration files: a ``.jsonl`` / ``.jsonl.gz`` file gives one text per line (its
    ``"text"`` field, else its string fields joined by newlines); any other file is one UTF-8 text."""
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {path} does not exist")
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}, line {number}: not JSON ({e}); one JSON object per line") from e
                    if isinstance(record, dict) and isinstance(record.get("text"), str):
                        yield record["text"]
                    elif isinstance(record, dict):
                        yield "\n".join(v for v in record.values() if isinstance(v, str))
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def calibration_batches(tokenizer: Any, texts: Iterable[str], tokens: int = 16_384, seq_len: int = 512,
                        batch: int = 4) -> list[torch.Tensor]:  # fmt: skip
    """``texts`` as (batch, seq_len) token batches: encoded (no special tokens), joined with the end-of-text
    token, cut into ``seq_len`` pieces, at most ``tokens`` in all."""
    if tokens < seq_len:
        raise ValueError(f"calibration needs at least one sequence of {seq_len} tokens, got tokens={tokens}")
    eot = getattr(tokenizer, "eod_id", None)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode_ordinary(text))
        if eot is not None:
            ids.append(eot)
        if len(ids) >= tokens:
            break
    n = min(len(ids), tokens) // seq_len
    if n == 0:
        raise ValueError(
            f"the calibration text has {len(ids)} tokens, fewer than one sequence of {seq_len}; give more text"
        )
    seqs = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    return list(seqs.split(batch))


def gptq_int4(w: torch.Tensor, hessian: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, ...]:
    """4-bit codes (n, k) uint8 and per-group scale, zero (n, k/g) for ``w`` (n, k), GPTQ against ``hessian``
    (k, k, summed ``x^T x`` of the inputs); same convention as ``fit_int4_groups``."""
    w = w.detach().float().clone()
    n, k = w.shape
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0  # inputs that never fire: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(DAMPING * torch.diag(h).mean())
    # the upper Cholesky factor of H^-1: row i holds how column i's error spreads over the columns after it
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    codes = torch.empty(n, k, dtype=torch.uint8)
    scales = torch.empty(n, k // group_size)
    zeros = torch.empty(n, k // group_size)
    step = max(BLOCK_COLUMNS // group_size, 1) * group_size  # whole groups per block
    for b0 in range(0, k, step):
        b1 = min(b0 + step, k)
        wb = w[:, b0:b1].clone()
        errors = torch.empty_like(wb)
        for i in range(b1 - b0):
            col = b0 + i
            if col % group_size == 0:
                _, s, z = fit_int4_groups(wb[:, i : i + group_size], group_size)
                scale = s[:, 0].to(KERNEL_DTYPE).float()  # the codes are chosen for the scales that are stored
                zero = z[:, 0].to(KERNEL_DTYPE).float()
                scales[:, col // group_size], zeros[:, col // group_size] = scale, zero
                offset = zero - 8 * scale
            q = torch.clamp(torch.round((wb[:, i] - offset) / scale), 0, 15)
            codes[:, col] = q.to(torch.uint8)
            err = (wb[:, i] - (q * scale + offset)) / hinv[col, col]
            wb[:, i:] -= err[:, None] * hinv[col, b0 + i : b1][None, :]
            errors[:, i] = err
        w[:, b1:] -= errors @ hinv[b0:b1, b1:]
    return codes, scales, zeros


class _Inputs:
    """Sums ``x^T x`` of the inputs a linear sees (a forward hook)."""

    def __init__(self, features: int) -> None:
        self.hessian = torch.zeros(features, features, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.hessian += (x.T @ x).double()  # each batch's product in fp32 (fast), the running sum in fp64

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.add(args[0])


def _fit(hessian: torch.Tensor, group_size: int) -> Any:
    """A ``Quantizer.swap`` fit: the linear as an ``Int4Linear`` rounded by GPTQ against ``hessian``."""

    def fit(linear: nn.Linear) -> Int4Linear:
        return Int4Linear.from_codes(*gptq_int4(linear.weight, hessian, group_size), linear.bias)

    return fit


class _Stop(Exception):
    pass


def _hessians(linears: dict[str, nn.Linear], run: Any) -> dict[str, torch.Tensor]:
    """The input Hessians of ``linears`` while ``run()`` runs."""
    sums = {name: _Inputs(lin.in_features) for name, lin in linears.items()}
    hooks = [lin.register_forward_hook(sums[name]) for name, lin in linears.items()]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return {name: s.hessian for name, s in sums.items()}


def _block_inputs(model: nn.Module, batches: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, tuple]]:
    """The first block's input and its other arguments (rotary tables, masks) for each batch."""
    captured: list[tuple[torch.Tensor, tuple]] = []

    def grab(module: nn.Module, args: tuple) -> None:
        captured.append((args[0], args[1:]))
        raise _Stop

    hook = model.transformer.h[0].register_forward_pre_hook(grab)
    try:
        for ids in batches:
            with contextlib.suppress(_Stop):
                model.transformer(ids.to(model.device))
    finally:
        hook.remove()
    return captured


def quantize_calibrated(model: nn.Module, batches: Sequence[torch.Tensor], group_size: int = 32,
                        grids: dict[str, Any] | None = None, progress_bar: bool = True,
                        prebuilt: dict[str, nn.Module] | None = None) -> nn.Module:  # fmt: skip
    """Quantise ``model`` in place to int4 with GPTQ on ``batches`` (token id tensors, e.g. from
    ``calibration_batches``) and return it. Load the model in fp32: the calibration runs at its precision.
    The embedding becomes int8 (``prebuilt`` as for ``Quantizer``) once the calibration no longer reads it."""
    from . import Quantizer

    if not batches:
        raise ValueError("quantize_calibrated needs at least one batch of calibration tokens")
    q = Quantizer(model, 4, group_size, grids, prebuilt=prebuilt)

    def swap(names: list[str], hessians: dict[str, torch.Tensor]) -> None:
        for name in names:  # a layer with a grid keeps its codes (no Hessian was collected for it)
            q.swap(name, _fit(hessians[name], group_size) if name in hessians else None)

    with torch.no_grad():
        states = _block_inputs(model, batches)
        blocks = model.transformer.h
        done = bar(len(blocks) + 1, "GPTQ", unit="layer", enabled=progress_bar)
        for i in range(len(blocks)):
            prefix = f"transformer.h.{i}."
            names = [name for name in q.pending if name.startswith(prefix)]
            linears = {name: q.linear(name) for name in names if not q.keeps_codes(name)}
            block = blocks[i]
            swap(names, _hessians(linears, lambda block=block, states=states: [block(x, *a) for x, a in states]))
            states = [(block(x, *args), args) for x, args in states]
            done.update()
        if "lm_head" in q.pending:
            head = _Inputs(model.config.hidden_size)
            for x, _ in states:
                head.add(model.transformer.ln_f(x))
            swap(["lm_head"], {"lm_head": head.hessian})
        if q.embedding_pending:
            q.swap_embedding()
        done.close()
    return model
