"""Liveness and readiness probes: no auth, cheap.

``/readyz`` checks the store and the broker at most about once a second (issue #23 item 3): a probe
flood used to open a SQLite transaction and a new Redis connection per request. Callers within
``READY_TTL_S`` of a check that found both up get its answer; a failed check is not reused, so
recovery shows at once; concurrent callers share one check in progress. The answer also says who is
there to run jobs (issue #23 item 12): live workers on this API's queue, how many have CUDA, and for how
long none has been seen. That is information, not readiness: the API serves /act without a worker.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

router = APIRouter(tags=["health"])

READY_TTL_S = 1.0


class Readiness:
    """The last readiness check of one app, and the one running now if any."""

    def __init__(self) -> None:
        self.checked_at = float("-inf")
        self.result: tuple[bool, bool] = (False, False)
        self.workers: dict[str, Any] | None = None
        self.running: asyncio.Future[tuple[bool, bool]] | None = None

    async def check(self, state: Any) -> tuple[bool, bool]:
        if time.monotonic() - self.checked_at < READY_TTL_S:
            return self.result
        if self.running is None:
            self.running = asyncio.ensure_future(self._probe(state))
        return await asyncio.shield(self.running)

    async def _probe(self, state: Any) -> tuple[bool, bool]:
        try:
            store_ok, broker_ok = await asyncio.gather(
                asyncio.to_thread(state.store.ping), asyncio.to_thread(state.queue.ping)
            )
            self.result = (bool(store_ok), bool(broker_ok))
            self.workers = await asyncio.to_thread(_workers, state) if store_ok else None
            self.checked_at = time.monotonic() if all(self.result) else float("-inf")
            return self.result
        finally:
            self.running = None


def _workers(state: Any) -> dict[str, Any] | None:
    """The store's view of this queue's workers, or None when it cannot say (never fails the probe)."""
    settings = state.settings
    try:
        return state.store.worker_summary(settings.queue, settings.lease_ttl_s)
    except Exception:
        return None


@router.get("/livez", summary="The process is alive")
async def livez() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/readyz", summary="Store and broker reachable", responses={503: {"description": "Not ready"}})
async def readyz(request: Request) -> Response:
    state = request.app.state
    readiness = getattr(state, "readiness", None)
    if readiness is None:
        readiness = state.readiness = Readiness()
    store_ok, broker_ok = await readiness.check(state)
    body = {
        "status": "ready" if store_ok and broker_ok else "not ready",
        "store": store_ok,
        "broker": broker_ok,
        "workers": readiness.workers,  # who runs jobs: information, not part of readiness
    }
    headers = {} if store_ok and broker_ok else {"Retry-After": "5"}
    status = 200 if store_ok and broker_ok else 503
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)
