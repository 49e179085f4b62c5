"""StreamDecoder: deltas never show half a character or half a stop string, and add up to the full decode."""

from __future__ import annotations

import random

import pytest

from qwenlm.chat import CHATML, RAW, StreamDecoder, find_stop, truncate_at_stop
from qwenlm.tokenizer import QwenTokenizer
from tests.shared import shared_path


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return QwenTokenizer.from_pretrained(shared_path("qwen-7b"))


def byte_ids(tok, text: str) -> list[int]:
    """One single-byte token per UTF-8 byte: the worst split a model can produce."""
    return [tok.token_to_id(bytes([b])) for b in text.encode("utf-8")]


def reference(tok, ids, stop_strings=(), stop_ids=(), errors="replace", skip_special_tokens=False) -> str:
    """What the stream must add up to: the one-shot decode before the first stop id, cut where a
    generation loop reading it character by character would first have seen a stop string end."""
    ends = [i for i, t in enumerate(ids) if t in set(stop_ids)]
    text = tok.decode(ids[: ends[0]] if ends else ids, skip_special_tokens=skip_special_tokens, errors=errors)
    for end in range(1, len(text) + 1):
        done = [s for s in stop_strings if text[:end].endswith(s)]
        if done:
            return text[: end - max(map(len, done))]
    return text


def deltas(stream: StreamDecoder, ids) -> list[str]:
    out = [stream.push(i) for i in ids]
    return out + [stream.finish()]


# -- UTF-8 -------------------------------------------------------------------------------------------
def test_emoji_split_into_bytes_is_held_until_complete(tok):
    ids = byte_ids(tok, "a👍🏽b")  # 1 + 4 + 4 + 1 bytes
    out = deltas(StreamDecoder(tok), ids)
    assert out == ["a", "", "", "", "👍", "", "", "", "🏽", "b", ""]


@pytest.mark.parametrize(
    "text",
    ["龘𠮷 are rare", "🧑‍🤝‍🧑 family", "你好，世界！", "Ελληνικά · ภาษาไทย · 한국어", "flag 🇯🇵 and keycap 1️⃣"],
)
def test_natural_tokens_and_byte_tokens(tok, text):
    for ids in (tok.encode(text), byte_ids(tok, text)):
        out = deltas(StreamDecoder(tok), ids)
        assert "".join(out) == text
        assert not any("\ufffd" in d for d in out)


def test_cjk_character_cut_between_two_tokens(tok):
    ids = tok.encode("龘")
    assert len(ids) == 2  # the vocabulary has no token for it: two byte pieces
    assert deltas(StreamDecoder(tok), ids) == ["", "龘", ""]


def test_plain_text_is_not_delayed(tok):
    ids = tok.encode("Hello world, how are you?")
    out = deltas(StreamDecoder(tok), ids)
    assert out[:-1] == [tok.decode([i]) for i in ids] and out[-1] == ""


@pytest.mark.parametrize(
    "errors, expected", [("replace", "ok\ufffd"), ("ignore", "ok"), ("backslashreplace", "ok\\xe9\\xbe")]
)
def test_incomplete_character_at_the_end(tok, errors, expected):
    ids = tok.encode("ok") + tok.encode("龘")[:1]
    stream = StreamDecoder(tok, errors=errors)
    assert [stream.push(i) for i in ids] == ["ok", ""]
    assert stream.text + stream.finish() == expected == tok.decode(ids, errors=errors)


@pytest.mark.parametrize("errors", ["replace", "ignore", "backslashreplace"])
def test_invalid_bytes_follow_the_error_policy(tok, errors):
    raw = b"a\x80b\xe9\xbeZ\xf0\x9f\x98\x80\xc0\xaf"  # lone continuation, truncated char, emoji, overlong
    ids = [tok.token_to_id(bytes([b])) for b in raw]
    assert "".join(deltas(StreamDecoder(tok, errors=errors), ids)) == raw.decode("utf-8", errors=errors)


def test_strict_errors_raise_like_decode(tok):
    ids = [tok.token_to_id(b"a"), tok.token_to_id(b"\x80")]
    with pytest.raises(UnicodeDecodeError):
        tok.decode(ids, errors="strict")
    with pytest.raises(UnicodeDecodeError):
        deltas(StreamDecoder(tok, errors="strict"), ids)


def test_special_token_inside_a_split_character(tok):
    ids = [*tok.encode("龘")[:1], tok.eod_id, *tok.encode("龘")[1:]]
    expected = tok.decode(ids)
    assert expected == "\ufffd<|endoftext|>\ufffd"
    assert "".join(deltas(StreamDecoder(tok), ids)) == expected
    assert "".join(deltas(StreamDecoder(tok, skip_special_tokens=True), ids)) == "龘"


# -- stop strings ------------------------------------------------------------------------------------
def test_stop_string_spanning_tokens(tok):
    ids = tok.encode("Hello\nHuman: hi")  # Hello, \n, Human, :, " hi"
    stream = StreamDecoder(tok, stop_strings=["Human:"])
    assert [stream.push(i) for i in ids] == ["Hello", "\n", "", "", ""]
    assert stream.stopped and stream.stop_reason == "Human:"
    assert stream.finish() == "" and stream.text == "Hello\n"


def test_partial_stop_string_is_released_when_it_does_not_complete(tok):
    ids = tok.encode("Human") + tok.encode("e world")
    stream = StreamDecoder(tok, stop_strings=["Human:"])
    assert [stream.push(i) for i in ids] == ["", "Humane", " world"]
    assert not stream.stopped
    # ... and released at the end if the stream ends inside it
    stream = StreamDecoder(tok, stop_strings=["Human:"])
    assert deltas(stream, tok.encode("Hi\nHuman")) == ["Hi", "\n", "", "Human"]


def test_stop_string_inside_one_token(tok):
    ids = tok.encode("Hello world")
    assert "".join(deltas(StreamDecoder(tok, stop_strings=["world", "lo w"]), ids)) == "Hel"
    assert "".join(deltas(StreamDecoder(tok, stop_strings=["ell"]), ids)) == "H"


@pytest.mark.parametrize(
    "stops, expected",
    [
        (["Human:", "uma"], ("H", "uma")),  # "uma" completes first although "Human:" starts earlier
        (["Human:", "man:"], ("", "Human:")),  # completed by the same character: the longer one
        (["an: x", "Hu"], ("", "Hu")),
        (["zzz"], None),
    ],
)
def test_first_stop_to_complete_wins(tok, stops, expected):
    text = "Human: x"
    assert find_stop(text, stops) == (None if expected is None else (len(expected[0]), expected[1]))
    stream = StreamDecoder(tok, stop_strings=stops)
    out = "".join(stream.stream(tok.encode(text)))
    assert out == truncate_at_stop(text, stops) == reference(tok, tok.encode(text), stops)
    assert stream.stop_reason == (None if expected is None else expected[1])


def test_stop_string_with_multibyte_characters(tok):
    ids = byte_ids(tok, "答案：42。用户：") + tok.encode("再见")
    stream = StreamDecoder(tok, stop_strings=["用户："])
    out = deltas(stream, ids)
    assert "".join(out) == "答案：42。" and stream.stop_reason == "用户："
    assert not any("\ufffd" in d or "用" in d for d in out)


def test_nothing_after_a_stop(tok):
    stream = StreamDecoder(tok, stop_strings=["!"])
    assert [stream.push(i) for i in tok.encode("Hi!")] == ["Hi", ""]  # "Hi", "!"
    assert stream.stopped
    assert [stream.push(i) for i in tok.encode(" more text")] == ["", ""]
    assert stream.finish() == "" and stream.text == "Hi"


def test_stream_stops_pulling_ids(tok):
    ids = tok.encode("one two three four")
    pulled = []

    def generated():
        for i in ids:
            pulled.append(i)
            yield i

    assert list(StreamDecoder(tok, stop_strings=[" three"]).stream(generated())) == ["one", " two"]
    assert len(pulled) == 3  # " three" completed the stop: " four" was never generated


def test_bad_stop_strings(tok):
    with pytest.raises(ValueError):
        StreamDecoder(tok, stop_strings=[""])
    with pytest.raises(TypeError):
        StreamDecoder(tok, stop_strings="Human:")


# -- stop ids and chat formats -----------------------------------------------------------------------
def test_chatml_stream_stops_at_im_end(tok):
    ids = tok.encode("当然可以，这是答案。") + [tok.im_end_id] + tok.encode("\nextra")
    stream = CHATML.stream(tok)
    assert "".join(stream.stream(ids)) == "当然可以，这是答案。"
    assert stream.stop_reason == tok.im_end_id


def test_chatml_stream_flushes_an_incomplete_character_at_the_stop(tok):
    ids = tok.encode("ok") + tok.encode("龘")[:1] + [tok.im_start_id]
    assert "".join(CHATML.stream(tok).stream(ids)) == "ok\ufffd" == reference(tok, ids, stop_ids=[tok.im_start_id])


def test_raw_stream_stops_at_human_and_endoftext(tok):
    stream = RAW.stream(tok)
    assert "".join(stream.stream(tok.encode("Sure.\nHuman: next"))) == "Sure.\n" and stream.stop_reason == "Human:"
    stream = RAW.stream(tok, stop_strings=["\n\n"])
    assert "".join(stream.stream(tok.encode("A") + [tok.eod_id] + tok.encode("B"))) == "A"
    assert stream.stop_reason == tok.eod_id


# -- property: deltas add up to the one-shot decode --------------------------------------------------
def _random_ids(rng: random.Random, tok) -> list[int]:
    pieces = ["Hello", " world", "你好", "龘", "👍🏽", "🧑‍🤝‍🧑", "Human:", "\n", " ", "é", "<|im_end|>", "ab"]
    ids: list[int] = []
    for _ in range(rng.randint(0, 12)):
        roll = rng.random()
        if roll < 0.4:
            ids += tok.encode(rng.choice(pieces), allowed_special=set())
        elif roll < 0.7:
            ids += byte_ids(tok, rng.choice(pieces))
        elif roll < 0.8:
            ids.append(tok.token_to_id(bytes([rng.choice([0x80, 0xBF, 0xE9, 0xF0, 0xC0, 0xFF])])))
        elif roll < 0.9:
            ids.append(rng.choice([tok.eod_id, tok.im_start_id, tok.im_end_id]))
        else:
            ids.append(rng.randrange(tok.first_special_id))
    return ids


@pytest.mark.parametrize("seed", range(8))
def test_random_streams_match_one_shot_decode(tok, seed):
    rng = random.Random(seed)
    for _ in range(60):
        ids = _random_ids(rng, tok)
        text = tok.decode(ids)
        # Stop strings that occur (cut anywhere in the text) and some that may not.
        stop_strings = [text[a : a + rng.randint(1, 4)] for a in rng.sample(range(len(text)), min(2, len(text)))]
        stop_strings = [s for s in stop_strings if s] + rng.sample(["Human:", "ld", "\ufffd\ufffd", "好龘"], 2)
        stop_ids = rng.sample([tok.eod_id, tok.im_end_id], rng.randint(0, 1))
        errors = rng.choice(["replace", "ignore"])
        skip = rng.random() < 0.2
        stream = StreamDecoder(tok, stop_strings, stop_ids, skip_special_tokens=skip, errors=errors)
        out = deltas(stream, ids)
        expected = reference(tok, ids, stop_strings, stop_ids, errors=errors, skip_special_tokens=skip)
        assert "".join(out) == expected, (ids, stop_strings, stop_ids, errors, skip)
        assert stream.text == expected
        # Held-back text is never a complete stop string, and nothing emitted contains one.
        assert not any(s in expected for s in stop_strings)
