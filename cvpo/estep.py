"""CVPO E-step: the sampled convex dual in (η, λ) and the softmax weights (cvpo-algorithm.md §2).

For B states with K actions each sampled from π_old, scored by Q_r and m cost critics Q_c^i, let
A_sj = Q_r(s, a_sj) − Σ_i λ_i Q_c^i(s, a_sj). The dual (§2.1) is

    g(η, λ) = η ε + Σ_i λ_i c̄_i + (η/B) Σ_s [LSE_j(A_sj/η) − log K],

jointly convex for η > 0 (§2.2), and the E-step weights are q_sj = softmax_j(A_sj/η).

Everything here is float64 NumPy/SciPy on the host (§2.5 step 1), max-shifted so that no exponent is
positive (§8.1 P1), and no function writes into its inputs (§8.1 P15, §9 I14): float32 or float64
arrays go in, new float64 arrays come out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import OptimizeResult, minimize

__all__ = ["DualSolution", "dual", "dual_linear", "estep_weights", "solve_dual"]

ArrayLike = np.ndarray | Sequence[float]

# Solver tolerances. ``solve_dual`` minimises g / spread(Q_r) (per-state spread of the rewards), so the
# log-space gradient is (η/spread)·(ε − KL) and (λ_i/spread)·(c̄_i − weighted cost_i): at the natural
# scales η ~ spread, λ_i ~ spread(Q_r)/spread(Q_c^i) these are the KL error and the weighted-cost error
# relative to Q_c's spread, so one set of tolerances fits every scale of Q (§9 I6).
_GTOL = 1e-9  # L-BFGS-B's projected-gradient stop
_ACCEPT_TOL = 1e-7  # residual at which a solve counts as converged (``success``)
_LIFT_TOL = 1e-6  # a coordinate whose linear gradient says "increase" by more than this ...
_LIFT_GAP = 3.0  # ... while it sits more than e^3 ≈ 20× below its natural scale is lifted on restart
_MAX_RESTARTS = 4
# Newton warm path: largest step per log coordinate (a factor e^2) and backtracking halvings.
_NEWTON_MAX_STEP = 2.0
_NEWTON_BACKTRACKS = 8
# λ_i within this relative distance of the upper bound counts as saturated (P2).
_SATURATION_RTOL = 1e-6
# η's upper bound, separate from λ's (``bounds``): when no weights in the KL ball meet a constraint,
# λ runs to its bound and η must still be free to grow until KL = ε. With one shared bound the optimum
# sat at the corner (η, λ) = (1e5, 1e5), where ε no longer enters: KL 0.48 against ε = 0.1 on the
# golden infeasible problem, 0.13–0.21 against 0.05 in Circle training.
_TEMPERATURE_UPPER = 1e12


# --------------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------------


def _as_problem(
    q_reward: ArrayLike, q_cost: ArrayLike, per_step_threshold: ArrayLike, kl_bound: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Validate shapes and return float64 views/copies (q_r (B,K), q_c (m,B,K), c̄ (m,), ε).

    ``np.asarray`` only copies when the dtype changes; callers must treat the results as read-only.
    """
    qr = np.asarray(q_reward, dtype=np.float64)
    qc = np.asarray(q_cost, dtype=np.float64)
    if qr.ndim != 2 or qr.shape[0] < 1 or qr.shape[1] < 1:
        raise ValueError(f"q_reward must have shape (B, K) with B, K >= 1, got {qr.shape}")
    if qc.ndim != 3 or qc.shape[1:] != qr.shape:
        raise ValueError(f"q_cost must have shape (m, B, K) = (m, *{qr.shape}), got {qc.shape}")
    m = qc.shape[0]
    cbar = np.asarray(per_step_threshold, dtype=np.float64)
    if cbar.ndim == 0 and m == 1:
        cbar = cbar.reshape(1)
    if cbar.shape != (m,):
        raise ValueError(f"per_step_threshold must have shape ({m},), got {cbar.shape}")
    if np.isnan(cbar).any() or (cbar == -np.inf).any():
        raise ValueError(f"per_step_threshold must not be NaN or -inf (inf means unconstrained), got {cbar}")
    eps = float(kl_bound)
    if not (math.isfinite(eps) and eps > 0.0):
        raise ValueError(f"kl_bound must be finite and > 0, got {kl_bound!r}")
    return qr, qc, cbar, eps


def _as_multipliers(multipliers: ArrayLike, m: int, name: str = "multipliers") -> np.ndarray:
    lam = np.array(multipliers, dtype=np.float64).reshape(-1)
    if lam.shape != (m,):
        raise ValueError(f"{name} must have shape ({m},), got {np.shape(multipliers)}")
    return lam


# --------------------------------------------------------------------------------------------------
# Core evaluation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Eval:
    value: float  # g(η, λ), c̄ terms of pinned constraints excluded (see _evaluate)
    grad_eta: float  # ε − mean_s KL(w_s‖U)
    grad_lam: np.ndarray  # c̄ − weighted cost, shape (m,)
    mean_kl: float
    weighted_cost: np.ndarray  # (m,)
    advantages: np.ndarray  # A (B, K), kept for the Hessian at the same point
    weights: np.ndarray  # w (B, K)


def _flat(qc: np.ndarray) -> np.ndarray:
    """Q_c (m, B, K) as (m, B·K) (a view when contiguous; also for m = 0)."""
    m, b, k = qc.shape
    return qc.reshape(m, b * k)


def _advantages(qr: np.ndarray, qc2: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """A = Q_r − Σ_i λ_i Q_c^i as a (B, K) array; ``qc2`` is Q_c reshaped to (m, B·K).

    Returns a new array, or ``qr`` itself when m = 0: callers must not write into the result.
    """
    if qc2.shape[0] == 0:
        return qr
    # Element-wise rather than a BLAS gemv: multithreaded BLAS on tiny products costs more in thread
    # wake-ups (millisecond tail latencies) than the arithmetic.
    A = qr - lam[0] * qc2[0].reshape(qr.shape)
    for i in range(1, qc2.shape[0]):
        A -= lam[i] * qc2[i].reshape(qr.shape)
    return A


def _evaluate(eta: float, lam: np.ndarray, qr: np.ndarray, qc2: np.ndarray, cbar: np.ndarray, eps: float) -> _Eval:
    """g and its §2.2 gradient at (η, λ), max-shifted (§2.1 original-code form, §8.1 P1).

    ``qc2`` is Q_c reshaped to (m, B·K). Constraints with c̄_i = inf contribute no λ_i c̄_i term to the
    value (the solver pins their multiplier) and get an infinite gradient entry.
    """
    B, K = qr.shape
    log_k = math.log(K)
    A = _advantages(qr, qc2, lam)
    M = A.max(axis=1, keepdims=True)
    z = A - M  # new array, so the in-place ops below touch no input
    z /= eta
    w = np.exp(z)
    S = w.sum(axis=1)
    w /= S[:, None]
    lse = np.log(S)
    mean_lse = float(lse.mean())
    # KL(w_s‖U) = Σ_j w_sj log(K w_sj) with log w_sj = z_sj − lse_s.
    kl = float(np.einsum("ij,ij->", w, z)) / B - mean_lse + log_k  # einsum: no BLAS threads, as above
    wc = np.einsum("ij,j->i", qc2, w.reshape(-1)) / B
    finite = np.isfinite(cbar)
    lin = float(lam[finite] @ cbar[finite])
    value = eta * eps + lin + float(M.mean()) + eta * (mean_lse - log_k)
    return _Eval(
        value=value, grad_eta=eps - kl, grad_lam=cbar - wc, mean_kl=kl, weighted_cost=wc, advantages=A, weights=w
    )


def _hessian(eta: float, lam: np.ndarray, qr: np.ndarray, qc2: np.ndarray) -> np.ndarray:
    """∂²g in linear (η, λ) (§2.2): batch means of Var_w(A)/η³, Cov_w(A, Q_c^i)/η², Cov_w(Q_c^i, Q_c^k)/η.

    ``qc2`` is Q_c reshaped to (m, B·K). One pass of weighted moments, (1 + m) × (1 + m).
    """
    A = _advantages(qr, qc2, lam)
    z = A - A.max(axis=1, keepdims=True)
    z /= eta
    w = np.exp(z)
    w /= w.sum(axis=1, keepdims=True)
    return _hessian_at(eta, A, w, qc2)


def _hessian_at(eta: float, A: np.ndarray, w: np.ndarray, qc2: np.ndarray) -> np.ndarray:
    """:func:`_hessian` from the advantages A and weights w an evaluation at (η, λ) already computed."""
    B, K = A.shape
    m = qc2.shape[0]
    v = np.empty((1 + m, B, K))
    v[0] = A
    v[1:] = qc2.reshape(m, B, K)
    v -= np.einsum("bk,ibk->ib", w, v)[:, :, None]  # centred per state under w
    wv = v * w  # (1 + m, B, K)
    cov = np.einsum("ibk,jbk->ij", wv, v) / B
    scale = np.empty(1 + m)
    scale[0], scale[1:] = 1.0 / eta, 1.0
    return cov * np.outer(scale, scale) / eta


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def dual_linear(
    eta: float,
    multipliers: ArrayLike,
    q_reward: ArrayLike,
    q_cost: ArrayLike,
    per_step_threshold: ArrayLike,
    kl_bound: float,
) -> tuple[float, np.ndarray]:
    """Dual value g(η, λ) and its gradient w.r.t. (η, λ_1..m) (cvpo-algorithm.md §2.1–2.2).

    ∂g/∂η = ε − (1/B)Σ_s KL(w_s‖U) and ∂g/∂λ_i = c̄_i − (1/B)Σ_s Σ_j w_sj Q_c^i. Requires η > 0 and
    λ ≥ 0; an infinite c̄_i (unconstrained) gives an infinite value unless λ_i = 0.

    Returns:
        (g, gradient of shape (1 + m,)).
    """
    qr, qc, cbar, eps = _as_problem(q_reward, q_cost, per_step_threshold, kl_bound)
    lam = _as_multipliers(multipliers, qc.shape[0])
    eta = float(eta)
    if not (math.isfinite(eta) and eta > 0.0):
        raise ValueError(f"eta must be finite and > 0, got {eta!r}")
    if not (np.isfinite(lam).all() and (lam >= 0.0).all()):
        raise ValueError(f"multipliers must be finite and >= 0, got {lam}")
    ev = _evaluate(eta, lam, qr, _flat(qc), cbar, eps)
    inf_cbar = ~np.isfinite(cbar)
    value = ev.value + (float(lam[inf_cbar] @ cbar[inf_cbar]) if (lam[inf_cbar] > 0).any() else 0.0)
    return value, np.concatenate(([ev.grad_eta], ev.grad_lam))


def dual(
    log_params: ArrayLike,
    q_reward: ArrayLike,
    q_cost: ArrayLike,
    per_step_threshold: ArrayLike,
    kl_bound: float,
) -> tuple[float, np.ndarray]:
    """Dual value and gradient in log parameters x = (log η, log λ_1..m) (cvpo-algorithm.md §2.2, §2.5).

    ∂g/∂log η = η·∂g/∂η and ∂g/∂log λ_i = λ_i·∂g/∂λ_i. Max-shifted, so finite at Q ≈ 500, η = 1e-6.

    Returns:
        (g, gradient of shape (1 + m,)).
    """
    x = np.asarray(log_params, dtype=np.float64).reshape(-1)
    m = np.shape(q_cost)[0] if np.ndim(q_cost) == 3 else -1
    if m >= 0 and x.shape != (1 + m,):
        raise ValueError(f"log_params must have shape ({1 + m},) = (log η, log λ_1..m), got {x.shape}")
    params = np.exp(x)
    value, grad = dual_linear(params[0], params[1:], q_reward, q_cost, per_step_threshold, kl_bound)
    return value, grad * params


def estep_weights(
    q_reward: ArrayLike, q_cost: ArrayLike, temperature: float, cost_multipliers: ArrayLike
) -> np.ndarray:
    """E-step weights q_sj = softmax_j((Q_r − Σ_i λ_i Q_c^i)/η) (cvpo-algorithm.md §2.1, §2.5 step 6).

    Max-shifted (§8.1 P1) into a new float64 (B, K) array; the inputs are never modified (§9 I14).
    """
    qr = np.asarray(q_reward, dtype=np.float64)
    qc = np.asarray(q_cost, dtype=np.float64)
    if qr.ndim != 2 or qc.ndim != 3 or qc.shape[1:] != qr.shape:
        raise ValueError(f"need q_reward (B, K) and q_cost (m, B, K), got {qr.shape} and {qc.shape}")
    lam = _as_multipliers(cost_multipliers, qc.shape[0], "cost_multipliers")
    eta = float(temperature)
    if not (math.isfinite(eta) and eta > 0.0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    A = _advantages(qr, _flat(qc), lam)
    z = A - A.max(axis=1, keepdims=True)  # new array: the in-place ops below touch no input
    z /= eta
    w = np.exp(z)
    w /= w.sum(axis=1, keepdims=True)
    return w


@dataclass(frozen=True, eq=False)
class DualSolution:
    """Result of :func:`solve_dual` (cvpo-algorithm.md §2.5).

    Attributes:
        temperature: η.
        cost_multipliers: λ, shape (m,).
        dual_value: g(η, λ) (without λ_i c̄_i terms of unconstrained, c̄_i = inf, constraints).
        mean_kl: batch mean KL(w_s‖Uniform_K) of the weights at (η, λ).
        weighted_cost: batch mean Σ_j w_sj Q_c^i, shape (m,).
        iterations: L-BFGS-B iterations, over all restarts.
        success: the solve met its optimality test (see :func:`solve_dual`); ``False`` alone is not a
            failure (§2.5 step 5).
        saturated: bool (m,), λ_i at its upper bound: "constraint infeasible on sampled actions" (P2).
        fallback: the solve produced non-finite values and the starting (η, λ) were kept.
        message: optimiser message plus notes on saturation, fallback and warm-start resets.
        weights: the E-step weights q_sj at (η, λ), (B, K): what :func:`estep_weights` returns for them
            (to float64 rounding), from the solver's last evaluation instead of a second pass.
    """

    temperature: float
    cost_multipliers: np.ndarray
    dual_value: float
    mean_kl: float
    weighted_cost: np.ndarray
    iterations: int
    success: bool
    saturated: np.ndarray
    fallback: bool
    message: str
    weights: np.ndarray


def solve_dual(
    q_reward: ArrayLike,
    q_cost: ArrayLike,
    per_step_threshold: ArrayLike,
    kl_bound: float,
    init_temperature: float = 1.0,
    init_multipliers: ArrayLike | None = None,
    bounds: tuple[float, float] = (1e-6, 1e5),
    max_iter: int = 50,
    reset_on_saturation: bool = False,
    newton_steps: int = 0,
) -> DualSolution:
    """Solve the E-step dual with the recommended solver (cvpo-algorithm.md §2.5).

    ``bounds`` bound every λ_i and η from below; η's upper bound is its own, 1e12 (or ``hi`` if larger),
    so when a constraint saturates (λ_i at ``hi``) the trust region still holds: KL = ε at the optimum.

    L-BFGS-B in log space x = (log η, log λ) with the analytic gradient (``jac=True``) and the bounds
    [lo, hi] on η and every λ_i in log space. Warm start from (``init_temperature``,
    ``init_multipliers``), clipped into the bounds; ``init_multipliers=None`` puts every λ_i at the
    lower bound (the cold start of §2.5 step 4 is the default η = 1).

    - A constraint with c̄_i = inf is unconstrained: its λ_i is pinned at the lower bound.
    - λ_i at the upper bound sets ``saturated[i]`` (§8.1 P2). With ``reset_on_saturation=True`` a warm
      start with any λ_i at the upper bound (the previous solve saturated) is replaced by the cold
      start, so the solve does not have to climb back down (§8.1 P3).
    - Non-finite inputs or a non-finite result keep the starting (η, λ) and set ``fallback``
      (§2.5 step 5).
    - m = 0 (``q_cost`` of shape (0, B, K)) solves for η alone.
    - ``max_iter`` caps the L-BFGS-B iterations in total (Newton steps, below, are not counted). In log
      space a coordinate at the lower bound has a vanishing gradient, which can stall L-BFGS-B (or end
      it early, with a stale curvature memory) although the linear-space gradient says "increase"; such
      solves are restarted with a fresh memory and the stalled coordinates lifted to their natural
      scale, while iterations last.
    - ``success`` means every coordinate not held at a bound has a negligible effect on g or meets its
      optimality condition (|ε − KL| and |c̄_i − weighted cost_i| relative to Q_c's per-state spread)
      to 1e-7; ``False`` alone is not a failure (§2.5 step 5).

    - ``newton_steps > 0``: first try projected Newton steps (analytic Hessian, backtracking; η moves in
      log space, λ linearly) from up to three starts, each accepted only when it passes the same
      ``success`` test: the warm start (``newton_steps`` steps; one when it is saturated), a cold point
      (λ at the floor, η at the advantages' spread; twice as many steps) and the upper corner of the
      bounds (where the optimum sits when no weights in the KL ball meet the constraints). Only if all
      fail does the L-BFGS-B solve run from the warm start. In training the optimum moves little between
      most minibatches, so a few Newton steps replace ~10–30 L-BFGS-B iterations and their SciPy
      overhead; measured on 1 200 solves captured from PointGoal1 training, the mean solve fell from
      1.7 to 1.0 ms and the share meeting ``success`` rose from 97.3 % to 99.75 %. ``iterations`` counts
      both kinds.
    - A constraint whose threshold lies below the batch mean of its per-state minimum cost cannot be met
      by any weights; its λ_i starts (and stays) at the upper bound.

    Inputs may be float32; everything is computed in float64 and nothing is written into them. The
    rewards are centred per state internally, which leaves (η*, λ*) unchanged (§9 I6) and keeps g at
    full precision when Q is large.
    """
    qr_in, qc, cbar, eps = _as_problem(q_reward, q_cost, per_step_threshold, kl_bound)
    m = qc.shape[0]
    lo, hi = (float(b) for b in bounds)
    if not (0.0 < lo < hi < math.inf):
        raise ValueError(f"bounds must satisfy 0 < lo < hi < inf, got {bounds!r}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    if int(newton_steps) < 0:
        raise ValueError(f"newton_steps must be >= 0, got {newton_steps!r}")
    eta0 = float(init_temperature)
    lam0 = np.full(m, lo) if init_multipliers is None else _as_multipliers(init_multipliers, m, "init_multipliers")
    if math.isnan(eta0) or np.isnan(lam0).any():
        raise ValueError(f"initial values must not be NaN, got η={eta0!r}, λ={lam0}")
    eta_hi = max(hi, _TEMPERATURE_UPPER)  # η's own bound (see the docstring)
    eta0 = min(max(eta0, lo), eta_hi)
    lam0 = np.clip(lam0, lo, hi)
    pinned = ~np.isfinite(cbar)
    lam0[pinned] = lo
    notes: list[str] = []
    if reset_on_saturation and (lam0[~pinned] >= hi * (1.0 - _SATURATION_RTOL)).any():
        eta0, lam0 = min(max(1.0, lo), hi), np.full(m, lo)
        notes.append("warm start reset after saturation")

    if not (np.isfinite(qr_in).all() and np.isfinite(qc).all()):
        return _fallback(qr_in, qc, cbar, eps, eta0, lam0, "non-finite Q values", notes)

    p = _DualProblem(qr_in, qc, cbar, eps, lo, hi, eta_hi)
    x = np.concatenate(([math.log(eta0)], np.log(lam0[p.free])))
    x[1:][p.infeasible] = p.log_hi
    nit, converged, message = 0, False, ""
    if newton_steps > 0:
        x, nit, converged, message = _newton_starts(p, x, int(newton_steps))
    restarts = 0
    if not converged:
        x, lbfgs_nit, restarts, converged, message = _lbfgs(p, x, int(max_iter))
        nit += lbfgs_nit

    if not np.isfinite(x).all():
        return _fallback(qr_in, qc, cbar, eps, eta0, lam0, "non-finite solver result", notes)
    eta, lam = p.unpack(x)
    eta, lam = min(max(eta, lo), eta_hi), np.clip(lam, lo, hi)
    ev = p.evaluate(x)
    if not (math.isfinite(ev.value) and math.isfinite(ev.mean_kl) and np.isfinite(ev.weighted_cost).all()):
        return _fallback(qr_in, qc, cbar, eps, eta0, lam0, "non-finite dual value, KL or weighted cost", notes)
    saturated = ~pinned & (lam >= hi * (1.0 - _SATURATION_RTOL))
    if saturated.any():
        which = np.flatnonzero(saturated).tolist()
        notes.append(f"constraint infeasible on sampled actions: λ at upper bound for {which}")
    if restarts:
        notes.append(f"{restarts} restart(s)")
    return DualSolution(
        temperature=eta,
        cost_multipliers=lam,
        dual_value=ev.value + p.offset,
        mean_kl=ev.mean_kl,
        weighted_cost=np.array(ev.weighted_cost, dtype=np.float64),
        iterations=nit,
        success=converged,
        saturated=saturated,
        fallback=False,
        message="; ".join([message, *notes]),
        weights=ev.weights,
    )


def _fallback(
    qr: np.ndarray,
    qc: np.ndarray,
    cbar: np.ndarray,
    eps: float,
    eta0: float,
    lam0: np.ndarray,
    reason: str,
    notes: list[str],
) -> DualSolution:
    """Keep the starting (η, λ) when the solve cannot give finite values (§2.5 step 5)."""
    with np.errstate(all="ignore"):
        ev = _evaluate(eta0, lam0, qr, _flat(qc), cbar, eps)
        weights = estep_weights(qr, qc, eta0, lam0)
    return DualSolution(
        temperature=eta0,
        cost_multipliers=lam0.copy(),
        dual_value=ev.value,
        mean_kl=ev.mean_kl,
        weighted_cost=ev.weighted_cost,
        iterations=0,
        success=False,
        saturated=np.zeros(qc.shape[0], dtype=bool),
        fallback=True,
        message="; ".join([f"fallback: {reason}; kept previous (η, λ)", *notes]),
        weights=weights,
    )


class _DualProblem:
    """One E-step dual in the solvers' coordinates x = (log η, log λ_free), scaled and cached.

    Q_r is centred per state (a per-state shift: same (η*, λ*), g shifted by ``offset``, §9 I6) and g
    is divided by the per-state spread of Q_r (see _GTOL). ``natural`` holds the natural scales of η
    (that spread) and λ_i (spread of Q_r over spread of Q_c^i), where stalled coordinates are lifted to.
    The last evaluation is cached: the solvers ask for the same point several times.
    """

    def __init__(
        self, qr_in: np.ndarray, qc: np.ndarray, cbar: np.ndarray, eps: float, lo: float, hi: float, eta_hi: float
    ) -> None:
        m = qc.shape[0]
        self.m, self.cbar, self.eps = m, cbar, eps
        self.lo, self.hi, self.eta_hi = lo, hi, eta_hi
        self.qc2 = _flat(qc)
        row_mean = qr_in.mean(axis=1, keepdims=True)
        self.qr = qr_in - row_mean
        self.offset = float(row_mean.mean())
        self.free = np.flatnonzero(np.isfinite(cbar))
        free = self.free
        self.log_lo, self.log_hi, self.log_eta_hi = math.log(lo), math.log(hi), math.log(eta_hi)
        self.x_hi = np.concatenate(([self.log_eta_hi], np.full(free.size, self.log_hi)))  # upper bounds of x
        spread_c = qc.std(axis=2).mean(axis=1)[free]
        spread_r = float(self.qr.std(axis=1).mean())
        if not spread_r > 0.0:  # constant rewards per state: fall back on the costs' spread
            spread_r = float(spread_c.max()) if spread_c.size and spread_c.max() > 0.0 else 1.0
        self.scale = spread_r
        lam_scale = spread_r / np.where(spread_c > 0.0, spread_c, spread_r)
        self.natural = np.log(np.clip(np.concatenate(([self.scale], lam_scale)), lo, hi))
        self.keep = np.concatenate(([0], 1 + free))  # η and the free λ_i, in Hessian index order
        # A constraint whose threshold lies below the batch mean of its per-state minimum cost cannot be
        # met by any weights: ∂g/∂λ_i = c̄_i − weighted cost_i < 0 everywhere, so λ_i* is the upper bound
        # (§8.1 P2).
        self.infeasible = (cbar[free] < qc[free].min(axis=2).mean(axis=1)) if free.size else np.zeros(0, bool)
        self._x: np.ndarray | None = None
        self._ev: _Eval | None = None

    def unpack(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        lam = np.full(self.m, self.lo)
        lam[self.free] = np.exp(x[1:])
        return math.exp(x[0]), lam

    def evaluate(self, x: np.ndarray) -> _Eval:
        if self._ev is not None and np.array_equal(self._x, x):
            return self._ev
        eta, lam = self.unpack(x)
        with np.errstate(all="ignore"):
            ev = _evaluate(eta, lam, self.qr, self.qc2, self.cbar, self.eps)
        self._x, self._ev = x.copy(), ev
        return ev

    def linear_grad(self, ev: _Eval) -> np.ndarray:
        return np.concatenate(([ev.grad_eta], ev.grad_lam[self.free]))

    def objective(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        ev = self.evaluate(x)
        return ev.value / self.scale, self.linear_grad(ev) * np.exp(x) / self.scale

    def check(self, x: np.ndarray) -> tuple[bool, np.ndarray, np.ndarray] | None:
        """(converged, stalled, linear gradient) at x, or None if the gradient is not finite."""
        ev = self.evaluate(x)
        g_lin = self.linear_grad(ev)
        if not np.isfinite(g_lin).all():
            return None
        # Per coordinate, in dimensionless units: the log-space gradient (the effect on g) and the
        # linear gradient at the natural scale (≈ ε − KL, and the weighted-cost error over Q_c's spread).
        g_log = g_lin * np.exp(x) / self.scale
        g_nat = g_lin * np.exp(self.natural) / self.scale
        at_lo, at_hi = x <= self.log_lo + 1e-12, x >= self.x_hi - 1e-12
        residual = np.minimum(np.abs(g_log), np.abs(g_nat))
        residual[(at_lo & (g_lin > 0.0)) | (at_hi & (g_lin < 0.0))] = 0.0
        # Stalled far below the natural scale although the linear gradient says "increase" (§2.5).
        stalled = (x < self.natural - _LIFT_GAP) & (g_nat < -_LIFT_TOL)
        return bool(residual.max() <= _ACCEPT_TOL) and not stalled.any(), stalled, g_lin

    def cold_start(self) -> np.ndarray:
        """λ at the floor (the bound when infeasible) and η at the advantages' spread there."""
        lam_cold = np.full(self.m, self.lo)
        lam_cold[self.free[self.infeasible]] = self.hi
        spread_a = float(_advantages(self.qr, self.qc2, lam_cold).std(axis=1).mean())
        eta_cold = min(max(spread_a if spread_a > 0.0 else self.scale, self.lo), self.eta_hi)
        return np.concatenate(([math.log(eta_cold)], np.log(lam_cold[self.free])))


def _newton(p: _DualProblem, x: np.ndarray, budget: int) -> tuple[np.ndarray | None, int]:
    """Projected Newton steps in u = (log η, λ); (log-space solution, steps) if it passes ``check``.

    η moves multiplicatively (at most e^2 per step) while λ moves linearly, projected into its
    bounds: in log space a λ near the floor moves by factors of e^2 per step, which turns a
    constraint switching on or off into a dozen steps; linearly it is one or two (the dual is
    jointly convex in (η, λ), §2.2).
    """
    free, scale = p.free, p.scale
    lo_u = np.concatenate(([p.log_lo], np.full(free.size, p.lo)))
    hi_u = np.concatenate(([p.log_eta_hi], np.full(free.size, p.hi)))

    def to_x(u: np.ndarray) -> np.ndarray:
        return np.concatenate((u[:1], np.log(u[1:])))

    u = np.concatenate((x[:1], np.exp(x[1:])))
    for step in range(budget + 1):
        x = to_x(u)
        state = p.check(x)
        if state is None:
            return None, step
        done, _, g_lin = state
        if done:
            return x, step
        if step == budget:
            return None, step
        eta = math.exp(x[0])
        jac = np.ones_like(u)
        jac[0] = eta
        ev = p.evaluate(x)  # cached by check above
        h_lin = _hessian_at(eta, ev.advantages, ev.weights, p.qc2)[np.ix_(p.keep, p.keep)]
        hess = jac[:, None] * jac[None, :] * h_lin
        hess[0, 0] += eta * g_lin[0]
        hess /= scale
        grad = g_lin * jac / scale
        at_lo, at_hi = u <= lo_u * (1.0 + 1e-12), u >= hi_u * (1.0 - 1e-12)
        at_lo[0], at_hi[0] = u[0] <= p.log_lo + 1e-12, u[0] >= p.log_eta_hi - 1e-12
        move = ~((at_lo & (grad > 0.0)) | (at_hi & (grad < 0.0)))  # bound-held coordinates stay put
        direction = np.zeros_like(u)
        try:
            direction[move] = -np.linalg.solve(hess[np.ix_(move, move)], grad[move])
        except np.linalg.LinAlgError:
            return None, step
        if not (np.isfinite(direction).all() and float(grad @ direction) < 0.0):
            return None, step  # not a descent direction (Hessian not positive definite here)
        direction[0] = min(max(direction[0], -_NEWTON_MAX_STEP), _NEWTON_MAX_STEP)
        f0, t = ev.value / scale, 1.0
        for _ in range(_NEWTON_BACKTRACKS):
            trial = np.clip(u + t * direction, lo_u, hi_u)
            if p.evaluate(to_x(trial)).value / scale <= f0 + 1e-4 * float(grad @ (trial - u)):
                break
            t *= 0.5
        else:
            return None, step
        u = trial
    return None, budget


def _newton_starts(p: _DualProblem, warm: np.ndarray, newton_steps: int) -> tuple[np.ndarray, int, bool, str]:
    """Newton from up to three starts until one converges: (x, steps, converged, message).

    1. the warm start (one step only when it is saturated: leaving saturation is the common case);
    2. the cold point, for a warm start far off (leaving saturation, a constraint switching on);
    3. the corner (η, λ) = hi: when no weights inside the KL ball meet the constraints the dual
       decreases without bound towards large (η, λ) and the bounded optimum sits near that corner.
    Starts are built only when reached: most solves converge from the warm start.
    """
    saturated_start = bool((warm[1:] >= p.log_hi - 1e-12).any())
    starts: list[tuple[str, Callable[[], np.ndarray], int]] = [
        ("warm", lambda: warm, 1 if saturated_start else newton_steps),
        ("cold", p.cold_start, 2 * newton_steps),
    ]
    if p.free.size:
        starts.append(("corner", lambda: np.full(1 + p.free.size, p.log_hi), 2 * newton_steps))
    nit = 0
    for name, start, budget in starts:
        x_newton, steps = _newton(p, start(), budget)
        nit += steps
        if x_newton is not None:
            return x_newton, nit, True, f"converged in {nit} Newton step(s), from the {name} start"
    return warm, nit, False, ""


def _lbfgs(p: _DualProblem, x: np.ndarray, max_iter: int) -> tuple[np.ndarray, int, int, bool, str]:
    """L-BFGS-B with restarts that lift stalled coordinates: (x, iterations, restarts, converged, message)."""
    nit, restarts, converged, message = 0, 0, False, ""
    while True:
        box = list(zip(np.full(x.size, p.log_lo), p.x_hi, strict=True))
        res = _minimize(p.objective, x, box, max_iter - nit)
        nit += int(res.nit)
        message = str(res.message)
        x = np.clip(res.x, p.log_lo, p.x_hi)
        if not np.isfinite(x).all():
            break
        state = p.check(x)
        if state is None:
            break
        converged, stalled, _ = state
        if converged or nit >= max_iter or restarts >= _MAX_RESTARTS:
            break
        x = np.where(stalled, p.natural, x)
        restarts += 1
    return x, nit, restarts, converged, message


def _minimize(
    fun: Callable[[np.ndarray], tuple[float, np.ndarray]],
    x0: np.ndarray,
    bounds: list[tuple[float, float]],
    max_iter: int,
) -> OptimizeResult:
    """L-BFGS-B with the analytic gradient (§2.5 step 2); ``ftol=0`` so only the gradient test stops it."""
    return minimize(
        fun,
        x0,
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options={"maxiter": max_iter, "ftol": 0.0, "gtol": _GTOL},
    )
