"""Pydantic models of the job API (service-design.md §1.2–1.3). They validate control-plane bodies
and document the schema; the ``/act`` hot path parses with orjson instead (§2.5)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TOTAL_ENV_STEPS = 20_000_000
MAX_TIME_LIMIT_S = 48 * 3600


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    episodes: int = Field(10, ge=1, le=100, description="Deterministic evaluation episodes after every epoch.")


class CertifySpec(BaseModel):
    """How a finished job's candidates are certified before one becomes its policy (README "Serving policies")."""

    model_config = ConfigDict(extra="forbid")

    episodes: int = Field(
        ...,
        ge=2,
        le=1000,
        description="Held-out deterministic episodes per certificate (default CVPO_CERTIFY_EPISODES).",
    )
    stochastic_episodes: int | None = Field(
        None, ge=0, le=1000, description="Sampled-action episodes, reported not certified (default: a third, ≤ 10)."
    )


def _check_limits(v: float | list[float] | None) -> float | list[float] | None:
    values = v if isinstance(v, list) else [v] if v is not None else []
    if isinstance(v, list) and not 1 <= len(v) <= 8:
        raise ValueError("give 1 to 8 cost limits")
    for x in values:
        if not math.isfinite(x) or x < 0:
            raise ValueError("cost limits must be finite and ≥ 0")
    return v


class JobSpec(BaseModel):
    """A training job. Defaults < the task's preset < ``hyperparams`` (the response echoes the result)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"env_id": "SafetyPointCircle1-v0", "total_env_steps": 2000, "seed": 0, "cost_limit": 25}]
        },
    )

    env_id: str = Field(..., description="A task id from GET /envs.", max_length=80)
    algorithm: Literal["cvpo"] = "cvpo"
    preset: str | None = Field(None, description="Preset name (GET /presets); default: the task's own.", max_length=40)
    cost_limit: float | list[float] | None = Field(
        None, description="Episodic cost limit(s) ≥ 0, one per constraint; default: the task's."
    )
    total_env_steps: int = Field(..., ge=1, le=MAX_TOTAL_ENV_STEPS)
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Drawn and stored when missing.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    hyperparams: dict[str, Any] = Field(
        default_factory=dict,
        description="Engine settings: nested sections ({'algo': {'batch_size': 64}}), dotted keys "
        "('algo.batch_size') or bare names that are unique across sections ('batch_size').",
    )
    eval: EvalSpec | None = None
    certify: CertifySpec | None = None
    checkpoint_every_epochs: int | None = Field(None, ge=1, le=10_000)
    time_limit_s: float = Field(86_400, gt=0, le=MAX_TIME_LIMIT_S)
    max_attempts: int = Field(3, ge=1, le=5)
    labels: dict[str, str] = Field(default_factory=dict, max_length=20)

    @field_validator("cost_limit")
    @classmethod
    def _finite_limits(cls, v: float | list[float] | None) -> float | list[float] | None:
        return _check_limits(v)


class CancelResponse(BaseModel):
    id: str
    status: str


class OverrideSpec(BaseModel):
    """An admin's promotion of a checkpoint that did not certify: the reason is kept with the policy."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(..., min_length=1, max_length=1000, description="Why this uncertified policy may be served.")

    @field_validator("reason")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("give a reason")
        return v.strip()


class PromoteRequest(BaseModel):
    """Promote a checkpoint of a job to an immutable policy (service-design.md §1.1)."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(..., max_length=40)
    checkpoint_id: str = Field(
        "best", max_length=40, description='A checkpoint id, "best", "final" or "served" (the run\'s policy/).'
    )
    shield: dict[str, Any] | None = Field(
        None, description='{"type": "box", "low": [...], "high": [...]} or {"type": "hook", "name": ...}.'
    )
    override: OverrideSpec | None = Field(
        None, description="Admin only: promote although the checkpoint does not certify; needs a reason."
    )


class AliasTarget(BaseModel):
    """Point an alias at a policy (``PUT /aliases/{name}``, issue #20)."""

    model_config = ConfigDict(extra="forbid")

    policy_id: str = Field(..., min_length=1, max_length=40, description="A certified policy of the alias's client.")
    reason: str | None = Field(None, max_length=1000, description="Why; kept in the alias's history.")
    override: OverrideSpec | None = Field(
        None, description="Admin only: point at a policy that is not certified; needs a reason (as promotion)."
    )


class AliasRollback(BaseModel):
    """Point an alias back at its previous target (``POST /aliases/{name}/rollback``); the body is optional."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, max_length=1000, description="Why; kept in the alias's history.")
    override: OverrideSpec | None = Field(
        None, description="Admin only: needed when the previous target is not certified."
    )


class EvaluationRequest(BaseModel):
    """An on-demand evaluation of a policy on held-out layouts (``cvpo.certify``)."""

    model_config = ConfigDict(extra="forbid")

    episodes: int | None = Field(
        None, ge=2, le=1000, description="Deterministic episodes (default CVPO_CERTIFY_EPISODES)."
    )
    stochastic_episodes: int | None = Field(
        None, ge=0, le=1000, description="Sampled-action episodes (default: a third, ≤ 10)."
    )
    seed_base: int = Field(2_000_003, ge=0, le=2**32 - 1, description="Episode i resets with seed_base + i.")
    cost_limits: float | list[float] | None = Field(
        None, description="Limit(s) to certify against, one per constraint (one number: all); default the policy's."
    )
    env_id: str | None = Field(
        None, max_length=80, description="A variant task with the same spaces (e.g. another level)."
    )
    confidence: float = Field(0.95, ge=0.5, le=0.999, description="One-sided confidence of the cost upper bound.")

    @field_validator("cost_limits")
    @classmethod
    def _finite_limits(cls, v: float | list[float] | None) -> float | list[float] | None:
        return _check_limits(v)
