"""Shedding ``/act`` before the app runs (service-design.md §2.6, issue #9).

Past the in-flight cap :class:`api.middleware.LimitsMiddleware` answers 503, but by then uvicorn has
built the ASGI scope, a request cycle and a task, and Starlette's stack has run. Under a flood that
made a rejection cost about as much CPU as serving a one-row ``/act``: the rejections alone
saturated the process, and the requests it did accept queued behind them for seconds
(bench/results/overload.json before this module).

:func:`shedding_protocol` is uvicorn's httptools HTTP protocol with one change: a ``POST`` to
``/policies/{id}/act`` that arrives while the process already serves ``max_inflight`` requests is
answered as soon as its headers are parsed, with the middleware's problem+json 503, ``Retry-After: 1``
and ``X-Request-ID`` (echoed or generated), written straight to the socket. Its body is read and
dropped, and a keep-alive connection stays open for the next request. "Serving" counts every
request the process has started and not finished (uvicorn's task set) except open job event
streams, which the middleware's cap does not count either; everything else takes uvicorn's path
unchanged. Sheds are counted in ``act_shed_total``.

It also caps open client connections (``max_connections``, CVPO_MAX_CONNECTIONS): a request on a
connection opened while that many were already open, health probes excepted, gets a 503 with
``Retry-After: 1`` and the connection is closed. This replaces uvicorn's ``limit_concurrency``,
which counts idle keep-alive connections with the requests, so that a few dozen connected
controllers made it answer every request with a bare text 503 without Retry-After.

Idle and slow connections (issue #23 item 2): a request's headers must be complete within
``header_timeout_s`` (CVPO_HEADER_TIMEOUT_S) of the connection opening or of the previous response;
otherwise the connection is closed (after a 408 if part of a request had come). Sockets that never
send a request used to hold their slot for ever, and enough of them refused every new connection.
One client address holds at most ``max_per_peer`` connections (CVPO_MAX_CONNECTIONS_PER_PEER): one
more gets a 503 at once and is closed, so one host cannot take every slot of the global cap.
Requests still authenticating or receiving their body (``Pending``) are not counted as in flight.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections import Counter as Tally
from http import HTTPStatus

import httptools
import orjson
from prometheus_client import Counter
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.auth import TokenCache, credentials
from api.errors import PROBLEM_JSON, Problem, problem_document
from api.middleware import (
    BUSY,
    HEALTH,
    PENDING_KEY,
    TIMEOUT_TYPE,
    OpenStreams,
    Pending,
    checks_headers_first,
    request_id,
)
from api.routes.act import is_act_path
from core.settings import Settings
from core.store import hash_token

ACT_SHED = Counter("act_shed_total", "/act requests answered 503 at the in-flight cap before the app ran")
AUTH_SHED = Counter("auth_shed_total", "requests answered 401 from their headers alone, before the app ran")


class _NoEvent:
    def set(self) -> None:
        pass


class _Answered:
    """Stands in for uvicorn's request cycle of a request answered here: its body is dropped."""

    response_complete = True
    disconnected = False
    message_event = _NoEvent()


_ANSWERED = _Answered()
TOO_MANY_CONNECTIONS = Problem(503, "too many open connections to this API process", headers={"Retry-After": "1"})
TOO_MANY_FROM_PEER = Problem(503, "too many open connections from this address", headers={"Retry-After": "1"})
HEADER_TIMEOUT = Problem(408, "the request headers did not arrive in time", type=TIMEOUT_TYPE, title="Request timeout")


def _unauthorized(detail: str) -> Problem:
    return Problem(401, detail, headers={"WWW-Authenticate": "Bearer"})


def _problem_bytes(
    problem: Problem, path: str | None, request_id: str, default_headers: list[tuple[bytes, bytes]], close: bool
) -> bytes:
    body = orjson.dumps(problem_document(problem, path, request_id))
    head = [f"HTTP/1.1 {problem.status} {HTTPStatus(problem.status).phrase}\r\n".encode()]
    head += [name + b": " + value + b"\r\n" for name, value in default_headers]
    for name, value in problem.headers.items():
        head.append(f"{name.lower()}: {value}\r\n".encode("latin-1"))
    head.append(b"content-type: " + PROBLEM_JSON.encode() + b"\r\n")
    head.append(b"content-length: %d\r\n" % len(body))
    head.append(b"x-request-id: " + request_id.encode("latin-1") + b"\r\n")
    if close:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head) + body


def shedding_protocol(
    max_inflight: int,
    max_connections: int,
    header_timeout_s: float | None = None,
    max_per_peer: int | None = None,
) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol that sheds ``/act`` at ``max_inflight`` requests in flight and
    any request (health probes excepted) on a connection past ``max_connections``, closes connections
    whose headers take over ``header_timeout_s``, and caps connections per client address at
    ``max_per_peer`` (0: no cap). The last two default to the environment's settings."""
    settings = Settings.from_env()  # CVPO_AUTH and CVPO_PUBLIC_PATHS, as the app reads them
    header_timeout_s = settings.header_timeout_s if header_timeout_s is None else header_timeout_s
    max_per_peer = settings.max_connections_per_peer if max_per_peer is None else max_per_peer
    per_peer: Tally[str] = Tally()  # open connections by client address, in this server

    class SheddingProtocol(HttpToolsProtocol):
        over_connections = False
        peer: str | None = None  # set while this connection counts in per_peer
        header_timer: asyncio.TimerHandle | None = None
        partial = False  # bytes of a request whose headers are not complete yet have come

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.over_connections = len(self.connections) > max_connections  # this one is past the cap
            peer = self.client[0] if self.client else None
            if max_per_peer and peer is not None:
                if per_peer[peer] >= max_per_peer:
                    # Answered and closed at once: held until a request came, it would fill the global cap.
                    transport.write(_problem_bytes(TOO_MANY_FROM_PEER, None, request_id(b""), [], close=True))
                    transport.close()
                    return
                per_peer[peer] += 1
                self.peer = peer
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            if self.peer is not None:
                per_peer[self.peer] -= 1
                if per_peer[self.peer] <= 0:
                    del per_peer[self.peer]
                self.peer = None
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self.partial = False
            self.header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _disarm_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _header_timeout(self) -> None:
            self.header_timer = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return  # a request is being served: its response re-arms the timer
            if self.partial:
                self.transport.write(_problem_bytes(HEADER_TIMEOUT, None, request_id(b""), [], close=True))
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.header_timer is not None:
                self.partial = True
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()  # the next request's headers are due within the deadline

        def on_headers_complete(self) -> None:
            self._disarm_header_timer()
            if (self.cycle is None or self.cycle.response_complete) and not self.parser.should_upgrade():
                # Not behind a pipelined request: this one may be answered here, before a task exists.
                path = httptools.parse_url(self.url).path.decode("latin-1")
                if "%" in path:
                    path = urllib.parse.unquote(path)  # as uvicorn builds scope["path"]
                if self.over_connections and path not in HEALTH:
                    self._answer(TOO_MANY_CONNECTIONS, path, close=True)
                    return
                method = self.parser.get_method().decode("latin-1")
                header = next((v for n, v in self.headers if n == b"authorization"), None)
                unknown = False
                if checks_headers_first(method, path, header is not None):
                    verdict = self._token_verdict(path, header)
                    if isinstance(verdict, Problem):
                        self._answer(verdict, path, close=True)
                        AUTH_SHED.inc()
                        return
                    unknown = verdict is None
                busy = len(self.tasks) - OpenStreams.count - Pending.count >= max_inflight
                if busy and method == "POST" and is_act_path(path):
                    self._answer(BUSY, path, close=False)
                    ACT_SHED.inc()
                    return
                if unknown:
                    # Its token is looked up before it can compete for a slot: until then it is
                    # pending, so a flood of unknown tokens does not make /act look over the cap.
                    self.scope["state"][PENDING_KEY] = True
                    Pending.count += 1
            super().on_headers_complete()

        def _token_verdict(self, path: str, header: bytes | None) -> Problem | bool | None:
            """A 401 when the headers alone show the token is missing, malformed or known to be unknown;
            True when it needs no lookup (a known token, auth off, a public path); None: look it up."""
            try:
                found = credentials(settings, path, None if header is None else header.decode("latin-1"))
            except Problem as problem:
                return _unauthorized(problem.detail)
            if not isinstance(found, str):
                return True
            cache = TokenCache.active
            if cache is None:
                return None
            known, principal = cache.cached(hash_token(found))
            if not known:
                return None
            return True if principal is not None else _unauthorized("unknown API token")

        def _answer(self, problem: Problem, path: str, close: bool) -> None:
            rid = request_id(next((v for n, v in self.headers if n == b"x-request-id"), b""))
            keep_alive = not close and self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
            self.transport.write(_problem_bytes(problem, path, rid, self.server_state.default_headers, not keep_alive))
            self.cycle = _ANSWERED  # type: ignore[assignment]  # on_body/on_message_complete drop the body
            if not keep_alive:
                self.transport.close()
            self.on_response_complete()

    return SheddingProtocol
