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
"""

from __future__ import annotations

import asyncio
import urllib.parse

import httptools
import orjson
from prometheus_client import Counter
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.errors import PROBLEM_JSON, Problem, problem_document
from api.middleware import BUSY, HEALTH, OpenStreams, is_act_path, request_id

ACT_SHED = Counter("act_shed_total", "/act requests answered 503 at the in-flight cap before the app ran")


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


def _problem_bytes(
    problem: Problem, path: str, request_id: str, default_headers: list[tuple[bytes, bytes]], close: bool
) -> bytes:
    body = orjson.dumps(problem_document(problem, path, request_id))
    head = [b"HTTP/1.1 503 Service Unavailable\r\n"]
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


def shedding_protocol(max_inflight: int, max_connections: int) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol that sheds ``/act`` at ``max_inflight`` requests in flight and
    any request (health probes excepted) on a connection past ``max_connections``."""

    class SheddingProtocol(HttpToolsProtocol):
        over_connections = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.over_connections = len(self.connections) > max_connections  # this one is past the cap

        def on_headers_complete(self) -> None:
            over_connections = self.over_connections
            if (
                (over_connections or len(self.tasks) - OpenStreams.count >= max_inflight)
                and (self.cycle is None or self.cycle.response_complete)  # not behind a pipelined request
                and not self.parser.should_upgrade()
            ):
                path = httptools.parse_url(self.url).path.decode("latin-1")
                if "%" in path:
                    path = urllib.parse.unquote(path)  # as uvicorn builds scope["path"]
                if over_connections and path not in HEALTH:
                    self._answer(TOO_MANY_CONNECTIONS, path, close=True)
                    return
                if self.parser.get_method() == b"POST" and is_act_path(path):
                    self._answer(BUSY, path, close=False)
                    ACT_SHED.inc()
                    return
            super().on_headers_complete()

        def _answer(self, problem: Problem, path: str, close: bool) -> None:
            rid = request_id(next((v for n, v in self.headers if n == b"x-request-id"), b""))
            keep_alive = not close and self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
            self.transport.write(_problem_bytes(problem, path, rid, self.server_state.default_headers, not keep_alive))
            self.cycle = _ANSWERED  # type: ignore[assignment]  # on_body/on_message_complete drop the body
            if not keep_alive:
                self.transport.close()
            self.on_response_complete()

    return SheddingProtocol
