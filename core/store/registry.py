"""Who runs jobs, and the service's small shared state: the worker registry (issue #23 items 12 and 13:
live workers per queue and what they can run) and the ``kv`` table (e.g. the broker run id the reconciler last saw)."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from core.store.base import StoreBase
from core.store.records import rfc3339
from core.store.schema import _upsert, kv, workers

WORKERS_KEPT_S = 7 * 24 * 3600  # worker records unseen this long are dropped


class RegistryMixin(StoreBase):
    """Worker records and key-value pairs."""

    def register_worker(self, worker_id: str, queue: str, capabilities: dict[str, Any]) -> None:
        """Announce a worker and what it can run (``{"cuda": bool, ...}``), so the API can refuse a job no
        live worker could run and tell a queued job whether anyone is there to take it. An upsert:
        a restarted worker with the same id is live again. Records unseen for a week are dropped."""
        now = time.time()
        values = {"queue": queue, "capabilities": capabilities, "seen_at": now, "stopped_at": None}
        with self.tx() as c:
            c.execute(workers.delete().where(workers.c.seen_at < now - WORKERS_KEPT_S))
            _upsert(c, workers, {"id": worker_id, "started_at": now, **values}, values)

    def worker_seen(self, worker_id: str) -> bool:
        """Renew a live worker's ``seen_at``; False when it has no record (dropped): register again."""
        with self.tx() as c:
            return (
                c.execute(
                    workers.update()
                    .where(workers.c.id == worker_id, workers.c.stopped_at.is_(None))
                    .values(seen_at=time.time())
                ).rowcount
                == 1
            )

    def worker_stopped(self, worker_id: str) -> None:
        """A graceful stop: the worker is no longer live at once (a killed one ages out instead)."""
        now = time.time()
        with self.tx() as c:
            c.execute(workers.update().where(workers.c.id == worker_id).values(seen_at=now, stopped_at=now))

    def get_worker(self, worker_id: str) -> dict[str, Any] | None:
        with self._read() as c:
            row = c.execute(sa.select(workers).where(workers.c.id == worker_id)).first()
        return dict(row._mapping) if row else None

    def live_workers(self, queue: str, stale_after_s: float, now: float | None = None) -> list[dict[str, Any]]:
        """Workers consuming ``queue`` that renewed their record within ``stale_after_s`` and did not stop."""
        now = time.time() if now is None else now
        with self._read() as c:
            rows = c.execute(
                sa.select(workers).where(
                    workers.c.queue == queue, workers.c.stopped_at.is_(None), workers.c.seen_at >= now - stale_after_s
                )
            ).all()
        return [dict(r._mapping) for r in rows]

    def worker_summary(self, queue: str, stale_after_s: float, now: float | None = None) -> dict[str, Any]:
        """Who is there to run ``queue``'s jobs: live workers, how many have CUDA, when any worker was last
        seen and, when none is live, for how long (None: a live one, or none ever registered). Cheap
        enough for a probe: ``/readyz`` may show it next to ``GET /jobs/{id}``'s ``queue`` block."""
        now = time.time() if now is None else now
        with self._read() as c:
            rows = c.execute(sa.select(workers).where(workers.c.queue == queue)).all()
        live = [r for r in rows if r.stopped_at is None and r.seen_at >= now - stale_after_s]
        last_seen = max((r.seen_at for r in rows), default=None)
        return {
            "queue": queue,
            "workers": len(live),
            "cuda_workers": sum(1 for r in live if (r.capabilities or {}).get("cuda")),
            "workers_seen_at": rfc3339(last_seen),
            "no_worker_for_s": None if live or last_seen is None else round(max(now - last_seen, 0.0), 3),
            "ever_seen": last_seen is not None,
        }

    def get_kv(self, key: str) -> Any:
        with self._read() as c:
            return c.execute(sa.select(kv.c.value).where(kv.c.key == key)).scalar_one_or_none()

    def set_kv(self, key: str, value: Any) -> None:
        with self.tx() as c:  # API processes' reconcilers may write the same key at once
            _upsert(c, kv, {"key": key, "value": value}, {"value": value})
