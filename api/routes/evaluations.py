"""On-demand evaluations of a policy (issue #18): ``POST /policies/{id}/evaluations`` queues a
``cvpo.certify`` run on held-out layouts for a worker (like a job: Celery task ``cvpo.evaluate``),
``GET …/evaluations[/{eval_id}]`` reads its state and result (a certificate with its intervals).

Inputs are checked here so a bad one is a 422 at once, not a failed evaluation later: the episode
counts and confidence (pydantic), the seed range, one limit per constraint, and a variant task
with the policy's spaces.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from api.auth import require
from api.errors import Problem, page_token_problem, validation_problem
from api.routes import json_response, store_of
from api.routes.policies import _get_visible
from api.schemas import EvaluationRequest
from core.store import EvaluationRecord, Principal, rfc3339

router = APIRouter(tags=["policies"])
Reader = Annotated[Principal, Depends(require("policies:read"))]
Writer = Annotated[Principal, Depends(require("jobs:write"))]


def evaluation_resource(ev: EvaluationRecord) -> dict[str, Any]:
    result = ev.result
    return {
        "id": ev.id,
        "policy_id": ev.policy_id,
        "status": ev.status,
        "params": ev.params,
        "certified": None if result is None else bool(result.get("certified")),
        "result": result,
        "error": ev.error,
        "created_at": rfc3339(ev.created_at),
        "started_at": rfc3339(ev.started_at),
        "finished_at": rfc3339(ev.finished_at),
        "links": {"self": f"/policies/{ev.policy_id}/evaluations/{ev.id}", "policy": f"/policies/{ev.policy_id}"},
    }


def _bad(field: str, msg: str, value: Any) -> Problem:
    return validation_problem([{"loc": ["body", field], "msg": msg, "input": value}])


def _constraints(policy: Any) -> int:
    cert = policy.certificate or {}
    if cert.get("constraints"):
        return len(cert["constraints"])
    return len((policy.meta or {}).get("cost_limits") or [None])


def _check_variant(env_id: str, meta: dict[str, Any]) -> None:
    from cvpo.certify import _check_spaces
    from cvpo.envs.catalogue import TASKS

    if env_id not in TASKS:
        raise _bad("env_id", f"unknown task; valid: {', '.join(sorted(TASKS))}", env_id)
    runtime_like = SimpleNamespace(
        obs_dim=int(meta["observation_space"]["shape"][0]),
        act_dim=int(meta["action_space"]["shape"][0]),
        low=np.asarray(meta["action_space"]["low"], dtype=np.float64),
        high=np.asarray(meta["action_space"]["high"], dtype=np.float64),
        meta=meta,
    )
    try:
        _check_spaces(runtime_like, env_id)
    except ValueError as exc:
        raise _bad("env_id", str(exc), env_id) from exc


@router.post(
    "/policies/{policy_id}/evaluations",
    status_code=202,
    summary="Evaluate a policy on held-out layouts (runs on a worker)",
    description="Deterministic episodes on reset seeds seed_base + i (and a few sampled-action ones), then the "
    "per-constraint mean cost, its one-sided upper confidence bound and the certification decision against "
    "cost_limits (default the policy's). Poll the Location for the result.",
    responses={202: {}, 403: {}, 404: {}, 422: {}},
)
async def create_evaluation(request: Request, policy_id: str, body: EvaluationRequest, principal: Writer) -> Response:
    from core.certification import stochastic_for
    from cvpo.envs import MAX_SEED

    store = store_of(request)
    settings = request.app.state.settings
    policy = await asyncio.to_thread(_get_visible, request, policy_id, principal)
    episodes = body.episodes or settings.certify_episodes
    stochastic = body.stochastic_episodes
    if stochastic is None:
        stochastic = stochastic_for(episodes, settings.certify_stochastic_episodes)
    last_seed = body.seed_base + max(episodes, stochastic) - 1
    if last_seed > MAX_SEED:
        raise _bad("seed_base", f"seeds {body.seed_base}..{last_seed} pass the largest seed {MAX_SEED}", body.seed_base)
    limits = None
    if body.cost_limits is not None:
        limits = body.cost_limits if isinstance(body.cost_limits, list) else [body.cost_limits]
        m = _constraints(policy)
        if len(limits) not in (1, m):
            raise _bad("cost_limits", f"give 1 limit or {m}, one per constraint; got {len(limits)}", limits)
    if body.env_id is not None:
        _check_variant(body.env_id, policy.meta or {})
    params = {
        "episodes": episodes,
        "stochastic_episodes": stochastic,
        "seed_base": body.seed_base,
        "confidence": body.confidence,
        "cost_limits": limits,
        "env_id": body.env_id,
    }
    ev = await asyncio.to_thread(store.create_evaluation, policy.id, principal.client, params)
    await asyncio.to_thread(request.app.state.queue.send_evaluation, ev.id)
    return json_response(evaluation_resource(ev), 202, {"Location": f"/policies/{policy.id}/evaluations/{ev.id}"})


@router.get("/policies/{policy_id}/evaluations", summary="A policy's evaluations, newest first", responses={404: {}})
def list_evaluations(
    request: Request,
    policy_id: str,
    principal: Reader,
    page_size: Annotated[int, Query(ge=1, le=100)] = 50,
    page_token: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    policy = _get_visible(request, policy_id, principal)
    try:
        items, token = store_of(request).list_evaluations(policy.id, page_size, page_token)
    except ValueError as exc:
        raise page_token_problem(exc, page_token) from exc
    return json_response({"items": [evaluation_resource(e) for e in items], "next_page_token": token})


@router.get(
    "/policies/{policy_id}/evaluations/{eval_id}",
    summary="An evaluation's state and, once done, its certificate",
    responses={404: {}},
)
def get_evaluation(request: Request, policy_id: str, eval_id: str, principal: Reader) -> Response:
    policy = _get_visible(request, policy_id, principal)
    ev = store_of(request).get_evaluation(eval_id, policy.id)
    if ev is None:
        raise Problem(404, f"no evaluation {eval_id!r} of policy {policy_id!r}")
    return json_response(evaluation_resource(ev))
