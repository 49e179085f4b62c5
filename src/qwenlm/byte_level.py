"""GPT-2 byte-level BPE bookkeeping shared by the GGUF and Hugging Face tokenizer formats.

Both formats spell a token's bytes as printable text (GPT-2's ``bytes_to_unicode`` table, e.g. a space is
``Ġ``) and list the BPE merges separately. Qwen's tokenizer is a tiktoken rank table instead: token bytes ->
rank, where the rank is both the token id and the merge priority. This module converts between the two and
checks that a vocabulary really is such a rank table, so that tiktoken encodes text exactly as the merges do.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (printable bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@lru_cache(maxsize=1)
def char_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_char().items()}


def token_to_text(token: bytes) -> str:
    """The byte-level spelling of ``token`` (as in ``vocab.json`` and GGUF ``tokenizer.ggml.tokens``)."""
    table = byte_to_char()
    return "".join(table[b] for b in token)


@lru_cache(maxsize=1)
def _to_latin1() -> dict[int, int]:
    """``str.translate`` table: each GPT-2 character to the character of its byte (U+0000-U+00FF); the
    characters below U+0100 that are not in GPT-2's table to one beyond it, so that encoding fails on them."""
    table = {ord(c): b for c, b in char_to_byte().items()}
    return {**{c: 0xFFFF for c in range(256) if c not in table}, **table}


def text_to_token(text: str, source: str = "vocabulary") -> bytes:
    """Inverse of :func:`token_to_text`; a character outside GPT-2's table means the file is not byte-level."""
    try:
        return text.translate(_to_latin1()).encode("latin-1")  # (in C: ~5x a per-character lookup)
    except UnicodeEncodeError as e:
        bad = next(c for c in text if c not in char_to_byte())
        raise ValueError(
            f"{source}: token {text!r} contains {bad!r}, which is not a GPT-2 byte-level character; "
            f"only byte-level BPE vocabularies (tokenizer model 'gpt2' / HF ByteLevel) are supported"
        ) from e


def rank_table(pieces: Sequence[str], source: str) -> dict[bytes, int]:
    """tiktoken ranks from byte-level token strings, ``pieces[i]`` being token ``i``.

    A byte-level BPE must contain all 256 single bytes (otherwise some text cannot be encoded at all), and
    two ids may not spell the same bytes.
    """
    ranks: dict[bytes, int] = {}
    for i, piece in enumerate(pieces):
        token = text_to_token(piece, source)
        if token in ranks:
            raise ValueError(
                f"{source}: tokens {ranks[token]} and {i} both spell {piece!r}; a BPE rank table needs unique tokens"
            )
        ranks[token] = i
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} of the 256 single bytes are not tokens (first: {bytes([missing[0]])!r}); "
            f"a byte-level BPE vocabulary must contain every byte"
        )
    return ranks


def check_merges(ranks_by_text: Mapping[str, int], merges: Sequence[Sequence[str]], source: str) -> None:
    """Check that BPE with ``merges`` (in priority order) is the same as tiktoken with ids as ranks.

    That holds when merge k produces the k-th multi-byte token in id order, from two tokens of lower id:
    then "merge the pair listed first" and "merge the pair whose result has the lowest id" are one rule.
    (In Qwen's vocabulary ids 0-255 are the single bytes, so merge k produces token 256 + k.)
    """
    n_multi = sum(1 for text in ranks_by_text if len(text) > 1)  # one character = one byte
    if len(merges) != n_multi:
        raise ValueError(
            f"{source}: {len(merges)} merges for {n_multi} multi-byte tokens; in a BPE rank table every "
            f"multi-byte token is made by exactly one merge"
        )
    get = ranks_by_text.get
    firsts, seconds = [a for a, _ in merges], [b for _, b in merges]
    made = list(map(get, map(operator.add, firsts, seconds)))  # (lookups in C: ~4x a Python loop)
    ids = (list(map(get, firsts)), list(map(get, seconds)), made)
    if any(None in column for column in ids):
        k = next(k for k in range(len(merges)) if None in (ids[0][k], ids[1][k], ids[2][k]))
        a, b = merges[k]
        absent = next(t for t, column in ((a, ids[0]), (b, ids[1]), (a + b, ids[2])) if column[k] is None)
        raise ValueError(f"{source}: merge {k} ({a!r} {b!r}) uses {absent!r}, which is not in the vocabulary")
    ra, rb, rm = (np.asarray(column, dtype=np.int64) for column in ids)
    previous = np.concatenate([[-1], rm[:-1]])
    bad = np.flatnonzero((np.maximum(ra, rb) >= rm) | (rm <= previous))
    if bad.size:
        k = int(bad[0])
        a, b = merges[k]
        raise ValueError(
            f"{source}: merge {k} ({a!r} {b!r} -> id {rm[k]}) is out of id order (previous merge made id "
            f"{previous[k]}, parts have ids {ra[k]} and {rb[k]}); this vocabulary's ids are not BPE ranks, so "
            f"tiktoken cannot reproduce it"
        )


def bpe_split(ranks: Mapping[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair-encode ``token`` using only merges of rank below ``max_rank`` (tiktoken's algorithm)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_rank, best_i = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def derive_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list equivalent to a tiktoken rank table, in rank order.

    The merge that makes token ``t`` is the last step of BPE on ``t``'s own bytes with every rank below
    ``rank(t)`` allowed: it must end in exactly two parts, or ``t`` could never be produced.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = bpe_split(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(
                f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens "
                f"(BPE stops at {parts!r}); this is not a valid BPE rank table"
            )
        merges.append((parts[0], parts[1]))
    return merges
