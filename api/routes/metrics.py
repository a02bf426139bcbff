"""Prometheus exposition: HTTP metrics (instrumentator), /act counters, and job gauges read at scrape time.

``cvpo_job_disk_bytes{job_id}`` is each job's run-directory size as its worker last cached it in the
store (issue #23 item 11; a job deleted with DELETE /jobs/{id} drops out): a scrape reads one column,
never the disk. A tenant's token sees its own jobs' and policies' series only."""

from __future__ import annotations

import asyncio
import re
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import REGISTRY, CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from api.auth import require
from core.store import Principal

router = APIRouter(tags=["metrics"])


def _gauges(registry: CollectorRegistry) -> tuple[Gauge, Gauge, Gauge, Gauge]:
    return (
        Gauge("cvpo_jobs", "Jobs by status", ["status"], registry=registry),
        Gauge("cvpo_queue_depth", "Messages waiting in the broker queue (-1: broker unreachable)", registry=registry),
        Gauge("cvpo_heartbeat_age_seconds", "Age of the stalest live job lease renewal", registry=registry),
        Gauge(
            "cvpo_job_disk_bytes",
            "Bytes in a job's run directory (checkpoints, artefacts, logs) as its worker last measured them",
            ["job_id"],
            registry=registry,
        ),
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request, principal: Annotated[Principal, Depends(require("metrics:read"))]) -> Response:
    state = request.app.state
    if not hasattr(state, "job_gauges"):
        state.job_gauges = _gauges(state.prometheus_registry)
    by_status, gauge_depth, gauge_age, gauge_disk = state.job_gauges
    counts, depth, age, disk = await asyncio.gather(
        asyncio.to_thread(state.store.jobs_by_status),
        asyncio.to_thread(state.queue.depth),
        asyncio.to_thread(state.store.oldest_heartbeat_age),
        asyncio.to_thread(state.store.disk_usage),
    )
    gauge_disk.clear()  # deleted jobs' series go
    for job_id, nbytes in disk.items():
        gauge_disk.labels(job_id).set(nbytes)
    for status, n in counts.items():
        by_status.labels(status).set(n)
    gauge_depth.set(-1 if depth is None else depth)
    # Age = how far past renewal the stalest lease is: lease_until - ttl gives the last renewal time.
    gauge_age.set(0.0 if age is None else max(0.0, age + state.settings.lease_ttl_s))
    body = generate_latest(state.prometheus_registry) + generate_latest(REGISTRY)
    if not principal.admin:  # a tenant sees its own policies' and jobs' series only (issue #23 item 9)
        own, own_jobs = await asyncio.gather(
            asyncio.to_thread(state.store.policy_ids, principal.client),
            asyncio.to_thread(state.store.disk_usage, principal.client),
        )
        body = _only_policies(body, own)
        body = _only_owned(body, _JOB_LABEL, set(own_jobs))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


_POLICY_LABEL = re.compile(rb'policy_id="([^"]*)"')
_JOB_LABEL = re.compile(rb'job_id="([^"]*)"')


def _only_policies(body: bytes, allowed: set[str]) -> bytes:
    """Drop the samples labelled with a policy id outside ``allowed`` (HELP/TYPE lines stay)."""
    return _only_owned(body, _POLICY_LABEL, allowed)


def _only_owned(body: bytes, label: re.Pattern[bytes], allowed: set[str]) -> bytes:
    """Drop the samples whose ``label`` names an id outside ``allowed`` (HELP/TYPE lines stay)."""
    keep = []
    for line in body.split(b"\n"):
        m = label.search(line) if not line.startswith(b"#") else None
        if m is None or m.group(1).decode() in allowed:
            keep.append(line)
    return b"\n".join(keep)
