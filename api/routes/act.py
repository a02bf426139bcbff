"""``POST /policies/{id}/act``, the controllers' hot path, in one place: its path, the matcher the
middleware and the shedding protocol use, the handler, its request schema, and how it is mounted.
``POST /aliases/{name}/act`` (issue #20) is the same path behind one more step: the alias resolves
to a policy id once per request (api/aliasing.py), and the request is then served exactly as that
policy's own /act, with the same body limit, in-flight cap and shedding. Every answer names the
policy that gave it (``policy_id`` in the body, ``X-Policy-Id``).

It is mounted twice: ``fast_router()`` is the one-route Starlette router ``LimitsMiddleware`` calls
directly for every /act request (no FastAPI dependency or parameter machinery, ~40 µs of a ~250 µs
request, service-design.md §2.5); ``router`` registers the same handler with the app so that it is
documented in OpenAPI and would serve identically were the fast path ever bypassed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route, Router

from api.act import CorruptPolicyError, LoadedPolicy, PolicyCache, PolicyNotReadyError, act, parse_act_request
from api.aliasing import AliasResolver
from api.auth import authenticate
from api.errors import Problem, guarded
from api.routes.policies import NOT_READY_TYPE, _not_found, _not_ready, _problems, _visible
from api.shield import ShieldSpecError
from core.store import ALIAS_NAME, ALIAS_SCOPE_PREFIX, Principal

ACT_PATH = "/policies/{policy_id}/act"
ALIAS_ACT_PATH = "/aliases/{name}/act"
ACT_COLLECTIONS = ("policies", "aliases")
router = APIRouter(tags=["policies"])

# Above these a request's parse or forward pass (~1 ms of CPU) would stall every other connection
# on the event loop, so it runs in the threadpool (§2.5): ~100 rows of 60 floats, ~200 rows of a 2×256 MLP.
INLINE_BODY_BYTES = 128 * 1024
INLINE_MACS = 16_000_000


def is_act_path(path: str) -> bool:
    """Exactly ``/policies/{one segment}/act`` or ``/aliases/{one segment}/act``. An id holding a slash
    (``%2F`` decodes to one) has no route in the act router, whose not-found exception nothing there
    turned into a problem: it was a 500. Such paths go to the main app, which answers 404."""
    parts = path.split("/")
    return len(parts) == 4 and parts[1] in ACT_COLLECTIONS and parts[2] != "" and parts[3] == "act"


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
    policy_id: str = Field(..., description="The policy that answered (also in X-Policy-Id)")
    alias: str | None = Field(None, description="The alias acted through (POST /aliases/{name}/act only)")
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


async def _load(request: Request, policy_id: str, principal: Principal, wait: bool = False) -> LoadedPolicy:
    """First request for a policy in this process: look it up, check ownership, load it off the loop.
    ``wait``: a load already under way is waited for instead of answered 503 (alias targets)."""
    state = request.app.state
    cache: PolicyCache = state.policy_cache
    policy = await asyncio.to_thread(state.store.get_policy, policy_id)
    if policy is None or not _visible(policy, principal):
        raise _not_found(policy_id)
    reason = cache.not_ready_reason(policy_id) or (None if policy.ready else "it failed a check earlier")
    if reason is not None:
        raise _not_ready(policy_id, reason)
    if not wait and cache.is_loading(policy_id):
        raise Problem(503, f"policy {policy_id} is loading", headers={"Retry-After": "1"})
    try:
        return await asyncio.to_thread(cache.get_record, policy)
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
    return await _serve(request, entry)


async def alias_act_route(request: Request) -> Response:
    """Resolve the alias once, then serve from the fully-loaded policy it named at that moment."""
    name: str = request.path_params["name"]
    state = request.app.state
    principal = authenticate(request)
    if not (principal.allows("policies:act") or ALIAS_SCOPE_PREFIX + name in principal.scopes):
        raise Problem(
            403, f"this token lacks the 'policies:act' or 'alias:{name[:64]}' scope", type="/problems/missing-scope"
        )
    if ALIAS_NAME.fullmatch(name) is None:
        raise Problem(
            422,
            f"alias name {name[:64]!r} does not match {ALIAS_NAME.pattern}",
            errors=[{"loc": ["path", "name"], "msg": f"must match {ALIAS_NAME.pattern}", "input": name[:64]}],
        )
    resolver: AliasResolver = state.aliases
    known, policy_id = resolver.cached(principal.client, name)
    if not known:
        policy_id = await resolver.resolve(principal.client, name)
    if policy_id is None:
        raise Problem(404, f"no alias {name!r}")
    entry = state.policy_cache.lookup(policy_id)
    if entry is None:
        target = policy_id
        entry = await resolver.load_once(target, lambda: _load(request, target, principal, wait=True))
    return await _serve(request, entry, name)


async def _serve(request: Request, entry: LoadedPolicy, alias: str | None = None) -> Response:
    """The request answered by ``entry`` alone (one loaded, immutable policy, whatever happens meanwhile)."""
    state = request.app.state
    policy_id = entry.policy_id
    body = await request.body()
    runtime, max_batch = entry.runtime, state.settings.max_batch
    try:
        if len(body) <= INLINE_BODY_BYTES:
            req = parse_act_request(body, runtime.obs_dim, max_batch)
            macs = entry.macs_per_row + (entry.critic_macs_per_row if req.cost_to_go else 0)
            if req.observations.shape[0] * macs <= INLINE_MACS:
                out = act(runtime, req, entry.shield, policy_id, alias)
            else:
                out = await run_in_threadpool(act, runtime, req, entry.shield, policy_id, alias)
        else:
            req = await run_in_threadpool(parse_act_request, body, runtime.obs_dim, max_batch)
            out = await run_in_threadpool(act, runtime, req, entry.shield, policy_id, alias)
    except CorruptPolicyError as exc:
        state.policy_cache.mark_not_ready(policy_id, str(exc))
        await asyncio.to_thread(state.store.set_policy_ready, policy_id, False)
        raise Problem(
            500, "the policy produced a non-finite action; it is now marked not ready", type="/problems/corrupt-policy"
        ) from exc
    response = Response(out, media_type="application/json")
    # X-Policy-Certified and X-Policy-Id, prebuilt per policy.
    response.raw_headers.extend((entry.certified_header, entry.id_header))
    return response


# Two registrations of each endpoint. The plain Starlette route comes first and serves every
# request: it skips FastAPI's per-request dependency and parameter machinery (~40 µs of a ~250 µs
# request, §2.5). The APIRoute after it is never reached but documents the operation in OpenAPI;
# were the order ever lost, it would serve identically, since the handler reads only the Request.
ANSWER_HEADERS = {
    "X-Policy-Certified": {
        "description": "true when the policy's certificate certified it; false for an admin's "
        "override or a policy without a certificate",
        "schema": {"type": "string", "enum": ["true", "false"]},
    },
    "X-Policy-Id": {"description": "The policy that answered", "schema": {"type": "string"}},
}
router.add_route(ACT_PATH, act_route, methods=["POST"], include_in_schema=False)
router.add_route(ALIAS_ACT_PATH, alias_act_route, methods=["POST"], include_in_schema=False)
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
        200: {"description": "Actions", "headers": ANSWER_HEADERS},
        **_problems(400, 401, 403, 404, 413, 415, 422, 429, 500, 503),
    },
    openapi_extra={
        # Declared here rather than as a handler argument, which FastAPI would validate per request.
        "parameters": [{"name": "policy_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": act_body_schema()}}},
    },
)
router.add_api_route(
    ALIAS_ACT_PATH,
    alias_act_route,
    methods=["POST"],
    tags=["aliases"],
    summary="Actions from the policy an alias points at",
    description="Resolves the alias (cached per API process for CVPO_ALIAS_TTL_S), then answers exactly as "
    "POST /policies/{policy_id}/act of that policy; policy_id and X-Policy-Id name the policy that answered. "
    "Needs policies:act, or the token's alias:{name} scope.",
    response_model=ActAnswer,
    response_model_exclude_none=True,
    responses={
        200: {"description": "Actions", "headers": ANSWER_HEADERS},
        **_problems(400, 401, 403, 404, 413, 415, 422, 429, 500, 503),
    },
    openapi_extra={
        "parameters": [
            {
                "name": "name",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": f"^{ALIAS_NAME.pattern}$"},
            }
        ],
        "requestBody": {"required": True, "content": {"application/json": {"schema": act_body_schema()}}},
    },
)


def fast_router() -> Router:
    """The router LimitsMiddleware hands /act requests to (errors become problems via guarded)."""
    return Router(
        routes=[
            Route(ACT_PATH, guarded(act_route), methods=["POST"]),
            Route(ALIAS_ACT_PATH, guarded(alias_act_route), methods=["POST"]),
        ]
    )
