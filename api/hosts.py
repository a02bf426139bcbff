"""What keeps an API without authentication (``CVPO_AUTH=off``) reachable from this machine only.

Two checks, both answered with problem+json before any route runs:

* **Host allowlist** (DNS rebinding): a web page on ``evil.example`` whose name is re-pointed at
  127.0.0.1 makes the victim's browser send requests to the loopback API with ``Host:
  evil.example``. Only the names in ``CVPO_ALLOWED_HOSTS`` (default the loopback names) and loopback
  IP literals are served; any other Host is a 421.
* **Loopback connections only**: the address a connection arrived at (ASGI ``scope["server"]``, the
  accepted socket's own address) must be a loopback one, so an app started behind some other
  launcher bound to 0.0.0.0 still refuses a remote peer (403) instead of serving it unauthenticated.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import Problem, problem_response

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also IPv4-mapped) or ``localhost``; not the wildcard 0.0.0.0 / ::."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def host_name(header: str) -> str:
    """The name part of a Host header, lower-case, without port or IPv6 brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header[1:]
    name, _, _port = header.partition(":")
    return name.rstrip(".")


class LoopbackOnlyMiddleware:
    """Outermost layer of an app running without authentication (see the module docstring)."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str]) -> None:
        self.app = app
        self.allowed = frozenset(host_name(h) if h != "*" else "*" for h in allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        problem = self.check(scope)
        if problem is None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await problem_response(Request(scope), problem)(scope, receive, send)

    def check(self, scope: Scope) -> Problem | None:
        server = scope.get("server")
        if server is not None and not is_loopback(str(server[0])):
            return Problem(
                403,
                "authentication is off (CVPO_AUTH=off): this API answers connections to a loopback address only",
            )
        host = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"), "")
        name = host_name(host)
        # A loopback IP literal cannot be a rebinding (the page's origin would be that IP itself).
        if "*" not in self.allowed and name not in self.allowed and not (name != "localhost" and is_loopback(name)):
            return Problem(
                421,
                "this Host is not served while authentication is off; add it to CVPO_ALLOWED_HOSTS",
                type="/problems/misdirected-request",
                title="Misdirected request",
            )
        return None
