"""Policies: list, metadata, export, and ``POST /policies`` (promotion) (service-design.md §1.1, §2).

``POST /policies/{id}/act``, the hot path, is built differently from every other route (§2.5) and
lives in ``api/routes/act.py``; the 404/503 helpers it shares with these routes are here.
Over 400 lines because one resource's routes, response models and export checks belong together;
the act path and promotion's certification (``core/certification.py``) are already elsewhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from api.act import (
    LoadedPolicy,
    PolicyCache,
    PolicyNotReadyError,
    check_meta_sha256,
)
from api.auth import owner_filter, require
from api.errors import Problem, json_safe, page_token_problem, validation_problem
from api.routes import json_response, store_of
from api.schemas import PromoteRequest
from api.shield import ShieldSpecError
from core import promotion
from core.store import ConflictError, NotFoundError, PolicyRecord, Principal
from cvpo.artefact import META_FILE, WEIGHTS_FILE, ArtefactError

router = APIRouter(tags=["policies"])
Reader = Annotated[Principal, Depends(require("policies:read"))]

NOT_READY_TYPE = "/problems/policy-not-ready"


# ---------------------------------------------------------------------- schema documentation only


PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details (service-design.md §1.7)",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "request_id": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["loc", "msg"],
                "properties": {
                    "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                    "msg": {"type": "string"},
                },
            },
        },
    },
}


class Space(BaseModel):
    shape: list[int]
    low: list[float | None] | None = Field(None, description="null where unbounded (JSON has no infinity)")
    high: list[float | None] | None = None


class Normalizer(BaseModel):
    present: bool
    clip: float | None = None


class Source(BaseModel):
    job_id: str | None
    checkpoint_id: str | None
    epoch: int | None = None
    eval_return: float | None = None
    eval_cost: float | None = None


class PolicyOut(BaseModel):
    id: str
    env_id: str
    created_at: str | None
    ready: bool
    sha256: str
    observation_space: Space
    action_space: Space
    normalizer: Normalizer
    max_batch: int
    shield: dict[str, Any] | None
    cost_limits: list[float | None] | None
    summary: dict[str, Any]
    source: Source
    architecture: dict[str, Any] | None
    config_hash: str | None
    has_cost_critic: bool = Field(
        False, description='The artefact carries its cost critics: /act can "return": ["cost_to_go"]'
    )
    cost_critic: dict[str, Any] | None = Field(
        None, description="The critics' members, γ, per-step thresholds c̄ and inputs; null when there are none"
    )
    certified: bool = Field(..., description="Every constraint's cost upper bound ≤ its limit on held-out layouts")
    certificate: dict[str, Any] | None = Field(None, description="cvpo.certify certificate; null for old policies")
    override: dict[str, Any] | None = Field(None, description="An admin's override of the gate: reason, actor, at")
    links: dict[str, str]


class PolicyPage(BaseModel):
    items: list[PolicyOut]
    next_page_token: str | None


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "Not JSON",
        401: "No or unknown token",
        403: "Missing scope",
        404: "Unknown policy, or another client's",
        413: "Body over the byte limit, or batch over max_batch",
        415: "Content-Type is not JSON",
        422: "Invalid input; errors[].loc points at the culprit",
        429: "Over this client's cap",
        500: "Corrupt artefact (non-finite output); the policy is marked not ready",
        503: "Policy loading or not ready, or server busy (see Retry-After)",
    }
    return {
        c: {"description": text[c], "content": {"application/problem+json": {"schema": PROBLEM_SCHEMA}}} for c in codes
    }


# ------------------------------------------------------------------------------------- helpers


def _finite_or_none(values: Any) -> Any:
    if values is None:
        return None
    return [float(v) if isinstance(v, int | float) and math.isfinite(v) else None for v in values]


def _space(space: dict[str, Any] | None) -> dict[str, Any]:
    space = space or {}
    return {
        "shape": list(space.get("shape") or []),
        "low": _finite_or_none(space.get("low")),
        "high": _finite_or_none(space.get("high")),
    }


def policy_resource(policy: PolicyRecord, settings: Any, cache: PolicyCache | None = None) -> dict[str, Any]:
    """A policy as clients see it: spaces, bounds, normaliser, shield, source checkpoint (§2.1)."""
    meta = policy.meta or {}
    norm = meta.get("normalizer") or {}
    summary = meta.get("summary") or {}
    ready = policy.ready and (cache is None or cache.not_ready_reason(policy.id) is None)
    return json_safe(
        {
            "id": policy.id,
            "env_id": policy.env_id,
            "created_at": policy.created_at,
            "ready": ready,
            "sha256": policy.sha256,
            "observation_space": _space(meta.get("observation_space")),
            "action_space": _space(meta.get("action_space")),
            "normalizer": {"present": bool(norm.get("present")), "clip": norm.get("clip")},
            "max_batch": settings.max_batch,
            "shield": policy.shield,
            "cost_limits": _finite_or_none(meta.get("cost_limits")),
            "summary": summary,
            "source": {
                "job_id": policy.job_id,
                "checkpoint_id": policy.checkpoint_id,
                "epoch": summary.get("epoch"),
                "eval_return": summary.get("eval_return"),
                "eval_cost": summary.get("eval_cost"),
            },
            "architecture": meta.get("architecture"),
            "config_hash": meta.get("config_hash"),
            "has_cost_critic": bool(meta.get("cost_critic")),
            "cost_critic": meta.get("cost_critic"),
            "certified": bool(policy.certified),
            "certificate": policy.certificate,
            "override": policy.override,
            "links": {
                "act": f"/policies/{policy.id}/act",
                "onnx": f"/policies/{policy.id}/export?format=onnx",
                "bundle": f"/policies/{policy.id}/export?format=bundle",
                "evaluations": f"/policies/{policy.id}/evaluations",
            },
        }
    )


def _visible(policy: PolicyRecord | LoadedPolicy | None, principal: Principal) -> bool:
    """Another client's policy is a 404, never a 403 (no existence leak); admins see all."""
    owner = owner_filter(principal)
    return policy is not None and (owner is None or policy.client == owner)


def _not_found(policy_id: str) -> Problem:
    return Problem(404, f"no policy {policy_id!r}")


def _not_ready(policy_id: str, reason: str) -> Problem:
    return Problem(
        503,
        f"policy {policy_id} is not ready: {reason}",
        type=NOT_READY_TYPE,
        title="Policy not ready",
        headers={"Retry-After": "60"},
    )


def _get_visible(request: Request, policy_id: str, principal: Principal) -> PolicyRecord:
    policy = store_of(request).get_policy(policy_id)
    if policy is None or not _visible(policy, principal):
        raise _not_found(policy_id)
    return policy


# -------------------------------------------------------------------------------------- routes


@router.get(
    "/policies",
    summary="List policies, newest first",
    response_model=PolicyPage,
    responses=_problems(401, 403, 422),
)
def list_policies(
    request: Request,
    principal: Reader,
    env_id: Annotated[str | None, Query(max_length=80)] = None,
    job_id: Annotated[str | None, Query(max_length=40)] = None,
    page_size: Annotated[int, Query(ge=1, le=100)] = 50,
    page_token: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    try:
        items, token = store_of(request).list_policies(
            client=owner_filter(principal), env_id=env_id, job_id=job_id, page_size=page_size, page_token=page_token
        )
    except ValueError as exc:
        raise page_token_problem(exc, page_token) from exc
    state = request.app.state
    return json_response(
        {"items": [policy_resource(p, state.settings, state.policy_cache) for p in items], "next_page_token": token}
    )


@router.get(
    "/policies/{policy_id}",
    summary="A policy's metadata: spaces, bounds, normaliser, shield, source checkpoint",
    response_model=PolicyOut,
    responses=_problems(401, 403, 404, 422),
)
def get_policy(request: Request, policy_id: str, principal: Reader) -> Response:
    state = request.app.state
    return json_response(
        policy_resource(_get_visible(request, policy_id, principal), state.settings, state.policy_cache)
    )


# -------------------------------------------------------------------------------------- export


@lru_cache(maxsize=16)
def _onnx_bytes(
    path: str, sha256: str, shield_json: str, cost_head: bool = False, meta_sha256: str | None = None
) -> bytes:
    """Policies are immutable, so (path, hashes, shield, cost head) names one export for the process's
    life. Both files are checked against the store's hashes first (issue #23 item 10): the weights
    against ``sha256`` (load_policy only compares them with the hash inside policy.json) and
    policy.json against ``meta_sha256`` (None for policies registered before it was recorded)."""
    from cvpo.onnx_export import export_onnx  # onnx loads on first export only

    check_meta_sha256(path, meta_sha256)
    if hashlib.sha256((Path(path) / WEIGHTS_FILE).read_bytes()).hexdigest() != sha256:
        raise PolicyNotReadyError(f"{WEIGHTS_FILE} differs from the one registered at promotion (sha256 mismatch)")
    return export_onnx(path, json.loads(shield_json) if shield_json else None, cost_head)


def _bundle(policy: PolicyRecord) -> bytes:
    root = Path(policy.path)
    weights = (root / WEIGHTS_FILE).read_bytes()
    if hashlib.sha256(weights).hexdigest() != policy.sha256:
        raise PolicyNotReadyError(f"{WEIGHTS_FILE} fails its sha256 check")
    meta = (root / META_FILE).read_bytes()
    if policy.meta_sha256 is not None and hashlib.sha256(meta).hexdigest() != policy.meta_sha256:
        raise PolicyNotReadyError(f"{META_FILE} differs from the one registered at promotion (sha256 mismatch)")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr(META_FILE, meta)
        z.writestr(WEIGHTS_FILE, weights, compress_type=zipfile.ZIP_STORED)
        if policy.shield is not None:
            z.writestr("shield.json", json.dumps(policy.shield, indent=2) + "\n")
        if policy.certificate is not None:
            z.writestr("certificate.json", json.dumps(policy.certificate, indent=2) + "\n")
    return buf.getvalue()


@router.get(
    "/policies/{policy_id}/export",
    summary="Download a policy: ONNX (normaliser, clip, Box map and box shield inside) or its native files",
    response_class=Response,
    responses={
        200: {
            "description": "ONNX model (application/octet-stream) or a zip of policy.json + policy.safetensors "
            "(+ certificate.json, shield.json when present)",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "application/zip": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        **_problems(401, 403, 404, 422, 503),
    },
)
def export_policy(
    request: Request,
    policy_id: str,
    principal: Reader,
    format: Annotated[str, Query(pattern="^(onnx|bundle)$", description="onnx or bundle")] = "onnx",
    cost_head: Annotated[
        bool,
        Query(description="onnx: add the cost critics' cost_to_go [batch, m] output (policies with has_cost_critic)"),
    ] = False,
) -> Response:
    policy = _get_visible(request, policy_id, principal)
    if cost_head and format == "onnx" and not (policy.meta or {}).get("cost_critic"):
        raise validation_problem(
            [{"loc": ["query", "cost_head"], "msg": "this policy has no cost critic to export", "input": True}]
        )
    try:
        if format == "bundle":
            return Response(
                _bundle(policy),
                media_type="application/zip",
                headers={"Content-Disposition": f'attachment; filename="{policy.id}.zip"'},
            )
        shield_json = json.dumps(policy.shield, sort_keys=True) if policy.shield else ""
        data = _onnx_bytes(policy.path, policy.sha256, shield_json, cost_head, policy.meta_sha256)
    except ValueError as exc:  # a hook shield: exporting would silently drop it
        raise validation_problem([{"loc": ["query", "format"], "msg": str(exc), "input": format}]) from exc
    except (ArtefactError, PolicyNotReadyError, OSError) as exc:
        request.app.state.policy_cache.mark_not_ready(policy_id, str(exc))
        store_of(request).set_policy_ready(policy_id, False)
        raise _not_ready(policy_id, str(exc)) from exc
    return Response(
        data,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{policy.id}.onnx"'},
    )


# -------------------------------------------------------------------------------------- promotion


@router.post(
    "/policies",
    status_code=201,
    summary="Promote a job's checkpoint to an immutable policy, if it certifies",
    description="The checkpoint is evaluated on held-out layouts (cvpo.certify; the job's certify.episodes, "
    "default CVPO_CERTIFY_EPISODES; a certificate the worker computed at job end is reused). Not certified: 409 "
    "with the certificate, unless the body has override.reason and the token the admin scope (else 403).",
    responses={201: {}, 403: {}, 404: {}, 409: {}, 422: {}},
)
def promote(
    request: Request, body: PromoteRequest, principal: Annotated[Principal, Depends(require("jobs:write"))]
) -> Response:
    from api.routes.jobs import _get_job
    from api.shield import validate_shield_spec
    from core.certification import cached_certificate, certify, cost_signals_of, job_params, shortfall

    job = _get_job(request, body.job_id, principal)
    if body.override is not None and not principal.admin:
        raise Problem(
            403, "promoting an uncertified checkpoint needs the 'admin' scope", type="/problems/missing-scope"
        )
    store = store_of(request)
    settings = request.app.state.settings

    def check(spec: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return validate_shield_spec(spec, meta, settings.shield_hooks)
        except ShieldSpecError as exc:
            raise validation_problem([{"loc": ["body", "shield"], "msg": str(exc), "input": spec}]) from exc

    try:
        _, artefact = promotion.resolve_artefact(store, job, body.checkpoint_id)
        sha = json.loads((artefact / "policy.json").read_text())["weights_sha256"]
        params = job_params(job.spec, settings)
        cert = cached_certificate(job, sha, params, None)
        if cert is None:
            cert = certify(artefact, params, cost_signals=cost_signals_of(job.config))
    except NotFoundError as exc:
        raise Problem(404, str(exc)) from exc
    except (OSError, KeyError, ValueError, RuntimeError) as exc:  # unreadable artefact, unusable for the task
        raise Problem(409, f"checkpoint {body.checkpoint_id!r} cannot be certified: {exc}") from exc
    if not cert["certified"] and body.override is None:
        raise Problem(
            409,
            f"checkpoint {body.checkpoint_id!r} of {job.id} is not certified: {shortfall(cert)} "
            f"({cert['episodes']} held-out episodes, {cert['confidence']:.0%} upper bound). "
            "An admin may promote it anyway with override.reason.",
            type="/problems/not-certified",
            title="Not certified",
            extra={"certificate": cert},
        )
    override = {"reason": body.override.reason, "actor": principal.client} if body.override else None
    try:
        policy = promotion.promote(
            store,
            job=job,
            source=body.checkpoint_id,
            client=principal.client,
            shield=body.shield,
            validate_shield=check,
            certificate=cert,
            override=override,
        )
    except NotFoundError as exc:
        raise Problem(404, str(exc)) from exc
    except ConflictError as exc:
        raise Problem(409, str(exc)) from exc
    view = policy_resource(policy, settings, request.app.state.policy_cache)
    return json_response(view, 201, {"Location": f"/policies/{policy.id}"})
