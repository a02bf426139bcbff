"""Prometheus exposition: HTTP metrics (instrumentator), /act counters, and job gauges read at scrape time."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import REGISTRY, CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from api.auth import require
from core.store import Principal

router = APIRouter(tags=["metrics"])


def _gauges(registry: CollectorRegistry) -> tuple[Gauge, Gauge, Gauge]:
    return (
        Gauge("cvpo_jobs", "Jobs by status", ["status"], registry=registry),
        Gauge("cvpo_queue_depth", "Messages waiting in the broker queue (-1: broker unreachable)", registry=registry),
        Gauge("cvpo_heartbeat_age_seconds", "Age of the stalest live job lease renewal", registry=registry),
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request, _: Annotated[Principal, Depends(require("metrics:read"))]) -> Response:
    state = request.app.state
    if not hasattr(state, "job_gauges"):
        state.job_gauges = _gauges(state.prometheus_registry)
    by_status, gauge_depth, gauge_age = state.job_gauges
    counts, depth, age = await asyncio.gather(
        asyncio.to_thread(state.store.jobs_by_status),
        asyncio.to_thread(state.queue.depth),
        asyncio.to_thread(state.store.oldest_heartbeat_age),
    )
    for status, n in counts.items():
        by_status.labels(status).set(n)
    gauge_depth.set(-1 if depth is None else depth)
    # Age = how far past renewal the stalest lease is: lease_until - ttl gives the last renewal time.
    gauge_age.set(0.0 if age is None else max(0.0, age + state.settings.lease_ttl_s))
    body = generate_latest(state.prometheus_registry) + generate_latest(REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
