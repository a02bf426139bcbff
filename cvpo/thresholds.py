"""Episodic cost limit → per-step Q_c threshold (cvpo-algorithm.md §1.2).

Q_c is a discounted cost-to-go while the limit C is an undiscounted episode total. Both reference
implementations convert with c̄ = C·(1 − γ^T)/((1 − γ)·T), the discounted value of C spread evenly
over T steps. The formula assumes fixed-length episodes and is a heuristic (§8.1 P8).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

import numpy as np

__all__ = ["curriculum_factor", "curriculum_limits", "curriculum_threshold", "per_step_threshold"]


def _as_limits(name: str, value: float | Sequence[float]) -> np.ndarray:
    """Cost limit(s) as a new float64 array of shape (m,), validated: C ≥ 0, not NaN (inf allowed)."""
    arr = np.array(value, dtype=np.float64)
    if arr.ndim > 1:
        raise ValueError(f"{name} must be a scalar or a 1-D sequence, got shape {arr.shape}")
    arr = arr.reshape(-1)
    for c in arr:
        if math.isnan(c) or c < 0.0:
            raise ValueError(f"{name} must be >= 0 and not NaN (inf means unconstrained), got {c!r}")
    return arr


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_gamma(gamma: float) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, Real) or not (0.0 < float(gamma) <= 1.0):
        raise ValueError(f"gamma must satisfy 0 < gamma <= 1, got {gamma!r}")
    return float(gamma)


def per_step_threshold(cost_limit: float | Sequence[float], horizon: int, gamma: float) -> np.ndarray:
    """Per-step threshold c̄_i = C_i·(1 − γ^T)/((1 − γ)·T), one per constraint (cvpo-algorithm.md §1.2).

    Args:
        cost_limit: episodic limit C, a scalar (one constraint) or one value per constraint. ``inf``
            means unconstrained and maps to ``inf``.
        horizon: episode length T (``env.spec.max_episode_steps``), ≥ 1.
        gamma: discount γ with 0 < γ ≤ 1; γ = 1 gives c̄ = C exactly.

    Returns:
        New float64 array of shape (m,).

    Raises:
        ValueError: naming the bad value, if T < 1, γ ∉ (0, 1] or some C is negative or NaN.
    """
    limits = _as_limits("cost_limit", cost_limit)
    T = _check_int("horizon", horizon, 1)
    g = _check_gamma(gamma)
    if g == 1.0:
        return limits
    # (1 − γ^T)/(1 − γ) computed without cancellation: 1 − γ is exact for γ near 1 (Sterbenz), and
    # −expm1(T·log1p(−d)) = 1 − (1 − d)^T keeps full relative precision.
    d = 1.0 - g
    factor = -math.expm1(T * math.log1p(-d)) / (d * T)
    return limits * factor


def curriculum_factor(epoch: int, decay_epochs: int) -> float:
    """The curriculum's law, its one home: exp(−5e/E_decay) for e < E_decay, then 0 (§1.2)."""
    e = _check_int("epoch", epoch, 0)
    E = _check_int("decay_epochs", decay_epochs, 0)
    return math.exp(-5.0 * e / E) if e < E else 0.0


def curriculum_limits(epoch: int, start_limit: float, end_limits: Sequence[float], decay_epochs: int) -> list[float]:
    """The episodic limits in force at ``epoch`` (for reporting): C_end + (C_start − C_end)·factor."""
    if decay_epochs <= 0 or epoch >= decay_epochs:
        return [float(c) for c in end_limits]
    f = curriculum_factor(epoch, decay_epochs)
    return [c + (start_limit - c) * f for c in end_limits]


def curriculum_threshold(
    epoch: int,
    start_limit: float | Sequence[float],
    end_limit: float | Sequence[float],
    decay_epochs: int,
    horizon: int,
    gamma: float,
) -> np.ndarray:
    """Optional threshold curriculum of the original code (cvpo-algorithm.md §1.2).

    c̄(e) = c̄_end + (c̄_start − c̄_end)·exp(−5e/E_decay) for e < E_decay, and c̄_end afterwards, with both
    endpoints converted by :func:`per_step_threshold`. Scalars broadcast against per-constraint
    sequences.

    Returns:
        New float64 array of shape (m,).

    Raises:
        ValueError: naming the bad value, for epoch < 0, decay_epochs < 0, mismatched numbers of
            constraints, or any value :func:`per_step_threshold` rejects.
    """
    e = _check_int("epoch", epoch, 0)
    E = _check_int("decay_epochs", decay_epochs, 0)
    start = per_step_threshold(start_limit, horizon, gamma)
    end = per_step_threshold(end_limit, horizon, gamma)
    try:
        start, end = np.broadcast_arrays(start, end)
    except ValueError:
        raise ValueError(
            f"start_limit and end_limit must give the same number of constraints, got "
            f"{start.shape[0]} and {end.shape[0]}"
        ) from None
    if e >= E:
        return np.array(end, dtype=np.float64)
    f = curriculum_factor(e, E)
    finite = np.isfinite(start) & np.isfinite(end)
    # An infinite endpoint (unconstrained) makes the blend infinite; avoid inf − inf = NaN.
    return np.where(finite, end + (np.where(finite, start, 0.0) - np.where(finite, end, 0.0)) * f, np.inf)
