"""Turn generated token ids into printable text deltas, one token at a time.

Two things are held back until they resolve: the bytes of a UTF-8 character cut between tokens, and a
tail of text that could be the start of a stop string. Joining every delta (``push`` results, then
``finish``) gives exactly ``tokenizer.decode(ids)`` cut before the first stop string to complete (see
``find_stop``), where ``ids`` end before the first stop id.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qwenlm.tokenizer import QwenTokenizer


def find_stop(text: str, stop_strings: Iterable[str]) -> tuple[int, str] | None:
    """Where ``text`` must be cut, and the stop string found there, or None.

    The stop is the first stop string to be *completed* reading left to right, which is where a
    generation loop would have stopped; of two completed by the same character the longer (earlier
    starting) one wins.
    """
    hits = [(i + len(s), i, s) for s in stop_strings if (i := text.find(s)) >= 0]
    if not hits:
        return None
    _, start, stop = min(hits)
    return start, stop


def truncate_at_stop(text: str, stop_strings: Iterable[str]) -> str:
    """``text`` before its stop (see ``find_stop``): what a ``StreamDecoder`` emits in total."""
    hit = find_stop(text, stop_strings)
    return text if hit is None else text[: hit[0]]


class StreamDecoder:
    """Incremental decoder of generated ids with stop strings and stop ids.

    >>> stream = StreamDecoder(tokenizer, stop_strings=["Human:"])
    >>> for token_id in generated:          # doctest: +SKIP
    ...     print(stream.push(token_id), end="")
    ...     if stream.stopped:
    ...         break
    >>> print(stream.finish())              # doctest: +SKIP

    ``errors`` is the UTF-8 error policy of ``tokenizer.decode``: an invalid byte is replaced as soon as
    it is known to be invalid, an incomplete character left at the end is replaced by ``finish``.
    """

    def __init__(
        self,
        tokenizer: QwenTokenizer,
        stop_strings: Sequence[str] = (),
        stop_ids: Iterable[int] = (),
        skip_special_tokens: bool = False,
        errors: str = "replace",
    ) -> None:
        if isinstance(stop_strings, str):
            raise TypeError("stop_strings must be a sequence of strings, not one string")
        self.stop_strings = tuple(stop_strings)
        if any(not s for s in self.stop_strings):
            raise ValueError("stop strings must be non-empty")
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.skip_special_tokens = skip_special_tokens
        self._bytes = codecs.getincrementaldecoder("utf-8")(errors)
        self._pending = ""  # decoded text not emitted yet: a possible stop-string prefix
        self._emitted: list[str] = []
        self.stopped = False
        self.stop_reason: str | int | None = None  # the stop string or stop id that ended the stream
        self.finished = False

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._emitted)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that became safe to show (often ``""``)."""
        if self.stopped or self.finished:
            return ""
        token_id = int(token_id)
        if token_id in self.stop_ids:
            self.stopped, self.stop_reason = True, token_id
            return self._flush()
        if self.skip_special_tokens and token_id >= self.tokenizer.first_special_id:
            return ""
        self._pending += self._bytes.decode(self.tokenizer.decode_bytes([token_id]))
        return self._emit(final=False)

    def finish(self) -> str:
        """End of generation: return what was held back (an incomplete character per ``errors``)."""
        if self.stopped or self.finished:
            return ""
        return self._flush()

    def stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield the non-empty deltas of ``ids``, then the held-back rest; stop pulling ids at a stop."""
        for token_id in ids:
            delta = self.push(token_id)
            if delta:
                yield delta
            if self.stopped:
                return
        delta = self.finish()
        if delta:
            yield delta

    def _flush(self) -> str:
        self.finished = True
        self._pending += self._bytes.decode(b"", final=True)
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        text = self._pending
        hit = find_stop(text, self.stop_strings)
        if hit is not None:
            cut, self.stop_reason = hit
            self.stopped, self.finished = True, True
            return self._take(cut, keep=False)
        return self._take(len(text) if final else self._safe_length(text), keep=True)

    def _safe_length(self, text: str) -> int:
        """Length of the longest prefix of ``text`` that no stop string can start in."""
        longest = max((len(s) for s in self.stop_strings), default=0)
        for start in range(max(0, len(text) - longest + 1), len(text)):
            tail = text[start:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return start
        return len(text)

    def _take(self, n: int, keep: bool) -> str:
        out = self._pending[:n]
        self._pending = self._pending[n:] if keep else ""
        if out:
            self._emitted.append(out)
        return out
