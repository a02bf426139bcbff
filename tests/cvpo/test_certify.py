"""Policy certificates: the upper bound's coverage and width, ``summarise``, a real-env certificate
and ``cvpo eval``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.synthetic import write_random_artefact
from cvpo.certify import CERT_SEED_BASE, Certificate, certify_policy, cost_upper_bound, summarise
from cvpo.trainer import EVAL_SEED_BASE

REPS, N = 2000, 30


def zero_inflated(rng: np.random.Generator, p_zero: float, size: tuple[int, ...]) -> np.ndarray:
    """Cost 0 with probability p_zero, else uniform on [20, 200] (mean (1 - p_zero) * 110)."""
    return np.where(rng.random(size) < p_zero, 0.0, rng.uniform(20.0, 200.0, size))


def coverage(samples: np.ndarray, true_mean: float, bound=cost_upper_bound) -> float:
    return float(np.mean([bound(row, 0.95) >= true_mean for row in samples]))


@pytest.mark.parametrize(
    ("name", "draw", "true_mean"),
    [
        ("70% zeros, else U[20, 200]", lambda rng: zero_inflated(rng, 0.7, (REPS, N)), 33.0),
        ("85% zeros, else U[20, 200]", lambda rng: zero_inflated(rng, 0.85, (REPS, N)), 16.5),
        ("exponential, mean 25, capped at 500", lambda rng: np.minimum(rng.exponential(25.0, (REPS, N)), 500.0), None),
    ],
)
def test_upper_bound_covers_skewed_costs(name, draw, true_mean) -> None:
    rng = np.random.default_rng(20240611)
    samples = draw(rng)
    if true_mean is None:  # E[min(X, 500)] for X ~ Exp(25)
        true_mean = 25.0 * (1.0 - math.exp(-500.0 / 25.0))
    cov = coverage(samples, true_mean)
    assert cov >= 0.93, f"{name}: coverage {cov:.3f}"
    # The test has teeth: the sample mean as a 'bound' covers about half the time, and the plain
    # one-sided t bound undershoots on zero-inflated costs.
    assert coverage(samples, true_mean, bound=lambda x, c: float(np.mean(x))) < 0.7


def test_plain_t_bound_undercovers_where_halls_does_not() -> None:
    from scipy import stats

    def t_bound(x, c):
        return float(np.mean(x) + stats.t.ppf(c, len(x) - 1) * np.std(x, ddof=1) / math.sqrt(len(x)))

    samples = zero_inflated(np.random.default_rng(7), 0.85, (REPS, N))
    assert coverage(samples, 16.5, bound=t_bound) < 0.92 <= coverage(samples, 16.5)


def test_upper_bound_is_not_absurdly_wide() -> None:
    """On a Bernoulli-ish sample (0 or 100, p = 0.2) the bound sits within ~2.5 standard errors of
    the sample mean on average: nowhere near a range-based bound (Anderson's adds 0.22 * range)."""
    rng = np.random.default_rng(3)
    samples = 100.0 * (rng.random((REPS, N)) < 0.2)
    widths = np.array([cost_upper_bound(row, 0.95) - row.mean() for row in samples])
    standard_error = math.sqrt(0.2 * 0.8) * 100.0 / math.sqrt(N)
    assert np.all(widths >= 0)
    assert widths.mean() < 2.5 * standard_error, widths.mean() / standard_error
    # Symmetric data: the correction vanishes and the bound is the t bound.
    sym = np.array([10.0, 20.0, 30.0, 40.0, 50.0] * 6)
    from scipy import stats

    t = sym.mean() + stats.t.ppf(0.95, N - 1) * sym.std(ddof=1) / math.sqrt(N)
    assert cost_upper_bound(sym, 0.95) == pytest.approx(t, rel=1e-9)


def test_upper_bound_edge_cases() -> None:
    assert cost_upper_bound([0.0] * 30, 0.95) == 0.0
    assert cost_upper_bound([7.0, 7.0, 7.0], 0.95) == 7.0
    assert cost_upper_bound([0, 0, 0, 500], 0.95, upper_range=500.0) == 500.0  # capped at the range
    assert cost_upper_bound([0, 1, 5, 9], 0.99) > cost_upper_bound([0, 1, 5, 9], 0.9)
    for bad, msg in (([1.0], "at least 2"), ([1.0, -1.0], "≥ 0"), ([1.0, math.nan], "finite")):
        with pytest.raises(ValueError, match=msg):
            cost_upper_bound(bad, 0.95)
    with pytest.raises(ValueError, match="exceeds the stated range"):
        cost_upper_bound([1.0, 600.0], 0.95, upper_range=500.0)
    with pytest.raises(ValueError, match="confidence"):
        cost_upper_bound([1.0, 2.0], 1.0)


def test_summarise_reports_each_constraint_and_certifies_only_when_all_bounds_fit() -> None:
    rng = np.random.default_rng(11)
    first = zero_inflated(rng, 0.7, (N,))
    second = np.minimum(first, 5.0) * (rng.random(N) < 0.5)
    costs = np.stack([first, second], axis=1)
    returns = rng.normal(10.0, 2.0, N)
    ub = [cost_upper_bound(first), cost_upper_bound(second)]

    s = summarise(costs, returns, [ub[0] + 1, ub[1] + 1], 0.95, signals=["cost", "cost_hazards"])
    assert s.certified and [c.signal for c in s.constraints] == ["cost", "cost_hazards"]
    for j, c in enumerate(s.constraints):
        assert c.cost_mean == pytest.approx(costs[:, j].mean()) and c.cost_upper_bound == pytest.approx(ub[j])
        assert c.within_limit_share == pytest.approx(np.mean(costs[:, j] <= c.limit))
        assert c.stochastic_cost_mean is None and c.certified
    lo, hi = s.return_ci
    assert lo < s.return_mean < hi and s.return_mean == pytest.approx(returns.mean())

    # One constraint over its limit is enough to refuse, and it is the one flagged.
    s = summarise(costs, returns, [ub[0] + 1, ub[1] - 0.01], 0.95)
    assert not s.certified and [c.certified for c in s.constraints] == [True, False]
    # The sample mean within the limit does not certify: the bound must be.
    s = summarise(costs, returns, [first.mean(), None], 0.95)
    assert not s.certified and s.constraints[1].limit is None and s.constraints[1].certified
    s = summarise(costs, returns, [math.inf, math.inf], 0.95, stochastic_costs=costs[:3], stochastic_returns=[1, 2, 3])
    assert s.certified and s.stochastic_return_mean == 2.0
    assert s.constraints[0].stochastic_cost_mean == pytest.approx(costs[:3, 0].mean())
    # A single constraint may be a flat list.
    assert summarise(first, returns, [1e9]).constraints[0].cost_mean == pytest.approx(first.mean())
    with pytest.raises(ValueError, match="limit"):
        summarise(costs, returns, [25.0])


def test_certification_layouts_are_disjoint_from_training_evaluation() -> None:
    assert CERT_SEED_BASE - EVAL_SEED_BASE >= 1_000_000


@pytest.fixture(scope="module")
def circle_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained constant-ish actor on SafetyPointCircle1: it drifts out of bounds, costing
    ~300 per 500-step episode on the certification layouts."""
    path = tmp_path_factory.mktemp("cert") / "policy"
    return write_random_artefact(
        path,
        obs_dim=28,
        act_dim=2,
        hidden=(8,),
        env_id="SafetyPointCircle1-v0",
        head_scale=0.0,
        normalizer=False,
        seed=1,
    )


def test_real_certificate_is_reproducible_and_decides_on_the_limit(circle_policy: Path) -> None:
    a = certify_policy(circle_policy, episodes=3, stochastic_episodes=2, cost_limits=[400.0])
    b = certify_policy(circle_policy, episodes=3, stochastic_episodes=2, cost_limits=[400.0])
    da, db = a.to_dict(), b.to_dict()
    da.pop("created"), db.pop("created")
    assert da == db
    assert a.env_id == a.artefact_env_id == "SafetyPointCircle1-v0"
    assert a.seeds == {"base": CERT_SEED_BASE, "count": 3, "stochastic_count": 2}
    assert len(a.costs) == 3 and len(a.stochastic_costs) == 2 and a.constraints[0].signal == "cost"
    assert a.artefact_sha256 == json.loads((circle_policy / "policy.json").read_text())["weights_sha256"]
    assert a.safety_gymnasium_version and a.engine_version and a.created.endswith("Z")
    c = a.constraints[0]
    assert c.cost_mean > 0 and c.cost_upper_bound <= 400.0 and a.certified, c
    assert c.stochastic_cost_mean is not None

    zero = certify_policy(circle_policy, episodes=3, stochastic_episodes=0, cost_limits=[0.0])
    assert not zero.certified and zero.constraints[0].within_limit_share < 1.0
    assert zero.costs == a.costs  # same layouts, same mean actions
    assert zero.stochastic_costs == [] and zero.constraints[0].stochastic_cost_mean is None

    text = json.dumps(a.to_dict())
    assert Certificate.from_dict(json.loads(text)) == a


def test_variant_task_must_share_the_spaces(circle_policy: Path) -> None:
    variant = certify_policy(circle_policy, episodes=2, stochastic_episodes=0, env_id="SafetyPointCircle2-v0")
    assert variant.env_id == "SafetyPointCircle2-v0" and variant.artefact_env_id == "SafetyPointCircle1-v0"
    assert variant.constraints[0].limit == 25.0  # the artefact's own limit
    with pytest.raises(ValueError, match="observation length 60 != the policy's 28"):
        certify_policy(circle_policy, episodes=2, env_id="SafetyPointGoal1-v0")
    with pytest.raises(ValueError, match="episodes must be ≥ 2"):
        certify_policy(circle_policy, episodes=1)


def test_constraints_follow_the_runs_cost_signals(tmp_path: Path) -> None:
    """An artefact inside a run directory reads its constraints' signals from the run's config.json
    (when its hash matches the artefact's); each constraint is bounded separately."""
    from types import SimpleNamespace

    import torch

    from cvpo.artefact import write_policy_artefact
    from cvpo.config import resolve_config
    from cvpo.nets import GaussianActor

    config = resolve_config(
        {
            "env_id": "SafetyPointCircle1-v0",
            "constraints": {"cost_limits": [400, 300], "cost_signals": ["cost", "cost_out_of_boundary"]},
        }
    )
    torch.manual_seed(1)
    actor = GaussianActor(28, 2, (8,))
    with torch.no_grad():
        actor.mean_head.weight.zero_()
        actor.mean_head.bias.copy_(torch.tensor([0.6, 0.3]))
    env = SimpleNamespace(obs_dim=28, act_dim=2, act_low=-np.ones(2), act_high=np.ones(2))
    write_policy_artefact(tmp_path / "policy", actor, None, env, config, {})
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    cert = certify_policy(tmp_path / "policy", episodes=2, stochastic_episodes=0)
    assert cert.cost_signals_source == "run config.json"
    assert [c.signal for c in cert.constraints] == ["cost", "cost_out_of_boundary"]
    assert [c.limit for c in cert.constraints] == [400.0, 300.0]
    assert all(c1 <= c0 for c0, c1 in cert.costs)  # the itemised signal never exceeds the total
    with pytest.raises(ValueError, match="give 2 cost limit"):
        certify_policy(tmp_path / "policy", episodes=2, stochastic_episodes=0, cost_limits=[1.0, 2.0, 3.0])

    (tmp_path / "config.json").write_text("{}")  # a config that is not this artefact's is ignored
    cert = certify_policy(tmp_path / "policy", episodes=2, stochastic_episodes=0, cost_limits=[400.0])
    assert cert.cost_signals_source.startswith("default") and len(cert.constraints) == 2
    assert [c.limit for c in cert.constraints] == [400.0, 400.0]  # one limit applies to all


def test_cli_eval_prints_a_certificate(circle_policy: Path) -> None:
    cvpo = str(Path(sys.executable).parent / "cvpo")
    common = [cvpo, "eval", str(circle_policy), "--episodes", "3", "--stochastic-episodes", "1"]
    out = subprocess.run([*common, "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cert = json.loads(out.stdout)
    assert cert["episodes"] == 3 and len(cert["returns"]) == 3 and len(cert["costs"]) == 3
    assert cert["seeds"]["base"] == CERT_SEED_BASE and cert["constraints"][0]["limit"] == 25.0
    assert cert["certified"] is False  # ~300 per episode against the artefact's 25

    out = subprocess.run(
        [*common, "--cost-limit", "400", "--seed-base", str(CERT_SEED_BASE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "95% upper bound" in out.stdout and "sampled policy mean" in out.stdout
    assert out.stdout.rstrip().splitlines()[-1].startswith("CERTIFIED")

    bad = subprocess.run([*common, "--cost-limit", "abc"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--cost-limit" in bad.stderr and "Traceback" not in bad.stderr
