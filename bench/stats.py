"""Benchmark statistics: bootstrap confidence intervals, Student-t intervals, feasible fraction, curve alignment.

One small tested module, so the numbers in ``docs/benchmarks.md`` and the bench JSON come from it. With the
5 seeds a benchmark can afford, a percentile bootstrap of the mean makes no normality assumption
about final returns (often bimodal: some seeds learn, some do not); it is slightly narrow for
tiny n, which the report states beside the seed count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray


def _finite_1d(values: ArrayLike, what: str) -> NDArray[np.float64]:
    """A 1-D float array, rejecting NaN/inf by index: a silent NaN would poison every mean."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D sequence, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what}: no values")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{what}: non-finite value {arr[bad[0]]} at index {int(bad[0])} (NaN/inf are not allowed)")
    return arr


def bootstrap_ci(
    values: ArrayLike, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean, low, high)``: the sample mean and its percentile-bootstrap confidence interval.

    Seeded, so a regenerated report shows identical numbers. One value gives ``(x, x, x)``:
    there is no spread to resample, and the report shows the seed count beside the interval.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be ≥ 1, got {n_resamples}")
    arr = _finite_1d(values, "bootstrap_ci")
    mean = float(arr.mean())
    if arr.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_resamples, arr.size))
    means = arr[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    # Rounding can put a quantile a hair outside [min, max] or past the mean on constant data.
    return mean, float(min(low, mean)), float(max(high, mean))


def mean_ci(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample std and the 95 % Student-t interval of the mean (infinite for one value): the
    paired benches (learning_equivalence, vs_fsrl_learning) compare two arms by these."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n) if n > 1 else math.inf
    return {"n": n, "mean": mean, "std": std, "ci95_low": mean - half, "ci95_high": mean + half}


def feasible_fraction(costs: ArrayLike, limit: float) -> float:
    """Share of seeds whose (final eval) cost is within the limit, ``cost <= limit`` like the trainer."""
    if np.isnan(limit):
        raise ValueError("feasible_fraction: limit is NaN")
    arr = _finite_1d(costs, "feasible_fraction")
    return float(np.mean(arr <= limit))


def align_curves(
    curves: Sequence[tuple[ArrayLike, ArrayLike]], grid: ArrayLike | None = None, num: int | None = None
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Put per-seed curves ``(env_steps, values)`` on one env-step grid by linear interpolation.

    Epochs end at episode ends, so seeds of tasks with early termination log at different step
    counts; a band needs values at common steps. Returns ``(grid, Y)`` with ``Y[i, j]`` curve i at
    ``grid[j]``, NaN outside curve i's logged range (an unfinished run is not extrapolated).
    Default grid: ``num`` evenly spaced points (default: the longest curve's length) from the
    earliest first step to the latest last step.
    """
    if not curves:
        raise ValueError("align_curves: no curves")
    xs, ys = [], []
    for i, (x, y) in enumerate(curves):
        xa, ya = _finite_1d(x, f"align_curves: curve {i} steps"), _finite_1d(y, f"align_curves: curve {i} values")
        if xa.shape != ya.shape:
            raise ValueError(f"align_curves: curve {i} has {xa.size} steps but {ya.size} values")
        if np.any(np.diff(xa) <= 0):
            raise ValueError(f"align_curves: curve {i} steps must be strictly increasing")
        xs.append(xa)
        ys.append(ya)
    if grid is None:
        n = num if num is not None else max(x.size for x in xs)
        if n < 1:
            raise ValueError(f"align_curves: num must be ≥ 1, got {n}")
        lo, hi = min(x[0] for x in xs), max(x[-1] for x in xs)
        grid_arr = np.linspace(lo, hi, n) if n > 1 else np.array([hi])
    else:
        grid_arr = _finite_1d(grid, "align_curves: grid")
    out = np.full((len(xs), grid_arr.size), np.nan)
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        inside = (grid_arr >= x[0]) & (grid_arr <= x[-1])
        out[i, inside] = np.interp(grid_arr[inside], x, y)
    return grid_arr, out


def band(
    matrix: ArrayLike, confidence: float = 0.95, n_resamples: int = 2_000, seed: int = 0
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Per-column ``(mean, low, high)`` over the non-NaN rows of an aligned matrix (for plot bands).

    A column with no values is NaN throughout (matplotlib leaves a gap there).
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"band: expected a 2-D matrix, got shape {m.shape}")
    mean, low, high = (np.full(m.shape[1], np.nan) for _ in range(3))
    for j in range(m.shape[1]):
        col = m[:, j][~np.isnan(m[:, j])]
        if col.size:
            mean[j], low[j], high[j] = bootstrap_ci(col, confidence, n_resamples, seed)
    return mean, low, high
