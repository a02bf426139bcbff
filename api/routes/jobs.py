"""Jobs: create (idempotent, outbox), read, list, cancel, delete, metrics, events (SSE), logs, checkpoints;
and ``POST /policies`` (promotion), which reads job checkpoints. Routes only map HTTP to ``core.store``."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import math
import secrets
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from api.auth import owner_filter, require
from api.errors import Problem, json_safe, validation_problem
from api.routes import json_response, store_of
from api.schemas import JobSpec, PromoteRequest
from core.store import (
    STATUSES,
    CapExceededError,
    ConflictError,
    IdempotencyMismatchError,
    JobRecord,
    NotFoundError,
    Principal,
    rfc3339,
)
from cvpo.config import ConfigError, expand_overrides, resolve_config
from cvpo.envs.catalogue import TASKS

INT64_MAX = 2**63 - 1  # the job store's integer columns (SQLite INTEGER); a larger cursor is a 422, not a 500
router = APIRouter(tags=["jobs"])
promote_router = APIRouter(tags=["policies"])
Reader = Annotated[Principal, Depends(require("jobs:read"))]
Writer = Annotated[Principal, Depends(require("jobs:write"))]

SPEC_FIELDS_NOT_HYPERPARAMS = ("env_id", "total_env_steps", "seed", "device", "preset")
SSE_KEEPALIVE_S = 15.0
SSE_POLL_S = 0.5


def promotion_view(promotion: dict[str, Any] | None, full: bool = True) -> dict[str, Any] | None:
    """How the job's automatic promotion went; ``full=False`` drops per-episode lists (job listings)."""
    if promotion is None:
        return None
    from core.certification import certificate_summary

    view = dict(promotion)
    view["candidates"] = [
        {**c, "certificate": c.get("certificate") if full else certificate_summary(c.get("certificate"))}
        for c in promotion.get("candidates") or []
    ]
    return view


def chosen_certificate(promotion: dict[str, Any] | None) -> dict[str, Any] | None:
    """The certificate of the candidate that became the job's policy."""
    if not promotion or not promotion.get("policy_id"):
        return None
    for c in promotion.get("candidates") or []:
        if c.get("source") == promotion.get("source") and c.get("certified"):
            return c.get("certificate")
    return None


def job_resource(job: JobRecord, full: bool = True) -> dict[str, Any]:
    """The job as clients see it (service-design.md §1.3)."""
    rate = job.steps_per_s
    remaining = max(job.total_env_steps - job.env_step, 0)
    return {
        "id": job.id,
        "status": job.status,
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "env_id": job.env_id,
        "spec": job.spec,
        "config": job.config,
        "labels": job.labels,
        "progress": {
            "env_step": job.env_step,
            "total_env_steps": job.total_env_steps,
            "fraction": job.env_step / job.total_env_steps if job.total_env_steps else None,
            "epoch": job.epoch,
            "env_steps_per_s": rate,
            "eta_s": remaining / rate if rate and job.status in ("running", "starting") else None,
            # "training" or "evaluating" while an attempt runs (the heartbeat carries it); None otherwise.
            "phase": job.phase if job.status in ("running", "starting", "cancelling") else None,
        },
        "latest": job.latest,
        "cost_limits": job.config.get("constraints", {}).get("cost_limits"),
        "best": job.best,
        "policy_id": job.policy_id,
        # Certified policies (issue #18): the certificate of the policy the job produced, or, when no
        # candidate certified, ``policy_id`` null and ``promotion.reason`` saying why.
        "certificate": chosen_certificate(job.promotion) if full else None,
        "promotion": promotion_view(job.promotion, full),
        "failure": job.failure,
        "cancel_requested": job.cancel_requested,
        "created_at": rfc3339(job.created_at),
        "started_at": rfc3339(job.started_at),
        "finished_at": rfc3339(job.finished_at),
        "updated_at": rfc3339(job.updated_at),
    }


def _get_job(request: Request, job_id: str, principal: Principal) -> JobRecord:
    try:
        return store_of(request).get_job(job_id, owner_filter(principal))
    except NotFoundError as exc:
        raise Problem(404, str(exc)) from exc


def parse_json_body(raw: bytes) -> Any:
    """Strict JSON; NaN/Infinity literals are a 422 (they parse leniently), anything else a 400.
    Nesting past orjson's 1024 levels is a 400 too (the lenient parser would hit Python's recursion
    limit: that was a 500)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise Problem(400, "request body is not valid JSON (or nested over 1024 levels)") from exc
        raise validation_problem(
            [{"loc": ["body"], "msg": "NaN and Infinity are not allowed; numbers must be finite", "input": None}]
        ) from exc


def resolve_spec(spec: JobSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The echoed spec (seed drawn if missing) and the engine's resolved TrainConfig as a dict."""
    if spec.env_id not in TASKS:
        raise validation_problem(
            [
                {
                    "loc": ["body", "env_id"],
                    "msg": f"unknown task; valid: {', '.join(sorted(TASKS))}",
                    "input": spec.env_id,
                }
            ]
        )
    bad = [k for k in spec.hyperparams if k.split(".")[0] in SPEC_FIELDS_NOT_HYPERPARAMS]
    if bad:
        raise validation_problem(
            [{"loc": ["body", "hyperparams", bad[0]], "msg": "set this with the spec's own field", "input": bad[0]}]
        )
    seed = spec.seed if spec.seed is not None else secrets.randbelow(2**31)
    echoed = spec.model_dump()
    echoed["seed"] = seed
    try:
        overrides = expand_overrides(spec.hyperparams)
        overrides.update({"env_id": spec.env_id, "total_env_steps": spec.total_env_steps, "seed": seed})
        overrides["device"] = spec.device
        loop = overrides.setdefault("loop", {})
        if not isinstance(loop, dict):
            raise ConfigError("loop", "expected a section of settings")
        if spec.eval is not None:
            loop["eval_episodes"] = spec.eval.episodes
        if spec.checkpoint_every_epochs is not None:
            loop["checkpoint_every_epochs"] = spec.checkpoint_every_epochs
        if spec.cost_limit is not None:
            limits = spec.cost_limit if isinstance(spec.cost_limit, list) else [spec.cost_limit]
            cons = overrides.setdefault("constraints", {})
            if not isinstance(cons, dict):
                raise ConfigError("constraints", "expected a section of settings")
            cons["cost_limits"] = limits
        config = resolve_config(overrides, preset=spec.preset)
    except ConfigError as exc:
        top = exc.field.split(".")[0]
        loc = ["body", top] if top in ("env_id", "preset") else ["body", "hyperparams", exc.field]
        if exc.field.startswith("constraints.cost_limits"):
            loc = ["body", "cost_limit"]
        raise validation_problem([{"loc": loc, "msg": str(exc), "input": None}]) from exc
    return echoed, config.to_dict()


def _inline_defs(model: type[JobSpec]) -> dict[str, Any]:
    """The model's JSON Schema with its ``$defs`` inlined. pydantic's ``#/$defs/EvalSpec`` resolves
    within the model's own schema, but inside /openapi.json it points at nothing: schemathesis could
    not build a POST /jobs body and sent none (every generated request was a 400), and OpenAPI
    client generators fail the same way."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return inline(schema)


@router.post(
    "/jobs",
    status_code=202,
    summary="Start a training job",
    responses={202: {"description": "Accepted; Location names the job"}, 409: {}, 422: {}, 429: {}, 503: {}},
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": _inline_defs(JobSpec)}}}
    },
)
async def create_job(
    request: Request,
    principal: Writer,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> Response:
    raw = await request.body()
    data = parse_json_body(raw)
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise validation_problem([{**e, "loc": ["body", *e["loc"]]} for e in exc.errors(include_url=False)]) from exc
    echoed, config = resolve_spec(spec)
    settings = request.app.state.settings
    store = store_of(request)
    body_sha = hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()
    try:
        job, replayed = await asyncio.to_thread(
            store.create_job,
            client=principal.client,
            spec=echoed,
            config=config,
            max_attempts=spec.max_attempts,
            time_limit_s=spec.time_limit_s,
            labels=spec.labels,
            idempotency_key=idempotency_key,
            body_sha256=body_sha,
            max_active_per_client=settings.max_active_jobs_per_client,
            max_queued=settings.max_queued,
        )
    except IdempotencyMismatchError as exc:
        raise validation_problem(
            [{"loc": ["header", "Idempotency-Key"], "msg": str(exc), "input": idempotency_key}], str(exc)
        ) from exc
    except CapExceededError as exc:
        raise Problem(exc.status, str(exc), headers={"Retry-After": str(exc.retry_after)}) from exc
    if not replayed:
        await asyncio.to_thread(request.app.state.queue.send, job)
        job = await asyncio.to_thread(store.get_job, job.id)
    headers = {"Location": f"/jobs/{job.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response(job_resource(job), 202, headers)


@router.get("/jobs", summary="List jobs, newest first")
def list_jobs(
    request: Request,
    principal: Reader,
    status: Annotated[str | None, Query(description=f"One of {', '.join(STATUSES)}")] = None,
    env_id: Annotated[str | None, Query(max_length=80)] = None,
    page_size: Annotated[int, Query(ge=1, le=100)] = 50,
    page_token: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    if status is not None and status not in STATUSES:
        raise validation_problem(
            [{"loc": ["query", "status"], "msg": f"valid: {', '.join(STATUSES)}", "input": status}]
        )
    try:
        items, token = store_of(request).list_jobs(
            client=owner_filter(principal), status=status, env_id=env_id, page_size=page_size, page_token=page_token
        )
    except ValueError as exc:
        raise validation_problem([{"loc": ["query", "page_token"], "msg": str(exc), "input": page_token}]) from exc
    return json_response({"items": [job_resource(j, full=False) for j in items], "next_page_token": token})


@router.get("/jobs/{job_id}", summary="A job's state, progress, reward and cost", responses={404: {}})
def get_job(request: Request, job_id: str, principal: Reader) -> Response:
    return json_response(job_resource(_get_job(request, job_id, principal)))


@router.post("/jobs/{job_id}/cancel", summary="Cancel a job", responses={200: {}, 202: {}, 404: {}, 409: {}})
def cancel_job(request: Request, job_id: str, principal: Writer) -> Response:
    try:
        status = store_of(request).request_cancel(job_id, owner_filter(principal))
    except NotFoundError as exc:
        raise Problem(404, str(exc)) from exc
    except ConflictError as exc:
        raise Problem(409, str(exc)) from exc
    job = _get_job(request, job_id, principal)
    return json_response(job_resource(job), 200 if status == "cancelled" else 202)


@router.delete("/jobs/{job_id}", status_code=204, summary="Delete a finished job", responses={404: {}, 409: {}})
def delete_job(request: Request, job_id: str, principal: Writer) -> Response:
    try:
        store_of(request).delete_job(job_id, owner_filter(principal))
    except NotFoundError as exc:
        raise Problem(404, str(exc)) from exc
    except ConflictError as exc:
        raise Problem(409, str(exc)) from exc
    return Response(status_code=204)


@router.get("/jobs/{job_id}/metrics", summary="Per-epoch metric history (JSON or CSV)", responses={404: {}})
def job_metrics(
    request: Request,
    job_id: str,
    principal: Reader,
    keys: Annotated[str | None, Query(description="Comma-separated metric names; default all")] = None,
    after_step: Annotated[int | None, Query(ge=0, le=INT64_MAX)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    format: Annotated[str, Query(pattern="^(json|csv)$")] = "json",
) -> Response:
    _get_job(request, job_id, principal)
    points = store_of(request).metric_history(job_id, after_step=after_step, limit=limit)
    wanted = [k for k in keys.split(",") if k] if keys else None
    if wanted is not None:
        for p in points:
            p["values"] = {k: p["values"].get(k) for k in wanted}
    if format == "csv":
        names = wanted or sorted({k for p in points for k, v in p["values"].items() if not isinstance(v, list | dict)})
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["env_step", "epoch", "attempt", "time", *names])
        for p in points:
            writer.writerow(
                [p["env_step"], p["epoch"], p["attempt"], p["time"], *(_csv_cell(p["values"].get(k)) for k in names)]
            )
        return Response(out.getvalue(), media_type="text/csv")
    nxt = points[-1]["env_step"] if len(points) == limit else None
    return json_response({"points": points, "next_after_step": nxt})


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return orjson.dumps(v).decode() if isinstance(v, list | dict) else v


@router.get("/jobs/{job_id}/checkpoints", summary="A job's checkpoints", responses={404: {}})
def job_checkpoints(request: Request, job_id: str, principal: Reader) -> Response:
    job = _get_job(request, job_id, principal)
    best_epoch = (job.best or {}).get("epoch")
    items = [
        {
            "id": ck.id,
            "attempt": ck.attempt,
            "epoch": ck.epoch,
            "env_step": ck.env_step,
            "eval_reward": ck.eval_reward,
            "eval_cost": ck.eval_cost,
            "feasible": ck.feasible,
            "is_best": best_epoch is not None and ck.epoch == best_epoch,
            "promotable": ck.artefact_path is not None,
            "created_at": rfc3339(ck.created_at),
        }
        for ck in store_of(request).list_checkpoints(job_id)
    ]
    return json_response({"items": items})


@router.get("/jobs/{job_id}/logs", summary="A job's log lines", responses={404: {}})
def job_logs(
    request: Request,
    job_id: str,
    principal: Reader,
    after_seq: Annotated[int, Query(ge=0, le=INT64_MAX)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> Response:
    _get_job(request, job_id, principal)
    lines = store_of(request).events_after(job_id, after_seq, limit, types=["log", "status"])
    return json_response({"items": lines, "next_after_seq": lines[-1]["seq"] if lines else after_seq})


@router.get(
    "/jobs/{job_id}/events",
    summary="Server-sent events: status, metrics, checkpoint, attempt, log",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, 404: {}},
)
async def job_events(
    request: Request,
    job_id: str,
    principal: Reader,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    store = store_of(request)
    owner = owner_filter(principal)
    try:
        await asyncio.to_thread(store.get_job, job_id, owner)
    except NotFoundError as exc:
        raise Problem(404, str(exc)) from exc
    try:
        start = int(last_event_id) if last_event_id else 0
        if not 0 <= start <= INT64_MAX:
            raise ValueError(last_event_id)
    except ValueError as exc:
        raise validation_problem(
            [{"loc": ["header", "Last-Event-ID"], "msg": "must be an integer in [0, 2^63 - 1]", "input": last_event_id}]
        ) from exc

    async def stream() -> Any:
        seq = start
        idle = 0.0
        while True:
            batch = await asyncio.to_thread(store.events_after, job_id, seq, 500)
            for ev in batch:
                seq = ev["seq"]
                payload = orjson.dumps(json_safe({**ev["data"], "time": ev["time"]})).decode()
                yield f"id: {seq}\nevent: {ev['type']}\ndata: {payload}\n\n"
            if batch:
                idle = 0.0
            try:
                job = await asyncio.to_thread(store.get_job, job_id, owner)
            except NotFoundError:
                return
            if job.terminal and not batch:
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(SSE_POLL_S)
            idle += SSE_POLL_S
            if idle >= SSE_KEEPALIVE_S:
                idle = 0.0
                yield ": keep-alive\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@promote_router.post(
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
    from api.routes.policies import policy_resource
    from api.shield import ShieldSpecError, validate_shield_spec
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
        _, artefact = store.resolve_artefact(job, body.checkpoint_id)
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
        policy = store.promote(
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
