"""Token lookups and reads under load (issue #23 item 3): reads never queue behind a writer, unknown
tokens are cached too, and cache misses are resolved off the event loop."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from core.store import Store, hash_token


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
