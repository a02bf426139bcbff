"""Liveness and readiness probes: no auth, cheap."""

from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

router = APIRouter(tags=["health"])


@router.get("/livez", summary="The process is alive")
async def livez() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/readyz", summary="Store and broker reachable", responses={503: {"description": "Not ready"}})
async def readyz(request: Request) -> Response:
    state = request.app.state
    store_ok, broker_ok = await asyncio.gather(asyncio.to_thread(state.store.ping), asyncio.to_thread(state.queue.ping))
    body = {"status": "ready" if store_ok and broker_ok else "not ready", "store": store_ok, "broker": broker_ok}
    headers = {} if store_ok and broker_ok else {"Retry-After": "5"}
    status = 200 if store_ok and broker_ok else 503
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)
