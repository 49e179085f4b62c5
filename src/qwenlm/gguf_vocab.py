"""A :class:`QwenTokenizer` from the vocabulary stored inside a GGUF file.

llama.cpp's converter writes Qwen's tiktoken table as a GPT-2 style vocabulary:

* ``tokenizer.ggml.tokens``: every token id's byte-level spelling (GPT-2's ``bytes_to_unicode``), and
  special tokens as their surface text (``<|im_end|>``).
* ``tokenizer.ggml.token_type``: NORMAL (1) for the BPE tokens, which come first (ids 0..n-1); CONTROL (3)
  for ``<|endoftext|>``, ``<|im_start|>``…, USER_DEFINED (4) for e.g. ``<tool_call>``, and UNUSED (5)
  for the ``[PAD151665]``… rows that only pad the embedding matrix.
* ``tokenizer.ggml.merges``: "a b" strings; in Qwen's files merge k makes token 256 + k (ids 0-255 are the
  single bytes), which :func:`qwenlm.byte_level.check_merges` verifies in general form.

Every non-NORMAL token becomes a special token, so that every id the model can emit decodes (Qwen v1 does
the same with its ``<|extra_N|>`` tokens). A side effect: the literal text ``[PAD151665]`` encodes as one
token here, where llama.cpp would split it.
"""

from __future__ import annotations

from typing import Any

from qwenlm.byte_level import check_merges, rank_table
from qwenlm.tokenizer import ENDOFTEXT, PAT_STR, QwenTokenizer

NORMAL = 1  # gguf.TokenType.NORMAL
# Pre-tokenizers (llama.cpp's "tokenizer.ggml.pre") whose regular expression is Qwen's PAT_STR.
QWEN_PRE_TOKENIZERS = ("qwen2", "qwen")


def tokenizer_from_metadata(meta: dict[str, Any], source: str) -> QwenTokenizer:
    """Build the tokenizer from GGUF metadata (``field.contents()`` values keyed by name)."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"{source}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') vocabularies, as in "
            f"Qwen models, are supported"
        )
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in QWEN_PRE_TOKENIZERS:
        raise ValueError(
            f"{source}: tokenizer.ggml.pre is {pre!r}; only Qwen's pre-tokenizer "
            f"({' or '.join(map(repr, QWEN_PRE_TOKENIZERS))}) is supported, since its regular expression "
            f"decides how text is split before BPE"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens)))
    if len(types) != len(tokens):
        raise ValueError(f"{source}: {len(tokens)} tokens but {len(types)} token types; the file is corrupt")

    n_regular = next((i for i, t in enumerate(types) if t != NORMAL), len(types))
    stray = next((i for i in range(n_regular, len(types)) if types[i] == NORMAL), None)
    if stray is not None:
        raise ValueError(
            f"{source}: regular token {stray} ({tokens[stray]!r}) comes after special token {n_regular} "
            f"({tokens[n_regular]!r}); a BPE rank table needs the regular tokens to be ids 0..n-1"
        )
    ranks = rank_table(tokens[:n_regular], source)
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None:
        check_merges({t: i for i, t in enumerate(tokens[:n_regular])}, _split_merges(merges, source), source)

    special = {}
    for i in range(n_regular, len(tokens)):
        if tokens[i] in special:
            raise ValueError(f"{source}: special tokens {special[tokens[i]]} and {i} are both {tokens[i]!r}")
        special[tokens[i]] = i
    if ENDOFTEXT not in special:
        raise ValueError(f"{source}: the vocabulary has no {ENDOFTEXT} special token, which every Qwen model has")

    def surface(key: str, default: int) -> str:
        token_id = int(meta.get(key, default))
        if not n_regular <= token_id < len(tokens):
            raise ValueError(f"{source}: {key} = {token_id} is not a special token id ({n_regular}..{len(tokens) - 1})")
        return tokens[token_id]

    eos = surface("tokenizer.ggml.eos_token_id", special[ENDOFTEXT])
    pad = surface("tokenizer.ggml.padding_token_id", special[ENDOFTEXT])
    return QwenTokenizer(ranks, special, pat_str=PAT_STR, eos_token=eos, pad_token=pad, name="qwen-gguf")


def _split_merges(merges: list[str], source: str) -> list[tuple[str, ...]]:
    pairs = [tuple(merge.split(" ")) for merge in merges]
    if set(map(len, pairs)) - {2}:
        k = next(k for k, parts in enumerate(pairs) if len(parts) != 2)
        raise ValueError(f"{source}: merge {k} is {merges[k]!r}; expected two byte-level tokens separated by a space")
    return pairs
