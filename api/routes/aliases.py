"""Aliases (issue #20): ``GET /aliases``, ``GET|PUT /aliases/{name}``, ``GET /aliases/{name}/history``,
``POST /aliases/{name}/rollback``. ``POST /aliases/{name}/act`` is the /act hot path's and lives in
api/routes/act.py.

An alias belongs to a client, like a policy: a name addresses the caller's own client's alias (an
admin may add ``?client=`` to address another client's; anyone else naming another client gets the
404 an unknown alias gets), and it can only point at that client's policies. Pointing at a policy
that is not certified needs the same admin override as promotion; the store checks the gate inside
the repoint's transaction (core/store/alias_store.py). A PUT first loads the target in this process,
so a policy that cannot be served here is refused before any controller is sent to it, and this
process answers through the alias with the new target as soon as the PUT returns.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from pydantic import BaseModel, Field

from api.act import PolicyNotReadyError
from api.auth import owner_filter, require
from api.errors import Problem, page_token_problem
from api.routes import json_response, store_of
from api.routes.policies import PROBLEM_SCHEMA
from api.schemas import AliasRollback, AliasTarget
from api.shield import ShieldSpecError
from core.store import (
    ALIAS_NAME,
    Actor,
    AliasEventRecord,
    AliasRecord,
    ConflictError,
    NotCertifiedError,
    NotFoundError,
    NothingToRollBackError,
    Principal,
    rfc3339,
)

router = APIRouter(tags=["aliases"])
Reader = Annotated[Principal, Depends(require("policies:read"))]
Writer = Annotated[Principal, Depends(require("aliases:write"))]
Name = Annotated[
    str,
    PathParam(
        pattern=f"^{ALIAS_NAME.pattern}$",
        description="1 to 63 of a-z 0-9 . _ -, starting with a letter or digit (e.g. production, arm-3)",
    ),
]
Client = Annotated[
    str | None, Query(max_length=64, description="Admin only: the client whose alias this is (default: yours)")
]


class ActorOut(BaseModel):
    client: str
    token_id: str | None
    token_name: str | None


class OverrideOut(BaseModel):
    reason: str


class AliasEventOut(BaseModel):
    seq: int
    alias: str
    action: str = Field(..., description="set (PUT) or rollback")
    from_policy_id: str | None = Field(..., description="null when the alias was created")
    to_policy_id: str
    version: int = Field(..., description="The alias's version after this change")
    actor: ActorOut = Field(..., description="Who: the caller's client and token")
    reason: str | None
    certified: bool = Field(..., description="Whether the target was certified")
    override: OverrideOut | None = Field(..., description="An admin's override of the gate, when it was needed")
    at: str


class AliasOut(BaseModel):
    name: str
    client: str
    policy_id: str = Field(..., description="The current target")
    version: int
    created_at: str
    updated_at: str
    certified: bool = Field(..., description="Whether the current target is certified")
    can_roll_back: bool = Field(..., description="POST /aliases/{name}/rollback has an earlier target to return to")
    last_change: AliasEventOut
    links: dict[str, str]


class AliasPage(BaseModel):
    items: list[AliasOut]
    next_page_token: str | None


class AliasHistory(BaseModel):
    items: list[AliasEventOut] = Field(..., description="Newest first")
    next_page_token: str | None


_TEXT = {
    400: "Not JSON",
    401: "No or unknown token",
    403: "Missing scope, or an override without the admin scope",
    404: "Unknown alias or policy, or another client's",
    409: "Target not certified (with its certificate), not ready or not servable here; nothing to roll back to",
    413: "Body over the byte limit",
    415: "Content-Type is not JSON",
    422: "Invalid input; errors[].loc points at the culprit",
}


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {
        c: {"description": _TEXT[c], "content": {"application/problem+json": {"schema": PROBLEM_SCHEMA}}} for c in codes
    }


# ------------------------------------------------------------------------------------- helpers


def event_resource(e: AliasEventRecord) -> dict[str, Any]:
    return {
        "seq": e.seq,
        "alias": e.alias,
        "action": e.action,
        "from_policy_id": e.from_policy,
        "to_policy_id": e.to_policy,
        "version": e.version,
        "actor": {"client": e.actor, "token_id": e.actor_token, "token_name": e.actor_name},
        "reason": e.reason,
        "certified": bool(e.certified),
        "override": None if e.override_reason is None else {"reason": e.override_reason},
        "at": rfc3339(e.time),
    }


def alias_resource(a: AliasRecord) -> dict[str, Any]:
    base = f"/aliases/{a.name}"
    return {
        "name": a.name,
        "client": a.client,
        "policy_id": a.policy_id,
        "version": a.version,
        "created_at": rfc3339(a.created_at),
        "updated_at": rfc3339(a.updated_at),
        "certified": bool(a.head.certified),
        "can_roll_back": a.can_roll_back,
        "last_change": event_resource(a.head),
        "links": {
            "act": f"{base}/act",
            "history": f"{base}/history",
            "rollback": f"{base}/rollback",
            "policy": f"/policies/{a.policy_id}",
        },
    }


def _no_alias(name: str) -> Problem:
    return Problem(404, f"no alias {name!r}")


def _namespace(principal: Principal, client: str | None, name: str) -> str:
    """The client whose alias ``name`` is: the caller's own, or (admins only) the one named."""
    if client is None or client == principal.client:
        return principal.client
    if principal.admin:
        return client
    raise _no_alias(name)  # another client's aliases do not exist for you


def _actor(principal: Principal) -> Actor:
    return Actor(principal.client, principal.token_id, principal.token_name)


def _override_reason(body: AliasTarget | AliasRollback, principal: Principal) -> str | None:
    if body.override is None:
        return None
    if not principal.admin:
        raise Problem(
            403, "pointing an alias at an uncertified policy needs the 'admin' scope", type="/problems/missing-scope"
        )
    return body.override.reason


def _refused(exc: Exception) -> Problem:
    """The store's refusal of a repoint or rollback as a problem."""
    if isinstance(exc, NotFoundError):
        return Problem(404, str(exc))
    if isinstance(exc, NotCertifiedError):
        return Problem(
            409,
            f"{exc}: an alias points only at certified policies, unless an admin gives override.reason",
            type="/problems/not-certified",
            title="Not certified",
            extra={"policy_id": exc.policy_id, "certificate": exc.certificate},
        )
    if isinstance(exc, NothingToRollBackError):
        return Problem(409, str(exc), type="/problems/nothing-to-roll-back", title="Nothing to roll back to")
    return Problem(409, str(exc))


def _warm(request: Request, client: str, policy_id: str, override: str | None) -> None:
    """Refuse early what the store would refuse, then load the target here: a policy that cannot be
    served (tampered files, a shield hook this server lacks) is refused before any alias points at it."""
    store = store_of(request)
    policy = store.get_policy(policy_id)
    if policy is None or policy.client != client:
        raise Problem(404, f"no policy {policy_id!r}")
    if not policy.certified and override is None:
        raise _refused(NotCertifiedError(policy_id, policy.certificate))
    cache = request.app.state.policy_cache
    try:
        cache.get_record(policy)
    except PolicyNotReadyError as exc:
        store.set_policy_ready(policy_id, False)
        raise Problem(409, f"policy {policy_id} cannot be served: {exc}") from exc
    except ShieldSpecError as exc:
        raise Problem(409, f"policy {policy_id} cannot be served here: {exc}") from exc


# -------------------------------------------------------------------------------------- routes


@router.get(
    "/aliases",
    summary="List aliases, newest first (an admin sees every client's)",
    response_model=AliasPage,
    responses=_problems(401, 403, 422),
)
def list_aliases(
    request: Request,
    principal: Reader,
    page_size: Annotated[int, Query(ge=1, le=100)] = 50,
    page_token: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    try:
        items, token = store_of(request).list_aliases(owner_filter(principal), page_size, page_token)
    except ValueError as exc:
        raise page_token_problem(exc, page_token) from exc
    return json_response({"items": [alias_resource(a) for a in items], "next_page_token": token})


@router.get(
    "/aliases/{name}",
    summary="An alias: its target, whether that is certified, its last change",
    response_model=AliasOut,
    responses=_problems(401, 403, 404, 422),
)
def get_alias(request: Request, name: Name, principal: Reader, client: Client = None) -> Response:
    alias = store_of(request).get_alias(_namespace(principal, client, name), name)
    if alias is None:
        raise _no_alias(name)
    return json_response(alias_resource(alias))


@router.put(
    "/aliases/{name}",
    summary="Point an alias at a policy (creating it); certified policies only, unless an admin overrides",
    description="One transaction moves the alias and records who, when, from, to, why and whether the target "
    "was certified. Requests through the alias in flight finish on the old target; this API process answers "
    "with the new one at once, others within CVPO_ALIAS_TTL_S. The current target again changes nothing.",
    response_model=AliasOut,
    status_code=200,
    responses={201: {"description": "Created", "model": AliasOut}, **_problems(400, 401, 403, 404, 409, 413, 415, 422)},
)
def put_alias(request: Request, name: Name, body: AliasTarget, principal: Writer, client: Client = None) -> Response:
    namespace = _namespace(principal, client, name)
    override = _override_reason(body, principal)
    store = store_of(request)
    current = store.get_alias(namespace, name)
    if current is None or current.policy_id != body.policy_id:
        _warm(request, namespace, body.policy_id, override)
    try:
        alias, changed = store.set_alias(
            namespace, name, body.policy_id, actor=_actor(principal), reason=body.reason, override_reason=override
        )
    except (NotFoundError, ConflictError) as exc:
        raise _refused(exc) from exc
    request.app.state.aliases.put(namespace, name, alias.policy_id)
    created = changed and alias.version == 1
    headers = {"Location": f"/aliases/{name}"} if created else None
    return json_response(alias_resource(alias), 201 if created else 200, headers)


@router.get(
    "/aliases/{name}/history",
    summary="Every change of an alias's target, newest first: who, when, from, to, why, certified",
    response_model=AliasHistory,
    responses=_problems(401, 403, 404, 422),
)
def alias_history(
    request: Request,
    name: Name,
    principal: Reader,
    client: Client = None,
    page_size: Annotated[int, Query(ge=1, le=100)] = 50,
    page_token: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    namespace = _namespace(principal, client, name)
    store = store_of(request)
    if store.get_alias(namespace, name) is None:
        raise _no_alias(name)
    try:
        items, token = store.alias_history(namespace, name, page_size, page_token)
    except ValueError as exc:
        raise page_token_problem(exc, page_token) from exc
    return json_response({"items": [event_resource(e) for e in items], "next_page_token": token})


@router.post(
    "/aliases/{name}/rollback",
    summary="Point an alias back at its previous target, in one call",
    description="An undo: A → B → C, rollback → B, rollback → A. The previous target must still be certified "
    "(or an admin gives override.reason). Recorded in the history as its own change, with the reason.",
    response_model=AliasOut,
    responses=_problems(400, 401, 403, 404, 409, 413, 415, 422),
)
def rollback_alias(
    request: Request, name: Name, principal: Writer, body: AliasRollback | None = None, client: Client = None
) -> Response:
    namespace = _namespace(principal, client, name)
    body = body or AliasRollback()
    override = _override_reason(body, principal)
    try:
        alias = store_of(request).rollback_alias(
            namespace, name, actor=_actor(principal), reason=body.reason, override_reason=override
        )
    except (NotFoundError, ConflictError) as exc:
        raise _refused(exc) from exc
    request.app.state.aliases.put(namespace, name, alias.policy_id)
    return json_response(alias_resource(alias))
