"""Per-step cost threshold and its curriculum (cvpo-algorithm.md §1.2, §9 I9)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cvpo.thresholds import curriculum_threshold, per_step_threshold


@pytest.mark.parametrize(
    ("limit", "horizon", "gamma", "expected"),
    [
        (10.0, 400, 0.99, 2.4551),  # original, Button/Goal
        (25.0, 1000, 0.995, 4.9667),  # FSRL safety-gymnasium navigation
        (20.0, 300, 0.99, 6.3397),  # original, Car-Circle
        (10.0, 500, 0.97, 0.6667),  # FSRL Bullet default
        (25.0, 1000, 0.98, 1.2500),  # FSRL Mujoco5M/10M
    ],
)
def test_documented_values(limit: float, horizon: int, gamma: float, expected: float) -> None:
    out = per_step_threshold(limit, horizon, gamma)
    assert out.shape == (1,)
    assert out.dtype == np.float64
    assert round(float(out[0]), 4) == expected


def test_matches_the_discounted_sum_definition() -> None:
    # c̄ = (C/T)·Σ_{t<T} γ^t, summed term by term.
    for limit, horizon, gamma in [(10.0, 400, 0.99), (3.0, 7, 0.5), (25.0, 1000, 0.999), (1.0, 1, 0.3)]:
        direct = limit / horizon * math.fsum(gamma**t for t in range(horizon))
        assert per_step_threshold(limit, horizon, gamma)[0] == pytest.approx(direct, rel=1e-12)


def test_gamma_one_gives_the_limit_exactly() -> None:
    assert per_step_threshold(10.0, 400, 1.0)[0] == 10.0
    assert per_step_threshold([7.5, 0.0], 1000, 1)[0] == 7.5


def test_tends_to_the_limit_as_gamma_tends_to_one() -> None:
    gaps = [10.0 - per_step_threshold(10.0, 400, 1.0 - 10.0**-k)[0] for k in range(2, 13)]
    assert all(g > 0.0 for g in gaps)  # discounting only shrinks c̄
    assert all(later < earlier for earlier, later in itertools.pairwise(gaps))
    assert gaps[-1] < 1e-7  # 1 − γ = 1e-12: no cancellation blow-up near γ = 1
    # T = 1: a single, undiscounted step.
    assert per_step_threshold(10.0, 1, 0.5)[0] == 10.0


def test_one_threshold_per_constraint() -> None:
    out = per_step_threshold([10.0, 20.0, 25.0], 400, 0.99)
    assert out.shape == (3,)
    for i, limit in enumerate([10.0, 20.0, 25.0]):
        assert out[i] == per_step_threshold(limit, 400, 0.99)[0]
    assert per_step_threshold(np.array([10.0, 20.0]), 400, 0.99).shape == (2,)
    assert per_step_threshold([], 400, 0.99).shape == (0,)


def test_infinite_limit_means_unconstrained() -> None:
    out = per_step_threshold([10.0, math.inf], 400, 0.99)
    assert out[1] == math.inf
    assert out[0] == pytest.approx(2.4551, abs=5e-5)
    assert per_step_threshold(math.inf, 400, 1.0)[0] == math.inf


def test_returns_a_new_array() -> None:
    limits = np.array([10.0, 20.0])
    before = limits.copy()
    out = per_step_threshold(limits, 400, 1.0)
    out[0] = -1.0
    assert np.array_equal(limits, before)


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"cost_limit": 10.0, "horizon": 0, "gamma": 0.99}, "0"),
        ({"cost_limit": 10.0, "horizon": -5, "gamma": 0.99}, "-5"),
        ({"cost_limit": 10.0, "horizon": 2.5, "gamma": 0.99}, "2.5"),
        ({"cost_limit": 10.0, "horizon": 400, "gamma": 0.0}, "0.0"),
        ({"cost_limit": 10.0, "horizon": 400, "gamma": 1.5}, "1.5"),
        ({"cost_limit": 10.0, "horizon": 400, "gamma": -0.1}, "-0.1"),
        ({"cost_limit": 10.0, "horizon": 400, "gamma": math.nan}, "nan"),
        ({"cost_limit": -1.0, "horizon": 400, "gamma": 0.99}, "-1.0"),
        ({"cost_limit": [10.0, math.nan], "horizon": 400, "gamma": 0.99}, "nan"),
    ],
)
def test_invalid_arguments_raise_naming_the_value(kwargs: dict, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        per_step_threshold(**kwargs)


# --- curriculum (§1.2, original code, off by default) ---------------------------------------------


def test_curriculum_endpoints() -> None:
    start = per_step_threshold(300.0, 400, 0.99)
    end = per_step_threshold(10.0, 400, 0.99)
    assert np.array_equal(curriculum_threshold(0, 300.0, 10.0, 200, 400, 0.99), start)
    for epoch in (200, 201, 10_000):
        assert np.array_equal(curriculum_threshold(epoch, 300.0, 10.0, 200, 400, 0.99), end)


def test_curriculum_formula_and_monotone_decay() -> None:
    start = per_step_threshold(300.0, 400, 0.99)[0]
    end = per_step_threshold(10.0, 400, 0.99)[0]
    values = [curriculum_threshold(e, 300.0, 10.0, 200, 400, 0.99)[0] for e in range(0, 205)]
    for e in (1, 50, 137, 199):
        assert values[e] == pytest.approx(end + (start - end) * math.exp(-5.0 * e / 200), rel=1e-12)
    assert all(b <= a for a, b in itertools.pairwise(values))
    assert values[199] > end  # still above c̄_end until E_decay
    # Rising curriculum (start below end) is monotone the other way.
    rising = [curriculum_threshold(e, 5.0, 10.0, 20, 400, 0.99)[0] for e in range(25)]
    assert all(b >= a for a, b in itertools.pairwise(rising))


def test_curriculum_per_constraint_and_unconstrained() -> None:
    out = curriculum_threshold(10, [300.0, 50.0], 10.0, 200, 400, 0.99)
    assert out.shape == (2,)
    assert out[0] == curriculum_threshold(10, 300.0, 10.0, 200, 400, 0.99)[0]
    assert out[1] == curriculum_threshold(10, 50.0, 10.0, 200, 400, 0.99)[0]
    inf_start = curriculum_threshold(10, [math.inf, 20.0], [10.0, math.inf], 200, 400, 0.99)
    assert np.array_equal(inf_start, [math.inf, math.inf])
    assert curriculum_threshold(300, math.inf, 10.0, 200, 400, 0.99)[0] == per_step_threshold(10.0, 400, 0.99)[0]
    with pytest.raises(ValueError, match="same number of constraints"):
        curriculum_threshold(0, [1.0, 2.0], [1.0, 2.0, 3.0], 10, 400, 0.99)


@pytest.mark.parametrize(("epoch", "decay", "bad"), [(-1, 200, "-1"), (0, -3, "-3")])
def test_curriculum_invalid_arguments(epoch: int, decay: int, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        curriculum_threshold(epoch, 300.0, 10.0, decay, 400, 0.99)


def test_curriculum_limits_follow_the_same_law_as_the_thresholds() -> None:
    """The reported episodic limits and the E-step thresholds come from one law (curriculum_factor)."""
    from cvpo.thresholds import curriculum_factor, curriculum_limits

    for e in range(0, 12):
        limits = curriculum_limits(e, 100.0, [25.0, 10.0], 10)
        np.testing.assert_allclose(
            per_step_threshold(limits, 500, 0.99), curriculum_threshold(e, 100.0, [25.0, 10.0], 10, 500, 0.99)
        )
    assert curriculum_limits(10, 100.0, [25.0], 10) == [25.0] and curriculum_factor(10, 10) == 0.0
    assert curriculum_limits(0, 100.0, [25.0], 10) == [100.0]
    assert curriculum_limits(3, 100.0, [25.0], 0) == [25.0]
