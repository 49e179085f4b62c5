"""GPT-2 byte-level spelling and the checks that a vocabulary is a BPE rank table (qwenlm.byte_level)."""

import pytest

from qwenlm.byte_level import byte_to_char, check_merges, rank_table, text_to_token, token_to_text
from qwenlm.gguf_vocab import _split_merges


def test_every_byte_string_round_trips_through_its_spelling():
    every = bytes(range(256))
    assert token_to_text(every) == "".join(byte_to_char()[b] for b in range(256))
    assert text_to_token(token_to_text(every)) == every
    assert text_to_token("Ġhello") == b" hello"


@pytest.mark.parametrize("bad", [" ", "\n", "\x7f", "中", "\u0100\u00ff\u4e2d"])
def test_characters_outside_gpt2s_table_are_refused_by_name(bad):
    """Characters below U+0100 that GPT-2 spells otherwise (a space is Ġ) as well as those above its table."""
    with pytest.raises(ValueError, match="not a GPT-2 byte-level character") as info:
        text_to_token("ab" + bad, "vocab.json")
    assert "vocab.json" in str(info.value)
    assert repr(next(c for c in bad if c not in byte_to_char().values())) in str(info.value)


def _vocabulary():
    pieces = [byte_to_char()[b] for b in range(256)] + ["ab", "abc", "cd"]
    return pieces, {t: i for i, t in enumerate(pieces)}


def test_a_rank_table_needs_unique_tokens_and_every_byte():
    pieces, _ = _vocabulary()
    assert rank_table(pieces, "f")[b"abc"] == 257
    with pytest.raises(ValueError, match="tokens 256 and 259 both spell 'ab'"):
        rank_table([*pieces, "ab"], "f")
    with pytest.raises(ValueError, match="1 of the 256 single bytes"):
        rank_table(pieces[1:], "f")


def test_merges_in_id_order_pass_and_each_kind_of_fault_is_named():
    _, ranks = _vocabulary()
    check_merges(ranks, [("a", "b"), ("ab", "c"), ("c", "d")], "f")
    with pytest.raises(ValueError, match=r"merge 1 \('ab' 'x'\) uses 'abx'"):
        check_merges(ranks, [("a", "b"), ("ab", "x"), ("c", "d")], "f")
    order = r"merge 2 \(.ab. .c. -> id 257\) is out of id order \(previous merge made id 258, parts have ids 256 and 99"
    with pytest.raises(ValueError, match=order):
        check_merges(ranks, [("a", "b"), ("c", "d"), ("ab", "c")], "f")
    with pytest.raises(ValueError, match="2 merges for 3 multi-byte tokens"):
        check_merges(ranks, [("a", "b"), ("ab", "c")], "f")


def test_gguf_merges_are_two_tokens_each():
    assert _split_merges(["a b", "ab c"], "f") == [("a", "b"), ("ab", "c")]
    with pytest.raises(ValueError, match="merge 1 is 'a b c'; expected two byte-level tokens"):
        _split_merges(["a b", "a b c"], "f")
