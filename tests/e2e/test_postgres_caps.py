"""The store's check-then-insert writes under real concurrency, on SQLite and PostgreSQL (issue #23 item 14).

On PostgreSQL (READ COMMITTED) two transactions that count rows and then insert both pass the count
unless the store serialises them (``core.store._serialize``); these tests start many threads, each
with its own store (its own connections, as separate API processes have), release them together and
check that every cap and every key still holds. Without the advisory locks, the upserts and the schema
lock they fail on PostgreSQL: more jobs than the cap, IntegrityErrors on a replayed key, a token or
a key-value row, and CREATE TABLE collisions of stores starting together.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from core import store as store_module
from core.store import CapExceededError, Store, jobs, tokens

pytestmark = pytest.mark.both_backends

THREADS = 12
ROUNDS = 2
SPEC = {"env_id": "SafetyPointCircle1-v0", "total_env_steps": 1000}


def together(n: int, setup: Callable[[int], Any], action: Callable[[int, Any], Any]) -> list[Any]:
    """``setup(i)`` in each of n threads, then ``action(i, setup's value)`` in all of them at once;
    returns each thread's result or exception."""
    barrier = threading.Barrier(n, timeout=60)

    def run(i: int) -> Any:
        state = setup(i)
        barrier.wait()
        try:
            return action(i, state)
        except Exception as exc:  # the caller counts outcomes
            return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def submit(store: Store, client: str, **kw: Any) -> Any:
    job, replayed = store.create_job(
        client=client, spec=SPEC, config={}, max_attempts=1, time_limit_s=60, labels={}, **kw
    )
    return job.id, replayed


def test_the_per_client_active_job_cap_holds_under_concurrent_submissions(database_url: str, tmp_path: Path) -> None:
    Store(database_url, tmp_path)  # the schema, before the threads race on anything else
    for round_ in range(ROUNDS):
        client = f"client-{round_}"
        results = together(
            THREADS,
            lambda _i: Store(database_url, tmp_path),
            lambda _i, store, client=client: submit(store, client, max_active_per_client=3),
        )
        accepted = [r for r in results if isinstance(r, tuple)]
        refused = [r for r in results if isinstance(r, CapExceededError)]
        assert len(accepted) == 3 and len(refused) == THREADS - 3, results
        assert all(r.status == 429 for r in refused)
        with Store(database_url, tmp_path).engine.connect() as c:
            active = c.execute(sa.select(sa.func.count()).where(jobs.c.client == client)).scalar_one()
        assert active == 3


def test_the_queued_job_cap_holds_across_clients(database_url: str, tmp_path: Path) -> None:
    Store(database_url, tmp_path)
    results = together(
        THREADS,
        lambda _i: Store(database_url, tmp_path),
        lambda i, store: submit(store, f"c{i}", max_queued=4),
    )
    assert sum(isinstance(r, tuple) for r in results) == 4, results
    assert all(r.status == 503 for r in results if isinstance(r, CapExceededError))
    assert Store(database_url, tmp_path).jobs_by_status()["queued"] == 4


def test_one_idempotency_key_sent_at_once_creates_one_job(database_url: str, tmp_path: Path) -> None:
    Store(database_url, tmp_path)
    results = together(
        THREADS,
        lambda _i: Store(database_url, tmp_path),
        lambda _i, store: submit(store, "retrier", idempotency_key="k-1", body_sha256="0" * 64),
    )
    assert all(isinstance(r, tuple) for r in results), results
    assert len({job_id for job_id, _ in results}) == 1
    assert sorted(replayed for _, replayed in results) == [False] + [True] * (THREADS - 1)


def test_one_token_registered_at_once_is_one_row(database_url: str, tmp_path: Path) -> None:
    """API processes starting together all register CVPO_API_TOKEN."""
    Store(database_url, tmp_path)
    results = together(
        THREADS,
        lambda _i: Store(database_url, tmp_path),
        lambda _i, store: store.ensure_token("the-admin-token", "bootstrap", ["admin"], client="admin"),
    )
    assert all(isinstance(r, str) for r in results) and len(set(results)) == 1, results
    with Store(database_url, tmp_path).engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(tokens)).scalar_one() == 1


def test_upserts_of_a_new_key_at_once_do_not_collide(database_url: str, tmp_path: Path) -> None:
    """Reconcilers of several API processes record the broker's run id; a worker re-registers."""
    Store(database_url, tmp_path)

    def upsert(i: int, store: Store) -> None:
        store.set_kv("broker_run_id", f"run-{i}")
        store.register_worker("host:1", "q", {"cuda": False, "n": i})

    results = together(THREADS, lambda _i: Store(database_url, tmp_path), upsert)
    assert results == [None] * THREADS, results
    store = Store(database_url, tmp_path)
    assert store.get_kv("broker_run_id").startswith("run-")
    (worker,) = store.live_workers("q", 60)
    assert worker["id"] == "host:1" and worker["capabilities"]["cuda"] is False


def test_stores_starting_together_on_an_empty_database_create_the_schema_once(
    database_url: str, tmp_path: Path
) -> None:
    results = together(THREADS, lambda _i: None, lambda _i, _s: Store(database_url, tmp_path))
    assert all(isinstance(r, Store) for r in results), [r for r in results if not isinstance(r, Store)]
    assert results[0].list_jobs(client=None) == ([], None)


def test_what_postgresql_enforces_is_a_clear_error_on_both(database_url: str, tmp_path: Path) -> None:
    """PostgreSQL enforces VARCHAR lengths and 32-bit INTEGER, SQLite neither: the store checks token
    names itself and keeps 64-bit cursors, so both backends answer alike."""
    store = Store(database_url, tmp_path)
    with pytest.raises(ValueError, match="name must be 1 to 200"):
        store.create_token("n" * 201, ["jobs:read"])
    assert store.create_token("n" * 200, ["jobs:read"])[0]
    job_id, _ = submit(store, "c")
    assert store.events_after(job_id, 2**63 - 1) == []
    assert store.list_jobs(client="c", page_token=store_module._encode_cursor(2**63 - 1))[0][0].id == job_id
    # PostgreSQL's json refuses NaN: a non-finite number in a JSON column is stored as null there.
    store.set_kv("x", {"v": [float("nan"), 1.0], "w": float("-inf")})
    got = store.get_kv("x")
    if store.engine.dialect.name == "postgresql":
        assert got == {"v": [None, 1.0], "w": None}
    else:
        assert math.isnan(got["v"][0]) and got["w"] == float("-inf")


def test_a_nul_in_an_id_or_filter_finds_nothing_on_both(api: Any) -> None:
    """PostgreSQL text cannot hold NUL: a lookup with one was a DataError (500) there, 404/empty on SQLite."""
    from tests.e2e.test_jobs_api import MINIMAL, post_job

    job_id = post_job(api, MINIMAL).json()["id"]
    for path in ("/jobs/job_%00", f"/jobs/{job_id}%00", "/policies/pol_%00", "/jobs/job_%00/metrics"):
        assert api.get(path).status_code == 404, path
    assert api.get("/jobs", params={"env_id": "Safety\x00"}).json()["items"] == []
    assert api.get("/policies", params={"job_id": "job_\x00"}).json()["items"] == []
    assert api.get("/jobs").json()["items"][0]["id"] == job_id
