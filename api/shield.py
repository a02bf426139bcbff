"""Safety shields for served policies (service-design.md §2.4). Over 400 lines: the three shield kinds,
their spec validation and their metrics are one concept.

CVPO bounds expected cost during training only; nothing holds per step at serve time. A policy may
therefore carry a shield, fixed when it is promoted (a shielded policy is its own version):

- ``{"type": "none"}``: no shield.
- ``{"type": "box", "low": [...], "high": [...]}``: tighter per-dimension limits inside the action Box.
- ``{"type": "hook", "name": "<name>"}``: a projection function the *server's* configuration
  registers under ``name`` (``CVPO_SHIELD_HOOKS="name=module.path:function,..."``). Requests never
  name code, and specs only name hooks, so promoting a policy cannot import anything new.

A hook is ``(raw_obs (B, o), action (B, d)) -> (safe_action (B, d), applied (B,), reasons [str | None] * B)``.
Whatever a shield returns is clipped to the env Box again, and every intervention is audited: the
nominal and safe action and the reason go to the ``cvpo.shield`` logger and
``act_shield_interventions_total{policy_id}`` counts them.

Optional keywords, found once from the hook's signature when a policy's shield is built (so hooks
written before them keep working unchanged):

- ``cost_to_go``: the policy's predicted discounted cost-to-go Q_c(s, a) per constraint, (B, m), of
  the action the policy produced (its cost critics, ``PolicyRuntime.cost_to_go``). A hook whose
  ``cost_to_go`` parameter has no default can only shield policies whose artefact carries the
  critics (checked at promotion); with a default it gets the array when there is one.
- ``config``: the shield spec's ``"config"`` object, fixed at promotion (``{"type": "hook", "name":
  ..., "config": {...}}``). A hook object may have ``validate_config(config, meta) -> config``, which
  checks and normalises it against the policy's ``policy.json`` (raise ``ValueError`` to refuse).

``cost_budget_fallback`` is such a hook: the configured safe action wherever Q_c is over a per-step budget.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from prometheus_client import Counter

log = logging.getLogger("cvpo.shield")

# (raw_obs, action, *, cost_to_go=..., config=...) → (safe_action, applied, reasons); the keywords are optional.
ShieldHook = Callable[..., tuple[np.ndarray, np.ndarray, list[str | None]]]
MAX_CONFIG_BYTES = 4096

SHIELD_INTERVENTIONS = Counter(
    "act_shield_interventions_total", "Actions a policy's shield changed, by policy", ["policy_id"]
)

_HOOK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class ShieldSpecError(ValueError):
    """A shield spec that cannot be attached to a policy; the message says which part and why."""


class ShieldConfigError(ValueError):
    """A malformed ``CVPO_SHIELD_HOOKS`` value or a hook that cannot be imported (a server config error)."""


class ShieldOutputError(RuntimeError):
    """A hook returned something unusable (wrong shape, non-finite): a server-side defect, never a 200."""


def load_hooks(env_value: str | None) -> dict[str, ShieldHook]:
    """Parse ``"name=module.path:function,other=pkg.mod:Class.method"`` and import each target.

    Fails loudly on any bad entry so a typo in deployment config stops the server at start-up
    instead of silently serving a policy without its shield.
    """
    hooks: dict[str, ShieldHook] = {}
    for item in (s.strip() for s in (env_value or "").split(",")):
        if not item:
            continue
        name, sep, target = (part.strip() for part in item.partition("="))
        if not sep or not _HOOK_NAME.match(name) or not _TARGET.match(target):
            raise ShieldConfigError(f"CVPO_SHIELD_HOOKS entry {item!r}: expected name=module.path:function")
        if name in hooks:
            raise ShieldConfigError(f"CVPO_SHIELD_HOOKS names {name!r} twice")
        module_name, _, attr_path = target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for attr in attr_path.split("."):
                obj = getattr(obj, attr)
        except (ImportError, AttributeError) as exc:
            raise ShieldConfigError(f"CVPO_SHIELD_HOOKS {name}={target}: cannot import it ({exc})") from exc
        if not callable(obj):
            raise ShieldConfigError(f"CVPO_SHIELD_HOOKS {name}={target} is not callable")
        hooks[name] = obj
    return hooks


@lru_cache(maxsize=8)
def _hooks_from_string(env_value: str) -> dict[str, ShieldHook]:
    return load_hooks(env_value)


def _resolve_hooks(hooks: str | Mapping[str, ShieldHook] | None) -> Mapping[str, ShieldHook]:
    if hooks is None:
        return {}
    return _hooks_from_string(hooks) if isinstance(hooks, str) else hooks


@dataclass(frozen=True, slots=True)
class HookParams:
    """Which optional keywords a hook takes: ``cost_to_go`` ("no" | "optional" | "required"), ``config``."""

    cost_to_go: str = "no"
    config: bool = False


def hook_params(hook: Any) -> HookParams:
    """Read a hook's signature (once per shield built, never per request)."""
    try:
        params = inspect.signature(hook).parameters
    except (TypeError, ValueError):  # some builtins have no signature: the plain protocol
        return HookParams()
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)

    def takes(name: str) -> inspect.Parameter | None:
        p = params.get(name)
        return p if p is not None and p.kind in keyword_kinds else None

    ctg = takes("cost_to_go")
    if ctg is not None:
        cost = "required" if ctg.default is inspect.Parameter.empty else "optional"
    else:
        cost = "optional" if var_kw else "no"
    return HookParams(cost_to_go=cost, config=takes("config") is not None or var_kw)


def _hook_config(name: str, hook: Any, spec: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The hook's checked config (None when the hook takes none), or a ``ShieldSpecError``."""
    params = hook_params(hook)
    given = spec.get("config")
    if "config" in spec and not isinstance(given, Mapping):
        raise ShieldSpecError(f"hook shield {name!r}: config must be an object")
    if params.cost_to_go == "required" and not meta.get("cost_critic"):
        raise ShieldSpecError(
            f"hook shield {name!r} needs the policy's cost critic (cost_to_go), and this artefact has none; "
            "artefacts written by this version of the trainer carry it"
        )
    if not params.config:
        if given:
            raise ShieldSpecError(f"hook shield {name!r} takes no config")
        return None
    config = dict(given or {})
    try:
        size = len(json.dumps(config, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ShieldSpecError(f"hook shield {name!r}: config must be plain JSON ({exc})") from exc
    if size > MAX_CONFIG_BYTES:
        raise ShieldSpecError(f"hook shield {name!r}: config is over {MAX_CONFIG_BYTES} bytes of JSON")
    validate = getattr(hook, "validate_config", None)
    if callable(validate):
        try:
            config = validate(config, meta)
        except (TypeError, ValueError, KeyError) as exc:
            raise ShieldSpecError(f"hook shield {name!r}: config: {exc}") from exc
    return config


def _action_box(meta: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    space = meta["action_space"]
    return np.asarray(space["low"], dtype=np.float64), np.asarray(space["high"], dtype=np.float64)


def _bound_list(spec: Mapping[str, Any], key: str, act_dim: int) -> np.ndarray:
    values = spec.get(key)
    if not isinstance(values, list) or len(values) != act_dim:
        raise ShieldSpecError(f"box shield: {key!r} must be a list of {act_dim} numbers (one per action dimension)")
    for j, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ShieldSpecError(f"box shield: {key}[{j}] must be a number, got {v!r}")
        if not math.isfinite(v):
            raise ShieldSpecError(f"box shield: {key}[{j}] must be finite, got {v!r}")
    return np.asarray(values, dtype=np.float64)


def validate_shield_spec(
    spec: Mapping[str, Any] | None, meta: Mapping[str, Any], hooks: str | Mapping[str, ShieldHook] | None = None
) -> dict[str, Any] | None:
    """Check a spec against a policy's ``policy.json`` and the configured hooks; return it normalised.

    ``hooks`` is the raw ``CVPO_SHIELD_HOOKS`` string or an already-loaded mapping. Returns None for
    no shield (``None`` or ``{"type": "none"}``).
    """
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise ShieldSpecError("a shield must be an object with a 'type'")
    kind = spec.get("type")
    allowed = {"none": {"type"}, "box": {"type", "low", "high"}, "hook": {"type", "name", "config"}}
    if kind not in allowed:
        raise ShieldSpecError(f"shield type must be one of none, box, hook; got {kind!r}")
    extra = sorted(set(spec) - allowed[kind])
    if extra:
        raise ShieldSpecError(f"{kind} shield: unknown field(s) {extra}")
    if kind == "none":
        return None
    if kind == "hook":
        name = spec.get("name")
        known = _resolve_hooks(hooks)
        if not isinstance(name, str) or name not in known:
            configured = ", ".join(sorted(known)) or "none configured"
            raise ShieldSpecError(f"hook shield: {name!r} is not a hook in CVPO_SHIELD_HOOKS ({configured})")
        config = _hook_config(name, known[name], spec, meta)
        return {"type": "hook", "name": name} if config is None else {"type": "hook", "name": name, "config": config}
    env_low, env_high = _action_box(meta)
    act_dim = env_low.shape[0]
    low, high = _bound_list(spec, "low", act_dim), _bound_list(spec, "high", act_dim)
    for j in range(act_dim):
        if low[j] > high[j]:
            raise ShieldSpecError(f"box shield: low[{j}]={low[j]} is above high[{j}]={high[j]}")
        if low[j] < env_low[j] or high[j] > env_high[j]:
            raise ShieldSpecError(
                f"box shield: dimension {j} [{low[j]}, {high[j]}] must lie inside the action Box "
                f"[{env_low[j]}, {env_high[j]}]"
            )
    return {"type": "box", "low": low.tolist(), "high": high.tolist()}


class Shield:
    """A shield bound to one policy's action Box. ``apply`` projects, re-clips, audits and counts."""

    kind = "shield"
    wants_cost_to_go = False  # whether ``apply`` should be given the policy's Q_c (computed only then)

    def __init__(self, spec: dict[str, Any], env_low: np.ndarray, env_high: np.ndarray) -> None:
        self.spec = spec
        self.env_low = env_low
        self.env_high = env_high

    def project(
        self, raw_obs: np.ndarray, action: np.ndarray, cost_to_go: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        raise NotImplementedError

    def apply(
        self, policy_id: str, raw_obs: np.ndarray, action: np.ndarray, cost_to_go: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """(safe actions inside the Box, applied flags, reasons); changed rows are logged and counted.

        ``cost_to_go`` (B, m): the policy's Q_c of its own actions, for shields that read it."""
        safe, applied, reasons = self.project(raw_obs, action, cost_to_go)
        safe = np.clip(safe, self.env_low, self.env_high)
        # "applied" is what the audit trail reports, so a change the shield did not own up to still counts.
        changed = np.any(safe != action, axis=1)
        applied = applied | changed
        reasons = [
            (r or f"{self.kind}: changed the action") if a else None for r, a in zip(reasons, applied, strict=True)
        ]
        n = int(applied.sum())
        if n:
            SHIELD_INTERVENTIONS.labels(policy_id).inc(n)
            if log.isEnabledFor(logging.INFO):
                for i in np.flatnonzero(applied):
                    log.info(
                        "shield intervention policy=%s row=%d nominal=%s safe=%s reason=%s",
                        policy_id, i, action[i].tolist(), safe[i].tolist(), reasons[i],
                    )  # fmt: skip
        return safe, applied, reasons


class BoxShield(Shield):
    kind = "box"

    def __init__(self, spec: dict[str, Any], env_low: np.ndarray, env_high: np.ndarray) -> None:
        super().__init__(spec, env_low, env_high)
        self.low = np.asarray(spec["low"], dtype=np.float64)
        self.high = np.asarray(spec["high"], dtype=np.float64)

    def project(
        self, raw_obs: np.ndarray, action: np.ndarray, cost_to_go: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        safe = np.clip(action, self.low, self.high)
        hit = safe != action
        applied = hit.any(axis=1)
        reasons: list[str | None] = [
            f"box: dims {np.flatnonzero(row).tolist()} limited" if a else None
            for row, a in zip(hit, applied, strict=True)
        ]
        return safe, applied, reasons


class HookShield(Shield):
    kind = "hook"

    def __init__(
        self,
        spec: dict[str, Any],
        env_low: np.ndarray,
        env_high: np.ndarray,
        hook: ShieldHook,
        has_cost_critic: bool = False,
    ) -> None:
        super().__init__(spec, env_low, env_high)
        self.name = spec["name"]
        self.hook = hook
        self.kind = f"hook {self.name}"
        params = hook_params(hook)  # once per policy load: the hot path only reads these flags
        self.cost_to_go_param = params.cost_to_go
        self.wants_cost_to_go = params.cost_to_go != "no" and has_cost_critic
        self.kwargs: dict[str, Any] = {}
        if params.config:
            self.kwargs["config"] = copy.deepcopy(spec.get("config") or {})

    def project(
        self, raw_obs: np.ndarray, action: np.ndarray, cost_to_go: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        # The hook gets copies: it must not be able to alter what the audit log records as nominal.
        kwargs = self.kwargs
        if self.wants_cost_to_go and cost_to_go is not None:
            kwargs = {**kwargs, "cost_to_go": cost_to_go.copy()}
        elif self.cost_to_go_param == "required":
            raise ShieldOutputError(f"shield hook {self.name!r} needs cost_to_go, and none was computed")
        out = self.hook(raw_obs.copy(), action.copy(), **kwargs)
        try:
            safe_raw, applied_raw, reasons_raw = out
            safe = np.asarray(safe_raw, dtype=np.float64)
            applied = np.asarray(applied_raw, dtype=bool).reshape(-1)
            reasons = [None if r is None else str(r) for r in reasons_raw]
        except (TypeError, ValueError) as exc:
            raise ShieldOutputError(f"shield hook {self.name!r} returned an unusable result: {exc}") from exc
        b = action.shape[0]
        if safe.shape != action.shape or applied.shape != (b,) or len(reasons) != b:
            raise ShieldOutputError(
                f"shield hook {self.name!r} returned shapes {safe.shape}, {applied.shape}, {len(reasons)} "
                f"for a batch of {action.shape}"
            )
        if not np.all(np.isfinite(safe)):
            raise ShieldOutputError(f"shield hook {self.name!r} returned a non-finite action")
        return safe, applied, reasons


def build_shield(
    spec: Mapping[str, Any] | None, meta: Mapping[str, Any], hooks: str | Mapping[str, ShieldHook] | None = None
) -> Shield | None:
    """The runtime shield for a stored spec (validated again: config may have changed since promotion)."""
    clean = validate_shield_spec(spec, meta, hooks)
    if clean is None:
        return None
    env_low, env_high = _action_box(meta)
    if clean["type"] == "box":
        return BoxShield(clean, env_low, env_high)
    hook = _resolve_hooks(hooks)[clean["name"]]
    return HookShield(clean, env_low, env_high, hook, has_cost_critic=bool(meta.get("cost_critic")))


def speed_limiter(
    raw_obs: np.ndarray, action: np.ndarray, limit: float = 0.5
) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Example hook: scale each action down so its Euclidean norm is at most ``limit``.

    For point/car robots the action is (throttle, steering)-like, so this caps commanded speed.
    Register it with ``CVPO_SHIELD_HOOKS="slow=api.shield:speed_limiter"`` and promote a policy
    with ``"shield": {"type": "hook", "name": "slow"}``.
    """
    norms = np.linalg.norm(action, axis=1)
    applied = norms > limit
    scale = np.where(applied, limit / np.maximum(norms, 1e-12), 1.0)
    reasons: list[str | None] = [
        f"speed limit {limit}: |a|={n:.3f}" if a else None for n, a in zip(norms, applied, strict=True)
    ]
    return action * scale[:, None], applied, reasons


class CostBudgetFallback:
    """Hook: the configured safe action wherever the predicted cost-to-go is over a per-step budget.

    Row i falls back when Q_c,j(s_i, a_i) > budget_j for some constraint j (``cost_to_go`` from the
    policy's cost critics, so the policy's artefact must carry them). Config (shield spec ``config``):

    - ``budget``: ``"thresholds"`` (default) = the artefact's per-step thresholds c̄_j =
      C_j·(1 − γ^T)/((1 − γ)·T), the level of Q_c the cost limits C mean and CVPO's E-step trains
      against; or one number for every constraint; or a list with one number (or null = no budget)
      per constraint.
    - ``safe_action``: the action to send instead, inside the action Box (default zeros, clipped
      into the Box): e.g. a "brake" command.

    Register with ``CVPO_SHIELD_HOOKS="budget=api.shield:cost_budget_fallback"`` and promote with
    ``"shield": {"type": "hook", "name": "budget", "config": {"safe_action": [0, 0]}}``.
    """

    def validate_config(self, config: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
        # budget_source is only in the normalised form this returns (checked again at every load).
        extra = sorted(set(config) - {"budget", "safe_action", "budget_source"})
        if extra:
            raise ValueError(f"unknown field(s) {extra}; allowed: budget, safe_action")
        if config.get("budget_source", "config") not in ("config", "thresholds"):
            raise ValueError("budget_source must be 'config' or 'thresholds'")
        critic = meta.get("cost_critic")
        if not critic:
            raise ValueError("the policy has no cost critic")
        m = int(critic["members"])
        budget = "thresholds" if config.get("budget_source") == "thresholds" else config.get("budget", "thresholds")
        if budget == "thresholds":
            values = critic.get("per_step_thresholds")
            if not values or len(values) != m:
                raise ValueError("the artefact records no per-step thresholds; give 'budget' numbers")
            source = "thresholds"
        elif isinstance(budget, int | float) and not isinstance(budget, bool):
            values, source = [budget] * m, "config"
        elif isinstance(budget, list) and len(budget) == m:
            values, source = budget, "config"
        else:
            raise ValueError(f"budget must be 'thresholds', a number, or a list of {m} numbers or nulls")
        for j, v in enumerate(values):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)):
                raise ValueError(f"budget[{j}] must be a finite number or null, got {v!r}")
        if all(v is None for v in values):
            raise ValueError("every constraint is unbudgeted (no finite threshold): give 'budget' numbers")
        low, high = _action_box(meta)
        safe = config.get("safe_action")
        if safe is None:
            safe_arr = np.clip(np.zeros_like(low), low, high)
        else:
            if not isinstance(safe, list) or len(safe) != low.shape[0]:
                raise ValueError(f"safe_action must be a list of {low.shape[0]} numbers")
            if any(isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) for v in safe):
                raise ValueError("safe_action must hold finite numbers")
            safe_arr = np.asarray(safe, dtype=np.float64)
            if np.any(safe_arr < low) or np.any(safe_arr > high):
                raise ValueError(f"safe_action {safe} must lie inside the action Box [{low.tolist()}, {high.tolist()}]")
        return {
            "budget": [None if v is None else float(v) for v in values],
            "budget_source": source,
            "safe_action": safe_arr.tolist(),
        }

    def __call__(
        self, raw_obs: np.ndarray, action: np.ndarray, *, cost_to_go: np.ndarray, config: Mapping[str, Any]
    ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        budget = np.array([np.inf if v is None else v for v in config["budget"]], dtype=np.float64)
        over = cost_to_go > budget  # (B, m)
        applied = over.any(axis=1)
        safe = np.where(applied[:, None], np.asarray(config["safe_action"], dtype=np.float64), action)
        reasons: list[str | None] = [None] * action.shape[0]
        for i in np.flatnonzero(applied):
            parts = [f"Q_c[{j}]={cost_to_go[i, j]:.4g} > budget {budget[j]:.4g}" for j in np.flatnonzero(over[i])]
            reasons[i] = "cost budget: " + ", ".join(parts) + "; safe action"
        return safe, applied, reasons


cost_budget_fallback = CostBudgetFallback()
