"""Long context: position policies on and off (v1 and Qwen2 layouts), window attention against a naive
masked softmax, and chunked prefill against one-shot prefill."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from qwenlm import QwenForCausalLM
from qwenlm.attention import AttentionMask, windowed_attention
from qwenlm.checkpoint import load_tokenizer
from qwenlm.convert import v1_to_qwen2
from qwenlm.eval.perplexity import read_documents
from qwenlm.generation.prefill import prefill, prefill_chunks
from qwenlm.longctx import DynamicNTK, PlainRoPE, WindowSchedule, ntk_alpha
from qwenlm.rope import apply_rotary
from tests.shared import demo_model_or_skip, fixtures, shared_path

ATOL = RTOL = 1e-4


def load(variant: str, **kwargs) -> QwenForCausalLM:
    return QwenForCausalLM.from_pretrained(fixtures("model", variant), dtype="float32", device="cpu", **kwargs)


def reference(variant: str) -> dict[str, torch.Tensor]:
    return load_file(str(fixtures("model", variant, "cases.safetensors")))


@pytest.fixture(scope="module")
def tiny_long() -> QwenForCausalLM:
    return load("tiny-long")


# -- window schedules -------------------------------------------------------------------------------


def test_default_schedule_follows_the_qwen_example():
    s = WindowSchedule.default(32, 8192)  # Qwen-7B: 2048 x4, 4096 x4, 8192 x4, then doubling
    assert s.windows[:12] == (2048,) * 4 + (4096,) * 4 + (8192,) * 4
    assert s.windows[-1] == 2048 * 2**7
    assert WindowSchedule.parse("default", 32, 8192) == s


@pytest.mark.parametrize(
    "spec,windows",
    [
        ("2kx4,4kx4,8k", (2048,) * 4 + (4096,) * 4 + (8192,) * 2),
        ("8,64", (8, 64) + (64,) * 8),
        ("16x2,full", (16, 16) + (None,) * 8),
        ("100x10", (100,) * 10),
    ],
)
def test_schedule_spec(spec, windows):
    s = WindowSchedule.parse(spec, 10, 64)
    assert s.windows == windows
    assert WindowSchedule.parse(s.describe(), 10, 64) == s


@pytest.mark.parametrize(
    "spec,message",
    [
        ("2kx4,banana", "entry 'banana' is not W or WxN"),
        ("8x20", "covers 20 layers but the model has 10"),
        ("8x2,16x2", "covers 4 layers but the model has 10"),
        ("0", "a window of 0 tokens"),
    ],
)
def test_bad_schedule_names_the_value(spec, message):
    with pytest.raises(ValueError, match=message):
        WindowSchedule.parse(spec, 10, 64)


def test_window_caps_the_ntk_alpha():
    ntk = DynamicNTK(32)
    assert ntk.within([7.0, 1.0], 64) == [3.0, 1.0]  # a 64-token window needs alpha 3, not the call's 7
    assert ntk.within([7.0], 16) == [1.0]
    assert PlainRoPE().within([1.0], 16) == [1.0]
    assert [ntk_alpha(n, 32) for n in (32, 33, 64, 65, 128, 129)] == [1, 3, 3, 7, 7, 15]


# -- policies on and off match the reference cases ----------------------------------------------------


def test_switching_policies_on_reproduces_the_ntk_fixture():
    on = load("tiny", ntk=True, logn=True)  # tiny and tiny-long have the same weights
    t = reference("tiny-long")
    with torch.no_grad():
        torch.testing.assert_close(on(t["forward_long.input_ids"]).logits, t["forward_long.logits"],
                                   atol=ATOL, rtol=RTOL)  # fmt: skip


def test_switching_policies_off_reproduces_the_plain_fixture():
    off = load("tiny-long", ntk=False, logn=False)
    t = reference("tiny")
    with torch.no_grad():
        torch.testing.assert_close(off(t["forward_long.input_ids"]).logits, t["forward_long.logits"],
                                   atol=ATOL, rtol=RTOL)  # fmt: skip
    assert repr(off.transformer.ntk) == "PlainRoPE()" and repr(off.transformer.logn) == "NoLogN()"


def test_each_policy_alone_changes_the_logits(tiny_long):
    ids = reference("tiny-long")["forward_long.input_ids"]
    model = load("tiny-long")
    with torch.no_grad():
        both = model(ids).logits
        model.transformer.set_long_context(ntk=False)
        logn_only = model(ids).logits
        model.transformer.set_long_context(ntk=True, logn=False)
        ntk_only = model(ids).logits
        model.transformer.set_long_context(ntk=False)
        plain = model(ids).logits
    t_plain = reference("tiny")["forward_long.logits"]
    torch.testing.assert_close(plain, t_plain, atol=ATOL, rtol=RTOL)
    for a, b in [(both, logn_only), (both, ntk_only), (plain, logn_only), (plain, ntk_only)]:
        assert (a - b).abs().max() > 1.0
    assert model.config.use_dynamic_ntk is False and model.config.use_logn_attn is False


def qwen2_folder(tmp_path, variant: str):
    """The fixture's weights in the HF Qwen2 layout (separate q/k/v, gate/up/down), no NTK/LogN keys."""
    v1 = json.loads(fixtures("model", variant, "config.json").read_text())
    w = load_file(str(fixtures("model", variant, "model.safetensors")))
    out, config = v1_to_qwen2(w, v1)  # the production mapping (Qwen v1 -> Qwen2), as `convert` uses it
    config["max_position_embeddings"] = v1["seq_length"]  # Qwen2's training length is this key
    folder = tmp_path / f"{variant}-qwen2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "model.safetensors"))
    return folder


def test_qwen2_layout_takes_the_policies_too(tmp_path):
    folder = qwen2_folder(tmp_path, "tiny")
    plain = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu")
    assert plain.config.seq_length == 32  # Qwen2: the training length is max_position_embeddings
    assert repr(plain.transformer.ntk) == "PlainRoPE()"  # off by default in the Qwen2 family
    on = QwenForCausalLM.from_pretrained(folder, dtype="float32", device="cpu", ntk=True, logn=True)
    assert repr(on.transformer.ntk) == "DynamicNTK(seq_length=32)"
    t_plain, t_long = reference("tiny"), reference("tiny-long")
    ids = t_long["forward_long.input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, t_plain["forward_long.logits"], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(on(ids).logits, t_long["forward_long.logits"], atol=ATOL, rtol=RTOL)
        # and the reference's cached decoding (prefill above S: alpha 3 kept while decoding)
        dec = t_long["decode_P60.input_ids"]
        out = on(dec[:, :60], use_cache=True)
        torch.testing.assert_close(out.logits[:, -1], t_long["decode_P60.prefill_last_logits"], atol=ATOL, rtol=RTOL)
        for step in range(5):
            out = on(dec[:, 60 + step : 61 + step], past_key_values=out.past_key_values, use_cache=True)
            torch.testing.assert_close(out.logits[:, -1], t_long["decode_P60.step_logits"][:, step],
                                       atol=ATOL, rtol=RTOL)  # fmt: skip


# -- window attention against a naive masked softmax -------------------------------------------------


def naive_attention(q, k, v, past: int, window: int | None, key_mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v with the whole (T, kv_len) score matrix. Hidden keys get the most
    negative float, as in the reference (a padding query then averages instead of making NaN)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    t, kv_len = q.shape[2], k.shape[2]
    q_pos = torch.arange(past, past + t)[:, None]
    k_pos = torch.arange(kv_len)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return scores.softmax(-1) @ v


@pytest.mark.parametrize(
    "t,past,window,block,heads,padded",
    [
        (40, 0, 7, 16, 4, False),  # prefill, blocks smaller and larger than the window
        (40, 0, 13, 5, 4, False),
        (40, 0, 1, 16, 4, False),  # each token sees only itself
        (12, 30, 9, 4, 4, False),  # a chunk after a cache
        (1, 57, 16, 512, 4, False),  # a decode step
        (40, 0, 7, 16, 2, False),  # grouped-query attention (2 kv heads for 4 query heads)
        (40, 0, 9, 8, 4, True),  # left padding
        (1, 39, 9, 8, 4, True),
    ],
)
def test_windowed_attention_equals_naive_softmax(t, past, window, block, heads, padded):
    g = torch.Generator().manual_seed(t + past + window)
    b, h, d = 2, 4, 8
    kv_len = past + t
    q = torch.randn(b, h, t, d, generator=g)
    k = torch.randn(b, heads, kv_len, d, generator=g)
    v = torch.randn(b, heads, kv_len, d, generator=g)
    key_mask = None
    if padded:
        key_mask = torch.ones(b, kv_len, dtype=torch.long)
        key_mask[1, :11] = 0  # row 1 starts at position 11
    mask = AttentionMask(key_mask, t, kv_len, q.dtype, q.device)
    got = windowed_attention(q, k, v, mask, window, gqa=heads != h, block=block)
    want = naive_attention(q, k, v, past, window, key_mask)
    if padded:  # only queries that are real tokens are meaningful
        real = key_mask[:, past:].bool()
        got, want = got.transpose(1, 2)[real], want.transpose(1, 2)[real]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def naive_model_logits(model: QwenForCausalLM, ids: torch.Tensor, key_mask: torch.Tensor | None = None):
    """The whole model written out with the naive attention: per-layer window and NTK alpha of
    min(length, window), LogN on absolute positions; tells the windowed model what it must compute."""
    c, tr = model.config, model.transformer
    b, t = ids.shape
    s = c.seq_length
    lengths = key_mask.sum(-1).tolist() if key_mask is not None and t > s else [t]
    h = tr.wte(ids)
    logn = torch.tensor([math.log(p + 1, s) if p + 1 > s else 1.0 for p in range(t)]) if c.use_logn_attn else None
    for i, block in enumerate(tr.h):
        window = tr.windows.window(i) if tr.windows else None
        span = [n if window is None else min(n, window) for n in lengths]
        alphas = [ntk_alpha(n, s) if c.use_dynamic_ntk else 1.0 for n in span]
        cos, sin = tr.rotary.cos_sin(0, t, alphas, h.device)
        a = block.attn
        x = block.ln_1(h)
        kv_size = a.n_kv_heads * a.head_dim
        q, k, v = a.c_attn(x).split((a.n_heads * a.head_dim, kv_size, kv_size), dim=-1)
        q = apply_rotary(q.view(b, t, a.n_heads, a.head_dim).transpose(1, 2), cos, sin)
        k = apply_rotary(k.view(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2)
        if logn is not None and t > s:
            q = q * logn.view(1, 1, t, 1)
        y = naive_attention(q, k, v, 0, window, key_mask)
        h = h + a.c_proj(y.transpose(1, 2).reshape(b, t, -1))
        h = h + block.mlp(block.ln_2(h))
    return model.lm_head(tr.ln_f(h))


@pytest.mark.parametrize("spec", ["8,64", "5x1,full", "default", "1000"])
@torch.no_grad()
def test_windowed_model_equals_naive_model(spec):
    model = load("tiny-long", window=spec)  # S = 32; "8,64" -> layer 1 gets alpha 3 for 100 tokens, not 7
    ids = reference("tiny-long")["forward_long.input_ids"]  # 100 tokens
    torch.testing.assert_close(model(ids).logits, naive_model_logits(model, ids), atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_windowed_model_with_padding_equals_naive_model():
    model = load("tiny-long", window="8,48")
    t = reference("tiny-long")
    ids, mask = t["padded.input_ids"], t["padded.attention_mask"]  # true lengths 10, 40, 90: alphas 1, 3, 7
    got, want = model(ids, attention_mask=mask).logits, naive_model_logits(model, ids, mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_a_window_longer_than_the_sequence_changes_nothing():
    t = reference("tiny-long")
    model = load("tiny-long", window="100x2")
    assert torch.equal(model(t["forward_long.input_ids"]).logits, load("tiny-long")(t["forward_long.input_ids"]).logits)


@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_windowed_decoding_equals_one_shot(padded):
    """tiny (no NTK, whose alpha would be fixed at prefill) with windows: cached steps = one call."""
    model = load("tiny", window="6,11")
    t = reference("tiny")
    ids = t["decode_padded.input_ids"]
    mask = t["decode_padded.attention_mask"] if padded else None
    full = model(ids, attention_mask=mask).logits
    prefill_len = 30
    out = model(ids[:, :prefill_len], attention_mask=None if mask is None else mask[:, :prefill_len], use_cache=True)
    steps = [out.logits[:, -1]]
    for pos in range(prefill_len, ids.shape[1]):
        step_mask = None if mask is None else mask[:, : pos + 1]
        out = model(ids[:, pos : pos + 1], attention_mask=step_mask, past_key_values=out.past_key_values)
        steps.append(out.logits[:, -1])
    got, want = torch.stack(steps, 1), full[:, prefill_len - 1 :]
    if mask is not None:  # logits of padding queries are not meaningful
        real = mask[:, prefill_len - 1 :].bool()
        got, want = got[real], want[real]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


# -- chunked prefill = one-shot prefill -------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 32, 64, 100])
@torch.no_grad()
def test_chunked_prefill_equals_one_shot_with_ntk_and_logn(tiny_long, chunk):
    ids = reference("tiny-long")["forward_long.input_ids"]  # 100 > 2 S: alpha 7 from the whole prompt
    want = reference("tiny-long")["forward_long.logits"]
    logits, cache = prefill(tiny_long, ids, chunk_size=chunk, all_logits=True)
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=RTOL)
    assert cache.ntk_alphas == [7.0] and len(cache) == 100
    last, _ = prefill(tiny_long, ids, chunk_size=chunk)
    torch.testing.assert_close(last[:, -1], want[:, -1], atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_chunked_prefill_then_decoding_follows_the_reference(tiny_long):
    t = reference("tiny-long")
    ids = t["decode_P60.input_ids"]
    last, cache = prefill(tiny_long, ids[:, :60], chunk_size=16)  # chunks of 16 alone would pick alpha 1
    torch.testing.assert_close(last[:, -1], t["decode_P60.prefill_last_logits"], atol=ATOL, rtol=RTOL)
    for step in range(40):
        logits = tiny_long(ids[:, 60 + step : 61 + step], past_key_values=cache).logits
        torch.testing.assert_close(logits[:, -1], t["decode_P60.step_logits"][:, step], atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_chunked_prefill_with_left_padding_keeps_per_row_alphas(tiny_long):
    t = reference("tiny-long")
    ids, mask = t["padded.input_ids"], t["padded.attention_mask"]
    logits, cache = prefill(tiny_long, ids, chunk_size=16, attention_mask=mask, all_logits=True)
    assert cache.ntk_alphas == [1.0, 3.0, 7.0]
    torch.testing.assert_close(logits[mask.bool()], t["padded.logits"][mask.bool()], atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_chunked_prefill_with_windows_equals_one_shot():
    model = load("tiny-long", window="8,48")
    ids = reference("tiny-long")["forward_long.input_ids"]
    logits, _ = prefill(model, ids, chunk_size=9, all_logits=True)
    torch.testing.assert_close(logits, model(ids).logits, atol=ATOL, rtol=RTOL)


def test_prefill_rejects_bad_arguments(tiny_long):
    ids = torch.zeros(1, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="chunk_size must be a positive number of tokens, got 0"):
        prefill(tiny_long, ids, chunk_size=0)
    with pytest.raises(ValueError, match="attention_mask covers 9 positions but the cached \\+ new tokens are 10"):
        prefill(tiny_long, ids, attention_mask=torch.ones(1, 9, dtype=torch.long))


@torch.no_grad()
def test_cached_chunk_sees_new_tokens_causally(tiny_long):
    """Our documented deviation: several new tokens fed with a cache attend causally among themselves
    (the reference lets them see each other), so each chunk's logits equal the one-shot ones."""
    ids = reference("tiny")["forward_short.input_ids"]
    model = load("tiny")
    full = model(ids).logits
    out = model(ids[:, :10], use_cache=True)
    rest = model(ids[:, 10:], past_key_values=out.past_key_values).logits
    torch.testing.assert_close(rest, full[:, 10:], atol=ATOL, rtol=RTOL)
    assert F.softmax(rest, -1).isfinite().all()


@pytest.mark.slow
@torch.no_grad()
def test_demo_model_chunked_prefill_with_all_policies():
    """The real Qwen2-family demo (GQA, tied embeddings), NTK + LogN measured against a 512-token training
    length and windows in the lower layers: chunked prefill equals one call."""

    path = demo_model_or_skip()
    model = QwenForCausalLM.from_pretrained(path, dtype="float32", device="cpu")
    model.config.seq_length = 512
    model.transformer.set_long_context(ntk=True, logn=True, window="256x4,1024x4,full")
    assert repr(model.transformer.ntk) == "DynamicNTK(seq_length=512)"
    text = read_documents([shared_path("eval-data", "longctx", "hott_book_chapters.jsonl.gz")])[0]
    ids = torch.tensor([load_tokenizer(path).encode_ordinary(text)[:1536]])  # alpha 7 for the whole prompt
    one_shot = model.transformer(ids)
    cache = model.new_cache(capacity=1536)
    chunked = torch.cat([h for _, h in prefill_chunks(model, ids, cache, chunk_size=500)], dim=1)
    assert cache.ntk_alphas == [7.0]
    torch.testing.assert_close(chunked, one_shot, atol=1e-3, rtol=1e-3)
