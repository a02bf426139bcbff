"""E-step dual, solver and weights (cvpo-algorithm.md §2, §8.1 P1-P4 and P15, §9 I1-I8 and I14).

Synthetic problems use B = 64 states and K = 32 sampled actions with fixed seeds; the golden problems
live in ``tests/data/estep-golden`` (provenance in its README).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.special import logsumexp, softmax

from cvpo.estep import DualSolution, dual, dual_linear, estep_weights, solve_dual

B, K = 64, 32
LO, HI = 1e-6, 1e5
GOLDEN = Path(__file__).resolve().parents[1] / "data/estep-golden"
GOLDEN_CASES = ("active_1c", "active_2c", "slack_1c", "infeasible_1c")


# --------------------------------------------------------------------------------------------------
# Helpers (independent of cvpo.estep)
# --------------------------------------------------------------------------------------------------


def mean_kl_to_uniform(w: np.ndarray) -> float:
    """Batch mean of KL(w_s‖U_K) = Σ_j w_sj log(K w_sj), with 0·log 0 = 0."""
    k = w.shape[1]
    terms = np.where(w > 0.0, w * np.log(np.where(w > 0.0, k * w, 1.0)), 0.0)
    return float(terms.sum(axis=1).mean())


def weights_at_kl(a: np.ndarray, eps: float) -> np.ndarray:
    """softmax(a/η) with η found by bisection so that the batch-mean KL to uniform equals ε."""
    lo, hi = -12.0, 12.0  # log η
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if mean_kl_to_uniform(softmax(a / math.exp(mid), axis=1)) > eps:
            lo = mid
        else:
            hi = mid
    return softmax(a / math.exp(hi), axis=1)


def reference_dual(eta: float, lam: np.ndarray, qr: np.ndarray, qc: np.ndarray, cbar: np.ndarray, eps: float) -> float:
    """g(η, λ) of §2.1 written directly with scipy's logsumexp (the FSRL form)."""
    a = qr - np.tensordot(lam, qc, axes=1)
    return float(eta * eps + lam @ cbar + eta * np.mean(logsumexp(a / eta, axis=1) - math.log(qr.shape[1])))


def make_problem(seed: int, m: int = 1, eps: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Q_r with per-state offsets; positive costs that rise with the reward, so constraints bite.

    Each c̄_i lies halfway between the uniform-weighted cost (so uniform q is strictly feasible, I5) and
    the cost of the KL-ball optimum that ignores costs (so the constraint is active, I4).
    """
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 2.0, (B, 1))
    noise = rng.normal(0.0, 1.0, (B, K))
    qr = base + noise
    qc = np.stack(
        [np.exp(0.6 * noise / (1 + i) + rng.normal(0.0, 0.4, (B, K)) + rng.normal(0.0, 0.2, (B, 1))) for i in range(m)]
    )
    w = weights_at_kl(qr, eps)
    uniform_cost = qc.mean(axis=(1, 2))
    greedy_cost = np.einsum("bk,ibk->i", w, qc) / B
    return qr, qc, uniform_cost + 0.5 * (greedy_cost - uniform_cost), eps


def solve_cold(qr: np.ndarray, qc: np.ndarray, cbar: np.ndarray, eps: float, **kwargs: object) -> DualSolution:
    sol = solve_dual(qr, qc, cbar, eps, **kwargs)
    assert not sol.fallback
    return sol


def load_golden(case: str) -> tuple[dict[str, np.ndarray], dict]:
    assert GOLDEN.is_dir(), f"golden E-step data missing: {GOLDEN} (tests/data/estep-golden)"
    with np.load(GOLDEN / f"{case}.npz") as data:
        arrays = {k: data[k] for k in data.files}
    solutions = json.loads((GOLDEN / "solutions.json").read_text())
    return arrays, solutions[case]


# --------------------------------------------------------------------------------------------------
# I1: valid weights
# --------------------------------------------------------------------------------------------------


def test_weights_are_the_max_shifted_softmax_and_valid() -> None:
    qr, qc, _, _ = make_problem(0, m=2)
    for eta, lam in [(1.0, [0.3, 0.2]), (0.05, [0.0, 1.0]), (50.0, [2.0, 0.0]), (1e-6, [0.1, 0.1])]:
        w = estep_weights(qr, qc, eta, np.array(lam))
        assert w.shape == (B, K)
        assert w.dtype == np.float64
        assert np.all(w >= 0.0)
        np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-12)
        expected = softmax((qr - np.tensordot(np.array(lam), qc, axes=1)) / eta, axis=1)
        np.testing.assert_allclose(w, expected, rtol=0, atol=1e-12)


def test_weights_unchanged_by_a_per_state_constant() -> None:
    qr, qc, _, _ = make_problem(1)
    shift = np.random.default_rng(11).normal(0.0, 300.0, (B, 1))
    w = estep_weights(qr, qc, 0.7, [0.4])
    w_shifted = estep_weights(qr + shift, qc, 0.7, [0.4])
    np.testing.assert_allclose(w_shifted, w, rtol=0, atol=1e-12)
    # A per-state constant does change the ranking between states, so the test is not vacuous.
    assert not np.allclose(np.argsort(qr.ravel()), np.argsort((qr + shift).ravel()))


# --------------------------------------------------------------------------------------------------
# The dual itself: value against an independent formula, I2 convexity, I3 gradient
# --------------------------------------------------------------------------------------------------


def test_dual_value_matches_the_logsumexp_formula() -> None:
    qr, qc, cbar, eps = make_problem(2, m=2)
    rng = np.random.default_rng(2)
    for _ in range(20):
        eta, lam = float(np.exp(rng.uniform(-3, 3))), rng.uniform(0.0, 3.0, 2)
        g, _ = dual_linear(eta, lam, qr, qc, cbar, eps)
        assert g == pytest.approx(reference_dual(eta, lam, qr, qc, cbar, eps), rel=1e-12, abs=1e-12)
        g_log, _ = dual(np.log(np.concatenate(([eta], lam + 1e-3))), qr, qc, cbar, eps)
        assert g_log == pytest.approx(reference_dual(eta, lam + 1e-3, qr, qc, cbar, eps), rel=1e-12)


def test_dual_is_jointly_convex_on_random_pairs() -> None:
    qr, qc, cbar, eps = make_problem(3, m=2)
    rng = np.random.default_rng(3)

    def g(p: np.ndarray) -> float:
        return dual_linear(p[0], p[1:], qr, qc, cbar, eps)[0]

    def draw() -> np.ndarray:
        return np.concatenate(([math.exp(rng.uniform(math.log(1e-2), math.log(1e2)))], rng.uniform(0.0, 5.0, 2)))

    gaps = []
    for _ in range(1000):
        x, y = draw(), draw()
        gx, gy = g(x), g(y)
        gaps.append(0.5 * (gx + gy) - g(0.5 * (x + y)))
        assert gaps[-1] >= -1e-10 * (1.0 + abs(gx) + abs(gy))
    assert max(gaps) > 1e-2  # strictly convex somewhere: the check has teeth


def analytic_hessian(eta: float, lam: np.ndarray, qr: np.ndarray, qc: np.ndarray) -> np.ndarray:
    """∂²g in (η, λ): (1/B)Σ_s [Var_w(A)/η³, Cov_w(A, Q_c^i)/η²; ·, Cov_w(Q_c^i, Q_c^k)/η]."""
    a = qr - np.tensordot(lam, qc, axes=1)
    w = softmax(a / eta, axis=1)
    v = np.concatenate((a[None], qc))  # (1 + m, B, K)
    centred = v - np.einsum("bk,ibk->ib", w, v)[:, :, None]
    cov = np.einsum("bk,ibk,jbk->ij", w, centred, centred) / qr.shape[0]
    h = cov.copy()
    h[0, 0] /= eta**3
    h[0, 1:] /= eta**2
    h[1:, 0] /= eta**2
    h[1:, 1:] /= eta
    return h


def test_finite_difference_hessian_is_psd() -> None:
    qr, qc, cbar, eps = make_problem(4, m=2)
    rng = np.random.default_rng(4)

    def g(p: np.ndarray) -> float:
        return dual_linear(p[0], p[1:], qr, qc, cbar, eps)[0]

    for _ in range(6):
        p = np.concatenate(([math.exp(rng.uniform(-1.0, 1.5))], rng.uniform(0.05, 2.0, 2)))
        n = p.size
        steps = np.diag(1e-4 * p)
        hess = np.empty((n, n))
        for i in range(n):
            for j in range(n):
                di, dj = steps[i], steps[j]
                second = g(p + di + dj) - g(p + di - dj) - g(p - di + dj) + g(p - di - dj)
                hess[i, j] = second / (4 * steps[i, i] * steps[j, j])
        hess = 0.5 * (hess + hess.T)
        eig = np.linalg.eigvalsh(hess)
        assert eig.min() >= -1e-5 * eig.max()
        np.testing.assert_allclose(hess, analytic_hessian(p[0], p[1:], qr, qc), rtol=1e-4, atol=1e-5 * eig.max())


@pytest.mark.parametrize("m", [1, 2])
def test_linear_gradient_matches_central_differences(m: int) -> None:
    qr, qc, cbar, eps = make_problem(5, m=m)
    rng = np.random.default_rng(5)
    for _ in range(10):
        p = np.concatenate(([math.exp(rng.uniform(-2.0, 2.0))], rng.uniform(0.0, 3.0, m)))
        _, grad = dual_linear(p[0], p[1:], qr, qc, cbar, eps)
        assert grad.shape == (1 + m,)
        for i in range(1 + m):
            h = 1e-6 * max(p[i], 1e-2)
            up, down = p.copy(), p.copy()
            up[i] += h
            down[i] = max(down[i] - h, 0.0)
            fd = dual_linear(up[0], up[1:], qr, qc, cbar, eps)[0] - dual_linear(down[0], down[1:], qr, qc, cbar, eps)[0]
            fd /= up[i] - down[i]
            assert grad[i] == pytest.approx(fd, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("m", [0, 1, 2])
def test_log_gradient_matches_central_differences(m: int) -> None:
    qr, qc, cbar, eps = make_problem(6, m=max(m, 1))
    qc, cbar = qc[:m], cbar[:m]
    rng = np.random.default_rng(6)
    for _ in range(10):
        x = rng.uniform(-4.0, 3.0, 1 + m)
        g0, grad = dual(x, qr, qc, cbar, eps)
        assert math.isfinite(g0)
        assert grad.shape == (1 + m,)
        for i in range(1 + m):
            h = 1e-6
            up, down = x.copy(), x.copy()
            up[i] += h
            down[i] -= h
            fd = (dual(up, qr, qc, cbar, eps)[0] - dual(down, qr, qc, cbar, eps)[0]) / (2 * h)
            assert grad[i] == pytest.approx(fd, rel=1e-5, abs=1e-8)
        # Chain rule against the linear gradient.
        _, grad_lin = dual_linear(math.exp(x[0]), np.exp(x[1:]), qr, qc, cbar, eps)
        np.testing.assert_allclose(grad, grad_lin * np.exp(x), rtol=1e-12, atol=0)


def test_no_overflow_with_large_q_and_tiny_eta() -> None:
    # P1: exp(Q/η) with Q ≈ 500, η = 1e-6 overflows unless max-shifted.
    rng = np.random.default_rng(7)
    qr = 500.0 + rng.normal(0.0, 1.0, (B, K))
    qc = (400.0 + rng.normal(0.0, 1.0, (B, K)))[None]
    lam = np.array([0.5])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        g, grad = dual(np.log([1e-6, 0.5]), qr, qc, [450.0], 0.1)
        w = estep_weights(qr, qc, 1e-6, lam)
    assert math.isfinite(g)
    assert np.all(np.isfinite(grad))
    # As η → 0 the value tends to λc̄ + mean_s max_j A_sj.
    a = qr - lam[0] * qc[0]
    assert g == pytest.approx(0.5 * 450.0 + a.max(axis=1).mean(), abs=1e-3)
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# I4, I5: active constraints bind; strong duality
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "m"), [(10, 1), (11, 1), (12, 2), (13, 2)])
def test_active_constraints_bind(seed: int, m: int) -> None:
    qr, qc, cbar, eps = make_problem(seed, m=m)
    sol = solve_cold(qr, qc, cbar, eps)
    assert sol.success
    assert LO * 10 < sol.temperature < HI / 10
    assert np.all(sol.cost_multipliers > 1e-3)  # interior optimum, every constraint active
    assert not sol.saturated.any()
    w = estep_weights(qr, qc, sol.temperature, sol.cost_multipliers)
    kl = mean_kl_to_uniform(w)
    weighted_cost = np.einsum("bk,ibk->i", w, qc) / B
    assert abs(kl - eps) < 1e-7  # §9 I4: 0.1000000 for ε = 0.1
    assert abs(sol.mean_kl - eps) < 1e-7
    np.testing.assert_allclose(weighted_cost, cbar, rtol=1e-7)
    np.testing.assert_allclose(sol.weighted_cost, weighted_cost, rtol=1e-12)
    assert sol.dual_value == pytest.approx(
        reference_dual(sol.temperature, sol.cost_multipliers, qr, qc, cbar, eps), rel=1e-12
    )


@pytest.mark.parametrize(("seed", "m"), [(20, 1), (21, 2)])
def test_strong_duality(seed: int, m: int) -> None:
    qr, qc, cbar, eps = make_problem(seed, m=m)
    assert np.all(qc.mean(axis=(1, 2)) < cbar)  # uniform q is strictly feasible
    sol = solve_cold(qr, qc, cbar, eps)
    w = estep_weights(qr, qc, sol.temperature, sol.cost_multipliers)
    primal = float(np.sum(w * qr) / B)
    assert sol.dual_value == pytest.approx(primal, rel=1e-6)
    # Weak duality: every dual point bounds the primal value of uniform q (and of q*) from above.
    rng = np.random.default_rng(seed)
    for _ in range(50):
        eta, lam = math.exp(rng.uniform(-3.0, 3.0)), rng.uniform(0.0, 3.0, m)
        assert dual_linear(eta, lam, qr, qc, cbar, eps)[0] >= primal - 1e-9
    assert float(qr.mean()) < primal


# --------------------------------------------------------------------------------------------------
# I6: shift and scale
# --------------------------------------------------------------------------------------------------


def test_shift_leaves_the_solution_and_shifts_the_value() -> None:
    qr, qc, cbar, eps = make_problem(30, m=2)
    shift = np.random.default_rng(30).normal(0.0, 50.0, (B, 1))
    base = solve_cold(qr, qc, cbar, eps)
    shifted = solve_cold(qr + shift, qc, cbar, eps)
    assert shifted.temperature == pytest.approx(base.temperature, rel=1e-6)
    np.testing.assert_allclose(shifted.cost_multipliers, base.cost_multipliers, rtol=1e-6)
    assert shifted.dual_value == pytest.approx(base.dual_value + float(shift.mean()), rel=1e-9)


def test_scaling_by_seven_scales_eta_only() -> None:
    k = 7.0
    qr, qc, cbar, eps = make_problem(31, m=2)
    base = solve_cold(qr, qc, cbar, eps)
    scaled = solve_cold(k * qr, k * qc, k * cbar, eps)
    assert scaled.temperature / base.temperature == pytest.approx(k, rel=1e-5)
    np.testing.assert_allclose(scaled.cost_multipliers / base.cost_multipliers, 1.0, rtol=1e-5)
    assert scaled.dual_value == pytest.approx(k * base.dual_value, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# I7: slack and infeasible constraints (P2)
# --------------------------------------------------------------------------------------------------


def test_slack_constraint_leaves_lambda_at_its_lower_bound() -> None:
    qr, qc, _, eps = make_problem(40)
    cbar = np.array([qc.max() * 1.01])  # above every sampled cost
    sol = solve_cold(qr, qc, cbar, eps, init_multipliers=[3.0])  # even from a warm start above it
    assert sol.cost_multipliers[0] == pytest.approx(LO, rel=1e-9)
    assert not sol.saturated[0]
    assert abs(sol.mean_kl - eps) < 1e-7  # the KL bound still binds
    assert sol.weighted_cost[0] < cbar[0]


def test_infeasible_constraint_saturates_and_moves_weight_to_cheap_samples() -> None:
    qr, qc, _, eps = make_problem(41)
    cbar = 0.5 * qc.min(axis=2).mean(axis=1)  # below even the cheapest-sample average
    feasible = solve_cold(*make_problem(41))
    sol = solve_cold(qr, qc, cbar, eps)
    assert sol.cost_multipliers[0] == HI
    assert sol.saturated.tolist() == [True]
    assert "infeasible" in sol.message
    assert sol.temperature > 1e3 * feasible.temperature  # η grows with λ
    w = estep_weights(qr, qc, sol.temperature, sol.cost_multipliers)
    cheapest = qc[0].argmin(axis=1)
    assert np.mean(w.argmax(axis=1) == cheapest) > 0.9
    # The trust region still binds: KL = ε, and inside that ball q is the most cost-reducing one,
    # softmax(−Q_c/τ) at KL = ε (λ at 1e5 leaves Q_r a negligible share of the advantages).
    assert mean_kl_to_uniform(w) == pytest.approx(eps, abs=1e-7)
    cheapest_in_ball = weights_at_kl(-qc[0], eps)
    assert sol.weighted_cost[0] == pytest.approx(np.mean(np.sum(cheapest_in_ball * qc[0], axis=1)), rel=1e-3)
    assert sol.weighted_cost[0] < feasible.weighted_cost[0]
    assert sol.weighted_cost[0] > cbar[0]  # still violated: it is unreachable


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("newton_steps", [0, 4])
def test_trust_region_holds_when_the_constraint_is_infeasible(seed: int, newton_steps: int) -> None:
    """Before η had its own bound, infeasible batches sat at the (1e5, 1e5) corner with KL far above ε."""
    rng = np.random.default_rng(seed)
    qr = rng.normal(0.0, 1.0, (B, K)) + rng.normal(0.0, 5.0, (B, 1))
    qc = np.abs(rng.normal(3.0, rng.uniform(0.2, 2.0), (1, B, K)))
    cbar = np.array([0.9 * qc.min(axis=2).mean()])
    for eps in (0.02, 0.05):
        sol = solve_cold(qr, qc, cbar, eps, newton_steps=newton_steps)
        assert sol.saturated.tolist() == [True]
        w = estep_weights(qr, qc, sol.temperature, sol.cost_multipliers)
        assert mean_kl_to_uniform(w) <= eps + 1e-6
        assert sol.mean_kl == pytest.approx(eps, abs=1e-6)
        np.testing.assert_allclose(sol.weights, w, rtol=1e-9, atol=1e-12)


def test_a_second_constraint_is_not_stranded_at_the_floor() -> None:
    # Constraint 0 is infeasible (λ_0 runs to 1e5), constraint 1 stays active with a large interior λ_1.
    # From the cold start λ_1 sits at 1e-6, where its log-space gradient vanishes; the solver must still
    # move it (§2.5) rather than report a point where constraint 1 is violated.
    rng = np.random.default_rng(37)
    qr = rng.normal(0.0, 2.0, (B, 1)) + rng.normal(0.0, 1.0, (B, K))
    centred = (qr - qr.mean(axis=1, keepdims=True))[None]
    qc = np.abs(
        rng.normal(2.0, 1.0, (2, B, 1)) + rng.normal(0.0, 1.0, (2, B, K)) + rng.uniform(0.0, 1.0, (2, 1, 1)) * centred
    )
    cbar = qc.mean(axis=(1, 2)) * rng.uniform(0.3, 0.95, 2)
    eps = float(10 ** rng.uniform(-2.0, 0.0))
    sol = solve_cold(qr, qc, cbar, eps)
    assert sol.saturated[0]
    assert sol.cost_multipliers[1] > 1.0
    # With λ_0 at its bound, constraint 1 only counts at the same scale: it binds or it saturates too.
    assert sol.saturated[1] or sol.weighted_cost[1] == pytest.approx(cbar[1], rel=1e-6)
    assert sol.mean_kl == pytest.approx(eps, abs=1e-6)  # the trust region holds throughout
    assert sol.success


def test_feasible_problem_reports_no_saturation() -> None:
    sol = solve_cold(*make_problem(42))
    assert sol.saturated.dtype == np.bool_
    assert sol.saturated.tolist() == [False]
    assert "infeasible" not in sol.message


# --------------------------------------------------------------------------------------------------
# I8: limits (P4)
# --------------------------------------------------------------------------------------------------


def test_tiny_eta_without_cost_gives_one_hot_argmax() -> None:
    qr, qc, _, _ = make_problem(50, m=2)
    top2 = np.sort(qr, axis=1)[:, -2:]
    assert np.min(top2[:, 1] - top2[:, 0]) > 1e-4  # no near-ties in the data
    w = estep_weights(qr, qc, LO, np.zeros(2))
    expected = np.zeros_like(w)
    expected[np.arange(B), qr.argmax(axis=1)] = 1.0
    np.testing.assert_allclose(w, expected, rtol=0, atol=1e-12)


def test_huge_eta_gives_uniform_weights_and_zero_kl() -> None:
    qr, qc, cbar, eps = make_problem(51)
    w = estep_weights(qr, qc, 1e8, [0.5])
    np.testing.assert_allclose(w, 1.0 / K, rtol=1e-6)
    _, grad = dual_linear(1e8, [0.5], qr, qc, cbar, eps)
    assert eps - grad[0] == pytest.approx(0.0, abs=1e-12)  # ∂g/∂η = ε − KL
    assert mean_kl_to_uniform(w) < 1e-12


@pytest.mark.parametrize("excess", [0.0, 0.01, 0.5, 10.0 - math.log(K)])
def test_kl_bound_at_or_above_log_k_is_inactive(excess: float) -> None:
    # P4: KL(q‖U) ≤ log K, so ε ≥ log K bounds nothing: ∂g/∂η = ε − KL ≥ 0 everywhere, η heads for its
    # floor and q goes one-hot on the arg-max.
    qr, qc, _, _ = make_problem(52)
    eps = math.log(K) + excess
    sol = solve_cold(qr, qc[:0], np.zeros(0), eps)
    assert sol.mean_kl <= eps
    assert sol.mean_kl > math.log(K) - 1e-3
    if excess > 0.0:
        assert sol.temperature == pytest.approx(LO, rel=1e-9)
    else:  # ε = log K exactly: g is flat as η → 0; η need not reach the floor, but it is tiny
        assert sol.temperature < 1e-3
    w = estep_weights(qr, qc[:0], sol.temperature, np.zeros(0))
    assert np.array_equal(w.argmax(axis=1), qr.argmax(axis=1))


def test_below_log_k_the_kl_bound_binds() -> None:
    # Counterpart of the previous test: just under log K the bound is active and η stays off the floor.
    qr, qc, _, _ = make_problem(52)
    eps = math.log(K) - 0.5
    sol = solve_cold(qr, qc[:0], np.zeros(0), eps)
    assert sol.temperature > 10 * LO
    assert abs(sol.mean_kl - eps) < 1e-7


# --------------------------------------------------------------------------------------------------
# I14 (P15): no mutation; non-finite fallback; shapes and dtypes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_inputs_are_never_mutated(dtype: type) -> None:
    qr64, qc64, cbar64, eps = make_problem(60, m=2)
    qr, qc, cbar = qr64.astype(dtype), qc64.astype(dtype), cbar64.astype(dtype)
    init = np.array([0.5, 0.7])
    copies = [a.copy() for a in (qr, qc, cbar, init)]
    sol = solve_dual(qr, qc, cbar, eps, init_temperature=2.0, init_multipliers=init)
    w = estep_weights(qr, qc, sol.temperature, sol.cost_multipliers)
    dual(np.log([2.0, 0.5, 0.7]), qr, qc, cbar, eps)
    dual_linear(2.0, init, qr, qc, cbar, eps)
    for before, after in zip(copies, (qr, qc, cbar, init), strict=True):
        assert after.dtype == before.dtype
        assert np.array_equal(after, before)
    assert not any(np.shares_memory(w, a) for a in (qr, qc))
    assert not np.shares_memory(sol.cost_multipliers, init)
    # Read-only inputs: any in-place write would raise.
    for a in (qr, qc, cbar, init):
        a.flags.writeable = False
    solve_dual(qr, qc, cbar, eps, init_temperature=2.0, init_multipliers=init)
    estep_weights(qr, qc, sol.temperature, sol.cost_multipliers)
    estep_weights(qr, qc[:0], sol.temperature, np.zeros(0))  # m = 0 path
    solve_dual(qr, qc[:0], cbar[:0], eps)


def test_float32_inputs_are_solved_in_float64() -> None:
    qr, qc, cbar, eps = make_problem(61)
    qr32, qc32, cbar32 = qr.astype(np.float32), qc.astype(np.float32), cbar.astype(np.float32)
    sol32 = solve_cold(qr32, qc32, cbar32, eps)
    sol64 = solve_cold(qr32.astype(np.float64), qc32.astype(np.float64), cbar32.astype(np.float64), eps)
    assert sol32.temperature == pytest.approx(sol64.temperature, rel=1e-10)
    np.testing.assert_allclose(sol32.cost_multipliers, sol64.cost_multipliers, rtol=1e-10)
    assert abs(sol32.mean_kl - eps) < 1e-7
    w = estep_weights(qr32, qc32, sol32.temperature, sol32.cost_multipliers)
    assert w.dtype == np.float64


@pytest.mark.parametrize("where", ["reward_nan", "cost_inf", "reward_neg_inf"])
def test_non_finite_input_keeps_the_previous_solution(where: str) -> None:
    qr, qc, cbar, eps = make_problem(62)
    previous = solve_cold(qr, qc, cbar, eps)
    qr_bad, qc_bad = qr.copy(), qc.copy()
    if where == "reward_nan":
        qr_bad[3, 5] = np.nan
    elif where == "cost_inf":
        qc_bad[0, 7, 1] = np.inf
    else:
        qr_bad[0, 0] = -np.inf
    before = (qr_bad.copy(), qc_bad.copy())
    sol = solve_dual(
        qr_bad,
        qc_bad,
        cbar,
        eps,
        init_temperature=previous.temperature,
        init_multipliers=previous.cost_multipliers,
    )
    assert sol.fallback
    assert not sol.success
    assert sol.temperature == previous.temperature
    np.testing.assert_array_equal(sol.cost_multipliers, previous.cost_multipliers)
    assert sol.saturated.tolist() == [False]
    assert "fallback" in sol.message
    np.testing.assert_array_equal(qr_bad, before[0])
    np.testing.assert_array_equal(qc_bad, before[1])


def test_finite_input_does_not_fall_back() -> None:
    sol = solve_cold(*make_problem(63))
    assert sol.fallback is False
    assert "fallback" not in sol.message


def test_no_constraints() -> None:
    qr, _, _, eps = make_problem(64)
    sol = solve_cold(qr, np.zeros((0, B, K)), np.zeros(0), eps)
    assert sol.cost_multipliers.shape == (0,)
    assert sol.weighted_cost.shape == (0,)
    assert sol.saturated.shape == (0,)
    assert sol.success
    assert abs(sol.mean_kl - eps) < 1e-7
    w = estep_weights(qr, np.zeros((0, B, K)), sol.temperature, [])
    np.testing.assert_allclose(w, weights_at_kl(qr, eps), atol=1e-7)


def test_infinite_threshold_pins_the_multiplier() -> None:
    qr, qc, cbar, eps = make_problem(65, m=2)
    unconstrained = solve_cold(qr, qc[:0], cbar[:0], eps)
    one = solve_cold(qr, qc[:1], cbar[:1], eps)
    sol = solve_cold(qr, qc, np.array([cbar[0], np.inf]), eps, init_multipliers=[1.0, 50.0])
    assert sol.cost_multipliers[1] == LO
    assert not sol.saturated[1]
    assert sol.cost_multipliers[0] == pytest.approx(one.cost_multipliers[0], rel=1e-4)
    assert sol.temperature == pytest.approx(one.temperature, rel=1e-4)
    assert math.isfinite(sol.dual_value)
    only_inf = solve_cold(qr, qc[:1], np.array([np.inf]), eps)
    assert only_inf.cost_multipliers[0] == LO
    assert only_inf.temperature == pytest.approx(unconstrained.temperature, rel=1e-4)


def test_warm_start_converges_fast_and_init_is_clipped() -> None:
    qr, qc, cbar, eps = make_problem(66, m=2)
    cold = solve_cold(qr, qc, cbar, eps)
    warm = solve_cold(qr, qc, cbar, eps, init_temperature=cold.temperature, init_multipliers=cold.cost_multipliers)
    assert warm.iterations <= 2 < cold.iterations
    assert warm.temperature == pytest.approx(cold.temperature, rel=1e-7)
    wild = solve_cold(qr, qc, cbar, eps, init_temperature=1e12, init_multipliers=[0.0, 1e12])
    assert wild.temperature == pytest.approx(cold.temperature, rel=1e-6)
    np.testing.assert_allclose(wild.cost_multipliers, cold.cost_multipliers, rtol=1e-6)


@pytest.mark.parametrize("reset", [False, True])
def test_recovers_from_a_saturated_warm_start(reset: bool) -> None:
    # P3: the previous batch saturated (η ≈ 5.8e4, λ = 1e5); this one is feasible.
    qr, qc, cbar, eps = make_problem(67)
    cold = solve_cold(qr, qc, cbar, eps)
    sol = solve_cold(qr, qc, cbar, eps, init_temperature=5.8e4, init_multipliers=[HI], reset_on_saturation=reset)
    assert sol.temperature == pytest.approx(cold.temperature, rel=1e-6)
    np.testing.assert_allclose(sol.cost_multipliers, cold.cost_multipliers, rtol=1e-6)
    assert not sol.saturated.any()
    assert ("warm start reset" in sol.message) is reset


def test_invalid_arguments_raise() -> None:
    qr, qc, cbar, eps = make_problem(68)
    with pytest.raises(ValueError, match="q_cost"):
        solve_dual(qr, qc[:, :10], cbar, eps)
    with pytest.raises(ValueError, match="per_step_threshold"):
        solve_dual(qr, qc, [1.0, 2.0], eps)
    with pytest.raises(ValueError, match="per_step_threshold"):
        solve_dual(qr, qc, [np.nan], eps)
    with pytest.raises(ValueError, match="kl_bound"):
        solve_dual(qr, qc, cbar, 0.0)
    with pytest.raises(ValueError, match="bounds"):
        solve_dual(qr, qc, cbar, eps, bounds=(1.0, 0.5))
    with pytest.raises(ValueError, match="temperature"):
        estep_weights(qr, qc, 0.0, [1.0])
    with pytest.raises(ValueError, match="log_params"):
        dual([0.0], qr, qc, cbar, eps)


def test_dual_solution_is_frozen() -> None:
    sol = solve_cold(*make_problem(69))
    with pytest.raises(AttributeError):
        sol.temperature = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------
# Golden problems (tests/data/estep-golden)
# --------------------------------------------------------------------------------------------------


def test_golden_folder_holds_exactly_the_four_cases() -> None:
    assert GOLDEN.is_dir(), f"golden E-step data missing: {GOLDEN}"
    assert sorted(p.stem for p in GOLDEN.glob("*.npz")) == sorted(GOLDEN_CASES)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_case(case: str) -> None:
    data, ref = load_golden(case)
    qr, qc, cbar, eps = data["q_reward"], data["q_cost"], data["per_step_threshold"], float(data["kl_bound"])
    assert qr.shape == (ref["B"], ref["K"]) and qc.shape[0] == ref["constraints"]
    np.testing.assert_allclose(cbar, ref["per_step_threshold"], rtol=1e-15)
    assert eps == ref["kl_bound"]

    sol = solve_cold(qr, qc, cbar, eps)
    w = estep_weights(qr, qc, sol.temperature, sol.cost_multipliers)
    kl = mean_kl_to_uniform(w)
    weighted_cost = np.einsum("bk,ibk->i", w, qc) / qr.shape[0]
    weighted_reward = float(np.sum(w * qr) / qr.shape[0])

    assert sol.dual_value == pytest.approx(ref["dual_value"], rel=1e-6)
    assert kl == pytest.approx(ref["mean_kl_to_uniform"], abs=1e-4)
    np.testing.assert_allclose(weighted_cost, ref["weighted_cost"], rtol=0, atol=1e-4)
    assert weighted_reward == pytest.approx(ref["weighted_reward"], abs=1e-4)

    if case == "infeasible_1c":
        assert sol.saturated.tolist() == [True]
        assert sol.cost_multipliers[0] == HI
        assert sol.temperature == pytest.approx(ref["temperature"], rel=1e-3)
        assert abs(kl - eps) < 1e-6  # the trust region holds although the constraint cannot be met
        assert weighted_cost[0] < qc.mean()  # weight moved toward the cheap samples
        assert np.mean(w.argmax(axis=1) == qc[0].argmin(axis=1)) > 0.5
        return

    assert not sol.saturated.any()
    assert sol.success
    assert sol.temperature == pytest.approx(ref["temperature"], rel=1e-3)
    np.testing.assert_allclose(sol.cost_multipliers, ref["cost_multipliers"], rtol=1e-3)
    assert abs(kl - eps) < 1e-4  # the KL bound binds in every feasible case
    if case == "slack_1c":
        assert sol.cost_multipliers[0] == pytest.approx(LO, rel=1e-9)
        assert weighted_cost[0] < cbar[0] - 1.0
    else:
        np.testing.assert_allclose(weighted_cost, cbar, rtol=0, atol=1e-4)
        assert sol.dual_value == pytest.approx(weighted_reward, rel=1e-6)  # strong duality


# --------------------------------------------------------------------------------------------------
# Newton warm path (the learner's default, algo.dual_newton_steps)
# --------------------------------------------------------------------------------------------------


def test_hessian_matches_the_analytic_formula() -> None:
    from cvpo.estep import _flat, _hessian

    qr, qc, _, _ = make_problem(4, m=2)
    for eta, lam in ((1.3, [0.3, 0.7]), (0.2, [2.0, 1e-6])):
        lam = np.array(lam)
        np.testing.assert_allclose(
            _hessian(eta, lam, qr, _flat(qc)), analytic_hessian(eta, lam, qr, qc), rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize("case", GOLDEN_CASES)
@pytest.mark.parametrize("factor", [1.0, 1.3, 0.7, 3.0])
def test_newton_warm_start_reaches_the_cold_solution(case: str, factor: float) -> None:
    data, _ = load_golden(case)
    qr, qc, cbar, eps = data["q_reward"], data["q_cost"], data["per_step_threshold"], float(data["kl_bound"])
    cold = solve_cold(qr, qc, cbar, eps)
    warm = solve_cold(
        qr,
        qc,
        cbar,
        eps,
        init_temperature=cold.temperature * factor,
        init_multipliers=cold.cost_multipliers * factor,
        newton_steps=4,
    )
    assert warm.temperature == pytest.approx(cold.temperature, rel=1e-6)
    np.testing.assert_allclose(warm.cost_multipliers, cold.cost_multipliers, rtol=1e-6)
    assert warm.success == cold.success and warm.saturated.tolist() == cold.saturated.tolist()
    if factor in (1.0, 1.3, 0.7) and case != "infeasible_1c":
        assert warm.success and "Newton" in warm.message and warm.iterations <= 4


@pytest.mark.parametrize("case", GOLDEN_CASES)
@pytest.mark.parametrize("start", ["saturated", "floor", "interior"])
def test_newton_recovers_from_far_warm_starts(case: str, start: str) -> None:
    """Leaving saturation, a constraint switching on, or entering infeasibility: the warm start is far
    from the optimum, and the cold and corner restarts still let Newton reach L-BFGS-B's solution."""
    data, _ = load_golden(case)
    qr, qc, cbar, eps = data["q_reward"], data["q_cost"], data["per_step_threshold"], float(data["kl_bound"])
    m = qc.shape[0]
    cold = solve_cold(qr, qc, cbar, eps)
    init = {
        "saturated": (HI, np.full(m, HI)),
        "floor": (cold.temperature, np.full(m, LO)),
        "interior": (cold.temperature * 0.3 if case == "infeasible_1c" else 0.3, np.full(m, 0.05)),
    }[start]
    warm = solve_cold(qr, qc, cbar, eps, init_temperature=init[0], init_multipliers=init[1], newton_steps=4)
    assert warm.success == cold.success and warm.saturated.tolist() == cold.saturated.tolist()
    assert "Newton" in warm.message, warm.message
    assert warm.iterations <= 1 + 8 + 4
    assert warm.dual_value <= cold.dual_value + 1e-9 * abs(cold.dual_value)
    assert warm.temperature == pytest.approx(cold.temperature, rel=1e-5)
    np.testing.assert_allclose(warm.cost_multipliers, cold.cost_multipliers, rtol=1e-5)


@pytest.mark.parametrize("newton_steps", [0, 4])
def test_solution_weights_are_the_estep_weights_at_the_solution(newton_steps: int) -> None:
    for seed, m in ((3, 1), (4, 2)):
        qr, qc, cbar, eps = make_problem(seed, m=m)
        sol = solve_cold(qr, qc, cbar, eps, newton_steps=newton_steps)
        expected = estep_weights(qr, qc, sol.temperature, sol.cost_multipliers)
        np.testing.assert_allclose(sol.weights, expected, rtol=1e-9, atol=1e-12)
    bad = qr.copy()
    bad[0, 0] = np.nan
    fb = solve_dual(bad, qc, cbar, eps, init_temperature=0.5, init_multipliers=[0.1] * m, newton_steps=4)
    assert fb.fallback and fb.weights.shape == qr.shape
    np.testing.assert_allclose(fb.weights[1:], estep_weights(bad, qc, 0.5, [0.1] * m)[1:])


def test_newton_keeps_a_threshold_below_every_cost_at_the_bound() -> None:
    """c̄ below the batch mean of the per-state minimum cost: no weights can meet it, so λ* is the upper
    bound whatever the warm start; the solver places it there before any step (§8.1 P2)."""
    qr, qc, _, eps = make_problem(7)
    cbar = np.array([qc[0].min(axis=1).mean() - 0.01])
    for init in ((0.2, [LO]), (1.0, [0.5]), (HI, [HI])):
        sol = solve_cold(qr, qc, cbar, eps, init_temperature=init[0], init_multipliers=init[1], newton_steps=4)
        assert sol.saturated.tolist() == [True] and sol.cost_multipliers[0] == pytest.approx(HI)
        assert "Newton" in sol.message


def test_newton_steps_on_random_problems_and_validation() -> None:
    for seed in range(5):
        qr, qc, cbar, eps = make_problem(80 + seed, m=1 + seed % 2)
        cold = solve_cold(qr, qc, cbar, eps)
        warm = solve_cold(
            qr,
            qc,
            cbar,
            eps,
            init_temperature=cold.temperature * 1.2,
            init_multipliers=cold.cost_multipliers * 0.8,
            newton_steps=4,
        )
        assert warm.success and warm.iterations <= 4
        np.testing.assert_allclose(warm.cost_multipliers, cold.cost_multipliers, rtol=1e-6)
        assert warm.temperature == pytest.approx(cold.temperature, rel=1e-6)
    with pytest.raises(ValueError, match="newton_steps"):
        solve_dual(qr, qc, cbar, eps, newton_steps=-1)
