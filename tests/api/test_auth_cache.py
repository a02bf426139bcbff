"""Token lookups and reads under load (issue #23 item 3): reads never queue behind a writer, unknown
tokens are cached too, and cache misses are resolved off the event loop."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

from core.store import Store, hash_token
from tests.conftest import RedisServer, Service

BEARER_WRONG = {"Authorization": "Bearer not-a-valid-token"}


def _in_thread(fn, timeout_s: float) -> tuple[bool, object]:
    """Run ``fn`` in a thread; (finished within timeout_s, its result)."""
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(timeout_s)
    return (not t.is_alive(), out[0] if out else None)


def test_reads_do_not_wait_for_a_writer_holding_the_lock(tmp_path: Path) -> None:
    """While another connection (the worker writing an epoch) holds SQLite's write lock, token lookups,
    job reads and the store's ping answer at once. With ``BEGIN IMMEDIATE`` on every read they waited
    for the lock (up to the 30 s busy timeout), on the API's event loop for /act's token lookups."""
    store = Store(f"sqlite:///{tmp_path / 'cvpo.db'}", tmp_path)
    store.ensure_token("a-token", "t", ["admin"], client="admin")
    writer = sqlite3.connect(tmp_path / "cvpo.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        done, principal = _in_thread(lambda: store.lookup_token(hash_token("a-token")), 10)
        assert done, "a token lookup waited for the writer's lock"
        assert principal is not None and principal.client == "admin"
        assert _in_thread(lambda: store.lookup_token(hash_token("nope")), 10) == (True, None)
        assert _in_thread(store.ping, 10) == (True, True)
        assert _in_thread(store.jobs_by_status, 10)[0]
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    # Writes still take the lock up front and work as before.
    assert store.revoke_token(store.list_tokens()[0]["id"])
    assert store.lookup_token(hash_token("a-token")) is None
    store.engine.dispose()


def _spy_lookups(store: Store) -> list[bool]:
    """Replace ``store.lookup_token`` by a wrapper recording, per call, whether it ran on an event loop."""
    calls: list[bool] = []
    real = store.lookup_token

    def spy(digest: str) -> object:
        try:
            asyncio.get_running_loop()
            calls.append(True)
        except RuntimeError:
            calls.append(False)
        return real(digest)

    store.lookup_token = spy  # type: ignore[method-assign]
    return calls


def test_unknown_tokens_are_cached_and_looked_up_off_the_event_loop(tmp_path: Path) -> None:
    """A flood repeating an invalid token costs one database lookup, not one per request, and that
    lookup runs on a thread, never on the event loop that serves /act. Before, only hits were cached
    and /act looked every miss up inline on the loop."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from core.settings import Settings

    settings = Settings(
        data_dir=tmp_path / "data", redis_url="redis://127.0.0.1:9/0", api_token="admin-token", reconcile_every_s=0
    )
    with TestClient(create_app(settings)) as client:
        calls = _spy_lookups(client.app.state.store)
        for _ in range(5):
            r = client.post("/policies/pol_x/act", json={"observations": [[0.0]]}, headers=BEARER_WRONG)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
            assert r.headers["content-type"] == "application/problem+json"
        assert calls == [False], calls
        calls.clear()
        for _ in range(5):
            assert client.get("/jobs", headers={"Authorization": "Bearer another-wrong"}).status_code == 401
        assert calls == [False], calls
        calls.clear()
        for _ in range(3):  # the admin token: looked up once, then a hit
            assert client.get("/jobs", headers={"Authorization": "Bearer admin-token"}).status_code == 200
        assert calls == [False], calls


def test_the_unknown_token_cache_is_bounded(tmp_path: Path) -> None:
    """Random tokens cannot grow memory: past ``max_unknown`` the oldest unknown digests are dropped,
    and known tokens stay cached."""
    from api.auth import TokenCache

    store = Store(f"sqlite:///{tmp_path / 'cvpo.db'}", tmp_path)
    store.ensure_token("good", "t", ["admin"], client="admin")
    cache = TokenCache(store, max_unknown=50)
    assert cache.resolve("good") is not None
    for i in range(500):
        assert cache.resolve(f"random-{i}") is None
    unknown = [d for d, (p, _) in cache._cache.items() if p is None]
    assert len(unknown) == 50 and hash_token("random-499") in unknown
    assert cache.cached(hash_token("good"))[0]
    store.engine.dispose()


def test_readyz_is_cached_and_probes_share_one_redis_connection(service: Service, redis_server: RedisServer) -> None:
    """Thirty /readyz calls check the store and the broker about once a second, over one pooled Redis
    connection. Before, each call pinged SQLite and opened a new Redis connection."""
    import redis
    from fastapi.testclient import TestClient

    from api.app import create_app

    probe = redis.Redis.from_url(redis_server.url)
    with TestClient(create_app(service.settings)) as client:
        store = client.app.state.store
        pings: list[float] = []
        real_ping = store.ping

        def spy() -> bool:
            pings.append(time.monotonic())
            return real_ping()

        store.ping = spy  # type: ignore[method-assign]
        before = probe.info("stats")["total_connections_received"]
        t0 = time.monotonic()
        for _ in range(30):
            r = client.get("/readyz")
            body = r.json()
            assert r.status_code == 200 and (body["status"], body["store"], body["broker"]) == ("ready", True, True)
        elapsed = time.monotonic() - t0
        opened = probe.info("stats")["total_connections_received"] - before  # ``probe`` reuses its own
        assert len(pings) <= elapsed / 1.0 + 2, (len(pings), elapsed)
        assert opened <= 1, opened
    probe.close()


def test_readyz_says_when_no_worker_has_been_seen(service: Service) -> None:
    """Issue #23 item 12: /readyz reports the queue's workers; with none it stays ready (it serves /act)
    and says none was ever seen; a registered worker shows up once the cached answer expires."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app(service.settings)) as client:
        body = client.get("/readyz").json()
        assert body["status"] == "ready" and body["workers"]["workers"] == 0
        assert body["workers"]["ever_seen"] is False and body["workers"]["queue"] == service.settings.queue
        client.app.state.store.register_worker("host:1:2", service.settings.queue, {"cpu": True, "cuda": False})
        time.sleep(1.1)  # past the probe's 1 s cache
        workers = client.get("/readyz").json()["workers"]
        assert workers["workers"] == 1 and workers["no_worker_for_s"] is None and workers["cuda_workers"] == 0
