"""Every record of the reference tokenizer fixtures: encodings in all special-token modes, raised
errors, and decodings with every error policy."""

from __future__ import annotations

import json

import pytest

from qwenlm import QwenTokenizer
from tests.shared import fixtures, shared_path


def _records(kind: str) -> list[dict]:
    try:
        path = fixtures("tokenizer", "cases.jsonl")
    except BaseException:
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    return [r for r in records if r["kind"] == kind]


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return QwenTokenizer.from_pretrained(shared_path("qwen-7b"))


def test_meta(tok: QwenTokenizer) -> None:
    (meta,) = _records("meta")
    assert tok.special_tokens == meta["special_tokens"]
    assert len(tok.special_tokens) == meta["n_special_tokens"] == 208
    assert len(tok.mergeable_ranks) == meta["n_mergeable_tokens"]
    assert len(tok) == meta["tokenizer_vocab_size"]
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (meta["eod_id"], meta["im_start_id"], meta["im_end_id"])
    from qwenlm.tokenizer import PAT_STR

    assert meta["pat_str"] == PAT_STR


@pytest.mark.parametrize("rec", _records("encode"), ids=lambda r: r["id"])
def test_encode(tok: QwenTokenizer, rec: dict) -> None:
    call = lambda: tok.encode(rec["text"], allowed_special=rec["allowed_special"],
                              disallowed_special=rec["disallowed_special"])  # fmt: skip
    if "error" in rec:
        with pytest.raises(ValueError) as err:
            call()
        assert rec["error_token"] in str(err.value)
    else:
        assert call() == rec["ids"]


@pytest.mark.parametrize("rec", _records("decode"), ids=lambda r: r["id"])
def test_decode(tok: QwenTokenizer, rec: dict) -> None:
    call = lambda: tok.decode(rec["ids"], skip_special_tokens=rec["skip_special_tokens"], errors=rec["errors"])
    if "error" in rec:
        with pytest.raises((KeyError, UnicodeDecodeError, ValueError)):
            call()
    else:
        assert call() == rec["text"]
