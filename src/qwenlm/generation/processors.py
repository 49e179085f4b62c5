"""Logits processors: small callables ``(input_ids [B, T], scores [B, V]) -> scores``.

Processors change scores (repetition penalty, stop words); warpers reshape the distribution before
sampling (temperature, top-k, top-p). Each is applied in the order HF transformers 4.32 used for Qwen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

STOP_SCORE = float(2**15)  # the reference *sets* the eos score to this value


class RepetitionPenalty:
    """Penalise every distinct id already in the sequence (prompt included): negative scores are
    multiplied by ``penalty``, others divided by it."""

    def __init__(self, penalty: float) -> None:
        if not penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
        self.penalty = penalty

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen = torch.gather(scores, 1, input_ids)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return scores.scatter(1, input_ids, seen)


class StopWordsLogitsProcessor:
    """Force ``eos`` right after any stop sequence: a row whose ids end with one gets its eos score set
    to 32768. A stop sequence equal to ``[eos]`` is dropped (plain eos stopping covers it)."""

    def __init__(self, stop_words_ids: Sequence[Sequence[int]], eos_token_id: int) -> None:
        if not isinstance(stop_words_ids, (list, tuple)) or len(stop_words_ids) == 0:
            raise ValueError(f"stop_words_ids must be a non-empty list of id lists, got {stop_words_ids!r}")
        for seq in stop_words_ids:
            if not isinstance(seq, (list, tuple)):
                raise ValueError(f"each stop sequence must be a list of ids, got {seq!r}")
            if len(seq) == 0:
                raise ValueError("stop_words_ids contains an empty stop sequence")
            if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in seq):
                raise ValueError(f"stop sequence {list(seq)!r} must hold non-negative integer ids")
        self.eos_token_id = eos_token_id
        self.stop_words_ids = [list(s) for s in stop_words_ids if list(s) != [eos_token_id]]

    def stopped(self, input_ids: torch.Tensor) -> list[bool]:
        rows = input_ids.tolist()
        return [any(len(s) <= len(row) and row[len(row) - len(s) :] == s for s in self.stop_words_ids) for row in rows]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for i, stop in enumerate(self.stopped(input_ids)):
            if stop:
                scores[i, self.eos_token_id] = STOP_SCORE
        return scores


class Temperature:
    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopK:
    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        return scores.masked_fill(scores < kth, float("-inf"))


class TopP:
    """Nucleus filtering as HF does it: keep the smallest set of top tokens whose probability mass
    reaches ``p`` (always at least one)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - self.p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(1, order, remove_sorted)
        return scores.masked_fill(remove, float("-inf"))


def apply_all(processors: Sequence[LogitsProcessor], input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    for p in processors:
        scores = p(input_ids, scores)
    return scores
