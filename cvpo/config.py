"""``TrainConfig``: the whole training surface, one dataclass per concept, validated.

Resolution order: dataclass defaults < the task's preset (``cvpo/presets/*.toml``) < user
overrides (a nested dict, e.g. from a job spec or ``--set algo.num_samples=64``). Unknown keys
and out-of-range values raise ``ConfigError`` naming the field. The effective config is saved
with every run (``to_dict``) and hashed (``config_hash``) into checkpoints and artefacts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, get_type_hints

from cvpo.envs.catalogue import get_task


class ConfigError(ValueError):
    """A bad configuration value; ``field`` is the dotted path of the offending key, ``path`` its parts.

    ``path`` splits ``"constraints.cost_limits[1]"`` into ``("constraints", "cost_limits", 1)`` so that
    a caller (the REST API's 422 ``loc``, the CLI) can point at the key without parsing the string.
    """

    def __init__(self, field_path: str, message: str) -> None:
        self.field = field_path
        self.message = message
        super().__init__(f"{field_path}: {message}")

    @property
    def path(self) -> tuple[str | int, ...]:
        parts: list[str | int] = []
        for part in self.field.split("."):
            name, *indices = part.replace("]", "").split("[")
            if name:
                parts.append(name)
            parts += [int(i) if i.isdigit() else i for i in indices]
        return tuple(parts)


@dataclass
class ConstraintConfig:
    """Episodic cost limits C_i (one cost critic and one λ_i each) and an optional curriculum.

    ``cost_limits``: undiscounted episode-cost limits; ``inf`` means unconstrained (CVPO → MPO).
    ``cost_signals``: which per-step cost each constraint reads: ``"cost"`` (the env's total) or
    an ``info`` key such as ``"cost_hazards"``. Default: the total, for every constraint.
    Curriculum (cvpo-algorithm.md §1.2): limit decays from ``curriculum_start`` to the final
    limit over ``curriculum_epochs`` epochs; 0 epochs = off.
    """

    cost_limits: tuple[float, ...] = (25.0,)
    cost_signals: tuple[str, ...] = ()
    curriculum_start: float | None = None
    curriculum_epochs: int = 0
    # Safety margin (docs/safety-margin.md). The E-step puts the stochastic policy's replay-averaged
    # Q_c exactly on c̄, so with critic and evaluation noise the served (mean-action) policy lands
    # over its limit about half the time. The engine therefore trains against c̄·(1 − δ):
    # ``margin``: a fixed fractional tightening δ₀ ∈ [0, 1).
    margin: float = 0.0
    # ``margin_control = "integral"``: δ = δ₀ + I, where I integrates the measured cost of probe
    # episodes against ``margin_target``·C, gain ``margin_gain`` per probe, I ∈ [0, margin_max − δ₀].
    margin_control: str = "off"  # "off" or "integral"
    margin_target: float = 1.0  # setpoint as a fraction of the limit C
    margin_gain: float = 0.05
    margin_max: float = 0.9
    # Every ``probe_every``-th training episode acts with the mean action (the served policy) on a
    # training layout; its cost is the controller's signal (0: no probes; the signal is then the
    # stochastic training episodes' cost).
    probe_every: int = 0
    # ``cost_continuation = "mean"``: the cost critics bootstrap on the mean action a′ = μ(s′) instead of
    # a sample, so Q_c (and the E-step constraint) is the cost-to-go of the policy the service serves
    # after one sampled step; "sampled" is CVPO's stochastic-policy cost.
    cost_continuation: str = "sampled"
    # ``cost_ucb = k ≥ 0``: the E-step scores its sampled actions with the upper confidence bound
    # Q_c^UCB = mean_i Q_c,i + k·std_i Q_c,i over each constraint's ``network.cost_critics`` members
    # (population std), so an uncertain cost counts as a higher one; 0 = the members' mean. The cost
    # critic underestimates on the navigation tasks (docs/safety-margin.md). k > 0 needs ≥ 2 members.
    cost_ucb: float = 0.0


@dataclass
class NetworkConfig:
    """Actor and critic shapes (cvpo-algorithm.md §5.3)."""

    actor_hidden: tuple[int, ...] = (256, 256)
    critic_hidden: tuple[int, ...] = (256, 256)
    covariance: str = "diag"  # "diag" (default) or "cholesky" (full covariance)
    mean_bound: float | None = None  # None: unbounded mean (FSRL's safety-gymnasium setting)
    # 2: a reward critic pair combined with a min (the paper's code, §4.3); 1: a single reward critic
    # (FSRL's default, double_critic=False), a third fewer critic FLOPs in the critic step and E-step.
    reward_critics: int = 2
    # Cost-critic ensemble members per constraint, each trained on its own TD target from its own
    # target network (diversity from independent init); the E-step combines them per constraint with
    # ``constraints.cost_ucb``, everything else reads their mean. 1: one critic per constraint (§4.3).
    cost_critics: int = 1


@dataclass
class AlgoConfig:
    """CVPO hyperparameters (cvpo-algorithm.md §7.2 recommended defaults)."""

    gamma: float = 0.99
    n_step: int = 1
    num_samples: int = 32  # K actions per state in the E-step
    kl_bound: float = 0.05  # ε, E-step KL(q‖π_old); must stay well below log K (P4)
    mean_kl_bound: float = 5e-3  # ε_μ
    cov_kl_bound: float = 5e-4  # ε_Σ
    alpha_mean_max: float = 1.0
    alpha_cov_max: float = 100.0
    alpha_mean_step: float = 1.0
    alpha_cov_step: float = 100.0
    persist_alpha: bool = True  # keep α across update phases (original code) or reset per phase
    mstep_iters: int = 1
    actor_lr: float = 5e-4
    critic_lr: float = 1e-3
    actor_grad_clip: float | None = None  # global-norm clip of the actor gradient; None = off
    tau: float = 0.01  # Polyak rate of the target critics (and π_old in "polyak" mode)
    batch_size: int = 256
    updates_per_step: float = 0.2
    cost_mask: str = "terminated"  # mask cost bootstraps on "terminated" or "never" (P8)
    # "raw": the critics and the M-step see raw Gaussian samples, which the env clips to the [-1, 1]
    # box (§8.1 P10; FSRL and the paper). "clip": they see the actions the env executes: the replay
    # stores clipped actions, the E-step scores and fits its K samples clipped, targets bootstrap on
    # clipped next actions. Raw samples beyond the box are all worth the same to the critics, so the
    # E-step can widen σ without bound (measured 1.0 → 1.8 on Goal and Circle) and the sampled policy
    # turns bang-bang while the served mean does not; fitting the executed actions keeps μ in the box
    # and σ the spread of what is executed (docs/safety-margin.md).
    action_box: str = "raw"
    pi_old: str = "polyak"  # "polyak" (original code) or "phase" (copied per update phase, FSRL)
    dual_lower: float = 1e-6
    dual_upper: float = 1e5
    dual_max_iter: int = 30
    reset_dual_on_saturation: bool = False
    # Projected Newton steps tried from the previous (η, λ) before L-BFGS-B; kept only if they meet the
    # same optimality test, so the solution is the same to the solver's tolerance. 0 = L-BFGS-B only.
    dual_newton_steps: int = 4


@dataclass
class LoopConfig:
    """Collection, evaluation and checkpoint cadence."""

    steps_per_epoch: int = 5000  # an epoch ends at the first episode end after this many steps
    update_every: int = 50  # env steps between update phases
    warmup_steps: int = 0  # uniform-random actions before the policy acts
    buffer_size: int = 1_000_000
    eval_episodes: int = 10
    # Extra stochastic (sampled-action) evaluation episodes per epoch on the same layouts: their cost
    # is what the constraint actually bounds, and their start states calibrate the cost critic.
    # None: half of ``eval_episodes``, rounded up.
    eval_stochastic_episodes: int | None = None
    # Which policy the run hands out as ``policy/`` (docs/safety-margin.md). "final": the last epoch's.
    # "validated": after every epoch the mean action also runs ``validation_episodes`` episodes on
    # validation layouts (their own reset seeds: never the evaluation, training or certification
    # layouts); the served policy is the epoch with the highest validation return among those whose
    # one-sided ``validation_confidence`` upper bound on every episode cost is within its limit, else
    # the epoch with the lowest bound.
    select: str = "final"
    validation_episodes: int = 10
    validation_confidence: float = 0.95
    checkpoint_every_epochs: int = 1
    normalize_obs: bool = True
    obs_clip: float = 5.0
    torch_threads: int = 2


@dataclass
class TrainConfig:
    """One training run. ``device``: "auto" (CUDA when available, else CPU), "cpu" or "cuda"."""

    env_id: str = "SafetyPointCircle1-v0"
    total_env_steps: int = 100_000
    seed: int = 0
    device: str = "auto"
    preset: str = ""  # filled in by resolve_config: which preset file was applied
    constraints: ConstraintConfig = field(default_factory=ConstraintConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)

    @property
    def num_constraints(self) -> int:
        return len(self.constraints.cost_limits)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    def config_hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


# ---------------------------------------------------------------- building from dicts


def _coerce(path: str, hint: Any, value: Any) -> Any:
    """Convert a JSON/TOML value to the annotated type, or raise ConfigError naming the field."""
    origin = getattr(hint, "__origin__", None)
    args = getattr(hint, "__args__", ())
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected true/false, got {value!r}")
    if hint is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (isinstance(value, float) and not value.is_integer())
        ):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, str) and value.lower() in ("inf", "infinity", "+inf"):
            return math.inf
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"expected a number, got {value!r}")
        if math.isnan(value):
            raise ConfigError(path, "NaN is not allowed")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            value = [value]  # a single number where a list is expected, e.g. cost_limits = 25
        return tuple(_coerce(f"{path}[{i}]", args[0], v) for i, v in enumerate(value))
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = next(a for a in args if a is not type(None))
        return _coerce(path, inner, value)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a table of settings, got {value!r}")
        return _merge(hint(), value, path)
    raise ConfigError(path, f"unsupported type {hint}")  # pragma: no cover - a programming error


def _merge(obj: Any, overrides: dict[str, Any], prefix: str = "") -> Any:
    hints = get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in overrides.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(path, f"unknown setting; valid keys here: {', '.join(names)}")
        hint = hints[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            _merge(current, value, path)
        else:
            setattr(obj, key, _coerce(path, hint, value))
    return obj


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_presets() -> dict[str, dict[str, Any]]:
    """All preset files: name → {"tasks": [glob…], "settings": {...}}."""
    presets = {}
    for entry in resources.files("cvpo.presets").iterdir():
        if entry.name.endswith(".toml"):
            data = tomllib.loads(entry.read_text())
            presets[entry.name.removesuffix(".toml")] = data
    return presets


def preset_for(env_id: str) -> str:
    """The preset whose ``tasks`` patterns match the task id (first match in name order)."""
    import fnmatch

    presets = load_presets()
    for name in sorted(presets):
        if any(fnmatch.fnmatch(env_id, pat) for pat in presets[name].get("tasks", [])):
            return name
    return ""


def resolve_config(overrides: dict[str, Any] | None = None, preset: str | None = None) -> TrainConfig:
    """Defaults < preset (auto-picked from env_id unless given; "none" for none) < overrides."""
    overrides = dict(overrides or {})
    if "preset" in overrides:  # a job spec may name its preset
        named = overrides.pop("preset")
        if named is not None and not isinstance(named, str):
            raise ConfigError("preset", f"expected a preset name string, got {named!r}")
        preset = preset if preset is not None else (named or None)
    env_id = overrides.get("env_id", TrainConfig.env_id)
    if not isinstance(env_id, str):
        raise ConfigError("env_id", f"expected a task id string, got {env_id!r}")
    try:
        get_task(env_id)
    except ValueError as exc:
        raise ConfigError("env_id", str(exc)) from exc
    presets = load_presets()
    name = preset_for(env_id) if preset is None else preset
    settings: dict[str, Any] = {}
    if name and name != "none":
        if name not in presets:
            raise ConfigError("preset", f"unknown preset {name!r}; valid: {', '.join(sorted(presets))}")
        settings = presets[name].get("settings", {})
    merged = _deep_update(settings, overrides)
    merged["preset"] = "" if name == "none" else name
    config = _merge(TrainConfig(), merged)
    validate(config)
    return config


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a saved effective config exactly (no preset applied)."""
    config = _merge(TrainConfig(), data)
    validate(config)
    return config


def _check(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise ConfigError(path, message)


def validate(c: TrainConfig) -> None:
    """Range checks with messages that name the field and the valid range."""
    get_task(c.env_id)
    _check(c.total_env_steps >= 1, "total_env_steps", f"must be ≥ 1, got {c.total_env_steps}")
    _check(c.total_env_steps <= 20_000_000, "total_env_steps", f"must be ≤ 20000000, got {c.total_env_steps}")
    _check(0 <= c.seed <= 2**32 - 1, "seed", f"must be in [0, 2**32-1], got {c.seed}")
    _check(c.device in ("auto", "cpu", "cuda"), "device", f"must be auto, cpu or cuda, got {c.device!r}")

    k = c.constraints
    _check(len(k.cost_limits) >= 1, "constraints.cost_limits", "give at least one limit (inf = unconstrained)")
    for i, limit in enumerate(k.cost_limits):
        _check(limit >= 0, f"constraints.cost_limits[{i}]", f"must be ≥ 0 (or inf), got {limit}")
    _check(
        len(k.cost_signals) in (0, len(k.cost_limits)),
        "constraints.cost_signals",
        f"give one signal per cost limit ({len(k.cost_limits)}) or none, got {len(k.cost_signals)}",
    )
    _check(k.curriculum_epochs >= 0, "constraints.curriculum_epochs", "must be ≥ 0")
    _check(0 <= k.margin < 1, "constraints.margin", f"must be in [0, 1), got {k.margin}")
    _check(
        k.margin_control in ("off", "integral"),
        "constraints.margin_control",
        f"must be off or integral, got {k.margin_control!r}",
    )
    _check(0 < k.margin_target <= 2, "constraints.margin_target", f"must be in (0, 2], got {k.margin_target}")
    _check(0 <= k.margin_gain <= 1, "constraints.margin_gain", f"must be in [0, 1], got {k.margin_gain}")
    _check(
        k.margin <= k.margin_max < 1,
        "constraints.margin_max",
        f"must be in [constraints.margin, 1), got {k.margin_max}",
    )
    _check(k.probe_every >= 0, "constraints.probe_every", f"must be ≥ 0, got {k.probe_every}")
    _check(
        k.cost_continuation in ("sampled", "mean"),
        "constraints.cost_continuation",
        f"must be sampled or mean, got {k.cost_continuation!r}",
    )
    _check(
        k.cost_ucb >= 0 and math.isfinite(k.cost_ucb),
        "constraints.cost_ucb",
        f"must be a finite number ≥ 0, got {k.cost_ucb}",
    )
    if k.curriculum_start is not None:
        _check(
            k.curriculum_start >= 0 and math.isfinite(k.curriculum_start),
            "constraints.curriculum_start",
            f"must be a finite number ≥ 0, got {k.curriculum_start}",
        )

    n = c.network
    for name in ("actor_hidden", "critic_hidden"):
        sizes = getattr(n, name)
        _check(
            len(sizes) >= 1 and all(1 <= s <= 4096 for s in sizes),
            f"network.{name}",
            f"give 1+ layer sizes in [1, 4096], got {list(sizes)}",
        )
    _check(
        n.covariance in ("diag", "cholesky"),
        "network.covariance",
        f"must be diag or cholesky, got {n.covariance!r}",
    )
    _check(n.mean_bound is None or n.mean_bound > 0, "network.mean_bound", "must be > 0 or null")
    _check(n.reward_critics in (1, 2), "network.reward_critics", f"must be 1 or 2, got {n.reward_critics}")
    _check(1 <= n.cost_critics <= 16, "network.cost_critics", f"must be in [1, 16], got {n.cost_critics}")
    _check(
        k.cost_ucb == 0 or n.cost_critics >= 2,
        "constraints.cost_ucb",
        f"an upper confidence bound needs network.cost_critics ≥ 2 (got {n.cost_critics}), got {k.cost_ucb}",
    )

    a = c.algo
    _check(0 < a.gamma < 1, "algo.gamma", f"must be in (0, 1), got {a.gamma}")
    _check(1 <= a.n_step <= 10, "algo.n_step", f"must be in [1, 10], got {a.n_step}")
    _check(2 <= a.num_samples <= 1024, "algo.num_samples", f"must be in [2, 1024], got {a.num_samples}")
    _check(
        0 < a.kl_bound < math.log(a.num_samples),
        "algo.kl_bound",
        f"must be in (0, log K = {math.log(a.num_samples):.3f}); ε ≥ log K bounds nothing "
        f"(cvpo-algorithm.md §8.1 P4), got {a.kl_bound}",
    )
    for name in (
        "mean_kl_bound",
        "cov_kl_bound",
        "alpha_mean_max",
        "alpha_cov_max",
        "alpha_mean_step",
        "alpha_cov_step",
        "actor_lr",
        "critic_lr",
    ):
        value = getattr(a, name)
        _check(value > 0 and math.isfinite(value), f"algo.{name}", f"must be a finite number > 0, got {value}")
    for name in ("actor_lr", "critic_lr"):  # Adam steps above 1 only diverge (a job would fail on NaN later)
        value = getattr(a, name)
        _check(value <= 1, f"algo.{name}", f"must be in (0, 1], got {value}")
    _check(1 <= a.mstep_iters <= 100, "algo.mstep_iters", f"must be in [1, 100], got {a.mstep_iters}")
    _check(a.actor_grad_clip is None or a.actor_grad_clip > 0, "algo.actor_grad_clip", "must be > 0 or null")
    _check(0 < a.tau <= 1, "algo.tau", f"must be in (0, 1], got {a.tau}")
    _check(1 <= a.batch_size <= 65536, "algo.batch_size", f"must be in [1, 65536], got {a.batch_size}")
    _check(0 < a.updates_per_step <= 16, "algo.updates_per_step", f"must be in (0, 16], got {a.updates_per_step}")
    _check(
        a.cost_mask in ("terminated", "never"),
        "algo.cost_mask",
        f"must be terminated or never, got {a.cost_mask!r}",
    )
    _check(a.pi_old in ("polyak", "phase"), "algo.pi_old", f"must be polyak or phase, got {a.pi_old!r}")
    _check(0 < a.dual_lower < a.dual_upper, "algo.dual_lower", "need 0 < dual_lower < dual_upper")
    _check(a.dual_max_iter >= 1, "algo.dual_max_iter", "must be ≥ 1")
    _check(a.action_box in ("raw", "clip"), "algo.action_box", f"must be raw or clip, got {a.action_box!r}")
    _check(0 <= a.dual_newton_steps <= 20, "algo.dual_newton_steps", "must be in [0, 20]")

    lp = c.loop
    _check(lp.steps_per_epoch >= 1, "loop.steps_per_epoch", "must be ≥ 1")
    _check(lp.update_every >= 1, "loop.update_every", "must be ≥ 1")
    _check(lp.warmup_steps >= 0, "loop.warmup_steps", "must be ≥ 0")
    _check(
        lp.buffer_size >= a.batch_size,
        "loop.buffer_size",
        f"must be ≥ algo.batch_size ({a.batch_size}), got {lp.buffer_size}",
    )
    _check(0 <= lp.eval_episodes <= 1000, "loop.eval_episodes", f"must be in [0, 1000], got {lp.eval_episodes}")
    _check(
        lp.eval_stochastic_episodes is None or 0 <= lp.eval_stochastic_episodes <= 1000,
        "loop.eval_stochastic_episodes",
        f"must be in [0, 1000], got {lp.eval_stochastic_episodes}",
    )
    _check(lp.select in ("final", "validated"), "loop.select", f"must be final or validated, got {lp.select!r}")
    _check(
        2 <= lp.validation_episodes <= 1000,
        "loop.validation_episodes",
        f"must be in [2, 1000] (an upper bound needs 2 episodes), got {lp.validation_episodes}",
    )
    _check(
        0.5 <= lp.validation_confidence < 1,
        "loop.validation_confidence",
        f"must be in [0.5, 1), got {lp.validation_confidence}",
    )
    _check(lp.checkpoint_every_epochs >= 1, "loop.checkpoint_every_epochs", "must be ≥ 1")
    _check(lp.obs_clip > 0, "loop.obs_clip", "must be > 0")
    _check(1 <= lp.torch_threads <= 256, "loop.torch_threads", "must be in [1, 256]")


def parse_assignment(text: str) -> dict[str, Any]:
    """``"algo.num_samples=64"`` → ``{"algo": {"num_samples": 64}}`` (value parsed as TOML/JSON)."""
    if "=" not in text:
        raise ConfigError(text, "expected KEY=VALUE, e.g. algo.num_samples=64")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings: cost_mask=never
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def build_overrides(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """The one way to build engine overrides (REST job specs, ``cvpo train``, benchmark grids).

    Each layer may mix nested sections, dotted keys and unique bare field names (:func:`expand_overrides`);
    layers merge section by section, later layers winning key by key. ``resolve_config`` then applies
    the result over the defaults and the task's preset.
    """
    out: dict[str, Any] = {}
    for layer in layers:
        if layer:
            _merge_layer(out, expand_overrides(dict(layer)), "")
    return out


def _merge_layer(out: dict[str, Any], extra: dict[str, Any], prefix: str) -> None:
    """``out`` updated in place by ``extra``; a section in one layer and a plain value in another is an error."""
    for key, value in extra.items():
        path = f"{prefix}{key}"
        current = out.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            out[key] = dict(current)
            _merge_layer(out[key], value, f"{path}.")
        elif key in out and isinstance(value, dict) != isinstance(current, dict):
            raise ConfigError(path, "expected a section of settings in every layer, got a plain value in one")
        else:
            out[key] = value


def expand_overrides(flat: dict[str, Any]) -> dict[str, Any]:
    """Nested overrides from a mix of nested sections, dotted keys and unique bare field names.

    ``{"batch_size": 64}`` and ``{"algo.batch_size": 64}`` both become ``{"algo": {"batch_size": 64}}``;
    a bare name found in two sections (or none) is left for ``resolve_config`` to reject by name.
    """
    sections = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    owners: dict[str, list[str]] = {}
    hints = get_type_hints(TrainConfig)
    for name in sections:
        sub = hints[name]
        if dataclasses.is_dataclass(sub):
            for f in dataclasses.fields(sub):
                owners.setdefault(f.name, []).append(name)
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".") if "." in key else [key]
        if len(parts) == 1 and key not in sections and len(owners.get(key, [])) == 1:
            parts = [owners[key][0], key]
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(key, "conflicts with another override")
        leaf = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = _deep_update(node[leaf], value)
        else:
            node[leaf] = value
    return out
