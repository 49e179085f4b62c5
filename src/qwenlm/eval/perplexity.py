"""Perplexity by context length: the long-context table of the Qwen model card.

Documents are tokenised (no special tokens inside a document) and turned into fixed-length samples:

* ``concat`` (the card's way, Qwen issue #206): documents joined with ``<|endoftext|>`` in the order given,
  cut into consecutive non-overlapping L-token samples; every length gets the same token budget
  (``samples`` x the longest length), so the lengths read the same text;
* ``document``: the first L tokens of each document that has at least L tokens (at most ``samples``
  x longest / L of them).

Each sample is scored alone (no KV carry-over), through chunked prefill so that 32K tokens fit in memory:
PPL = exp(total NLL / predicted tokens), where tokens 2..L are predicted from their prefix. Settings
(plain RoPE, dynamic NTK, LogN, window attention) are switched on the loaded model; a (setting, length)
pair that computes exactly what another already did (NTK alpha 1 and LogN off below the training length,
windows at least as long as the sample) is not run again but reported with ``same_as``.
"""

from __future__ import annotations

import gzip
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import progress
from ..checkpoint import describe
from ..generation.prefill import DEFAULT_CHUNK, prefill_chunks
from ..longctx import ntk_alpha, window_schedule

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
SAMPLING_MODES = ("concat", "document")
LOSS_BLOCK = 256  # positions per lm_head + cross-entropy call: a (256, vocab) fp32 block at a time
_FLAGS = {"plain": (), "ntk": ("ntk",), "logn": ("logn",), "window": ("window",)}


# -- settings -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One row of the table: which long-context policies are on."""

    ntk: bool
    logn: bool
    window: str | None = None  # window schedule spec ("default", "2kx4,4kx4,8k"…), None = full attention

    @property
    def label(self) -> str:
        parts = [name for name, on in (("dynamic_ntk", self.ntk), ("logn", self.logn), ("window_attn", self.window))
                 if on]  # fmt: skip
        return "+" + "+".join(parts) if parts else "plain"

    @classmethod
    def parse(cls, text: str, window: str | None = None) -> Setting:
        """``plain`` or ``+``-joined flags among ``ntk``, ``logn``, ``window`` (e.g. ``ntk+logn+window``);
        ``window`` uses the schedule ``window`` (default: ``"default"``)."""
        flags = set()
        for part in text.strip().lower().split("+"):
            if part not in _FLAGS:
                raise ValueError(
                    f"setting {text!r}: unknown part {part!r}; use plain or +-joined ntk, logn, window "
                    f"(e.g. ntk+logn+window)"
                )
            flags.update(_FLAGS[part])
        return cls("ntk" in flags, "logn" in flags, (window or "default") if "window" in flags else None)


def parse_settings(text: str, window: str | None = None) -> list[Setting]:
    """Comma-separated settings, e.g. ``plain,ntk,ntk+logn,ntk+logn+window``."""
    settings = [Setting.parse(s, window) for s in text.split(",") if s.strip()]
    if not settings:
        raise ValueError(f"no setting in {text!r}; example: plain,ntk,ntk+logn,ntk+logn+window")
    return settings


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lengths {text!r} must be comma-separated token counts, e.g. 1024,2048,4096") from None
    if not lengths or min(lengths) < 2:
        raise ValueError(f"--lengths {text!r}: every length must be at least 2 tokens")
    return sorted(set(lengths))


# -- data -----------------------------------------------------------------------------------------


def read_documents(paths: Iterable[str | Path]) -> list[str]:
    """Texts from ``.jsonl`` / ``.jsonl.gz`` files (one document per record, its ``text`` field) or plain
    text files (``.gz`` allowed; one document per file), in the order given."""
    docs: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            if path.name.endswith((".jsonl", ".jsonl.gz")):
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise ValueError(f"{path} line {n}: expected a JSON object with a string 'text' field")
                    docs.append(record["text"])
            else:
                docs.append(f.read())
    if not docs:
        raise ValueError("the data files hold no document")
    return docs


def make_samples(
    token_docs: Sequence[Sequence[int]], length: int, budget: int, mode: str = "concat", eod_id: int | None = None
) -> torch.Tensor:
    """(n, length) samples of at most ``budget`` tokens in all (see the module docstring)."""
    if mode == "concat":
        stream: list[int] = []
        for i, doc in enumerate(token_docs):
            if i and eod_id is not None:
                stream.append(eod_id)
            stream.extend(doc)
            if len(stream) >= budget:
                break
        n = min(budget, len(stream)) // length
        if n == 0:
            raise ValueError(f"the data has {len(stream)} tokens, fewer than one sample of {length}; add documents")
        return torch.tensor(stream[: n * length], dtype=torch.long).view(n, length)
    if mode == "document":
        rows = [list(doc[:length]) for doc in token_docs if len(doc) >= length][: max(budget // length, 1)]
        if not rows:
            longest = max((len(d) for d in token_docs), default=0)
            raise ValueError(f"no document has {length} tokens (the longest has {longest}); use --sampling concat")
        return torch.tensor(rows, dtype=torch.long)
    raise ValueError(f"sampling mode {mode!r} is unknown; use one of {', '.join(SAMPLING_MODES)}")


def tokenize_documents(tokenizer: Any, docs: Sequence[str], limit: int | None = None) -> list[list[int]]:
    """Token ids of each document (special-token strings stay text); stops once ``limit`` tokens are read."""
    out, total = [], 0
    for doc in docs:
        out.append(tokenizer.encode_ordinary(doc))
        total += len(out[-1]) + 1
        if limit is not None and total >= limit:
            break
    return out


# -- scoring ----------------------------------------------------------------------------------------


@torch.inference_mode()
def sample_nll(
    model: Any, ids: torch.Tensor, chunk_size: int = DEFAULT_CHUNK, on_chunk: Any = None
) -> tuple[float, int]:
    """Total next-token NLL of the rows of ``ids`` (B, L) and the number of predicted tokens, B x (L - 1).

    Chunked prefill with a cache sized to L; logits are made ``LOSS_BLOCK`` positions at a time, so the
    (L, vocab) logits matrix never exists. ``on_chunk(n)`` is called with each chunk's token count."""
    ids = ids.to(model.device)
    b, length = ids.shape
    cache = model.new_cache(capacity=length)
    total = 0.0
    for start, h in prefill_chunks(model, ids, cache, chunk_size):
        c = h.shape[1]
        targets = ids[:, start + 1 : start + c + 1]  # position p predicts token p + 1
        h = h[:, : targets.shape[1]]  # the last position predicts nothing
        for s in range(0, targets.shape[1], LOSS_BLOCK):
            logits = model.lm_head(h[:, s : s + LOSS_BLOCK]).float()
            tgt = targets[:, s : s + LOSS_BLOCK]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum").item()
        if on_chunk is not None:
            on_chunk(b * c)
    return total, b * (length - 1)


def perplexity(model: Any, samples: torch.Tensor, chunk_size: int = DEFAULT_CHUNK, on_chunk: Any = None) -> float:
    """exp(mean NLL) over every predicted token of ``samples`` (n, L), one sample at a time."""
    nll, count = 0.0, 0
    for row in samples:
        n, c = sample_nll(model, row[None], chunk_size, on_chunk)
        nll, count = nll + n, count + c
    return math.exp(nll / count)


# -- the table ----------------------------------------------------------------------------------------


@dataclass
class Result:
    setting: str
    length: int
    ppl: float
    nll: float
    predicted_tokens: int
    samples: int
    seconds: float
    same_as: str | None = None  # the setting whose identical computation this reuses


@dataclass
class Report:
    model: str
    lengths: list[int]
    settings: list[dict[str, Any]]
    sampling: str
    data: list[str]
    dtype: str
    seq_length: int
    kv_dtype: str = ""  # what the key/value cache stored
    linear_weights: list[str] = field(default_factory=list)  # float, int8, int4, int5 (describe)
    results: list[Result] = field(default_factory=list)

    def ppl(self, setting: str, length: int) -> float:
        return next(r.ppl for r in self.results if r.setting == setting and r.length == length)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "results": [asdict(r) for r in self.results]}

    def markdown(self) -> str:
        """One row per setting, one column per length, shaped like the model card's table."""
        lines = ["| model | " + " | ".join(str(n) for n in self.lengths) + " |",
                 "|---|" + "---|" * len(self.lengths)]  # fmt: skip
        for s in self.settings:
            name = self.model if s["label"] == "plain" else f"{self.model} {s['label'].replace('+', ' + ').strip()}"
            cells = [f"{self.ppl(s['label'], n):.2f}" for n in self.lengths]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> None:
        """Perplexity against length, log-scaled, one line per setting (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            from matplotlib.ticker import ScalarFormatter
        except ImportError:
            hint = 'pip install "qwenlm[plot]" (or pip install matplotlib)'
            raise ImportError(f"plotting needs matplotlib: {hint}") from None
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for s in self.settings:
            ax.plot(self.lengths, [self.ppl(s["label"], n) for n in self.lengths], marker="o", label=s["label"])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(self.lengths, [f"{n // 1024}K" if n >= 1024 else str(n) for n in self.lengths])
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        if self.lengths[0] <= self.seq_length <= self.lengths[-1]:
            ax.axvline(self.seq_length, color="grey", linestyle=":", linewidth=1, label="training length")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{self.model}: perplexity by context length", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _equivalence_key(model: Any, setting: Setting, length: int) -> tuple:
    """What a forward over ``length`` tokens actually computes under ``setting``: equal keys, equal logits."""
    c = model.config
    alpha = ntk_alpha(length, c.seq_length) if setting.ntk else 1.0
    logn = setting.logn and length > c.seq_length
    schedule = window_schedule(setting.window, c.num_hidden_layers, c.seq_length) if setting.window else None
    windows = tuple(w if w is not None and w < length else None for w in schedule.windows) if schedule else ()
    if all(w is None for w in windows):
        windows = ()
    layer_alphas = tuple(alpha if w is None else min(alpha, ntk_alpha(w, c.seq_length)) for w in windows)
    return length, alpha, logn, windows, layer_alphas


def evaluate(
    model: Any,
    tokenizer: Any,
    docs: Sequence[str],
    lengths: Sequence[int] = LENGTHS,
    settings: Sequence[Setting] = (Setting(False, False),),
    samples: int = 1,
    sampling: str = "concat",
    chunk_size: int = DEFAULT_CHUNK,
    model_name: str = "model",
    data_names: Sequence[str] = (),
    show_progress: bool = True,
) -> Report:
    """The perplexity of every setting at every length (see the module docstring)."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    lengths = sorted(lengths)
    budget = samples * lengths[-1]
    token_docs = tokenize_documents(tokenizer, docs, limit=budget if sampling == "concat" else None)
    per_length = {n: make_samples(token_docs, n, budget, sampling, tokenizer.eod_id) for n in lengths}
    facts = describe(model)
    report = Report(
        model=model_name,
        lengths=list(lengths),
        settings=[{"label": s.label, **asdict(s)} for s in settings],
        sampling=sampling,
        data=list(data_names),
        dtype=str(model.dtype).removeprefix("torch."),
        seq_length=model.config.seq_length,
        kv_dtype=facts["kv_dtype"],
        linear_weights=facts["linear_weights"],
    )
    jobs, done = [], {}
    for s in settings:
        for n in lengths:
            key = _equivalence_key(model, s, n)
            jobs.append((s, n, done.get(key)))
            done.setdefault(key, s)
    total = sum(per_length[n].numel() for s, n, same in jobs if same is None)
    bar = progress.bar(total, "perplexity", unit="tok", enabled=show_progress)
    saved = (model.config.use_dynamic_ntk, model.config.use_logn_attn, model.transformer.windows)
    computed: dict[tuple[str, int], Result] = {}
    try:
        for s, n, same in jobs:
            if same is not None:
                r = computed[(same.label, n)]
                report.results.append(Result(**{**asdict(r), "setting": s.label, "same_as": same.label}))
                continue
            model.transformer.set_long_context(ntk=s.ntk, logn=s.logn, window=s.window or "none")
            start = time.perf_counter()
            nll, count = 0.0, 0
            for row in per_length[n]:
                a, b = sample_nll(model, row[None], chunk_size, on_chunk=bar.update)
                nll, count = nll + a, count + b
            r = Result(s.label, n, math.exp(nll / count), nll, count, len(per_length[n]), time.perf_counter() - start)
            computed[(s.label, n)] = r
            report.results.append(r)
    finally:
        bar.close()
        model.transformer.set_long_context(ntk=saved[0], logn=saved[1], window=saved[2] or "none")
    return report
