"""Rows of different requests decoding together in one KV cache, joining and leaving between steps.

The rows share one ``KVCache`` whose columns are aligned at a common length P: a shorter row is
left-padded, its padding hidden by the attention mask, exactly like the reference's padded batches. The
model places every token at its column, so a row's positions start at its first real column; for
rotary-only position schemes only position *differences* matter, which makes a padded row compute what
it would compute alone (up to rounding). LogN scaling and dynamic NTK look at absolute lengths, so
for checkpoints that enable them this holds within the trained length (``seq_length``) only.

* Requests that join together are prefilled together in a fresh cache, each row ending at column P
  (left-padded among themselves); for the longest of length L <= P the cache starts at column P - L.
* If one is longer (L > P), the batch first moves right by L - P to meet it: its keys are re-rotated by
  L - P positions (rotary composes: R(a) R(p) = R(p + a)) and zero columns are put in front.
* When rows leave, leading columns that no row uses any more are cut and the keys rotated back, so P
  stays near the longest live row instead of growing with the server's uptime.
"""

from __future__ import annotations

import torch

from qwenlm.cache import KVCache
from qwenlm.rope import apply_rotary

TRIM_MIN_COLUMNS = 16  # cut unused leading columns only when at least this many...
TRIM_FRACTION = 4  # ...and at least 1/4 of the width: each cut re-rotates (and re-rounds) every key


def shift_positions(model, cache: KVCache, delta: int) -> None:
    """Re-rotate every cached key as if its token sat ``delta`` positions later (``delta`` may be < 0)."""
    if delta == 0 or cache.seq_len == 0:
        return
    rotary = model.transformer.rotary
    alphas = cache.ntk_alphas or [1.0]
    device = model.device
    inv_freq = torch.stack([rotary.inv_freq(a, device) for a in alphas]).double()  # (A, d/2)
    angles = torch.cat([inv_freq, inv_freq], dim=-1) * delta  # (A, d), in double: delta can be large
    cos = angles.cos().float()[:, None, None, :]  # (A, 1, 1, d): one row per alpha, broadcast over rows
    sin = angles.sin().float()[:, None, None, :]
    cache.map_keys(lambda k: apply_rotary(k, cos, sin))


class Batch:
    """The running rows: their shared cache and the (B, P) mask of which columns each row uses."""

    def __init__(self, model) -> None:
        self.model = model
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (B, P) long, 1 = this row's token

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, KVCache, torch.Tensor]:
        """Run ``prompts`` together, each placed to end at the batch's current column (the batch moves
        right first if one is longer); return their last tokens' logits (J, V) and their cache and mask
        (J, width), for ``join``. Shorter prompts are left-padded among themselves, as in a padded batch."""
        device = self.model.device
        longest = max(len(p) for p in prompts)
        if self.rows and longest > self.width:
            self._move_right(longest - self.width)
        width = max(self.width, longest)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)  # padding ids are never attended to
        for i, prompt in enumerate(prompts):
            mask[i, width - len(prompt) :] = 1
            ids[i, longest - len(prompt) :] = torch.tensor(prompt)
        mask, ids = mask.to(device), ids.to(device)
        cache = self.model.new_cache(capacity=width + 64)
        cache.start_at(width - longest)
        out = self.model(ids, None if bool(mask.all()) else mask, past_key_values=cache, logits_to_keep=1)
        return out.logits[:, -1], cache, mask

    def join(self, cache: KVCache, mask: torch.Tensor, keep: list[int] | None = None) -> None:
        """Add the rows made by ``prefill`` (no step of the batch in between), or only those in ``keep``."""
        if keep is not None and len(keep) < mask.shape[0]:
            if not keep:
                return
            cache.select(keep)
            mask = mask[keep]
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        self.cache.append_rows(cache)
        self.mask = torch.cat([self.mask, mask], dim=0)

    def _move_right(self, n: int) -> None:
        """Put ``n`` empty columns before every row, re-rotating the keys so positions stay consistent."""
        shift_positions(self.model, self.cache, n)
        self.cache.pad_front(n)
        self.mask = torch.cat([self.mask.new_zeros(self.rows, n), self.mask], dim=1)

    def step(self, next_ids: list[int]) -> torch.Tensor:
        """Feed one token per row; return the next-token logits (B, V)."""
        limit = self.model.config.max_position_embeddings
        if self.width + 1 > limit:
            self.trim(force=True)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        ids = torch.tensor(next_ids, dtype=torch.long, device=self.mask.device)[:, None]
        mask = None if self.rows == 1 and bool(self.mask[0, 0]) else self.mask  # nothing to hide
        return self.model.decode_step(ids, mask, self.cache)

    def remove(self, rows: list[int]) -> None:
        """Drop the given rows (finished or abandoned requests); their slots are free at once."""
        gone = set(rows)
        keep = [i for i in range(self.rows) if i not in gone]
        if not keep:
            self.cache, self.mask = None, None
            return
        if len(keep) < self.rows:
            self.cache.select(keep)
            self.mask = self.mask[keep]
            self.trim()

    def trim(self, force: bool = False) -> None:
        """Cut the leading columns that no row uses (when enough of them, or always with ``force``)."""
        used = self.mask.any(dim=0)
        unused = int(used.long().argmax()) if bool(used.any()) else self.width
        if unused == 0:
            return
        if force or (unused >= TRIM_MIN_COLUMNS and unused * TRIM_FRACTION >= self.width):
            shift_positions(self.model, self.cache, -unused)
            self.cache.drop_front(unused)
            self.mask = self.mask[:, unused:]
