"""One persistent keep-alive HTTP connection (``http.client``), reopened when the server dropped it.

A controller calling ``/act`` in a loop should not pay a TCP handshake per action, so the client keeps
one connection open. The API closes idle connections (``CVPO_HEADER_TIMEOUT_S`` after the previous
response) and after some answers (a 401 decided on the headers, a 503 past the connection cap), so:

* before reusing an idle connection, a zero-timeout ``select`` checks whether the server has closed
  it (readable while idle means EOF); if so it is replaced before anything is sent;
* if a reused connection still fails while sending or before any byte of the answer arrives (the
  close raced the request), the request is sent once more on a new connection, but only when that
  is harmless (``retry_safe``): reads, ``/act``, cancel, an alias's PUT, and job submission (which
  always carries an ``Idempotency-Key``). Promotions, evaluations and alias rollbacks are not resent:
  a second one would make a second policy or evaluation, or roll back one step further; they raise
  ``CvpoConnectionError`` instead.

A lock serialises requests, so a ``Client`` shared between threads is safe but not parallel: give each
thread its own ``Client`` for concurrent requests.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from cvpo_client.errors import CvpoConnectionError

# Failures that mean "the server had already closed this connection", as opposed to a refused
# connection or a timeout (which a resend would only repeat).
_DROPPED = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names
    data: bytes


class Connection:
    """Sends requests to one origin (``scheme://host:port`` plus an optional path prefix)."""

    def __init__(self, base_url: str, timeout: float) -> None:
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url must be http(s)://host[:port][/prefix], got {base_url!r}")
        self.scheme = url.scheme
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.prefix = url.path.rstrip("/")
        self.timeout = timeout
        self.connections_opened = 0  # for tests and diagnostics: how often a new TCP connection was made
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def _new(self) -> http.client.HTTPConnection:
        self.connections_opened += 1
        if self.scheme == "https":
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=ssl.create_default_context()
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _usable(self) -> tuple[http.client.HTTPConnection, bool]:
        """The connection to send on and whether it was used before (only a reused one may be stale)."""
        conn = self._conn
        if conn is not None and conn.sock is not None and not _closed_by_peer(conn.sock):
            return conn, True
        self._drop()
        self._conn = self._new()
        return self._conn, False

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: Mapping[str, str],
        *,
        retry_safe: bool,
    ) -> Response:
        with self._lock:
            for attempt in (1, 2):
                conn, reused = self._usable()
                try:
                    conn.request(method, self.prefix + path, body=body, headers=dict(headers))
                    resp = conn.getresponse()
                    data = resp.read()
                except _DROPPED as exc:
                    self._drop()
                    if reused and retry_safe and attempt == 1:
                        continue
                    raise CvpoConnectionError(f"{method} {path}: connection lost: {exc!r}") from exc
                except (OSError, http.client.HTTPException) as exc:  # refused, timed out, malformed answer
                    self._drop()
                    raise CvpoConnectionError(f"{method} {path}: {exc!r}") from exc
                if resp.will_close:
                    self._drop()
                headers_out = {k.lower(): v for k, v in resp.getheaders()}
                return Response(resp.status, resp.reason, headers_out, data)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def _closed_by_peer(sock: socket.socket) -> bool:
    """An idle keep-alive socket that is readable has been closed by the server (or holds bytes no
    request asked for): either way it must not carry the next request."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
