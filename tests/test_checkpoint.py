"""Loading checkpoint folders, and every kind of broken checkpoint named in a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenlm import QwenForCausalLM
from qwenlm.checkpoint import CheckpointError, load_tokenizer, resolve_dtype
from tests.builders import random_model, tiny_checkpoint, tiny_config, write_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def _logits(model, ids=None):
    ids = torch.tensor([[1, 2, 3, 151643, 5]]) if ids is None else ids
    with torch.no_grad():
        return model(ids).logits


def test_sharded_single_and_bin_load_identically(tmp_path, ckpt):
    model = random_model(tiny_config())
    sharded = write_checkpoint(model, tmp_path / "sharded", shards=3)
    assert len(list(sharded.glob("model-*.safetensors"))) == 3
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((sharded / "config.json").read_text())
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    expected = _logits(model)
    for folder in (sharded, bin_dir):
        loaded = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu")
        torch.testing.assert_close(_logits(loaded), expected, atol=0, rtol=0)


def test_loaded_weights_are_real_not_meta(ckpt):
    model = QwenForCausalLM.from_pretrained(ckpt, dtype="float32", device="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not model.training
    assert model.generation_config.max_new_tokens == 16


def test_bfloat16_load(ckpt):
    model = QwenForCausalLM.from_pretrained(ckpt, dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16
    ref = QwenForCausalLM.from_pretrained(ckpt, dtype="float32", device="cpu")
    a, b = _logits(model).float(), _logits(ref)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.5
    assert (a - b).abs().max() < 2.0


def test_auto_dtype_is_fp32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="float8"):
        resolve_dtype("float8", torch.device("cpu"))


def test_missing_config_names_file_and_folder(tmp_path, ckpt):
    folder = tmp_path / "noconf"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"config\.json.*noconf"):
        QwenForCausalLM.from_pretrained(folder)


def test_missing_tokenizer_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"qwen\.tiktoken"):
        load_tokenizer(tmp_path)


def test_missing_shard_is_named(tmp_path):
    folder = write_checkpoint(random_model(tiny_config()), tmp_path / "m", shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        QwenForCausalLM.from_pretrained(folder)


def test_truncated_shard_is_named(tmp_path):
    folder = write_checkpoint(random_model(tiny_config()), tmp_path / "m", shards=2)
    shard = folder / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        QwenForCausalLM.from_pretrained(folder)


def test_corrupt_bin_is_named(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    tiny_config().save(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        QwenForCausalLM.from_pretrained(folder)


def test_shape_mismatch_lists_tensors(tmp_path, ckpt):
    folder = tmp_path / "wrong"
    folder.mkdir()
    config = json.loads((ckpt / "config.json").read_text())
    config["hidden_size"] = 48  # weights were made for 32
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError) as err:
        QwenForCausalLM.from_pretrained(folder)
    assert "transformer.wte.weight: checkpoint (151936, 32), config expects (151936, 48)" in str(err.value)


@pytest.mark.parametrize("change", ["drop", "extra"])
def test_missing_or_unexpected_tensors_are_errors(tmp_path, ckpt, change):
    state = load_file(str(ckpt / "model.safetensors"))
    if change == "drop":
        del state["transformer.h.1.mlp.w1.weight"]
    else:
        state["transformer.h.9.attn.c_attn.weight"] = torch.zeros(2, 2)
    folder = tmp_path / change
    folder.mkdir()
    (folder / "config.json").write_text((ckpt / "config.json").read_text())
    save_file(state, str(folder / "model.safetensors"))
    expected = "missing tensor(s): transformer.h.1.mlp.w1.weight" if change == "drop" else "unexpected tensor(s)"
    with pytest.raises(CheckpointError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        QwenForCausalLM.from_pretrained(folder)


def test_no_weights_at_all(tmp_path):
    tiny_config().save(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights"):
        QwenForCausalLM.from_pretrained(tmp_path)


def test_invalid_config_value_is_named(tmp_path):
    tiny_config().save(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["rotary_pct"] = 1.5
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"rotary_pct = 1\.5"):
        QwenForCausalLM.from_pretrained(tmp_path)


def test_ntk_logn_overrides(ckpt):
    model = QwenForCausalLM.from_pretrained(ckpt, dtype="float32", device="cpu", ntk=False, logn=False)
    assert repr(model.transformer.ntk) == "PlainRoPE()" and repr(model.transformer.logn) == "NoLogN()"


def test_loading_a_model_does_not_import_dynamo(ckpt):
    # the model is built on the meta device; PyTorch's normal_ there imported dynamo, 1.5-2 s of every load
    import subprocess
    import sys

    code = ("import sys; from qwenlm.checkpoint import load_model; "
            f"load_model({str(ckpt)!r}, dtype='float32', device='cpu'); "
            "sys.exit(7 if 'torch._dynamo' in sys.modules else 0)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:] or "torch._dynamo was imported"
