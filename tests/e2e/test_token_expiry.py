"""Optional expiry of API tokens (issue #23 item 9): ``cvpo tokens create --expires-in``, the store refuses
an expired token like a revoked one (401), and a store made before the column existed keeps working."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from core.store import Store, hash_token, tokens
from tests.conftest import ROOT, Service, wait_until


def cvpo_tokens(service: Service, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "tokens", *args],
        env=service.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def expire_now(store: Store, token_id: str) -> None:
    """Move a token's expiry into the past: what waiting for it would do, without the wait."""
    with store.tx() as c:
        c.execute(tokens.update().where(tokens.c.id == token_id).values(expires_at=time.time() - 1))


def test_cli_token_with_expiry_works_until_it_expires_then_is_a_401(api: Any, service: Service) -> None:
    made = cvpo_tokens(service, "create", "--name", "temp", "--scopes", "jobs:read", "--expires-in", "1h")
    assert made.returncode == 0, made.stderr
    token_id, raw = made.stdout.split()
    assert "expires" in made.stderr
    store = service.store()
    listed = {t["id"]: t for t in store.list_tokens()}[token_id]
    assert listed["expires_at"] is not None and listed["expired"] is False
    headers = {"Authorization": f"Bearer {raw}"}
    assert api.get("/jobs", headers=headers).status_code == 200

    expire_now(store, token_id)
    assert store.lookup_token(hash_token(raw)) is None, "the store returns no principal for an expired token"
    # The API's token cache keeps a hit for a few seconds (api/auth.py); then the token is a 401.
    resp = wait_until(
        lambda: (r := api.get("/jobs", headers=headers)).status_code == 401 and r, 30, "the expired token's 401"
    )
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.headers["www-authenticate"].startswith("Bearer")
    listing = cvpo_tokens(service, "list")
    assert listing.returncode == 0 and any(token_id in ln and "expired" in ln for ln in listing.stdout.splitlines())


def test_expired_token_is_refused_on_first_use_and_tokens_without_expiry_never_expire(
    api: Any, service: Service
) -> None:
    store = service.store()
    token_id, raw = store.create_token("short", ["jobs:read"], expires_at=time.time() + 3600)
    _, forever = store.create_token("forever", ["jobs:read"])
    expire_now(store, token_id)
    assert api.get("/jobs", headers={"Authorization": f"Bearer {raw}"}).status_code == 401
    assert api.get("/jobs", headers={"Authorization": f"Bearer {forever}"}).status_code == 200
    assert {t["name"]: t["expires_at"] for t in store.list_tokens()}["forever"] is None


def test_bad_expiry_is_refused_by_the_cli_and_the_store(service: Service) -> None:
    for bad in ("0", "-5m", "soon", "nan", "inf", "40000d"):
        out = cvpo_tokens(service, "create", "--name", "x", "--scopes", "jobs:read", "--expires-in", bad)
        assert out.returncode == 2 and "--expires-in" in out.stderr, (bad, out.stderr)
    store = service.store()
    for when in (time.time() - 10, float("nan"), float("inf")):
        try:
            store.create_token("x", ["jobs:read"], expires_at=when)
        except ValueError as exc:
            assert "future" in str(exc)
        else:
            raise AssertionError(f"expires_at={when} was accepted")


def test_a_store_made_before_token_expiry_gains_the_column_and_keeps_its_tokens(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:  # the tokens table as earlier versions created it
        conn.execute(
            "CREATE TABLE tokens (id VARCHAR(40) NOT NULL PRIMARY KEY, sha256 VARCHAR(64) NOT NULL UNIQUE, "
            "name VARCHAR(200) NOT NULL, client VARCHAR(64) NOT NULL, scopes JSON NOT NULL, created_at FLOAT NOT NULL)"
        )
        conn.execute(
            "INSERT INTO tokens VALUES ('tok_old', ?, 'old', 'c1', '[\"jobs:read\"]', ?)",
            (hash_token("old-secret"), time.time()),
        )
    store = Store(f"sqlite:///{db}", tmp_path)
    assert "tokens.expires_at" in store.migrated
    principal = store.lookup_token(hash_token("old-secret"))
    assert principal is not None and principal.client == "c1"
    with store._read() as c:
        assert c.execute(sa.select(tokens.c.expires_at).where(tokens.c.id == "tok_old")).scalar_one() is None
