"""Hugging Face tokenizer files of the Qwen2 family, read into and written from :class:`QwenTokenizer`.

A Qwen2 folder holds ``tokenizer.json`` (the ``tokenizers`` library's single file: BPE vocab, merges and
added tokens) and/or the older pair ``vocab.json`` + ``merges.txt`` with the added tokens in
``tokenizer_config.json``. Token ids are Qwen's tiktoken ranks and the merges follow them, so both load
into the same rank table (checked by :func:`qwenlm.byte_level.check_merges`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qwenlm.byte_level import check_merges, derive_merges, rank_table, token_to_text
from qwenlm.tokenizer import ENDOFTEXT, PAT_STR, QwenTokenizer

TOKENIZER_JSON = "tokenizer.json"
VOCAB_JSON = "vocab.json"
MERGES_TXT = "merges.txt"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"


def load_hf_tokenizer(folder: str | Path) -> QwenTokenizer:
    """Load a Qwen2-style HF tokenizer folder (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``)."""
    folder = Path(folder)
    config = _read_json(folder / TOKENIZER_CONFIG) if (folder / TOKENIZER_CONFIG).is_file() else {}
    if (folder / TOKENIZER_JSON).is_file():
        vocab, merges, added = _from_tokenizer_json(folder / TOKENIZER_JSON)
        source = str(folder / TOKENIZER_JSON)
    elif (folder / VOCAB_JSON).is_file() and (folder / MERGES_TXT).is_file():
        vocab, merges = _read_json(folder / VOCAB_JSON), _read_merges_txt(folder / MERGES_TXT)
        decoder = config.get("added_tokens_decoder", {})
        added = {_content(entry): int(i) for i, entry in decoder.items()}
        source = str(folder / VOCAB_JSON)
    else:
        raise FileNotFoundError(
            f"no tokenizer in folder {folder}: expected {TOKENIZER_JSON}, or {VOCAB_JSON} with {MERGES_TXT} "
            f"(copy them from the original checkpoint)"
        )

    pieces = _pieces_by_id(vocab, source)
    ranks = rank_table(pieces, source)
    check_merges(vocab, merges, source)
    special = {}
    for content, token_id in sorted(added.items(), key=lambda item: item[1]):
        if token_id < len(pieces):
            if pieces[token_id] != content:
                raise ValueError(
                    f"{source}: added token {content!r} has id {token_id}, which is the regular token "
                    f"{pieces[token_id]!r}; special tokens must come after the {len(pieces)} regular ones"
                )
            continue  # an added token that is just a regular token changes nothing
        special[content] = token_id
    if ENDOFTEXT not in special:
        raise ValueError(f"{source}: no {ENDOFTEXT} added token, which every Qwen tokenizer has")
    eos = _eos_token(folder, config, special)
    pad = _content(config["pad_token"]) if config.get("pad_token") else ENDOFTEXT
    for key, value in (("eos_token", eos), ("pad_token", pad)):
        if value not in special:
            raise ValueError(f"{folder / TOKENIZER_CONFIG}: {key} {value!r} is not one of the added tokens")
    return QwenTokenizer(ranks, special, pat_str=PAT_STR, eos_token=eos, pad_token=pad, name="qwen-hf")


def save_hf_tokenizer(
    tokenizer: QwenTokenizer,
    folder: str | Path,
    *,
    chat_template: str | None = None,
    model_max_length: int = 32768,
) -> None:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder``.

    The merges are derived from the rank table (:func:`qwenlm.byte_level.derive_merges`); for Qwen's
    vocabulary they equal the merges of the official Qwen2 files and of llama.cpp's GGUF.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ranks = tokenizer.mergeable_ranks
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("the tokenizer's ranks are not 0..n-1; HF's vocab.json needs contiguous ids")
    vocab = {token_to_text(token): rank for token, rank in sorted(ranks.items(), key=lambda item: item[1])}
    merges = [f"{token_to_text(a)} {token_to_text(b)}" for a, b in derive_merges(ranks)]
    by_id = {i: s for s, i in tokenizer.special_tokens.items()}
    added = [
        {"id": i, "content": by_id[i], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i in sorted(by_id)
    ]  # fmt: skip

    _write_json(folder / VOCAB_JSON, vocab, indent=None)
    (folder / MERGES_TXT).write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    _write_json(
        folder / TOKENIZER_JSON,
        {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": {"type": "NFC"},  # QwenTokenizer normalises to NFC before encoding, too
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": PAT_STR}, "behavior": "Isolated", "invert": False},
                    byte_level,
                ],
            },
            "post_processor": byte_level,
            "decoder": byte_level,
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": "",
                "end_of_word_suffix": "",
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": False,
                "vocab": vocab,
                "merges": merges,
            },
        },
        indent=None,
    )
    config: dict[str, Any] = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in added},
        "bos_token": None,  # Qwen adds no BOS
        "clean_up_tokenization_spaces": False,
        "eos_token": by_id[tokenizer.eos_token_id],
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": by_id[tokenizer.pad_token_id],
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    _write_json(folder / TOKENIZER_CONFIG, config)


# -- reading ------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it from the original checkpoint") from e


def _write_json(path: Path, data: Any, indent: int | None = 2) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")


def _content(entry: str | dict[str, Any]) -> str:
    """A token as tokenizer_config.json spells it: a string, or an AddedToken dict with ``content``."""
    return entry["content"] if isinstance(entry, dict) else entry


def _from_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, int]]:
    data = _read_json(path)
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model type is {model.get('type')!r}; only BPE (Qwen2-style) tokenizers load")
    _check_pre_tokenizer(data.get("pre_tokenizer"), path)
    merges = []
    for k, merge in enumerate(model.get("merges", [])):
        pair = merge.split(" ") if isinstance(merge, str) else merge  # tokenizers < 0.20 wrote "a b"
        if len(pair) != 2:
            raise ValueError(f"{path}: merge {k} is {merge!r}; expected a pair of tokens")
        merges.append((pair[0], pair[1]))
    added = {entry["content"]: int(entry["id"]) for entry in data.get("added_tokens", [])}
    return model["vocab"], merges, added


def _check_pre_tokenizer(pre: dict[str, Any] | None, path: Path) -> None:
    """Qwen2's tokenizer.json splits with Qwen's regular expression, then maps bytes (ByteLevel)."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    patterns = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    if patterns != [PAT_STR]:
        raise ValueError(
            f"{path}: the pre-tokenizer splits with {patterns or 'no regular expression'}; only Qwen's "
            f"({PAT_STR!r}) is supported, since it decides how text is cut before BPE"
        )


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    merges = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line or line.startswith("#version"):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{path}:{lineno}: {line!r} is not a merge; expected two tokens separated by a space")
        merges.append((pair[0], pair[1]))
    return merges


def _pieces_by_id(vocab: dict[str, int], source: str) -> list[str]:
    pieces = sorted(vocab, key=vocab.__getitem__)
    ids = [vocab[p] for p in pieces]
    if ids != list(range(len(ids))):
        gap = next(i for i, token_id in enumerate(ids) if token_id != i)
        raise ValueError(
            f"{source}: vocabulary ids are not 0..{len(ids) - 1} (id {gap} is missing or repeated); "
            f"a BPE rank table needs contiguous ids"
        )
    return pieces


def _eos_token(folder: Path, config: dict[str, Any], special: dict[str, int]) -> str:
    """eos from tokenizer_config.json, else the first eos id of generation_config.json, else <|endoftext|>."""
    if config.get("eos_token"):
        return _content(config["eos_token"])
    generation = folder / GENERATION_CONFIG
    if generation.is_file():
        eos_id = _read_json(generation).get("eos_token_id")
        eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
        by_id = {i: s for s, i in special.items()}
        if eos_id is not None:
            if eos_id not in by_id:
                raise ValueError(f"{generation}: eos_token_id {eos_id} is not an added token's id")
            return by_id[eos_id]
    return ENDOFTEXT
