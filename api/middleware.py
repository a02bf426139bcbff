"""Limits that FastAPI and uvicorn do not have (service-design.md §2.6, §4), as one pure ASGI layer.

- A request id on every response (``X-Request-ID``, echoed from the client when it sends one).
- An in-flight cap per process: over it → immediate 503 + ``Retry-After: 1`` (controllers have
  deadlines; queueing them helps nobody). Health probes and job event streams are not counted.
- A byte limit counted while the body streams (chunked bodies too) → 413, 8 MiB on ``/act``,
  1 MiB elsewhere; JSON-only bodies → 415 for another Content-Type.
- Authentication on the headers before any body is read (issue #23 item 1): a request with a body,
  or with an ``Authorization`` header, and no valid token is a 401 and its connection is closed; the
  body of a stranger is never read. A body must arrive within ``CVPO_BODY_TIMEOUT_S`` (then 408,
  connection closed). A request counts against the in-flight cap only once its body is in: two
  clients trickling bodies used to hold both slots of ``CVPO_MAX_INFLIGHT=2`` and every ``/act``
  was shed while they did.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import authenticate_headers
from api.errors import Problem, problem_response
from api.routes.act import is_act_path

HEALTH = ("/livez", "/readyz")
# Past the in-flight cap: the same answer here and in api/shedding.py (which sheds /act before the app).
BUSY = Problem(503, "server busy", headers={"Retry-After": "1"})


# Generated request ids: 16 hex digits, a random per-process prefix and a counter (no urandom call
# per request, as uuid4 makes, on the hot path and on the shedding path alike).
_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count()


def request_id(sent: bytes) -> str:
    """The client's ``X-Request-ID`` (its first 128 characters), or a new one when it sent none."""
    return sent.decode("latin-1")[:128] or f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFF:08x}"


class OpenStreams:
    """Job event streams open in this process (api/shedding.py subtracts them from uvicorn's tasks)."""

    count = 0


class Pending:
    """Requests still authenticating or receiving their body: not yet counted against the in-flight
    cap (api/shedding.py subtracts them from uvicorn's tasks too), so slow senders cannot fill it."""

    count = 0


BODY_METHODS = ("POST", "PUT", "PATCH")
PENDING_KEY = "cvpo_pending"  # in scope["state"]: the protocol counted this request in Pending


def checks_headers_first(method: str, path: str, has_authorization: bool) -> bool:
    """Whether the middleware authenticates this request on its headers (and reads its body) before
    it may take an in-flight slot; api/shedding.py asks the same question of the parsed headers."""
    if path in HEALTH or (method == "GET" and is_stream_path(path)):
        return False
    return method in BODY_METHODS or has_authorization


TIMEOUT_TYPE = "/problems/request-timeout"
CLOSE = {"Connection": "close"}  # uvicorn closes the connection after a response carrying it


class LimitsMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        body_limit: int,
        act_body_limit: int,
        max_inflight: int,
        act_app: ASGIApp | None = None,
    ) -> None:
        self.app = app
        # POST /policies/{id}/act goes straight to ``act_app`` (a one-route router): the hot path
        # skips the per-request HTTP instrumentation; its own counters live in api/act.py.
        self.act_app = act_app
        self.body_limit = body_limit
        self.act_body_limit = act_body_limit
        self.max_inflight = max_inflight
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        rid = request_id(headers.get(b"x-request-id", b""))
        scope.setdefault("state", {})["request_id"] = rid
        rid_header = (b"x-request-id", rid.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), rid_header]
            await send(message)

        path = scope["path"]
        if path in HEALTH:
            await self.app(scope, receive, send_with_id)
            return
        if scope["method"] == "GET" and is_stream_path(path):
            # An event stream stays open as long as its job runs and mostly sleeps: counted, a few open
            # dashboards would fill a cap set low for /act latency and turn every controller away.
            OpenStreams.count += 1
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                OpenStreams.count -= 1
            return
        has_body = scope["method"] in BODY_METHODS
        counted = scope["state"].pop(PENDING_KEY, False)  # api/shedding.py counted it in Pending already
        body = b""
        if has_body or b"authorization" in headers:
            # Headers first: who is asking, before a byte of the body is read or a slot is taken.
            if not counted:
                Pending.count += 1
            problem = None
            try:
                problem = await self._authenticate(scope, headers)
                if problem is None and has_body:
                    limit = self.act_body_limit if is_act_path(path) else self.body_limit
                    body, problem = await self._read_body(headers, receive, limit, _body_timeout(scope))
                    if problem is None and body and not _is_json(headers.get(b"content-type", b"")):
                        problem = Problem(415, "send the body as application/json")
                if problem is not None:
                    await self._problem(scope, send_with_id, problem)
                    return
            finally:
                _leave_pending(at_task_end=problem is not None)
        elif counted:
            Pending.count -= 1
        if self.inflight >= self.max_inflight:
            await self._problem(scope, send_with_id, BUSY)
            return
        self.inflight += 1
        try:
            # One trip round the event loop before running, so every request already received
            # counts itself first: an inline /act request never awaits anything, so without this
            # each ran to completion alone, the count never passed 1, and the cap never saw the
            # requests queued behind it (bench/overload.py: no 503 at any load, seconds of queueing).
            await asyncio.sleep(0)
            if has_body:
                receive = _replay(body, receive)
                if self.act_app is not None and is_act_path(path):
                    await self.act_app(scope, receive, send_with_id)
                    return
            await self.app(scope, receive, send_with_id)
        finally:
            self.inflight -= 1

    async def _authenticate(self, scope: Scope, headers: dict[bytes, bytes]) -> Problem | None:
        """Resolve the bearer token from the headers alone; the Principal goes to the routes in
        ``scope["state"]`` (api/auth.py ``authenticate``), a failure is a 401 that closes the connection."""
        app = scope.get("app")
        if app is None:  # not under Starlette: the routes authenticate
            return None
        raw = headers.get(b"authorization")
        try:
            principal = await authenticate_headers(
                app.state, scope["path"], None if raw is None else raw.decode("latin-1")
            )
        except Problem as problem:
            if problem.status == 401:
                problem.headers.update(CLOSE)
            return problem
        scope["state"]["principal"] = principal
        return None

    async def _read_body(
        self, headers: dict[bytes, bytes], receive: Receive, limit: int, timeout_s: float
    ) -> tuple[bytes, Problem | None]:
        too_big = Problem(413, f"request body over the {limit}-byte limit")
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    return b"", too_big
            except ValueError:
                return b"", Problem(400, "malformed Content-Length header")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        break
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        return b"", too_big
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            detail = f"the request body did not arrive within {timeout_s:g} s"
            return b"", Problem(408, detail, type=TIMEOUT_TYPE, title="Request timeout", headers=dict(CLOSE))
        return b"".join(chunks), None

    async def _problem(self, scope: Scope, send: Send, problem: Problem) -> None:
        from starlette.requests import Request

        response = problem_response(Request(scope), problem)
        await response(scope, _no_receive, send)


def is_stream_path(path: str) -> bool:
    """Exactly ``/jobs/{one segment}/events``, the server-sent event stream of a job."""
    parts = path.split("/")
    return len(parts) == 4 and parts[1] == "jobs" and parts[2] != "" and parts[3] == "events"


def _leave_pending(at_task_end: bool) -> None:
    """A request answered before admission stays pending until its task is done: uvicorn drops the
    task from its set only then, and api/shedding.py would count it as in flight meanwhile (under
    an invalid-token flood that turned valid /act requests away)."""
    task = asyncio.current_task() if at_task_end else None
    if task is None:
        Pending.count -= 1
    else:
        task.add_done_callback(_pending_done)


def _pending_done(_task: object) -> None:
    Pending.count -= 1


def _body_timeout(scope: Scope) -> float:
    app = scope.get("app")
    return float(getattr(app.state.settings, "body_timeout_s", 30.0)) if app is not None else 30.0


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


def _replay(body: bytes, original: Receive) -> Receive:
    """The buffered body once, then the client's own stream (so disconnects still reach the app)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await original()

    return receive


async def _no_receive() -> Any:
    return {"type": "http.disconnect"}
