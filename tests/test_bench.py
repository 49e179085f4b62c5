"""qwenlm.bench's measurement helpers (the timed runs themselves: test_cli's bench tests)."""

import math

import pytest
import torch

from qwenlm.bench import read_bandwidth_gb_s, step_seconds
from tests.builders import random_model, tiny_config


def test_read_bandwidth_is_a_positive_rate():
    gb_s = read_bandwidth_gb_s(gib=1 / 64, runs=2)
    assert math.isfinite(gb_s) and gb_s > 0


@pytest.mark.parametrize("kwargs", [{"gib": 0}, {"gib": -1}, {"runs": 0}])
def test_read_bandwidth_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError, match="gib must be > 0 and runs >= 1"):
        read_bandwidth_gb_s(**kwargs)


def test_weight_bytes_count_the_saved_weights_not_the_kernel_layouts():
    # the bandwidth fraction of compare.py divides by these bytes: the kernels' layouts (buffers that are not
    # saved, e.g. PyTorch's packed int4 copy) are not read by a decoding step and must not count
    from qwenlm.bench import saved_weight_bytes
    from qwenlm.quant import quantize
    from tests.builders import random_model, tiny_config

    m = quantize(random_model(tiny_config(hidden_size=64, kv_channels=16), seed=1), 4)
    before = saved_weight_bytes(m)
    m.prepare_layers()
    assert saved_weight_bytes(m) == before == sum(t.numel() * t.element_size() for t in m.state_dict().values())
    embedding = m.transformer.wte.state_dict().values()  # int8 codes and their scales
    assert saved_weight_bytes(m, skip="wte") == before - sum(t.numel() * t.element_size() for t in embedding)


def test_step_seconds_times_one_token_steps_on_the_cache():
    model = random_model(tiny_config())
    with torch.inference_mode():
        cache = model.new_cache(16)
        model(torch.tensor([[1, 2, 3]]), past_key_values=cache)
        seconds = step_seconds(model, cache, 4)
    assert seconds > 0 and cache.seq_len == 3 + 4
