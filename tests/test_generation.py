"""Generation behaviour beyond the reference fixtures: validation, sampling, streaming, batching."""

from __future__ import annotations

import io

import pytest
import torch

from qwenlm import QwenForCausalLM, QwenTokenizer
from qwenlm.generation.processors import RepetitionPenalty, TopK, TopP
from qwenlm.generation.streamer import TextStreamer
from tests.shared import fixtures, shared_path


@pytest.fixture(scope="module")
def tiny() -> QwenForCausalLM:
    return QwenForCausalLM.from_pretrained(fixtures("model", "tiny"), dtype="float32", device="cpu")


PROMPT = torch.tensor([[5, 17, 300, 42, 7, 99]])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"temperature": -0.5}, "temperature must be >= 0, got -0.5"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
    ],
)
def test_bad_arguments_name_value_and_limit(tiny, kwargs, message):
    with pytest.raises(ValueError) as err:
        tiny.generate(PROMPT, **kwargs)
    assert message in str(err.value)


def test_unknown_argument(tiny):
    with pytest.raises(TypeError, match="top_q"):
        tiny.generate(PROMPT, top_q=0.5)


def test_ids_beyond_vocab(tiny):
    with pytest.raises(ValueError, match="token id 512 is outside the model's vocabulary 0..511"):
        tiny(torch.tensor([[1, 512]]))


def test_prompt_longer_than_context(tiny):
    too_long = torch.zeros(1, tiny.config.max_position_embeddings, dtype=torch.long)
    with pytest.raises(ValueError, match="512 tokens but the model attends to at most 512"):
        tiny.generate(too_long, max_new_tokens=1)


def test_defaults_come_from_generation_config(tiny):
    # the fixture folder has no generation_config.json: greedy, no eos
    out = tiny.generate(PROMPT, max_new_tokens=5)
    assert out.shape == (1, 11)
    assert torch.equal(out, tiny.generate(PROMPT, max_new_tokens=5, do_sample=False))


def test_eos_stops_and_none_means_never(tiny):
    greedy = tiny.generate(PROMPT, max_new_tokens=10, eos_token_id=None)
    eos = int(greedy[0, PROMPT.shape[1] + 2])
    stopped = tiny.generate(PROMPT, max_new_tokens=10, eos_token_id=eos)
    assert stopped.shape[1] == PROMPT.shape[1] + 3 and stopped[0, -1] == eos
    assert tiny.generate(PROMPT, max_new_tokens=10, eos_token_id=None).shape[1] == PROMPT.shape[1] + 10


def test_finished_rows_are_padded(tiny):
    prompts = torch.tensor([[5, 17, 300, 42, 7, 99], [8, 8, 1, 2, 3, 4]])
    alone = tiny.generate(prompts[:1], max_new_tokens=8, eos_token_id=None)
    eos = int(alone[0, 6 + 1])
    out = tiny.generate(prompts, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    row = out[0, 6:].tolist()
    assert row[:2] == alone[0, 6:8].tolist() and row[1] == eos
    assert all(t == 0 for t in row[2:])


def test_sampling_is_reproducible_with_seed(tiny):
    a = tiny.generate(PROMPT, max_new_tokens=20, do_sample=True, top_p=0.9, temperature=1.2, seed=7)
    b = tiny.generate(PROMPT, max_new_tokens=20, do_sample=True, top_p=0.9, temperature=1.2, seed=7)
    c = tiny.generate(PROMPT, max_new_tokens=20, do_sample=True, top_p=0.9, temperature=1.2, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_zero_temperature_sampling_is_greedy(tiny):
    greedy = tiny.generate(PROMPT, max_new_tokens=10, do_sample=False)
    assert torch.equal(tiny.generate(PROMPT, max_new_tokens=10, do_sample=True, temperature=0.0), greedy)


def test_top_k_one_is_greedy(tiny):
    greedy = tiny.generate(PROMPT, max_new_tokens=10, do_sample=False)
    assert torch.equal(tiny.generate(PROMPT, max_new_tokens=10, do_sample=True, top_k=1, seed=3), greedy)


def test_top_p_keeps_smallest_nucleus():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = TopP(0.8)(None, scores.clone()).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert TopP(0.01)(None, scores.clone()).isfinite().sum() == 1


def test_top_k_and_repetition_penalty():
    scores = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    assert TopK(2)(None, scores.clone()).isfinite().tolist() == [[False, True, True, False]]
    out = RepetitionPenalty(2.0)(torch.tensor([[1, 3, 3]]), scores.clone())
    assert out.tolist() == [[1.0, 1.5, 2.0, -2.0]]


def test_stream_generate_yields_same_tokens(tiny):
    steps = list(tiny.stream_generate(PROMPT, max_new_tokens=12, eos_token_id=None))
    assert len(steps) == 12
    full = tiny.generate(PROMPT, max_new_tokens=12, eos_token_id=None)
    assert torch.equal(torch.stack(steps, dim=1), full[:, PROMPT.shape[1] :])


def test_batched_left_padding_equals_each_row_alone(tiny):
    # `tiny` has neither NTK nor LogN: rotary is relative, so padding shifts nothing.
    rows = [[5, 17, 300, 42, 7, 99, 3, 3, 9], [8, 1, 2], [400, 401, 7, 7, 7, 1]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    batched = tiny.generate(ids, mask, max_new_tokens=15, eos_token_id=None, pad_token_id=0)
    for i, r in enumerate(rows):
        alone = tiny.generate(torch.tensor([r]), max_new_tokens=15, eos_token_id=None)
        assert batched[i, width:].tolist() == alone[0, len(r) :].tolist()


def test_kv_cache_does_not_recompute_prefix(tiny, monkeypatch):
    seen: list[int] = []
    original = tiny.transformer.forward

    def counting(input_ids, *args, **kwargs):
        seen.append(input_ids.shape[1])
        return original(input_ids, *args, **kwargs)

    monkeypatch.setattr(tiny.transformer, "forward", counting)
    tiny.generate(PROMPT, max_new_tokens=6, eos_token_id=None)
    assert seen == [PROMPT.shape[1]] + [1] * 5


def test_chunked_cached_prefill_equals_one_shot(tiny):
    ids = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = tiny(ids).logits
        cache = tiny.new_cache()
        parts = [tiny(ids[:, i : i + 10], past_key_values=cache).logits for i in range(0, 30, 10)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


def test_text_streamer_never_splits_a_character():
    tok = QwenTokenizer.from_pretrained(shared_path("qwen-7b"))
    text = "naïve 👨‍👩‍👧 长城 ok"
    ids = tok.encode(text)
    out = io.StringIO()
    streamer = TextStreamer(tok, out)
    pieces = []
    for i in ids:
        before = out.getvalue()
        streamer.put(torch.tensor([i]))
        pieces.append(out.getvalue()[len(before) :])
    streamer.end()
    assert out.getvalue() == text
    assert all("\ufffd" not in p for p in pieces)
