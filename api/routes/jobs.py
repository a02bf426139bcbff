"""Jobs: create (idempotent, outbox), read, list, cancel, delete, metrics, logs, checkpoints. The event
stream (SSE) is api/routes/events.py; promotion (``POST /policies``) is the policies router's. Routes only
map HTTP to ``core.store``. Over 400 lines: the job resource's views and its submission checks
(spec → engine config, device and disk-quota refusals) belong with its routes."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import logging
import math
import secrets
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError

from api.auth import owner_filter, require
from api.errors import Problem, page_token_problem, validation_problem
from api.routes import json_response, store_of
from api.schemas import JobSpec
from core.settings import Settings
from core.store import (
    STATUSES,
    CapExceededError,
    ConflictError,
    IdempotencyMismatchError,
    JobRecord,
    NotFoundError,
    Principal,
    Store,
    rfc3339,
)
from cvpo.config import ConfigError, build_overrides, resolve_config
from cvpo.envs.catalogue import TASKS

INT64_MAX = 2**63 - 1  # the job store's integer columns (SQLite INTEGER); a larger cursor is a 422, not a 500
router = APIRouter(tags=["jobs"])
Reader = Annotated[Principal, Depends(require("jobs:read"))]
Writer = Annotated[Principal, Depends(require("jobs:write"))]

SPEC_FIELDS_NOT_HYPERPARAMS = ("env_id", "total_env_steps", "seed", "device", "preset")
log = logging.getLogger("cvpo.api")


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


def job_resource(job: JobRecord, full: bool = True, queue: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job as clients see it (service-design.md §1.3); ``queue`` is ``queue_view``'s block (GET /jobs/{id})."""
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
        # Where a queued job stands and whether any worker is there to take it (issue #23 item 12);
        # null once it left the queue and in listings.
        "queue": queue,
        # The run directory's size as its worker last measured it (after each epoch and checkpoint;
        # issue #23 item 11): null until a worker has measured it. Never a disk walk per GET.
        "disk": {"bytes": job.disk_bytes, "measured_at": rfc3339(job.disk_measured_at)},
        "cancel_requested": job.cancel_requested,
        "created_at": rfc3339(job.created_at),
        "started_at": rfc3339(job.started_at),
        "finished_at": rfc3339(job.finished_at),
        "updated_at": rfc3339(job.updated_at),
    }


def queue_view(store: Store, settings: Settings, job: JobRecord) -> dict[str, Any] | None:
    """A queued job's place in the queue and who could run it: ``position`` (1 = next), ``ahead``,
    ``running`` (jobs workers hold now), the live ``workers`` on this queue (seen within
    CVPO_LEASE_TTL_S) and how many have CUDA, ``workers_seen_at``, ``no_worker_for_s`` (null while one
    is live) and ``waiting_for``: why it will not start soon, in words (null when nothing is wrong)."""
    position = store.queue_position(job)
    if position is None:
        return None
    workers = store.worker_summary(settings.queue, settings.lease_ttl_s)
    name = workers["queue"]
    note = None
    if workers["workers"] == 0:
        if workers["ever_seen"]:
            note = (
                f"no worker has been seen on queue {name!r} for {workers['no_worker_for_s']:.0f} s; "
                "the job waits until one starts (cvpo worker)"
            )
        else:
            note = f"no worker has ever registered on queue {name!r}; the job waits until one starts (cvpo worker)"
    elif job.spec.get("device") == "cuda" and workers["cuda_workers"] == 0:
        note = f"the job asks for device 'cuda' and no live worker on queue {name!r} has CUDA; it waits for one"
    return {
        **position,
        "name": name,
        "workers": workers["workers"],
        "cuda_workers": workers["cuda_workers"],
        "workers_seen_at": workers["workers_seen_at"],
        "no_worker_for_s": workers["no_worker_for_s"],
        "waiting_for": note,
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
        limits = spec.cost_limit if isinstance(spec.cost_limit, list) else [spec.cost_limit]
        overrides = build_overrides(
            spec.hyperparams,
            {"env_id": spec.env_id, "total_env_steps": spec.total_env_steps, "seed": seed, "device": spec.device},
            {"loop.eval_episodes": spec.eval.episodes} if spec.eval is not None else None,
            {"loop.checkpoint_every_epochs": spec.checkpoint_every_epochs}
            if spec.checkpoint_every_epochs is not None
            else None,
            {"constraints.cost_limits": limits} if spec.cost_limit is not None else None,
        )
        config = resolve_config(overrides, preset=spec.preset)
    except ConfigError as exc:
        top = exc.path[0] if exc.path else exc.field
        loc = ["body", top] if top in ("env_id", "preset") else ["body", "hyperparams", exc.field]
        if exc.path[:2] == ("constraints", "cost_limits"):
            loc = ["body", "cost_limit"]
        raise validation_problem([{"loc": loc, "msg": str(exc), "input": None}]) from exc
    return echoed, config.to_dict()


def refuse_without_cuda_worker(store: Store, settings: Settings) -> None:
    """``device: "cuda"`` is a 409 unless a live worker on this queue registered CUDA (issue #23 item 13):
    refused now, in words, instead of failing later inside a worker that has none."""
    workers = store.worker_summary(settings.queue, settings.lease_ttl_s)
    if workers["cuda_workers"] > 0:
        return
    seen = f"{workers['workers']} live worker(s), none with CUDA" if workers["workers"] else "no live worker"
    raise Problem(
        409,
        f"the job asks for device 'cuda' but no worker with CUDA is registered on queue {workers['queue']!r} "
        f"({seen}); submit it with device 'auto' or 'cpu', or start a worker on a machine with a GPU",
        type="/problems/no-cuda-worker",
        title="No CUDA worker",
        extra={"queue": workers["queue"], "workers": workers["workers"], "cuda_workers": 0},
    )


DISK_QUOTA_TYPE = "/problems/over-disk-quota"


def refuse_over_disk_quota(spec: JobSpec, config: dict[str, Any], settings: Settings) -> None:
    """A spec whose projected peak footprint (core.footprint) is over CVPO_JOB_DISK_QUOTA_BYTES is a
    422 carrying the estimate (issue #23 item 11): refused before a worker fills the disk with it."""
    from core.footprint import estimate, human

    quota = settings.job_disk_quota_bytes
    if not quota:
        return
    try:
        est = estimate(config, settings.keep_checkpoints)
    except (ArithmeticError, LookupError, TypeError, ValueError):  # a config the engine accepted: never a 500
        log.exception("disk footprint estimate failed; the spec is not checked against the quota")
        return
    if est["total_bytes"] <= quota:
        return
    buffer_bound = est["buffer_transitions"] < spec.total_env_steps  # loop.buffer_size caps the buffer
    field, what = (
        (["body", "hyperparams", "buffer_size"], "loop.buffer_size")
        if buffer_bound
        else (["body", "total_env_steps"], "total_env_steps")
    )
    detail = (
        f"the job's projected disk footprint is {human(est['total_bytes'])}, over this server's per-job quota of "
        f"{human(quota)} (CVPO_JOB_DISK_QUOTA_BYTES): up to {est['checkpoints_kept_at_peak']} full checkpoints of "
        f"{human(est['checkpoint_bytes'])} (a replay buffer of {est['buffer_transitions']} transitions × "
        f"{est['bytes_per_transition']} B) plus {est['artefacts']} policy artefacts of "
        f"{human(est['artefact_bytes'])}; lower {what}"
    )
    raise Problem(
        422,
        detail,
        type=DISK_QUOTA_TYPE,
        title="Over the disk quota",
        errors=[{"loc": field, "msg": f"projected footprint over the {human(quota)} per-job quota"}],
        extra={"estimate": est, "quota_bytes": quota},
    )


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
    try:
        refuse_over_disk_quota(spec, config, settings)
        over_quota = None
    except Problem as exc:
        over_quota = exc
    if spec.device == "cuda" or over_quota is not None:
        # A replay answers what was accepted, whatever the workers (or the quota) are now.
        replay = idempotency_key is not None and await asyncio.to_thread(
            store.idempotent_job_id, principal.client, idempotency_key
        )
        if not replay and over_quota is not None:
            raise over_quota
        if not replay:
            await asyncio.to_thread(refuse_without_cuda_worker, store, settings)
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
        raise page_token_problem(exc, page_token) from exc
    return json_response({"items": [job_resource(j, full=False) for j in items], "next_page_token": token})


@router.get("/jobs/{job_id}", summary="A job's state, progress, reward and cost", responses={404: {}})
def get_job(request: Request, job_id: str, principal: Reader) -> Response:
    job = _get_job(request, job_id, principal)
    queue = queue_view(store_of(request), request.app.state.settings, job) if job.status == "queued" else None
    return json_response(job_resource(job, queue=queue))


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
            "eval_return": ck.eval_return,
            "eval_cost": ck.eval_cost,
            "feasible": ck.feasible,
            "is_best": best_epoch is not None and ck.epoch == best_epoch,
            "promotable": ck.artefact_path is not None,
            # Retention (issue #23 item 11) deletes old full checkpoints; their artefacts stay promotable.
            "resumable": ck.files_deleted_at is None,
            "files_deleted_at": rfc3339(ck.files_deleted_at),
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
