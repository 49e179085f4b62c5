"""GGUF -> HF safetensors folders, in the Qwen2 and Qwen v1 layouts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qwenlm.config import QwenConfig
from qwenlm.convert import convert
from qwenlm.gguf import read_gguf
from qwenlm.hf_tokenizer import load_hf_tokenizer
from qwenlm.tokenizer import QwenTokenizer, load_tiktoken_bpe
from tests.shared import demo_model_or_skip, shared_path
from tests.tiny_gguf import TinySpec, write_tiny_gguf


def load_folder(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors folder."""
    index = folder / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    tensors = {}
    for name in sorted(files):
        tensors.update(load_file(folder / name))
    return tensors


@pytest.fixture(scope="module")
def gqa_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "gqa.gguf"
    write_tiny_gguf(path, TinySpec(kv_heads=2))
    return path


@pytest.fixture(scope="module")
def mha_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "mha.gguf"
    write_tiny_gguf(path, TinySpec(kv_heads=4, seed=1))
    return path


def test_qwen2_layout_holds_the_dequantized_tensors(gqa_gguf, tmp_path):
    out = convert(gqa_gguf, tmp_path / "hf", progress_bar=False)
    ckpt = read_gguf(gqa_gguf, progress_bar=False)
    tensors = load_folder(out)
    assert tensors.keys() == ckpt.tensors.keys()
    for name, values in ckpt.tensors.items():
        assert torch.equal(tensors[name], values), name
    config = json.loads((out / "config.json").read_text())
    assert config == {**ckpt.config, "torch_dtype": "float32"}
    assert QwenConfig.from_json(out).n_kv_heads == 2
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 300, "eos_token_id": [302, 300], "pad_token_id": 300}
    tok = load_hf_tokenizer(out)
    assert tok.mergeable_ranks == ckpt.tokenizer.mergeable_ranks and tok.eos_token_id == 302
    assert tok.special_tokens == ckpt.tokenizer.special_tokens
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == ckpt.chat_template


def test_bf16_and_sharding(gqa_gguf, tmp_path):
    out = convert(gqa_gguf, tmp_path / "hf", dtype=torch.bfloat16, max_shard_bytes=20_000, progress_bar=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards) and not (out / "model.safetensors").exists()
    ckpt = read_gguf(gqa_gguf, progress_bar=False)
    tensors = load_folder(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
    for name, values in ckpt.tensors.items():
        assert tensors[name].dtype == torch.bfloat16 and torch.equal(tensors[name], values.to(torch.bfloat16))
    for shard in shards:  # a shard only overflows the limit when one tensor alone is larger
        sizes = [t.numel() * 2 for t in load_file(out / shard).values()]
        assert sum(sizes) <= 20_000 or len(sizes) == 1
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_qwen_layout_from_qwen2(mha_gguf, tmp_path):
    out = convert(mha_gguf, tmp_path / "v1", layout="qwen", progress_bar=False)
    ckpt = read_gguf(mha_gguf, progress_bar=False)
    t, tensors = ckpt.tensors, load_folder(out)
    for i in range(2):
        hf, v1 = f"model.layers.{i}.", f"transformer.h.{i}."
        qkv = [t[hf + f"self_attn.{p}_proj.weight"] for p in "qkv"]
        assert torch.equal(tensors[v1 + "attn.c_attn.weight"], torch.cat(qkv))
        assert torch.equal(
            tensors[v1 + "attn.c_attn.bias"], torch.cat([t[hf + f"self_attn.{p}_proj.bias"] for p in "qkv"])
        )
        assert torch.equal(tensors[v1 + "mlp.w2.weight"], t[hf + "mlp.gate_proj.weight"])
        assert torch.equal(tensors[v1 + "mlp.w1.weight"], t[hf + "mlp.up_proj.weight"])
        assert torch.equal(tensors[v1 + "mlp.c_proj.weight"], t[hf + "mlp.down_proj.weight"])
        assert torch.equal(tensors[v1 + "attn.c_proj.weight"], t[hf + "self_attn.o_proj.weight"])
        assert torch.equal(tensors[v1 + "ln_1.weight"], t[hf + "input_layernorm.weight"])
        assert torch.equal(tensors[v1 + "ln_2.weight"], t[hf + "post_attention_layernorm.weight"])
    assert torch.equal(tensors["transformer.wte.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(tensors["transformer.ln_f.weight"], t["model.norm.weight"])
    assert torch.equal(tensors["lm_head.weight"], t["lm_head.weight"])
    assert len(tensors) == 3 + 2 * 8

    config = QwenConfig.from_json(out)
    assert config.model_type == "qwen" and config.intermediate_size == 2 * 96 and config.mlp_width == 96
    assert config.kv_channels == 16 and config.rotary_emb_base == 1e6 and config.layer_norm_epsilon == 1e-6
    assert not config.use_dynamic_ntk and not config.use_logn_attn and config.seq_length == 256
    tok = QwenTokenizer.from_pretrained(out)  # reads the qwen.tiktoken file
    assert tok.mergeable_ranks == ckpt.tokenizer.mergeable_ranks
    assert load_tiktoken_bpe(out / "qwen.tiktoken") == ckpt.tokenizer.mergeable_ranks
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["chat_format"] == "chatml" and generation["eos_token_id"] == 300


def test_tied_qwen2_gets_its_own_lm_head_in_v1(tmp_path):
    path = tmp_path / "tied.gguf"
    write_tiny_gguf(path, TinySpec(kv_heads=4, tied=True))
    tensors = load_folder(convert(path, tmp_path / "v1", layout="qwen", progress_bar=False))
    assert torch.equal(tensors["lm_head.weight"], tensors["transformer.wte.weight"])
    assert json.loads((tmp_path / "v1" / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" not in load_folder(convert(path, tmp_path / "hf", progress_bar=False))


def test_v1_gguf_round_trips_through_both_layouts(tmp_path):
    path = tmp_path / "v1.gguf"
    write_tiny_gguf(path, TinySpec(arch="qwen", kv_heads=4))
    ckpt = read_gguf(path, progress_bar=False)
    as_v1 = load_folder(convert(path, tmp_path / "v1", layout="qwen", progress_bar=False))
    assert as_v1.keys() == ckpt.tensors.keys()
    assert all(torch.equal(as_v1[k], v) for k, v in ckpt.tensors.items())
    hf_dir = convert(path, tmp_path / "hf", layout="qwen2", progress_bar=False)
    as_hf = load_folder(hf_dir)
    c_attn = ckpt.tensors["transformer.h.1.attn.c_attn.weight"]
    assert torch.equal(as_hf["model.layers.1.self_attn.k_proj.weight"], c_attn[64:128])
    assert torch.equal(as_hf["model.layers.1.mlp.gate_proj.weight"], ckpt.tensors["transformer.h.1.mlp.w2.weight"])
    config = QwenConfig.from_json(hf_dir)
    assert config.is_qwen2 and config.intermediate_size == 96 and config.n_kv_heads == 4


def test_gqa_cannot_become_qwen_v1(gqa_gguf, tmp_path):
    with pytest.raises(ValueError, match="4 query heads but 2 key/value heads"):
        convert(gqa_gguf, tmp_path / "v1", layout="qwen", progress_bar=False)


def test_refuses_unknown_layout_and_non_empty_destination(gqa_gguf, tmp_path):
    with pytest.raises(ValueError, match="layout must be one of 'qwen2', 'qwen', got 'llama'"):
        convert(gqa_gguf, tmp_path / "x", layout="llama")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        convert(gqa_gguf, tmp_path / "full")


# -- transformers as the judge ------------------------------------------------------------------------
def test_transformers_loads_the_qwen2_folder(gqa_gguf, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = convert(gqa_gguf, tmp_path / "hf", progress_bar=False)
    loaded = transformers.Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ckpt = read_gguf(gqa_gguf, progress_bar=False)
    config = transformers.Qwen2Config(**{k: v for k, v in ckpt.config.items() if k != "torch_dtype"})
    direct = transformers.Qwen2ForCausalLM(config).eval()
    missing, unexpected = direct.load_state_dict(ckpt.tensors, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    ids = torch.tensor([ckpt.tokenizer.encode("<|im_start|>user\nHello, world!<|im_end|>")])
    with torch.no_grad():
        a, b = loaded(ids).logits, direct(ids).logits
    assert a.shape == (1, ids.shape[1], ckpt.config["vocab_size"])
    assert torch.equal(a, b)
    assert torch.equal(loaded.lm_head.weight, ckpt.tensors["lm_head.weight"])  # untied, as stored
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok("Hello, world!")["input_ids"] == ckpt.tokenizer.encode("Hello, world!")


@pytest.mark.slow
def test_real_model_converts_and_matches_reference_logits(tmp_path):
    """End to end: demo GGUF -> HF folder -> transformers fp32 reproduces reference.json's hf_fp32 logits."""
    transformers = pytest.importorskip("transformers")

    path = demo_model_or_skip()
    reference = json.loads(shared_path("real-model", "reference.json").read_text(encoding="utf-8"))
    out = convert(path, tmp_path / "hf", progress_bar=False)
    assert (out / "model.safetensors.index.json").is_file()  # 2.5 GB of fp32 is sharded
    model = transformers.Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    passage = reference["passages"]["prompt_8pos"]
    with torch.no_grad():
        logits = model(torch.tensor([passage["ids"]])).logits[0]
    expected_ids = torch.tensor(passage["hf_fp32"]["top5_ids"])
    expected = torch.tensor(passage["hf_fp32"]["top5_logits"])
    got = logits.gather(1, expected_ids)
    assert (got - expected).abs().max() < 1e-2
    assert torch.equal(logits.argmax(-1), expected_ids[:, 0])


def test_folder_converts_between_layouts(tmp_path):
    from qwenlm import QwenForCausalLM
    from qwenlm.checkpoint import load_tokenizer
    from tests.builders import tiny_checkpoint

    v1 = tiny_checkpoint(tmp_path / "v1")
    qwen2 = convert(v1, tmp_path / "qwen2", layout="qwen2", progress_bar=False)
    back = convert(qwen2, tmp_path / "back", layout="qwen", progress_bar=False)
    ids = torch.tensor([[9707, 11, 1879, 0, 151643, 5]])  # shorter than seq_length: NTK/LogN play no part
    with torch.no_grad():
        logits = [QwenForCausalLM.from_pretrained(f, device="cpu")(ids).logits for f in (v1, qwen2, back)]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[2], logits[0], atol=1e-5, rtol=1e-5)
    assert load_tokenizer(qwen2).encode("Hello, world") == load_tokenizer(v1).encode("Hello, world")
