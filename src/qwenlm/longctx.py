"""Position policies for long context: dynamic NTK (which rotary base a call uses), LogN
attention scaling (how much queries beyond the training length are sharpened) and the per-layer
window schedule of window attention (how far back each layer looks).

All are objects chosen once from the config (or overridden at load time); the model asks them per
call and knows no flags.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch


def ntk_alpha(length: int, seq_length: int) -> float:
    """The reference's alpha: 1 up to S, then 3, 7, 15… for each doubling (2^ceil(log2(n/S)+1) - 1)."""
    if length <= 0:
        return 1.0
    return float(max(2 ** math.ceil(math.log(length / seq_length, 2) + 1) - 1, 1))


class PlainRoPE:
    """Rotary with its trained base at every length."""

    def alphas(self, length: int, attention_mask: torch.Tensor | None, training: bool) -> list[float]:
        return [1.0]

    def within(self, alphas: list[float], span: int) -> list[float]:
        return alphas

    def __repr__(self) -> str:
        return "PlainRoPE()"


class DynamicNTK:
    """Dynamic NTK interpolation as Qwen v1 does it.

    Per call without a cache: one alpha from the call length, or, when a mask is given and the call is
    longer than S, one alpha per row from that row's true length (its number of mask ones). Decoding
    reuses the prefill's alphas (the cache holds them), so they never change mid-generation.
    """

    def __init__(self, seq_length: int) -> None:
        self.seq_length = seq_length

    def alphas(self, length: int, attention_mask: torch.Tensor | None, training: bool) -> list[float]:
        if training:
            return [1.0]
        if attention_mask is not None and length > self.seq_length:
            return [ntk_alpha(int(n), self.seq_length) for n in attention_mask.sum(dim=-1).tolist()]
        return [ntk_alpha(length, self.seq_length)]

    def within(self, alphas: list[float], span: int) -> list[float]:
        """The alphas of a layer that sees at most ``span`` keys (window attention): each row's alpha is
        that of min(its length, span). alpha grows with length, so this is min(alpha, alpha(span))."""
        cap = ntk_alpha(span, self.seq_length)
        return [min(a, cap) for a in alphas]

    def __repr__(self) -> str:
        return f"DynamicNTK(seq_length={self.seq_length})"


class NoLogN:
    def factors(self, start: int, end: int, training: bool) -> torch.Tensor | None:
        return None

    def __repr__(self) -> str:
        return "NoLogN()"


class LogNScaling:
    """Scale the query at position p by log(p+1)/log(S) once p+1 > S (eval mode only, and only when
    the key length exceeds S). Factors are computed in double precision, stored as fp32."""

    def __init__(self, seq_length: int) -> None:
        self.seq_length = seq_length
        self._table = torch.ones(0)

    def factors(self, start: int, end: int, training: bool) -> torch.Tensor | None:
        """Factors for query positions ``start..end-1`` (end = key length), or None when unscaled."""
        if training or end <= self.seq_length:
            return None
        if self._table.numel() < end:
            n = max(2 * end, 1024)
            s = self.seq_length
            self._table = torch.tensor([math.log(i, s) if i > s else 1.0 for i in range(1, n + 1)], dtype=torch.float32)
        return self._table[start:end]

    def __repr__(self) -> str:
        return f"LogNScaling(seq_length={self.seq_length})"


def position_policies(
    seq_length: int, use_dynamic_ntk: bool, use_logn_attn: bool
) -> tuple[PlainRoPE | DynamicNTK, NoLogN | LogNScaling]:
    ntk = DynamicNTK(seq_length) if use_dynamic_ntk else PlainRoPE()
    logn = LogNScaling(seq_length) if use_logn_attn else NoLogN()
    return ntk, logn


# -- window attention (experimental) ------------------------------------------------------------

_ENTRY = re.compile(r"^(full|\d+k?)(?:x(\d+))?$")


@dataclass(frozen=True)
class WindowSchedule:
    """Per-layer causal sliding windows for window attention. EXPERIMENTAL.

    The Qwen technical report (§2.3.2) restricts each layer's attention to a window, shorter in lower
    layers, longer in higher ones, combined with dynamic NTK; no public code implements it, so this is
    our reconstruction. In layer ``l`` the query at position p sees the keys at positions
    p - W_l < j <= p (itself included; positions count left padding, like rotary), and that layer's NTK
    alpha is the one for min(length, W_l) keys (``DynamicNTK.within``); LogN keeps the absolute position.
    ``None`` means full causal attention. A window at least as long as the sequence changes nothing.

    ``default(n_layers, S)``: S/4 for layers 0-3, doubling every 4 layers (S/4, S/2, S, 2S, 4S, …), after
    the Qwen team's example "the first 4 layers 2048, the next 4 layers 4096, then 8192 and so on" for
    Qwen-7B (S = 8192); layers whose window exceeds S use NTK scaled to their window.
    """

    windows: tuple[int | None, ...]

    def __post_init__(self) -> None:
        for i, w in enumerate(self.windows):
            if w is not None and (not isinstance(w, int) or w < 1):
                raise ValueError(f"window of layer {i} is {w!r}; expected a positive number of tokens or None (full)")

    def __len__(self) -> int:
        return len(self.windows)

    def window(self, layer: int) -> int | None:
        return self.windows[layer]

    @classmethod
    def default(cls, n_layers: int, seq_length: int) -> WindowSchedule:
        base = max(seq_length // 4, 1)
        return cls(tuple(base * 2 ** (i // 4) for i in range(n_layers)))

    @classmethod
    def parse(cls, spec: str, n_layers: int, seq_length: int) -> WindowSchedule:
        """Read a schedule: ``default``, ``none``, or comma-separated ``W`` / ``WxN`` entries (window W for
        N layers, bottom layer first; ``k`` = 1024, ``full`` = no window). An entry without a count is one
        layer, except the last, which fills the remaining layers. Example: ``2kx4,4kx4,8k`` for Qwen-7B's
        32 layers (2048 in layers 0-3, 4096 in 4-7, 8192 in 8-31)."""
        text = spec.strip().lower().replace(" ", "")
        if text == "default":
            return cls.default(n_layers, seq_length)
        if text in ("none", "off", "full"):
            return cls((None,) * n_layers)
        entries = text.split(",")
        windows: list[int | None] = []
        for i, entry in enumerate(entries):
            m = _ENTRY.match(entry)
            if m is None:
                raise ValueError(
                    f"window schedule {spec!r}: entry {entry!r} is not W or WxN (W tokens, like 2048 or 2k, or "
                    f"'full'; N layers); example: 2kx4,4kx4,8k"
                )
            size, count = m.groups()
            w = None if size == "full" else int(size[:-1]) * 1024 if size.endswith("k") else int(size)
            if w == 0:
                raise ValueError(f"window schedule {spec!r}: a window of 0 tokens; use a positive size or 'full'")
            if count is not None:
                windows += [w] * int(count)
            elif i == len(entries) - 1:
                windows += [w] * max(n_layers - len(windows), 1)
            else:
                windows.append(w)
        if len(windows) != n_layers:
            raise ValueError(
                f"window schedule {spec!r} covers {len(windows)} layers but the model has {n_layers}; adjust the "
                f"counts or end with an entry without a count to fill the rest"
            )
        return cls(tuple(windows))

    def describe(self) -> str:
        """The schedule in ``parse`` syntax, runs of equal windows grouped (``2048x4,4096x4,...``)."""
        parts: list[str] = []
        i = 0
        while i < len(self.windows):
            j = i
            while j < len(self.windows) and self.windows[j] == self.windows[i]:
                j += 1
            w = self.windows[i]
            parts.append(f"{'full' if w is None else w}x{j - i}")
            i = j
        return ",".join(parts)

    def __repr__(self) -> str:
        return f"WindowSchedule({self.describe()})"


def window_schedule(spec: str | WindowSchedule | None, n_layers: int, seq_length: int) -> WindowSchedule | None:
    """A schedule from a spec string, a schedule or None; a schedule with no window at all is None."""
    if spec is None:
        return None
    schedule = spec if isinstance(spec, WindowSchedule) else WindowSchedule.parse(spec, n_layers, seq_length)
    if len(schedule) != n_layers:
        raise ValueError(f"the window schedule has {len(schedule)} layers but the model has {n_layers}")
    return None if all(w is None for w in schedule.windows) else schedule
