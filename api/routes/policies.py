"""Policies: list, metadata, ``/act`` and export (service-design.md §1.1, §2).

``POST /policies/{id}/act`` is the hot path and is built differently from every other route
(§2.5): ``async def`` with the forward pass inline (a ``def`` route or a sync dependency hops to
the threadpool: half the throughput, triple the p99), the raw body parsed by orjson + numpy in
``api.act`` (pydantic models here only document the schema), the token checked inline against the
in-memory token cache, and the policy taken from the in-process ``PolicyCache`` without a store
query once loaded. Requests estimated above ~1 ms of CPU go to the threadpool instead.

``POST /policies`` (promotion) lives with the jobs routes because it reads job checkpoints; it
renders its answer with ``policy_resource`` from here.
"""

from __future__ import annotations

import asyncio
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
from starlette.concurrency import run_in_threadpool

from api.act import (
    CorruptPolicyError,
    LoadedPolicy,
    PolicyCache,
    PolicyNotReadyError,
    act,
    check_meta_sha256,
    parse_act_request,
)
from api.auth import authenticate, owner_filter, require
from api.errors import Problem, json_safe, validation_problem
from api.routes import json_response, store_of
from api.shield import ShieldSpecError
from core.store import PolicyRecord, Principal
from cvpo.artefact import META_FILE, WEIGHTS_FILE, ArtefactError

router = APIRouter(tags=["policies"])
Reader = Annotated[Principal, Depends(require("policies:read"))]

# Above these a request's parse or forward pass (~1 ms of CPU) would stall every other connection
# on the event loop, so it runs in the threadpool (§2.5): ~100 rows of 60 floats, ~200 rows of a 2×256 MLP.
INLINE_BODY_BYTES = 128 * 1024
INLINE_MACS = 16_000_000
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


def act_body_schema(max_batch: int = 1024) -> dict[str, Any]:
    """JSON Schema of the ``/act`` body, for the docs and schemathesis only: the route parses with
    orjson + numpy, which also enforce what a schema cannot (row width = the policy's obs_dim)."""
    number = {"type": "number"}
    return {
        "title": "ActBody",
        "type": "object",
        "additionalProperties": False,
        "required": ["observations"],
        "properties": {
            "observations": {
                "description": "1 to max_batch raw observation rows of the policy's obs_dim, or one flat row. "
                "Numbers only: NaN/Infinity literals, 1e309, strings and booleans are a 422 naming the culprit.",
                "oneOf": [
                    {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": max_batch,
                        "items": {"type": "array", "items": number},
                    },
                    {"type": "array", "minItems": 1, "items": number},
                ],
            },
            "deterministic": {"type": "boolean", "default": True, "description": "true: the mean; false: a sample"},
            "seed": {
                "anyOf": [{"type": "integer", "minimum": 0, "maximum": 2**63 - 1}, {"type": "null"}],
                "description": "Makes a stochastic answer repeatable",
            },
            "request_id": {"anyOf": [{"type": "string", "maxLength": 128}, {"type": "null"}], "description": "Echoed"},
            "return": {
                "type": "array",
                "maxItems": 8,
                "items": {"type": "string", "enum": ["cost_to_go"]},
                "description": "Extra outputs. cost_to_go: the cost critics' Q_c(s, a) per constraint of the "
                "policy's action (422 when the policy has no cost critic; see has_cost_critic)",
            },
        },
        "example": {"observations": [[0.12, -0.4, 0.5]], "deterministic": True, "seed": None, "request_id": "c-913"},
    }


class ShieldReport(BaseModel):
    applied: list[bool]
    reasons: list[str | None]


class ActAnswer(BaseModel):
    policy_id: str
    artefact_sha256: str
    request_id: str | None
    deterministic: bool
    actions: list[list[float]] = Field(..., description="actions[i] answers observations[i], inside [low, high]")
    clipped: list[bool] = Field(..., description="Whether the policy's output was clipped to the Box")
    shield: ShieldReport | None = Field(None, description="Present only for shielded policies")
    cost_to_go: list[list[float]] | None = Field(
        None,
        description='Only with "return": ["cost_to_go"]: per row, the predicted discounted cost-to-go Q_c(s, a) '
        "per constraint of the action the policy produced (before any shield)",
    )


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
    eval_reward: float | None = None
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
                "eval_reward": summary.get("eval_return"),
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
        raise validation_problem([{"loc": ["query", "page_token"], "msg": str(exc), "input": page_token}]) from exc
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


async def _load(request: Request, policy_id: str, principal: Principal) -> LoadedPolicy:
    """First request for a policy in this process: look it up, check ownership, load it off the loop."""
    state = request.app.state
    cache: PolicyCache = state.policy_cache
    policy = await asyncio.to_thread(state.store.get_policy, policy_id)
    if policy is None or not _visible(policy, principal):
        raise _not_found(policy_id)
    reason = cache.not_ready_reason(policy_id) or (None if policy.ready else "it failed a check earlier")
    if reason is not None:
        raise _not_ready(policy_id, reason)
    if cache.is_loading(policy_id):
        raise Problem(503, f"policy {policy_id} is loading", headers={"Retry-After": "1"})
    try:
        return await asyncio.to_thread(
            cache.get,
            policy_id,
            policy.path,
            policy.shield,
            sha256=policy.sha256,
            client=policy.client,
            certified=bool(policy.certified),
            meta_sha256=policy.meta_sha256,
        )
    except PolicyNotReadyError as exc:
        await asyncio.to_thread(state.store.set_policy_ready, policy_id, False)
        raise _not_ready(policy_id, str(exc)) from exc
    except ShieldSpecError as exc:  # the policy names a hook this server's CVPO_SHIELD_HOOKS lacks
        raise Problem(503, f"policy {policy_id} cannot be served here: {exc}", type=NOT_READY_TYPE) from exc


async def act_route(request: Request) -> Response:
    policy_id: str = request.path_params["policy_id"]
    state = request.app.state
    # Inline, not Depends(require(...)): a sync dependency would cost a threadpool hop per request.
    principal = authenticate(request)
    if not principal.allows("policies:act"):
        raise Problem(403, "this token lacks the 'policies:act' scope", type="/problems/missing-scope")
    entry = state.policy_cache.lookup(policy_id)
    if entry is None:
        entry = await _load(request, policy_id, principal)
    elif not _visible(entry, principal):
        raise _not_found(policy_id)
    body = await request.body()
    runtime, max_batch = entry.runtime, state.settings.max_batch
    try:
        if len(body) <= INLINE_BODY_BYTES:
            req = parse_act_request(body, runtime.obs_dim, max_batch)
            macs = entry.macs_per_row + (entry.critic_macs_per_row if req.cost_to_go else 0)
            if req.observations.shape[0] * macs <= INLINE_MACS:
                out = act(runtime, req, entry.shield, policy_id)
            else:
                out = await run_in_threadpool(act, runtime, req, entry.shield, policy_id)
        else:
            req = await run_in_threadpool(parse_act_request, body, runtime.obs_dim, max_batch)
            out = await run_in_threadpool(act, runtime, req, entry.shield, policy_id)
    except CorruptPolicyError as exc:
        state.policy_cache.mark_not_ready(policy_id, str(exc))
        await asyncio.to_thread(state.store.set_policy_ready, policy_id, False)
        raise Problem(
            500, "the policy produced a non-finite action; it is now marked not ready", type="/problems/corrupt-policy"
        ) from exc
    response = Response(out, media_type="application/json")
    response.raw_headers.append(entry.certified_header)  # X-Policy-Certified, prebuilt per policy
    return response


ACT_PATH = "/policies/{policy_id}/act"
# Two registrations of the same endpoint. The plain Starlette route comes first and serves every
# request: it skips FastAPI's per-request dependency and parameter machinery (~40 µs of a ~250 µs
# request, §2.5). The APIRoute after it is never reached but documents the operation in OpenAPI;
# were the order ever lost, it would serve identically, since the handler reads only the Request.
router.add_route(ACT_PATH, act_route, methods=["POST"], include_in_schema=False)
router.add_api_route(
    ACT_PATH,
    act_route,
    methods=["POST"],
    summary="Actions for a batch of raw observations",
    description="Normalise with the artefact's frozen statistics, forward (mean or seeded sample), clip to "
    "[-1, 1], map to the action Box, apply the policy's shield. Always numbers inside the Box, never null.",
    response_model=ActAnswer,
    response_model_exclude_none=True,
    responses={
        200: {
            "description": "Actions",
            "headers": {
                "X-Policy-Certified": {
                    "description": "true when the policy's certificate certified it; false for an admin's "
                    "override or a policy without a certificate",
                    "schema": {"type": "string", "enum": ["true", "false"]},
                }
            },
        },
        **_problems(400, 401, 403, 404, 413, 415, 422, 429, 500, 503),
    },
    openapi_extra={
        # Declared here rather than as a handler argument, which FastAPI would validate per request.
        "parameters": [{"name": "policy_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": act_body_schema()}}},
    },
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
