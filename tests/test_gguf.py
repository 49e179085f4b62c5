"""read_gguf on tiny synthetic GGUF files, and (slow) on the real demo model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qwenlm.config import QwenConfig
from qwenlm.gguf import read_gguf, read_gguf_tokenizer, supported_types
from qwenlm.tokenizer import PAT_STR, QwenTokenizer, load_tiktoken_bpe
from tests.shared import demo_model_or_skip, shared_path
from tests.tiny_gguf import CHAT_TEMPLATE, N_REGULAR, SPECIALS, Q, TinySpec, gguf, hf_name, tiny_ranks, write_tiny_gguf

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x  # comment\n\n\n",
    "长城是中国的象征。 Ünïcödé   spaces\t\ttabs\r\n",
    "<|im_start|>user\nhi<|im_end|>\n<tool_call>{}</tool_call>",
    "emoji 🤖🚀 and numbers 1234567890",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    expected = write_tiny_gguf(path)
    return path, expected


def write(tmp_path, name="m.gguf", **changes):
    path = tmp_path / name
    expected = write_tiny_gguf(path, TinySpec(**changes))
    return path, expected


# -- config and tensors -------------------------------------------------------------------------------
def test_qwen2_config_is_hf_qwen2config(tiny):
    path, _ = tiny
    ckpt = read_gguf(path, progress_bar=False)
    c = ckpt.config
    assert ckpt.architecture == "qwen2" and ckpt.general_name == "tiny qwen2"
    assert c["model_type"] == "qwen2" and c["architectures"] == ["Qwen2ForCausalLM"]
    assert (c["vocab_size"], c["hidden_size"], c["intermediate_size"]) == (TinySpec().vocab, 64, 96)
    assert (c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]) == (2, 4, 2)
    assert c["rms_norm_eps"] == 1e-6  # not float32's 9.99999997e-07
    assert c["rope_theta"] == 1e6 and c["max_position_embeddings"] == 256
    assert c["tie_word_embeddings"] is False
    assert c["eos_token_id"] == N_REGULAR + SPECIALS.index("<|im_end|>")
    assert c["pad_token_id"] == c["bos_token_id"] == N_REGULAR
    json.dumps(c)  # it is a config.json
    config = QwenConfig.from_dict(c)
    assert config.is_qwen2 and config.n_kv_heads == 2 and config.head_dim == 16 and config.mlp_width == 96
    assert config.rotary_emb_base == 1e6 and not config.use_dynamic_ntk


def test_qwen2_tensors_are_dequantized_under_hf_names(tiny):
    path, expected = tiny
    ckpt = read_gguf(path, progress_bar=False)
    assert set(ckpt.tensors) == {hf_name(n) for n in expected}
    for name, values in expected.items():
        got = ckpt.tensors[hf_name(name)]
        assert got.dtype == torch.float32 and got.shape == values.shape, name
        assert torch.equal(got, values), name
    # [out, in]: k_proj maps hidden (64) to kv_heads * head_dim (32)
    assert ckpt.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    assert ckpt.tensors["model.layers.1.mlp.down_proj.weight"].shape == (64, 96)
    assert ckpt.chat_template == CHAT_TEMPLATE


def test_no_qk_permutation(tmp_path):
    # With every tensor stored as F32 the reader must hand back the exact array written: no row reordering.
    path, expected = write(tmp_path, types={})
    ckpt = read_gguf(path, progress_bar=False)
    assert torch.equal(ckpt.tensors["model.layers.0.self_attn.q_proj.weight"], expected["blk.0.attn_q.weight"])
    assert torch.equal(ckpt.tensors["model.layers.0.self_attn.k_proj.weight"], expected["blk.0.attn_k.weight"])


def test_dtype_bf16(tiny):
    path, expected = tiny
    ckpt = read_gguf(path, torch.bfloat16, progress_bar=False)
    assert ckpt.config["torch_dtype"] == "bfloat16"
    for name, values in expected.items():
        assert torch.equal(ckpt.tensors[hf_name(name)], values.to(torch.bfloat16)), name


def test_dtype_must_be_floating(tiny):
    with pytest.raises(ValueError, match="floating-point"):
        read_gguf(tiny[0], torch.int8)


def test_tied_model_has_no_lm_head(tmp_path):
    path, _ = write(tmp_path, tied=True)
    ckpt = read_gguf(path, progress_bar=False)
    assert "lm_head.weight" not in ckpt.tensors and ckpt.config["tie_word_embeddings"] is True


def test_qwen_v1_names_and_config(tmp_path):
    path, expected = write(tmp_path, arch="qwen", kv_heads=4, rope_base=10000.0, types={"ffn_up.weight": Q.F16})
    ckpt = read_gguf(path, progress_bar=False)
    c = ckpt.config
    assert ckpt.architecture == "qwen" and c["model_type"] == "qwen"
    assert c["intermediate_size"] == 2 * 96  # v1 stores twice the MLP width
    assert c["kv_channels"] == 16 and c["rotary_emb_base"] == 10000.0 and c["layer_norm_epsilon"] == 1e-6
    assert c["seq_length"] == c["max_position_embeddings"] == 256
    assert set(ckpt.tensors) == {hf_name(n, "qwen") for n in expected}
    # llama.cpp: v1 mlp.w2 (SiLU branch) is ffn_gate, mlp.w1 is ffn_up
    assert torch.equal(ckpt.tensors["transformer.h.1.mlp.w2.weight"], expected["blk.1.ffn_gate.weight"])
    assert torch.equal(ckpt.tensors["transformer.h.1.mlp.w1.weight"], expected["blk.1.ffn_up.weight"])
    assert ckpt.tensors["transformer.h.0.attn.c_attn.weight"].shape == (3 * 64, 64)
    config = QwenConfig.from_dict(c)
    assert config.model_type == "qwen" and config.mlp_width == 96 and config.n_kv_heads == 4


# -- tokenizer ----------------------------------------------------------------------------------------
def test_tokenizer_matches_tiktoken_on_the_same_ranks(tiny):
    tok = read_gguf_tokenizer(tiny[0])
    ranks = tiny_ranks()
    assert tok.mergeable_ranks == ranks
    specials = {s: N_REGULAR + i for i, s in enumerate(SPECIALS)}
    assert {s: i for s, i in tok.special_tokens.items() if not s.startswith("[PAD")} == specials
    assert tok.special_tokens["[PAD305]"] == 305 and len(tok) == TinySpec().vocab  # every row decodes
    reference = QwenTokenizer(ranks, specials, pat_str=PAT_STR)
    for text in TEXTS:
        assert tok.encode(text) == reference.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token_id == specials["<|im_end|>"] and tok.pad_token_id == specials["<|endoftext|>"]


def test_read_gguf_tokenizer_equals_read_gguf_tokenizer(tiny):
    full = read_gguf(tiny[0], progress_bar=False).tokenizer
    alone = read_gguf_tokenizer(tiny[0])
    assert full.mergeable_ranks == alone.mergeable_ranks and full.special_tokens == alone.special_tokens


def test_a_model_and_its_tokenizer_build_the_vocabulary_once(tmp_path, monkeypatch):
    # loading a model reads the tokenizer too (its special ids): one build per file, a copy for each caller
    import qwenlm.gguf
    from qwenlm.checkpoint import load_model, load_tokenizer

    path, _ = write(tmp_path)
    builds = []
    build = qwenlm.gguf.tokenizer_from_metadata
    monkeypatch.setattr(qwenlm.gguf, "tokenizer_from_metadata", lambda *a: builds.append(a) or build(*a))
    tok = load_tokenizer(path)
    model = load_model(path, dtype="float32", device="cpu")
    again = load_tokenizer(path)
    assert len(builds) == 1 and model.generation_config.eos_token_id == tok.eos_token_id
    again.chat_template, again.special_tokens["<x>"] = "changed", 1
    assert tok.chat_template == CHAT_TEMPLATE and "<x>" not in tok.special_tokens  # the copies are apart
    write_tiny_gguf(path, TinySpec(eos="<|endoftext|>"))  # the file changed: built again
    assert load_tokenizer(path).eos_token_id == N_REGULAR + SPECIALS.index("<|endoftext|>") and len(builds) == 2


# -- errors -------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b'{"header": 1}' * 10)
    with pytest.raises(ValueError, match=r"model\.safetensors is not a GGUF file"):
        read_gguf(path)


@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_file(tiny, tmp_path, keep):
    data = tiny[0].read_bytes()
    path = tmp_path / "short.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=r"short\.gguf is truncated or corrupt"):
        read_gguf(path)


def test_unsupported_quantization_names_tensor_and_types(tmp_path):
    raw = np.zeros((4, 2 * 40), dtype=np.uint8)  # Q8_1: 40 bytes per 32 weights; gguf cannot dequantise it
    path, _ = write(tmp_path, extra_tensor=("rope_freqs.weight", raw, Q.Q8_1))
    with pytest.raises(ValueError, match=r"rope_freqs\.weight is stored as Q8_1") as info:
        read_gguf(path)
    assert "Q8_0" in str(info.value) and "Q4_K" in str(info.value)
    assert {"F32", "F16", "Q8_0", "Q5_0", "Q6_K", "Q4_K"} <= set(supported_types())


def test_wrong_architecture(tmp_path):
    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="general.architecture is 'llama'"):
        read_gguf(path)


def test_unexpected_tensor(tmp_path):
    path, _ = write(tmp_path, extra_tensor=("blk.0.attn_qkv.weight", np.zeros((4, 64), np.float32), Q.F32))
    with pytest.raises(ValueError, match=r"unexpected tensor 'blk\.0\.attn_qkv\.weight'"):
        read_gguf(path)


def test_shape_mismatch(tmp_path):
    # head_count_kv says 2 heads, but the k projection holds 4
    path, _ = write(tmp_path, kv_heads=4)
    data = path.read_bytes()
    key = b"qwen2.attention.head_count_kv"
    at = data.index(key) + len(key) + 4  # the uint32 value follows its 4-byte type tag
    path.write_bytes(data[:at] + (2).to_bytes(4, "little") + data[at + 4 :])
    with pytest.raises(ValueError, match=r"attn_k\.weight has shape \[64, 64\].*implies \[32, 64\]"):
        read_gguf(path)


def test_other_pre_tokenizer_is_refused(tmp_path):
    path, _ = write(tmp_path, pre="llama-bpe")
    with pytest.raises(ValueError, match="tokenizer.ggml.pre is 'llama-bpe'"):
        read_gguf_tokenizer(path)


def test_merges_out_of_rank_order_are_refused(tmp_path):
    path, _ = write(tmp_path, merges_reversed=True)
    with pytest.raises(ValueError, match=r"merge 1 \(.* out of id order"):
        read_gguf_tokenizer(path)


# -- the real model -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_path():

    return demo_model_or_skip()


@pytest.mark.slow
def test_real_tokenizer_reproduces_reference_ids(demo_path):
    reference = json.loads(shared_path("real-model", "reference.json").read_text(encoding="utf-8"))
    tok = read_gguf_tokenizer(demo_path)
    for name, chat in reference["chats"].items():
        assert tok.encode(chat["prompt_text"], allowed_special="all") == chat["prompt_ids"], name
    for name, passage in reference["passages"].items():
        assert tok.encode(passage["passage_text"]) == passage["ids"], name
    assert tok.mergeable_ranks == load_tiktoken_bpe(shared_path("qwen-7b", "qwen.tiktoken"))
    assert len(tok.mergeable_ranks) == 151_643
    assert tok.special_tokens["<|endoftext|>"] == 151643 and tok.special_tokens["<|im_end|>"] == 151645
    assert tok.special_tokens["<tool_call>"] == 151657 and tok.special_tokens["<|file_sep|>"] == 151664
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643 and len(tok) == 151936


@pytest.mark.slow
def test_real_tokenizer_agrees_with_qwen_v1_golden_cases(demo_path):
    # The regular vocabulary and the first three specials are Qwen-7B's, so its golden encodings hold.
    tok = read_gguf_tokenizer(demo_path)
    cases = [json.loads(line) for line in shared_path("fixtures", "tokenizer", "cases.jsonl").open(encoding="utf-8")]
    checked = 0
    for case in cases:
        if case["kind"] != "encode" or case["mode"] != "default" or "ids" not in case or "<|extra_" in case["text"]:
            continue
        assert tok.encode(case["text"]) == case["ids"], case["id"]
        checked += 1
    assert checked > 50


@pytest.mark.slow
def test_real_read_gguf(demo_path):
    ckpt = read_gguf(demo_path, progress_bar=False)
    c = ckpt.config
    assert ckpt.general_name == "Qwen2.5 Coder 0.5B Instruct AWQ"
    expected = {
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768, "tie_word_embeddings": False, "eos_token_id": 151645,
    }  # fmt: skip
    assert {k: c[k] for k in expected} == expected
    assert len(ckpt.tensors) == 291
    assert ckpt.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (128, 896)
    assert ckpt.tensors["model.layers.23.mlp.down_proj.weight"].shape == (896, 4864)
    # output.weight (Q8_0) is numerically the tied embedding (Q5_0)
    diff = (ckpt.tensors["lm_head.weight"] - ckpt.tensors["model.embed_tokens.weight"]).abs().max()
    assert diff < 0.02
    assert "You are Qwen, created by Alibaba Cloud" in ckpt.chat_template
    QwenConfig.from_dict(c)
