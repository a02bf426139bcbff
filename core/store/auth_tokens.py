"""API tokens and who they make the caller: the token table's operations (only a SHA-256 is stored),
the ``Principal`` a token resolves to and the ``SCOPES`` it may hold. api/auth.py turns a request's
bearer token into a ``Principal`` through ``lookup_token``.

Besides ``SCOPES`` a token may hold ``alias:<name>`` scopes (issue #20): each lets it call
``POST /aliases/<name>/act`` of its client's alias of that name, and nothing else, so a controller's
token follows what the alias points at without ever naming a policy."""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from core.store.alias_store import ALIAS_NAME
from core.store.base import StoreBase
from core.store.records import new_id, rfc3339
from core.store.schema import LOCK_TOKENS, _serialize, tokens

SCOPES = ("jobs:read", "jobs:write", "policies:read", "policies:act", "aliases:write", "metrics:read", "admin")
ALIAS_SCOPE_PREFIX = "alias:"  # alias:<name>: POST /aliases/<name>/act only


def valid_scope(scope: str) -> bool:
    """One of ``SCOPES``, or ``alias:<name>`` with a valid alias name."""
    if scope.startswith(ALIAS_SCOPE_PREFIX):
        return ALIAS_NAME.fullmatch(scope[len(ALIAS_SCOPE_PREFIX) :]) is not None
    return scope in SCOPES


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass
class Principal:
    """Who is calling: the client owning jobs and policies, and the token's scopes."""

    client: str
    scopes: frozenset[str] = field(default_factory=frozenset)
    token_id: str | None = None  # who, in an alias's history (None: auth off, anonymous)
    token_name: str | None = None

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def allows(self, scope: str) -> bool:
        return self.admin or scope in self.scopes


class TokensMixin(StoreBase):
    """Registering, listing, revoking and looking up tokens."""

    def ensure_token(
        self, raw: str, name: str, scopes: Iterable[str], client: str | None = None, expires_at: float | None = None
    ) -> str:
        """Register a token (idempotent); returns its id. Only the SHA-256 is stored. ``expires_at``
        (epoch seconds) applies to a new token; None never expires."""
        digest = hash_token(raw)
        with self.tx() as c:
            _serialize(c, LOCK_TOKENS)  # two processes registering the same token: one inserts, one finds it
            row = c.execute(sa.select(tokens.c.id).where(tokens.c.sha256 == digest)).first()
            if row:
                c.execute(tokens.update().where(tokens.c.id == row.id).values(scopes=sorted(scopes)))
                return row.id
            tid = new_id("tok")
            c.execute(
                tokens.insert().values(
                    id=tid,
                    sha256=digest,
                    name=name,
                    client=client or tid,
                    scopes=sorted(scopes),
                    created_at=time.time(),
                    expires_at=expires_at,
                )
            )
            return tid

    def replace_bootstrap_token(self, raw: str, name: str, previous_names: Iterable[str], client: str) -> str:
        """Register the admin bootstrap token and revoke every earlier one (tokens named in
        ``previous_names`` with another digest): rotating CVPO_API_TOKEN must not leave the old one valid."""
        digest = hash_token(raw)
        with self.tx() as c:
            c.execute(tokens.delete().where(tokens.c.name.in_(list(previous_names)), tokens.c.sha256 != digest))
        return self.ensure_token(raw, name, ["admin"], client=client)

    def create_token(
        self, name: str, scopes: Iterable[str], client: str | None = None, expires_at: float | None = None
    ) -> tuple[str, str]:
        """A new random token; ``client`` defaults to the token's own id (a client of its own).
        ``expires_at`` (epoch seconds, in the future) makes it stop working then, like a revoked one."""
        if expires_at is not None and not (math.isfinite(expires_at) and expires_at > time.time()):
            raise ValueError("the expiry must be a finite time in the future")
        scopes = list(scopes)
        unknown = {s for s in scopes if not valid_scope(s)}
        if unknown or not scopes:
            raise ValueError(
                f"unknown or no scopes {sorted(unknown)}; valid: {list(SCOPES)} and alias:<name> "
                "(an alias name: lowercase letters, digits, '.', '_' and '-', 1 to 63, starting with a letter or digit)"
            )
        if client is not None and not client.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"client {client!r}: use letters, digits, '-' and '_'")
        # PostgreSQL enforces VARCHAR lengths (SQLite does not): too long is a clear error, not a DataError.
        for what, value, column in (("name", name, tokens.c.name), ("client", client, tokens.c.client)):
            if value is not None and not 0 < len(value) <= column.type.length:
                raise ValueError(f"the {what} must be 1 to {column.type.length} characters")
        raw = secrets.token_urlsafe(32)
        return self.ensure_token(raw, name, scopes, client, expires_at), raw

    def list_tokens(self) -> list[dict[str, Any]]:
        with self._read() as c:
            rows = c.execute(sa.select(tokens).order_by(tokens.c.created_at)).all()
        now = time.time()
        return [
            {
                "id": r.id,
                "name": r.name,
                "client": r.client,
                "scopes": r.scopes,
                "created_at": rfc3339(r.created_at),
                "expires_at": rfc3339(r.expires_at),
                "expired": r.expires_at is not None and r.expires_at <= now,
            }
            for r in rows
        ]

    def revoke_token(self, token_id: str) -> bool:
        with self.tx() as c:
            return c.execute(tokens.delete().where(tokens.c.id == token_id)).rowcount == 1

    def lookup_token(self, digest: str) -> Principal | None:
        with self._read() as c:
            # An expired token is no principal, exactly like a revoked one (issue #23 item 9). The API's
            # token cache (api/auth.py) may keep an earlier hit for its short TTL past the expiry.
            unexpired = sa.or_(tokens.c.expires_at.is_(None), tokens.c.expires_at > time.time())
            row = c.execute(sa.select(tokens).where(tokens.c.sha256 == digest, unexpired)).first()
        return Principal(row.client, frozenset(row.scopes), row.id, row.name) if row else None
