"""Perplexity by context length: the fixture losses, sample building, the report, the ``ppl`` command."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys

import pytest
import torch

from qwenlm import QwenForCausalLM, QwenTokenizer
from qwenlm.eval.perplexity import (
    Setting,
    evaluate,
    make_samples,
    parse_lengths,
    parse_settings,
    perplexity,
    read_documents,
)
from tests.builders import random_model, tiny_checkpoint, tiny_config
from tests.shared import fixtures, shared_path


def longctx(name: str = "hott_book_chapters.jsonl.gz"):
    return shared_path("eval-data", "longctx", name)


@pytest.mark.parametrize("variant", ["tiny", "tiny-long", "tiny-partial-rotary"])
@pytest.mark.parametrize("chunk", [16, 48])
def test_ppl_is_exp_of_the_reference_loss(variant, chunk):
    """The fixtures' loss case (2 x 48 tokens, NTK alpha 3 and LogN in the long variants): over that
    sample, our perplexity is exp(loss), also when prefilled in chunks of 16."""
    folder = fixtures("model", variant)
    model = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu")
    loss = next(c for c in json.loads((folder / "cases.json").read_text())["cases"] if c["name"] == "loss")
    from safetensors.torch import load_file

    ids = load_file(str(folder / "cases.safetensors"))["loss.input_ids"]
    assert perplexity(model, ids, chunk_size=chunk) == pytest.approx(math.exp(loss["loss_value"]), rel=1e-5)


def test_settings_and_lengths_parse():
    assert parse_settings("plain,ntk,ntk+logn,ntk+logn+window", "2kx4,8k") == [
        Setting(False, False),
        Setting(True, False),
        Setting(True, True),
        Setting(True, True, "2kx4,8k"),
    ]
    assert Setting.parse("logn+window").window == "default"
    assert Setting(True, True, "default").label == "+dynamic_ntk+logn+window_attn"
    assert parse_lengths("4096,1024,1024") == [1024, 4096]
    with pytest.raises(ValueError, match="unknown part 'yarn'"):
        parse_settings("ntk+yarn")
    with pytest.raises(ValueError, match="--lengths '1k' must be comma-separated token counts"):
        parse_lengths("1k")


def test_samples_concatenate_documents_with_end_of_text():
    docs = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    s = make_samples(docs, 4, budget=8, eod_id=0)
    assert s.tolist() == [[1, 2, 3, 0], [4, 5, 6, 7]]
    assert make_samples(docs, 3, budget=8, eod_id=0).tolist() == [[1, 2, 3], [0, 4, 5]]  # same budget: 8 // 3
    assert make_samples(docs, 3, budget=9, mode="document").tolist() == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(ValueError, match="fewer than one sample of 100"):
        make_samples(docs, 100, budget=100, eod_id=0)
    with pytest.raises(ValueError, match="no document has 5 tokens"):
        make_samples(docs, 5, budget=10, mode="document")


def test_read_documents(tmp_path):
    (tmp_path / "a.txt").write_text("plain text\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 2}) + "\n")
    assert read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl.gz"]) == ["plain text\n", "one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"title": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 1: expected a JSON object with a string 'text' field"):
        read_documents([tmp_path / "bad.jsonl"])
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        read_documents([tmp_path / "missing.txt"])


@pytest.fixture(scope="module")
def tokenizer() -> QwenTokenizer:
    return QwenTokenizer.from_pretrained(shared_path("qwen-7b", "qwen.tiktoken"))


@pytest.fixture(scope="module")
def qwen_vocab_model() -> QwenForCausalLM:
    return random_model(tiny_config(seq_length=64))  # 2 layers, full Qwen vocabulary, S = 64


@torch.no_grad()
def test_report_on_the_longctx_data(qwen_vocab_model, tokenizer, tmp_path):
    model = qwen_vocab_model
    docs = read_documents([longctx()])
    settings = parse_settings("plain,ntk,ntk+logn,ntk+logn+window", "16")
    report = evaluate(model, tokenizer, docs, [32, 64, 128], settings, samples=2, chunk_size=48,
                      model_name="tiny", data_names=["hott"], show_progress=False)  # fmt: skip
    by = {(r.setting, r.length): r for r in report.results}
    # up to S = 64 NTK and LogN do nothing: those rows reuse the plain computation
    for n in (32, 64):
        assert by[("+dynamic_ntk", n)].same_as == "plain" and by[("+dynamic_ntk+logn", n)].same_as == "plain"
        assert by[("+dynamic_ntk+logn", n)].ppl == by[("plain", n)].ppl
        assert by[("+dynamic_ntk+logn+window_attn", n)].same_as is None  # a 16-token window always matters
    assert len({by[(s.label, 128)].ppl for s in settings}) == 4
    # the same budget at every length (2 x 128 tokens): 8, 4, 2 samples
    assert [by[("plain", n)].samples for n in (32, 64, 128)] == [8, 4, 2]
    # each row is exp(mean loss) of a plain forward over its samples, policies set as in the setting
    stream = [t for d in docs[:1] for t in tokenizer.encode_ordinary(d)][:256]
    for setting, n in [(settings[0], 32), (settings[2], 128), (settings[3], 128)]:
        model.transformer.set_long_context(ntk=setting.ntk, logn=setting.logn, window=setting.window or "none")
        ids = torch.tensor(stream).view(-1, n)
        assert by[(setting.label, n)].ppl == pytest.approx(math.exp(model(ids, labels=ids).loss.item()), rel=1e-5)
    model.transformer.set_long_context(ntk=True, logn=True, window="none")
    table = report.markdown().splitlines()
    assert table[0] == "| model | 32 | 64 | 128 |" and table[1] == "|---|---|---|---|"
    assert table[2].startswith("| tiny | ") and table[5].startswith("| tiny + dynamic_ntk + logn + window_attn | ")
    saved = json.loads(json.dumps(report.to_json()))
    assert saved["results"][0]["setting"] == "plain"
    assert (saved["dtype"], saved["kv_dtype"], saved["linear_weights"]) == ("float32", "float32", ["float"])
    pytest.importorskip("matplotlib")
    report.plot(tmp_path / "ppl.png")
    assert (tmp_path / "ppl.png").read_bytes()[:4] == b"\x89PNG"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwenlm", *args], capture_output=True, text=True, timeout=300)


def test_ppl_command(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny")
    data = str(longctx())
    r = run("ppl", "--model", str(ckpt), "--data", data, "--lengths", "32,64,128", "--settings",
            "plain,ntk+logn+window", "--window", "16x1,full", "--json", str(tmp_path / "out.json"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "| model | 32 | 64 | 128 |"
    assert lines[3].startswith("| tiny + dynamic_ntk + logn + window_attn |")
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["settings"][1]["window"] == "16x1,full" and out["seq_length"] == 64
    assert {r["length"] for r in out["results"]} == {32, 64, 128}


def test_ppl_command_errors_name_the_value(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny")
    r = run("ppl", "--model", str(ckpt), "--data", str(longctx()), "--settings", "ntk+yarn")
    assert r.returncode == 2 and "unknown part 'yarn'" in r.stderr
    r = run("ppl", "--model", str(ckpt), "--data", str(longctx()), "--window", "8x9")
    assert r.returncode == 2 and "covers 9 layers but the model has 2" in r.stderr


def test_model_flags_reach_the_policies(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny")  # config: NTK and LogN on
    r = run("info", "--model", str(ckpt), "--json", "--no-ntk", "--window", "8,16")
    assert r.returncode == 0, r.stderr
    policies = json.loads(r.stdout)["position_policies"]
    assert policies == ["PlainRoPE()", "LogNScaling(seq_length=64)", "WindowSchedule(8x1,16x1)"]
    r = run("info", "--model", str(ckpt), "--json", "--no-logn")
    assert json.loads(r.stdout)["position_policies"] == ["DynamicNTK(seq_length=64)", "NoLogN()", "None"]
