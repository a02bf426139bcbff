"""Bearer-token auth with scopes (service-design.md §4).

Tokens are 32 random bytes; only their SHA-256 is stored, and lookups go by that digest (so timing
reveals nothing about the secret itself). The first start writes an admin token to
``<data_dir>/api_token`` (mode 0600) and logs only its path. Lookups are cached for a few seconds
so the ``/act`` hot path rarely touches the database.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

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
    """digest → Principal for a few seconds, so ``/act`` rarely touches the database and a revoked
    token (``cvpo tokens revoke``) stops working everywhere within ``ttl_s``."""

    def __init__(self, store: Store, ttl_s: float = 5.0) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    def resolve(self, raw: str) -> Principal | None:
        digest = hash_token(raw)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        principal = self.store.lookup_token(digest)
        with self._lock:
            if principal is None:
                self._cache.pop(digest, None)
            else:
                self._cache[digest] = (principal, now + self.ttl_s)
        return principal


def authenticate(request: Request) -> Principal:
    state: Any = request.app.state
    if not state.settings.auth:
        return LOCAL_ADMIN
    header = request.headers.get("authorization")
    if not header and request.url.path in state.settings.public_paths:
        return ANONYMOUS_READER
    if not header:
        raise Problem(401, "missing Authorization: Bearer <token> header")
    scheme, _, raw = header.partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        raise Problem(401, "the Authorization header must be 'Bearer <token>'")
    principal = state.tokens.resolve(raw.strip())
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
