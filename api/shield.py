"""Safety shields for served policies (service-design.md §2.4).

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
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

import numpy as np
from prometheus_client import Counter

log = logging.getLogger("cvpo.shield")

ShieldHook = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, list[str | None]]]

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
    allowed = {"none": {"type"}, "box": {"type", "low", "high"}, "hook": {"type", "name"}}
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
        return {"type": "hook", "name": name}
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

    def __init__(self, spec: dict[str, Any], env_low: np.ndarray, env_high: np.ndarray) -> None:
        self.spec = spec
        self.env_low = env_low
        self.env_high = env_high

    def project(self, raw_obs: np.ndarray, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        raise NotImplementedError

    def apply(
        self, policy_id: str, raw_obs: np.ndarray, action: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """(safe actions inside the Box, applied flags, reasons); changed rows are logged and counted."""
        safe, applied, reasons = self.project(raw_obs, action)
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

    def project(self, raw_obs: np.ndarray, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
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

    def __init__(self, spec: dict[str, Any], env_low: np.ndarray, env_high: np.ndarray, hook: ShieldHook) -> None:
        super().__init__(spec, env_low, env_high)
        self.name = spec["name"]
        self.hook = hook
        self.kind = f"hook {self.name}"

    def project(self, raw_obs: np.ndarray, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        # The hook gets copies: it must not be able to alter what the audit log records as nominal.
        out = self.hook(raw_obs.copy(), action.copy())
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
    return HookShield(clean, env_low, env_high, _resolve_hooks(hooks)[clean["name"]])


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
