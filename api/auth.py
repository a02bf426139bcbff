"""Bearer-token auth with scopes (service-design.md §4).

Tokens are 32 random bytes; only their SHA-256 is stored, and lookups go by that digest (so timing
reveals nothing about the secret itself). The first start writes an admin token to
``<data_dir>/api_token`` (mode 0600) and logs only its path. Lookups, hits and misses alike, are
cached for a few seconds so the ``/act`` hot path rarely touches the database; misses are resolved
off the event loop, and ``api.middleware`` authenticates on the headers before reading a body.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from fastapi import Request

from api.errors import Problem
from core.settings import Settings
from core.store import Principal, Store, hash_token

log = logging.getLogger("cvpo.api")

ADMIN_CLIENT = "admin"  # the bootstrap token's client: `cvpo tokens create --client admin` shares its policies
LOCAL_ADMIN = Principal(ADMIN_CLIENT, frozenset({"admin"}))
# Paths opened with CVPO_PUBLIC_PATHS (e.g. /metrics for a scraper) are readable without a token.
ANONYMOUS_READER = Principal("anonymous", frozenset({"jobs:read", "policies:read", "metrics:read"}))


# The bootstrap admin token's names in the store; registering one revokes the others (issue #23 item 9):
# a changed CVPO_API_TOKEN (or a switch between it and the token file) leaves no earlier admin token valid.
BOOTSTRAP_NAMES = ("admin (CVPO_API_TOKEN)", "admin (token file)")


def bootstrap_admin_token(settings: Settings, store: Store) -> tuple[str, str | None]:
    """Register the admin token, revoking earlier bootstrap tokens. Returns (where it is, the raw token
    if newly generated)."""
    if settings.api_token:
        store.replace_bootstrap_token(settings.api_token, BOOTSTRAP_NAMES[0], BOOTSTRAP_NAMES, ADMIN_CLIENT)
        return "the CVPO_API_TOKEN environment variable", None
    path = settings.token_file
    created = None
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(raw + "\n")
        created = raw
    raw = path.read_text().strip()
    store.replace_bootstrap_token(raw, BOOTSTRAP_NAMES[1], BOOTSTRAP_NAMES, ADMIN_CLIENT)
    return str(path.resolve()), created


class TokenCache:
    """digest → Principal, or None for an unknown token, for ``ttl_s`` seconds: ``/act`` rarely touches
    the database, a revoked token (``cvpo tokens revoke``) stops working everywhere within ``ttl_s``,
    and a flood repeating invalid tokens is answered from memory (issue #23 item 3).

    Misses are looked up on a small thread pool of their own (``resolve_async``), never on the event
    loop, one lookup per digest however many requests wait for it; at most ``max_pending`` digests are
    looked up at once, past that new ones are a 503 rather than a growing queue. Unknown digests kept
    are capped at ``max_unknown`` (oldest dropped first), so random tokens cannot grow memory."""

    active: ClassVar[TokenCache | None] = None  # the newest; api/shedding.py answers known-bad tokens from it

    def __init__(
        self,
        store: Store,
        ttl_s: float = 5.0,
        max_unknown: int = 10_000,
        lookup_threads: int = 2,
        max_pending: int = 256,
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.max_unknown = max_unknown
        self.max_pending = max_pending
        self._cache: dict[str, tuple[Principal | None, float]] = {}
        self._unknown = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(lookup_threads, thread_name_prefix="token-lookup")
        self._pending: dict[str, asyncio.Future[Principal | None]] = {}
        TokenCache.active = self

    def cached(self, digest: str) -> tuple[bool, Principal | None]:
        """(whether the cache knows this digest now, its Principal or None)."""
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > time.monotonic():
            return True, hit[0]
        return False, None

    def _lookup(self, digest: str) -> Principal | None:
        principal = self.store.lookup_token(digest)
        with self._lock:
            old = self._cache.pop(digest, None)
            if old is not None and old[0] is None:
                self._unknown -= 1
            if principal is None:
                while self._unknown >= self.max_unknown:  # drop the oldest unknown digests
                    first = next(d for d, (p, _) in self._cache.items() if p is None)
                    del self._cache[first]
                    self._unknown -= 1
                self._unknown += 1
            self._cache[digest] = (principal, time.monotonic() + self.ttl_s)
        return principal

    def resolve(self, raw: str) -> Principal | None:
        """Blocking: for sync routes, which already run on the threadpool."""
        digest = hash_token(raw)
        known, principal = self.cached(digest)
        return principal if known else self._lookup(digest)

    async def resolve_async(self, raw: str) -> Principal | None:
        """For the event loop: a hit answers at once, a miss waits for the lookup pool."""
        digest = hash_token(raw)
        known, principal = self.cached(digest)
        if known:
            return principal
        future = self._pending.get(digest)
        if future is None:
            if len(self._pending) >= self.max_pending:
                raise Problem(503, "too many token lookups in progress", headers={"Retry-After": "1"})
            future = asyncio.get_running_loop().run_in_executor(self._pool, self._lookup, digest)
            self._pending[digest] = future
            future.add_done_callback(lambda _f: self._pending.pop(digest, None))
        return await asyncio.shield(future)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def credentials(settings: Any, path: str, header: str | None) -> Principal | str:
    """The Principal needing no lookup (auth off, a public path), else the raw token; 401 if malformed."""
    if not settings.auth:
        return LOCAL_ADMIN
    if not header and path in settings.public_paths:
        return ANONYMOUS_READER
    if not header:
        raise Problem(401, "missing Authorization: Bearer <token> header")
    scheme, _, raw = header.partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        raise Problem(401, "the Authorization header must be 'Bearer <token>'")
    return raw.strip()


async def authenticate_headers(state: Any, path: str, header: str | None) -> Principal:
    """``authenticate`` for the middleware, before the body is read: misses off the event loop."""
    found = credentials(state.settings, path, header)
    if isinstance(found, Principal):
        return found
    principal = await state.tokens.resolve_async(found)
    if principal is None:
        raise Problem(401, "unknown API token")
    return principal


def authenticate(request: Request) -> Principal:
    """The caller's Principal: the one the middleware resolved from the headers, or looked up here."""
    state: Any = request.app.state
    early = request.scope.get("state", {}).get("principal")
    if early is not None:
        return early
    found = credentials(state.settings, request.url.path, request.headers.get("authorization"))
    if isinstance(found, Principal):
        return found
    principal = state.tokens.resolve(found)
    if principal is None:
        raise Problem(401, "unknown API token")
    return principal


def require(scope: str) -> Callable[[Request], Principal]:
    """A dependency: the caller's Principal, after checking it holds ``scope`` (or admin)."""

    def dependency(request: Request) -> Principal:
        principal = authenticate(request)
        if not principal.allows(scope):
            raise Problem(403, f"this token lacks the {scope!r} scope", type="/problems/missing-scope")
        return principal

    dependency.__name__ = f"require_{scope.replace(':', '_')}"
    return dependency


def owner_filter(principal: Principal) -> str | None:
    """Admins see every client's jobs and policies; others only their own."""
    return None if principal.admin else principal.client
