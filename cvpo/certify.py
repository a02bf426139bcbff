"""Certificates for trained policies: held-out evaluation with an upper confidence bound on cost.

``certify_policy`` loads a policy artefact (``cvpo.artefact``; numpy only, no torch), runs
``episodes`` deterministic (mean-action, i.e. the served policy) episodes on the reset seeds
``seed_base + i`` and ``stochastic_episodes`` sampled-action episodes on the first of the same
layouts, and hands the per-episode numbers to ``summarise``, a pure function. A policy is
*certified* when, for every constraint, the one-sided upper confidence bound on its expected
episode cost (``cost_upper_bound``) is at most the constraint's limit.

Held-out layouts: training-time evaluation resets on ``cvpo.trainer.EVAL_SEED_BASE + i``
(1_000_003 + i) every epoch, and the best-policy choice reads those episodes, so a policy is
selected on them and its cost there is optimistically biased. ``CERT_SEED_BASE`` = 2_000_003 keeps
certification layouts disjoint from them for any run with fewer than a million evaluation
episodes, and from training's own resets (seeded from small run seeds through the env's stream).

The interval. Episode costs lie in [0, T * max step cost] but are very skewed at the sample sizes
one can afford (N ~ 30): most episodes cost nothing and a few cost a lot. Options considered:

- one-sided Student-t on the mean: cheap, but under right skew the sample mean and the sample
  standard deviation are small together, so the bound is too low exactly when it matters. With
  70 % zeros and otherwise U[20, 200] its 95 % bound covers 91 % at N = 30; with 85 % zeros, 87 %.
- percentile bootstrap / bootstrap-t: random (a certificate should be a deterministic function of
  the episodes) and, at N = 30 with few nonzero episodes, the resamples often contain no cost at
  all; bootstrap-t covered 75 % with 90 % zeros.
- distribution-free bounds that use the known range (empirical Bernstein, Anderson's DKW bound):
  valid, but their width has a term proportional to the range. With T = 500 or 1000 and a limit of
  25, Anderson's bound adds sqrt(ln(1/delta) / 2N) * R = 0.22 * 500 = 112 at N = 30 and
  empirical Bernstein more: no policy could ever be certified.

Chosen: Hall's skewness-corrected t bound (P. Hall, "On the removal of skewness by
transformation", JRSS B 54 (1992) 221-228). With T = sqrt(N) (mean - mu) / s and gamma the sample
skewness, the monotone cubic

    g(T) = T + a T^2 + a^2 T^3 / 3 + gamma / (6 sqrt(N)),    a = gamma / (3 sqrt(N)),

removes the O(N^-1/2) skewness term from T's distribution (the term behind the t bound's
under-coverage), so g(T) is compared with the t_{N-1} quantile q and inverted in closed form:

    UB = mean - s / sqrt(N) * g^{-1}(-q),    g^{-1}(y) = ((1 + gamma (y - gamma / (6 sqrt N)) / sqrt N)^(1/3) - 1) / a.

It is deterministic, costs nothing, equals the t bound for symmetric samples, and is close to or
above nominal for skewed bounded costs (tests/cvpo/test_certify.py measures it: 95 % bound at
N = 30 with 70 % zeros covers ~0.98; README has a table). Its limit: it cannot see events rarer than
the sample shows. If no episode in N had any cost, the bound is 0; the probability of a costly
episode is then only known to be below ~3/N (rule of three), so pick N with that in mind.
``upper_range`` (T * max step cost, when known) is only a validity check on the data and a cap on
the bound, never a width term.

Critic calibration. When the artefact carries its cost critics, the certificate also records, per
deterministic episode, the critics' prediction Q_c(s_0, a_0) at the start state and the served
policy's first (mean) action, beside the realised discounted cost sum_t gamma^t c_t of that episode
(gamma from the artefact's ``cost_critic`` section), and their means per constraint
(``critic_calibration``). It says how far the serve-time ``cost_to_go`` can be trusted on these
layouts; it is reported, never part of the decision. Two caveats are recorded with it: the
realised sum stops at the episode's end while Q_c bootstraps past a time limit (gamma^T is 0.007 at
T = 500, gamma = 0.99), and with ``cost_continuation = "sampled"`` (the default) the critics predict
the cost of continuing with *sampled* actions, whereas these episodes follow the mean.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

CERT_SEED_BASE = 2_000_003
DEFAULT_EPISODES = 30
DEFAULT_STOCHASTIC_EPISODES = 10
INTERVAL = "hall-skewness-corrected-t (Hall 1992), one-sided"
RETURN_INTERVAL = "student-t, two-sided"


# ---------------------------------------------------------------------------------------- statistics


def _t_quantile(p: float, df: int) -> float:
    from scipy.special import stdtrit

    return float(stdtrit(df, p))


def _check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    return confidence


def cost_upper_bound(costs: Sequence[float], confidence: float = 0.95, upper_range: float | None = None) -> float:
    """One-sided upper confidence bound on the expected episode cost (Hall's skew-corrected t).

    ``costs``: one constraint's episode costs (at least 2, finite, ≥ 0). ``upper_range``: the
    largest possible episode cost (T × max step cost) when known: costs above it are an error and
    the bound is capped at it. See the module docstring for the choice and its coverage.
    """
    confidence = _check_confidence(confidence)
    x = np.asarray(costs, dtype=np.float64).reshape(-1)
    n = x.size
    if n < 2:
        raise ValueError(f"an upper bound needs at least 2 episodes, got {n}")
    if not np.all(np.isfinite(x)):
        raise ValueError("episode costs must be finite")
    if np.any(x < 0):
        raise ValueError("episode costs must be ≥ 0")
    if upper_range is not None and np.any(x > upper_range * (1 + 1e-12)):
        raise ValueError(f"an episode cost {x.max():g} exceeds the stated range {upper_range:g}")
    mean = float(x.mean())
    s = float(x.std(ddof=1))
    if s <= 1e-12 * max(1.0, abs(mean)):  # a constant sample: no spread to bound
        bound = mean
    else:
        rn = math.sqrt(n)
        q = _t_quantile(confidence, n - 1)
        sigma = float(x.std())  # the skewness uses the plug-in moments, as Hall's g does
        gamma = float(np.mean((x - mean) ** 3)) / sigma**3
        y = -q - gamma / (6.0 * rn)
        if abs(gamma) < 1e-9:
            t = y
        else:
            a = gamma / (3.0 * rn)
            t = (float(np.cbrt(1.0 + 3.0 * a * y)) - 1.0) / a
        bound = mean - s * t / rn
    bound = max(bound, mean)
    if upper_range is not None:
        bound = min(bound, float(upper_range))
    return float(bound)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Student-t interval for a mean (used for returns; not part of the decision)."""
    confidence = _check_confidence(confidence)
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size < 2:
        raise ValueError(f"an interval needs at least 2 episodes, got {x.size}")
    half = _t_quantile(0.5 + confidence / 2.0, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return float(x.mean() - half), float(x.mean() + half)


@dataclass
class ConstraintCertificate:
    """One constraint's part of a certificate; ``limit`` None = unconstrained."""

    signal: str
    limit: float | None
    cost_mean: float
    cost_std: float
    cost_upper_bound: float
    within_limit_share: float
    stochastic_cost_mean: float | None
    certified: bool


@dataclass
class Summary:
    """What ``summarise`` computes from episodes alone."""

    confidence: float
    constraints: list[ConstraintCertificate]
    return_mean: float
    return_std: float
    return_ci: list[float]
    stochastic_return_mean: float | None
    certified: bool


def _costs_matrix(costs: Any, name: str) -> np.ndarray:
    arr = np.asarray(costs, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be (episodes,) or (episodes, constraints), got shape {arr.shape}")
    return arr


def summarise(
    episode_costs: Any,
    episode_returns: Sequence[float],
    limits: Sequence[float | None],
    confidence: float = 0.95,
    *,
    stochastic_costs: Any = None,
    stochastic_returns: Sequence[float] | None = None,
    signals: Sequence[str] | None = None,
    upper_ranges: Sequence[float | None] | None = None,
) -> Summary:
    """Per-constraint cost statistics and the certification decision, from episode numbers only.

    ``episode_costs``: (N,) or (N, m) deterministic-episode costs; ``limits``: m limits (None or inf
    = unconstrained); ``stochastic_costs``: (K, m) sampled-policy episode costs, reported not
    certified. Certified iff every constraint's upper bound is ≤ its limit.
    """
    costs = _costs_matrix(episode_costs, "episode_costs")
    returns = np.asarray(episode_returns, dtype=np.float64).reshape(-1)
    m = costs.shape[1]
    if returns.size != costs.shape[0]:
        raise ValueError(f"{returns.size} returns for {costs.shape[0]} episodes")
    if len(limits) != m:
        raise ValueError(f"{len(limits)} limit(s) for {m} constraint(s)")
    signals = list(signals) if signals is not None else ["cost"] * m
    if len(signals) != m:
        raise ValueError(f"{len(signals)} signal name(s) for {m} constraint(s)")
    ranges = list(upper_ranges) if upper_ranges is not None else [None] * m
    s_costs = _costs_matrix(stochastic_costs, "stochastic_costs") if stochastic_costs is not None else None
    if s_costs is not None and s_costs.size and s_costs.shape[1] != m:
        raise ValueError(f"stochastic costs have {s_costs.shape[1]} constraints, expected {m}")
    out = []
    for j in range(m):
        limit = limits[j]
        limit = None if limit is None or math.isinf(float(limit)) else float(limit)
        ub = cost_upper_bound(costs[:, j], confidence, ranges[j])
        out.append(
            ConstraintCertificate(
                signal=signals[j],
                limit=limit,
                cost_mean=float(costs[:, j].mean()),
                cost_std=float(costs[:, j].std(ddof=1)),
                cost_upper_bound=ub,
                within_limit_share=1.0 if limit is None else float(np.mean(costs[:, j] <= limit)),
                stochastic_cost_mean=(
                    float(s_costs[:, j].mean()) if s_costs is not None and s_costs.shape[0] else None
                ),
                certified=limit is None or ub <= limit,
            )
        )
    has_s = stochastic_returns is not None and len(stochastic_returns) > 0
    s_ret = float(np.mean(stochastic_returns)) if has_s else None
    return Summary(
        confidence=float(confidence),
        constraints=out,
        return_mean=float(returns.mean()),
        return_std=float(returns.std(ddof=1)),
        return_ci=list(mean_interval(returns, confidence)),
        stochastic_return_mean=s_ret,
        certified=all(c.certified for c in out),
    )


# ---------------------------------------------------------------------------------------- the record


@dataclass
class Certificate:
    """A policy's certificate. ``to_dict`` is JSON-able; ``from_dict`` reads it back exactly.

    ``returns``/``costs`` are the deterministic episodes' numbers (``costs[i][j]``: episode i,
    constraint j); episode i reset with seed ``seeds["base"] + i``, and stochastic episode k on the
    same layout as deterministic episode k.
    """

    certified: bool
    policy_dir: str
    env_id: str
    artefact_env_id: str
    episodes: int
    stochastic_episodes: int
    seeds: dict[str, int]
    confidence: float
    interval: str
    constraints: list[ConstraintCertificate]
    return_mean: float
    return_std: float
    return_ci: list[float]
    stochastic_return_mean: float | None
    returns: list[float]
    costs: list[list[float]]
    stochastic_returns: list[float]
    stochastic_costs: list[list[float]]
    cost_signals_source: str
    artefact_sha256: str
    config_hash: str | None
    engine_version: str
    safety_gymnasium_version: str | None
    created: str
    return_interval: str = RETURN_INTERVAL
    critic_calibration: dict[str, Any] | None = None  # None: the artefact has no cost critics

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Certificate:
        data = dict(data)
        data["constraints"] = [ConstraintCertificate(**c) for c in data["constraints"]]
        return cls(**data)


def _engine_version() -> str:
    import cvpo

    version = getattr(cvpo, "__version__", None)
    if version:
        return str(version)
    try:
        return metadata.version("cvpo-service")
    except metadata.PackageNotFoundError:
        return "unknown"


def _safety_gymnasium_version() -> str | None:
    try:
        return metadata.version("safety-gymnasium")
    except metadata.PackageNotFoundError:
        return None


def _cost_signals(policy_dir: Path, meta: dict[str, Any], m: int) -> tuple[list[str], str]:
    """Which info signal each constraint reads: the artefact's record, else its run's config.json
    (only when its hash is the artefact's config_hash), else the env's total cost for all."""
    signals = meta.get("cost_signals")
    if signals:
        return list(signals), "artefact"
    config_path = policy_dir.parent / "config.json"
    if meta.get("config_hash") and config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError):
            config = None
        if isinstance(config, dict):
            blob = json.dumps(config, sort_keys=True, separators=(",", ":"))
            if hashlib.sha256(blob.encode()).hexdigest() == meta["config_hash"]:
                signals = (config.get("constraints") or {}).get("cost_signals") or []
                if signals:
                    return list(signals), "run config.json"
    return ["cost"] * m, "default (env cost)"


def _check_spaces(policy: Any, env_id: str) -> None:
    from cvpo.envs import get_task

    task = get_task(env_id)
    problems = []
    if task.obs_dim != policy.obs_dim:
        problems.append(f"observation length {task.obs_dim} != the policy's {policy.obs_dim}")
    if task.act_dim != policy.act_dim:
        problems.append(f"action length {task.act_dim} != the policy's {policy.act_dim}")
    elif not (np.allclose(task.act_low, policy.low) and np.allclose(task.act_high, policy.high)):
        problems.append("action bounds differ from the policy's")
    if problems:
        raise ValueError(f"cannot certify the {policy.meta['env_id']} policy on {env_id}: " + "; ".join(problems))


@dataclass
class EpisodeRecord:
    """``run_episodes_detailed``'s numbers: per episode the return and costs, and with ``gamma`` the
    discounted costs and (for artefacts with cost critics) Q_c at the first state and action."""

    returns: list[float]
    costs: list[list[float]]
    discounted_costs: list[list[float]] = dataclasses.field(default_factory=list)
    predicted_costs: list[list[float]] = dataclasses.field(default_factory=list)


def run_episodes_detailed(
    policy: Any,
    env: Any,
    seeds: Sequence[int],
    signals: Sequence[str],
    rng: np.random.Generator | None = None,
    gamma: float | None = None,
) -> EpisodeRecord:
    """``run_episodes``, plus, when ``gamma`` is given, each episode's discounted cost per constraint
    and, when the artefact has cost critics, their Q_c(s_0, a_0) of its first action."""
    from cvpo.envs.wrappers import step_costs as costs_of

    out = EpisodeRecord([], [])
    predict = gamma is not None and getattr(policy, "cost_critic", None) is not None
    for seed in seeds:
        obs, _ = env.reset(seed=int(seed))
        ep_return, ep_cost, ep_discounted, discount = 0.0, np.zeros(len(signals)), np.zeros(len(signals)), 1.0
        first = True
        while True:
            action = policy.raw_action(obs, deterministic=rng is None, rng=rng)[0]
            if first and predict:
                out.predicted_costs.append([float(q) for q in policy.cost_to_go(obs, action)[0]])
            first = False
            obs, reward, cost, terminated, truncated, info = env.step(action)
            step_costs = costs_of(signals, cost, info)
            ep_return += reward
            ep_cost += step_costs
            if gamma is not None:
                ep_discounted += discount * step_costs
                discount *= gamma
            if terminated or truncated:
                break
        out.returns.append(float(ep_return))
        out.costs.append([float(c) for c in ep_cost])
        if gamma is not None:
            out.discounted_costs.append([float(c) for c in ep_discounted])
    return out


def run_episodes(
    policy: Any,
    env: Any,
    seeds: Sequence[int],
    signals: Sequence[str],
    rng: np.random.Generator | None = None,
) -> tuple[list[float], list[list[float]]]:
    """Episodes of an artefact on ``env`` reset with ``seeds``: mean actions, or samples from ``rng``.

    The raw policy output goes to ``SafeEnv.step``, which clips it to [-1, 1] and maps it onto the
    Box (as training-time evaluation and ``evaluate_policy`` do).
    """
    record = run_episodes_detailed(policy, env, seeds, signals, rng)
    return record.returns, record.costs


def critic_calibration(
    predicted: Sequence[Sequence[float]],
    realised: Sequence[Sequence[float]],
    signals: Sequence[str],
    gamma: float,
    continuation: str | None = None,
) -> dict[str, Any]:
    """The certificate's ``critic_calibration``: per constraint, the mean of the critics' Q_c(s_0, a_0)
    and of the realised discounted episode cost over the same episodes, plus the per-episode values."""
    pred = np.asarray(predicted, dtype=np.float64).reshape(len(predicted), -1)
    real = np.asarray(realised, dtype=np.float64).reshape(len(realised), -1)
    if pred.shape != real.shape or pred.shape[0] < 1 or pred.shape[1] != len(signals):
        raise ValueError(f"predicted {pred.shape} and realised {real.shape} costs for {len(signals)} constraint(s)")
    return {
        "gamma": float(gamma),
        "episodes": int(pred.shape[0]),
        "at": "start state, first (mean) action; realised = sum_t gamma^t c_t of the deterministic episode",
        "cost_continuation": continuation,
        "constraints": [
            {
                "signal": signals[j],
                "predicted_mean": float(pred[:, j].mean()),
                "realised_mean": float(real[:, j].mean()),
                "bias": float(pred[:, j].mean() - real[:, j].mean()),
                "mean_abs_error": float(np.abs(pred[:, j] - real[:, j]).mean()),
            }
            for j in range(pred.shape[1])
        ],
        "predicted": pred.tolist(),
        "realised": real.tolist(),
    }


def certify_policy(
    policy_dir: Path | str,
    episodes: int = DEFAULT_EPISODES,
    seed_base: int = CERT_SEED_BASE,
    cost_limits: Sequence[float | None] | None = None,
    stochastic_episodes: int = DEFAULT_STOCHASTIC_EPISODES,
    env_id: str | None = None,
    confidence: float = 0.95,
    cost_signals: Sequence[str] | None = None,
) -> Certificate:
    """Evaluate an artefact on held-out layouts and decide whether its cost is certified.

    ``cost_limits`` default to the artefact's own (None/inf = unconstrained); one number is used for
    every constraint. ``env_id`` runs a variant of the task (another level with the same spaces).
    ``cost_signals`` names each constraint's info signal when the caller knows them (the service
    passes the job's config); otherwise they are found as ``_cost_signals`` describes.
    Sampled actions come from a generator seeded by ``seed_base``, so equal arguments give an equal
    certificate apart from ``created``.
    """
    from cvpo import envs
    from cvpo.artefact import load_policy

    if episodes < 2:
        raise ValueError(f"episodes must be ≥ 2 for a confidence bound, got {episodes}")
    if stochastic_episodes < 0:
        raise ValueError(f"stochastic_episodes must be ≥ 0, got {stochastic_episodes}")
    confidence = _check_confidence(confidence)
    policy_dir = Path(policy_dir)
    policy = load_policy(policy_dir)
    meta = policy.meta
    artefact_limits = list(meta.get("cost_limits") or [None])
    if cost_signals:
        signals, source = list(cost_signals), "given"
    else:
        signals, source = _cost_signals(policy_dir, meta, len(artefact_limits))
    if cost_limits is None:
        limits = artefact_limits
    else:
        limits = list(cost_limits)
        if len(limits) == 1 and len(signals) > 1:
            limits = limits * len(signals)
    if len(limits) != len(signals):
        raise ValueError(
            f"give {len(signals)} cost limit(s), one per constraint ({', '.join(signals)}), got {len(limits)}"
        )
    target = env_id or meta["env_id"]
    _check_spaces(policy, target)
    # Envs check seeds up to 2**32 - 1; say so before any episode runs.
    last_seed = seed_base + max(episodes, stochastic_episodes) - 1
    if seed_base < 0 or last_seed > envs.MAX_SEED:
        raise ValueError(f"seeds {seed_base}..{last_seed} are outside [0, {envs.MAX_SEED}]")

    seeds = [seed_base + i for i in range(episodes)]
    rng = np.random.Generator(np.random.PCG64([seed_base, 0xCE27]))
    with envs.make(target) as env:
        if env.obs_dim != policy.obs_dim or env.act_dim != policy.act_dim:  # the catalogue agreed; the env must too
            raise ValueError(f"{target} built with spaces ({env.obs_dim}, {env.act_dim}) unlike the policy's")
        critic = meta.get("cost_critic") if getattr(policy, "cost_critic", None) is not None else None
        gamma = float(critic["gamma"]) if critic and critic.get("gamma") is not None else None
        record = run_episodes_detailed(policy, env, seeds, signals, gamma=gamma)
        returns, costs = record.returns, record.costs
        s_seeds = [seed_base + i for i in range(stochastic_episodes)]
        s_returns, s_costs = run_episodes(policy, env, s_seeds, signals, rng=rng)

    summary = summarise(
        costs,
        returns,
        limits,
        confidence,
        stochastic_costs=s_costs if s_costs else None,
        stochastic_returns=s_returns,
        signals=signals,
    )
    return Certificate(
        certified=summary.certified,
        policy_dir=str(policy_dir),
        env_id=target,
        artefact_env_id=meta["env_id"],
        episodes=episodes,
        stochastic_episodes=stochastic_episodes,
        seeds={"base": seed_base, "count": episodes, "stochastic_count": stochastic_episodes},
        confidence=confidence,
        interval=INTERVAL,
        constraints=summary.constraints,
        return_mean=summary.return_mean,
        return_std=summary.return_std,
        return_ci=summary.return_ci,
        stochastic_return_mean=summary.stochastic_return_mean,
        returns=returns,
        costs=costs,
        stochastic_returns=s_returns,
        stochastic_costs=s_costs,
        cost_signals_source=source,
        artefact_sha256=meta["weights_sha256"],
        config_hash=meta.get("config_hash"),
        engine_version=_engine_version(),
        safety_gymnasium_version=_safety_gymnasium_version(),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        critic_calibration=(
            critic_calibration(
                record.predicted_costs, record.discounted_costs, signals, gamma, critic.get("cost_continuation")
            )
            if critic
            and gamma is not None
            and record.predicted_costs
            and len(record.predicted_costs[0]) == len(signals)
            else None
        ),
    )
