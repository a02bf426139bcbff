"""Typed views of the API's resources. Each keeps the fields callers branch on as attributes and the
whole answer in ``raw`` (not shown in repr), so a field the service adds later is usable at once
without a client release."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

JOB_TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
EVALUATION_TERMINAL = frozenset({"succeeded", "failed"})


@dataclass(frozen=True)
class Job:
    """A training job (``GET /jobs/{id}``); ``latest`` is the newest epoch's summary metrics."""

    id: str
    status: str
    env_id: str
    env_step: int
    total_env_steps: int
    epoch: int | None
    attempt: int
    policy_id: str | None
    latest: dict[str, Any]
    best: dict[str, Any] | None
    failure: Any
    created_at: str | None
    finished_at: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def done(self) -> bool:
        """The job has ended (succeeded, failed or cancelled): its state will not change again."""
        return self.status in JOB_TERMINAL

    @property
    def fraction(self) -> float:
        return self.env_step / self.total_env_steps if self.total_env_steps else 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        progress = d.get("progress") or {}
        return cls(
            id=d["id"],
            status=d["status"],
            env_id=d.get("env_id", ""),
            env_step=int(progress.get("env_step") or 0),
            total_env_steps=int(progress.get("total_env_steps") or 0),
            epoch=progress.get("epoch"),
            attempt=int(d.get("attempt") or 0),
            policy_id=d.get("policy_id"),
            latest=dict(d.get("latest") or {}),
            best=d.get("best"),
            failure=d.get("failure"),
            created_at=d.get("created_at"),
            finished_at=d.get("finished_at"),
            raw=d,
        )


@dataclass(frozen=True)
class Checkpoint:
    """One of a job's checkpoints (``GET /jobs/{id}/checkpoints``); any ``promotable`` one can be promoted."""

    id: str
    attempt: int
    epoch: int
    env_step: int
    eval_return: float | None
    eval_cost: float | None
    feasible: bool | None
    is_best: bool
    promotable: bool
    resumable: bool
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Checkpoint:
        return cls(
            id=d["id"],
            attempt=int(d.get("attempt") or 0),
            epoch=int(d.get("epoch") or 0),
            env_step=int(d.get("env_step") or 0),
            eval_return=d.get("eval_return"),
            eval_cost=d.get("eval_cost"),
            feasible=d.get("feasible"),
            is_best=bool(d.get("is_best")),
            promotable=bool(d.get("promotable")),
            resumable=bool(d.get("resumable")),
            raw=d,
        )


def _bounds(values: Any) -> NDArray[np.float64]:
    """Space bounds as floats; the API sends null for an unbounded side (JSON has no infinity)."""
    return np.array([np.nan if v is None else float(v) for v in values or []], dtype=np.float64)


@dataclass(frozen=True)
class Policy:
    """An immutable served policy (``GET /policies/{id}``). ``action_low``/``action_high`` bound every
    action ``/act`` returns (NaN where a side is unbounded)."""

    id: str
    env_id: str
    ready: bool
    certified: bool
    sha256: str
    obs_dim: int
    act_dim: int
    action_low: NDArray[np.float64] = field(repr=False, compare=False)
    action_high: NDArray[np.float64] = field(repr=False, compare=False)
    has_cost_critic: bool
    max_batch: int
    shield: dict[str, Any] | None
    job_id: str | None
    checkpoint_id: str | None
    certificate: dict[str, Any] | None = field(repr=False, compare=False)
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        obs, act = d.get("observation_space") or {}, d.get("action_space") or {}
        source = d.get("source") or {}
        return cls(
            id=d["id"],
            env_id=d.get("env_id", ""),
            ready=bool(d.get("ready")),
            certified=bool(d.get("certified")),
            sha256=d.get("sha256", ""),
            obs_dim=int((obs.get("shape") or [0])[0]),
            act_dim=int((act.get("shape") or [0])[0]),
            action_low=_bounds(act.get("low")),
            action_high=_bounds(act.get("high")),
            has_cost_critic=bool(d.get("has_cost_critic")),
            max_batch=int(d.get("max_batch") or 0),
            shield=d.get("shield"),
            job_id=source.get("job_id"),
            checkpoint_id=source.get("checkpoint_id"),
            certificate=d.get("certificate"),
            raw=d,
        )


@dataclass(frozen=True)
class Evaluation:
    """An on-demand evaluation of a policy on held-out layouts; ``result`` is its certificate once done."""

    id: str
    policy_id: str
    status: str
    params: dict[str, Any]
    certified: bool | None
    result: dict[str, Any] | None = field(repr=False, compare=False)
    error: Any
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def done(self) -> bool:
        return self.status in EVALUATION_TERMINAL

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Evaluation:
        return cls(
            id=d["id"],
            policy_id=d.get("policy_id", ""),
            status=d["status"],
            params=dict(d.get("params") or {}),
            certified=d.get("certified"),
            result=d.get("result"),
            error=d.get("error"),
            raw=d,
        )


@dataclass(frozen=True)
class ActResult:
    """What ``/act`` answered beyond the actions. Shapes follow the observations sent: for one 1-D
    observation ``actions`` is (act_dim,), ``clipped`` a 0-d bool array and ``cost_to_go`` (m,); for a
    batch of B rows they are (B, act_dim), (B,) and (B, m). ``cost_to_go`` is None unless asked for."""

    actions: NDArray[np.float64]
    clipped: NDArray[np.bool_]
    cost_to_go: NDArray[np.float64] | None
    shield: dict[str, Any] | None
    policy_id: str
    artefact_sha256: str
    request_id: str | None
    deterministic: bool
    certified: bool | None  # the X-Policy-Certified header: false for an override or an old policy
    alias: str | None  # the alias acted through (``act_alias``), else None
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class AliasEvent:
    """One change of an alias's target (``GET /aliases/{name}/history``): who, when, from, to, why."""

    seq: int
    alias: str
    action: str  # "set" or "rollback"
    from_policy_id: str | None  # None when the change created the alias
    to_policy_id: str
    version: int
    actor: dict[str, Any]  # client, token_id, token_name
    reason: str | None
    certified: bool
    override: dict[str, Any] | None
    at: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AliasEvent:
        return cls(
            seq=int(d["seq"]),
            alias=d.get("alias", ""),
            action=d.get("action", ""),
            from_policy_id=d.get("from_policy_id"),
            to_policy_id=d["to_policy_id"],
            version=int(d.get("version") or 0),
            actor=dict(d.get("actor") or {}),
            reason=d.get("reason"),
            certified=bool(d.get("certified")),
            override=d.get("override"),
            at=d.get("at"),
            raw=d,
        )


@dataclass(frozen=True)
class Alias:
    """A client's name for one of its policies (``GET /aliases/{name}``): controllers act through the
    name while the target is repointed or rolled back."""

    name: str
    client: str
    policy_id: str
    version: int
    certified: bool
    can_roll_back: bool
    updated_at: str | None
    last_change: AliasEvent | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Alias:
        last = d.get("last_change")
        return cls(
            name=d["name"],
            client=d.get("client", ""),
            policy_id=d["policy_id"],
            version=int(d.get("version") or 0),
            certified=bool(d.get("certified")),
            can_roll_back=bool(d.get("can_roll_back")),
            updated_at=d.get("updated_at"),
            last_change=AliasEvent.from_dict(last) if isinstance(last, dict) else None,
            raw=d,
        )
