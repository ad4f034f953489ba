"""The intervals over seeds, against computations done by hand."""

from __future__ import annotations

import math

import pytest

from mixturelm.stats import describe, mean_interval, paired_difference, t_quantile

# Student's t quantiles in closed form: nu = 1 is the Cauchy, tan(pi (p - 1/2)); nu = 2 is (2p - 1) / sqrt(2p(1 - p))
T_975_1 = 12.706204736174707  # tan(0.475 pi)
T_975_2 = 4.302652729749464  # 0.95 / sqrt(0.04875)


def test_t_quantiles_are_the_closed_forms():
    assert t_quantile(0.95, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-12)
    assert t_quantile(0.95, 1) == pytest.approx(T_975_1, rel=1e-12)
    assert t_quantile(0.95, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-12)
    assert t_quantile(0.95, 2) == pytest.approx(T_975_2, rel=1e-12)


def test_mean_interval_of_three_seeds_by_hand():
    # 1.80, 1.83, 1.79: mean 1.80666..., deviations -0.02/3, +0.07/3, -0.05/3,
    # squares summed (0.0004 + 0.0049 + 0.0025) / 9 = 0.0078 / 9, s^2 = that / 2 = 0.00043333...
    iv = mean_interval([1.80, 1.83, 1.79])
    s = math.sqrt(0.0078 / 9 / 2)
    half = T_975_2 * s / math.sqrt(3)
    assert half == pytest.approx(0.05171145, abs=1e-8)
    assert iv.n == 3 and iv.mean == pytest.approx(5.42 / 3, abs=1e-12)
    assert (iv.low, iv.high) == pytest.approx((5.42 / 3 - half, 5.42 / 3 + half), abs=1e-12)
    assert iv.half_width == pytest.approx(half, abs=1e-12)
    assert iv.resolved  # far from 0


def test_mean_interval_of_two_seeds_by_hand():
    # 0.5 and -0.1: mean 0.2, s = 0.6 / sqrt(2), half-width t_{.975,1} * s / sqrt(2) = 12.7062 * 0.3
    iv = mean_interval([0.5, -0.1])
    assert iv.mean == pytest.approx(0.2, abs=1e-12)
    assert iv.half_width == pytest.approx(T_975_1 * 0.3, rel=1e-12)
    assert not iv.resolved  # [-3.61, 4.01] holds 0


def test_paired_difference_by_hand_resolves_what_unpaired_intervals_do_not():
    arch, dense = [1.78, 1.80, 1.75], [1.80, 1.83, 1.79]
    d = paired_difference(arch, dense)
    # d = -0.02, -0.03, -0.04: mean -0.03, s = 0.01, half-width 4.3027 * 0.01 / sqrt(3) = 0.024841
    assert d.mean == pytest.approx(-0.03, abs=1e-12)
    assert d.half_width == pytest.approx(T_975_2 * 0.01 / math.sqrt(3), rel=1e-9)
    assert d.high == pytest.approx(-0.03 + 0.0248414, abs=1e-7) and d.resolved
    # each architecture's own interval is wider than the gap: only the pairing by seed resolves it
    a, b = mean_interval(arch), mean_interval(dense)
    assert a.high > b.low
    assert describe(d) == "-0.0300 [-0.0548, -0.0052], resolved"


def test_one_seed_has_no_interval_and_resolves_nothing():
    iv = paired_difference([1.5], [1.8])
    assert iv.n == 1 and iv.mean == pytest.approx(-0.3)
    assert iv.low is None and iv.high is None and iv.half_width is None and not iv.resolved
    assert describe(iv) == "-0.3000 (1 seed: not resolved)"
    assert iv.to_dict() == {"n": 1, "mean": pytest.approx(-0.3), "low": None, "high": None, "half_width": None,
                            "confidence": 0.95}


def test_bad_values_are_refused():
    with pytest.raises(ValueError):
        mean_interval([])
    with pytest.raises(ValueError):
        mean_interval([1.0, float("nan")])
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])
