"""HF tokenizer files: write from a QwenTokenizer, read back, and (optionally) load in transformers."""

from __future__ import annotations

import json

import pytest

from qwenlm.byte_level import derive_merges, token_to_text
from qwenlm.hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer
from qwenlm.tokenizer import PAT_STR, QwenTokenizer, load_tiktoken_bpe
from tests.shared import demo_model_or_skip, shared_path
from tests.tiny_gguf import SPECIALS, tiny_ranks

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def is_prime(n: int) -> bool:\n    return n > 1 and all(n % d for d in range(2, n))\n\n\n",
    "长城是中国的象征。 Ünïcödé   spaces\t\ttabs\r\n  \n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<tool_call>{}</tool_call>",
    "emoji 🤖🚀 numbers 1234567890 don't it's WE'LL",
    "e\u0301 (decomposed) vs \u00e9",  # NFC folds the first into the second
]


def tiny_tokenizer(eos: str = "<|im_end|>") -> QwenTokenizer:
    ranks = tiny_ranks()
    specials = {s: len(ranks) + i for i, s in enumerate(SPECIALS)}
    return QwenTokenizer(ranks, specials, pat_str=PAT_STR, eos_token=eos)


def same(a: QwenTokenizer, b: QwenTokenizer) -> None:
    assert a.mergeable_ranks == b.mergeable_ranks
    assert a.special_tokens == b.special_tokens
    assert (a.eos_token_id, a.pad_token_id) == (b.eos_token_id, b.pad_token_id)
    for text in CORPUS:
        assert a.encode(text) == b.encode(text), text


def test_round_trip_through_tokenizer_json(tmp_path):
    tok = tiny_tokenizer()
    save_hf_tokenizer(tok, tmp_path, chat_template="{{ messages }}")
    assert {p.name for p in tmp_path.iterdir()} == {
        "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"
    }  # fmt: skip
    same(load_hf_tokenizer(tmp_path), tok)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    assert config["bos_token"] is None and config["chat_template"] == "{{ messages }}"
    assert config["added_tokens_decoder"][str(len(tiny_ranks()))]["content"] == "<|endoftext|>"


def test_round_trip_through_vocab_and_merges(tmp_path):
    tok = tiny_tokenizer()
    save_hf_tokenizer(tok, tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    same(load_hf_tokenizer(tmp_path), tok)


def test_merges_follow_the_ranks(tmp_path):
    save_hf_tokenizer(tiny_tokenizer(), tmp_path)
    lines = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    # merge k makes token 256 + k, from two tokens of lower rank
    for k, line in enumerate(lines[1:]):
        a, b = line.split(" ")
        assert vocab[a + b] == 256 + k and max(vocab[a], vocab[b]) < 256 + k
    assert len(lines) - 1 == len(vocab) - 256


def test_derive_merges_splits_like_bpe():
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"ab", b"abc", b"bc", b"abcd"):
        ranks[token] = len(ranks)
    # "abc" could be ab+c; "abcd" is abc+d (ab, bc and abc all rank below abcd; BPE merges ab first)
    assert derive_merges(ranks) == [(b"a", b"b"), (b"ab", b"c"), (b"b", b"c"), (b"abc", b"d")]


def test_eos_from_generation_config(tmp_path):
    save_hf_tokenizer(tiny_tokenizer(), tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["eos_token"]
    config_path.write_text(json.dumps(config))
    assert load_hf_tokenizer(tmp_path).eos_token_id == tiny_tokenizer().eod_id  # no hint: <|endoftext|>
    im_end = tiny_tokenizer().im_end_id
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, 300]}))
    assert load_hf_tokenizer(tmp_path).eos_token_id == im_end


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer in folder"):
        load_hf_tokenizer(tmp_path)


def test_vocab_with_gaps_is_refused(tmp_path):
    save_hf_tokenizer(tiny_tokenizer(), tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    vocab[token_to_text(b"zz-new")] = len(vocab) + 5
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.json: vocabulary ids are not 0\.\.300"):
        load_hf_tokenizer(tmp_path)


def test_merges_out_of_order_are_refused(tmp_path):
    save_hf_tokenizer(tiny_tokenizer(), tmp_path)
    path = tmp_path / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    merges = data["model"]["merges"]
    merges[3], merges[4] = merges[4], merges[3]
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match="merge 4 .* out of id order"):
        load_hf_tokenizer(tmp_path)


def test_other_pre_tokenizer_is_refused(tmp_path):
    save_hf_tokenizer(tiny_tokenizer(), tmp_path)
    path = tmp_path / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match="only Qwen's"):
        load_hf_tokenizer(tmp_path)


def test_transformers_loads_the_written_files(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = tiny_tokenizer()
    save_hf_tokenizer(tok, tmp_path, chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in CORPUS:
        assert hf(text)["input_ids"] == tok.encode(text), text
        assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert hf.eos_token_id == tok.eos_token_id and hf.pad_token_id == tok.pad_token_id


# -- the real vocabulary ------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_vocabulary_round_trip_and_transformers(tmp_path):
    from qwenlm.gguf import open_gguf, read_gguf_tokenizer

    path = demo_model_or_skip()
    tok = read_gguf_tokenizer(path)
    template = open_gguf(path).metadata["tokenizer.chat_template"]
    save_hf_tokenizer(tok, tmp_path, chat_template=template)
    gguf_merges = open_gguf(path).metadata["tokenizer.ggml.merges"]
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] == gguf_merges
    assert tok.mergeable_ranks == load_tiktoken_bpe(shared_path("qwen-7b", "qwen.tiktoken"))
    same(load_hf_tokenizer(tmp_path), tok)

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    reference = json.loads(shared_path("real-model", "reference.json").read_text(encoding="utf-8"))
    for chat in reference["chats"].values():
        assert hf(chat["prompt_text"])["input_ids"] == chat["prompt_ids"]
        messages = [{"role": "user", "content": chat["user"]}]
        assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == chat["prompt_text"]
    for passage in reference["passages"].values():
        assert hf(passage["passage_text"])["input_ids"] == passage["ids"]
