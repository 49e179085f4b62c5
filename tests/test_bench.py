"""qwenlm.bench's measurement helpers (the timed runs themselves: test_cli's bench tests)."""

import math

import pytest

from qwenlm.bench import read_bandwidth_gb_s


def test_read_bandwidth_is_a_positive_rate():
    gb_s = read_bandwidth_gb_s(gib=1 / 64, runs=2)
    assert math.isfinite(gb_s) and gb_s > 0


@pytest.mark.parametrize("kwargs", [{"gib": 0}, {"gib": -1}, {"runs": 0}])
def test_read_bandwidth_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError, match="gib must be > 0 and runs >= 1"):
        read_bandwidth_gb_s(**kwargs)
