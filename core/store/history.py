"""A job's history: its event stream (status changes, logs, metrics, progress, checkpoints; what
``GET /jobs/{id}/events`` and the SSE stream read) and its per-epoch metric points. ``_event`` is the
one writer of events, called inside the transaction of the change it reports."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from core.store.base import StoreBase
from core.store.records import rfc3339
from core.store.schema import events, jobs, metric_points

EVENTS_KEPT = 10_000


def _event(c: Connection, job_id: str, type_: str, data: dict[str, Any]) -> int:
    """Append an event to the job's stream (its next ``event_seq``), keeping the last ``EVENTS_KEPT``."""
    seq = c.execute(
        jobs.update().where(jobs.c.id == job_id).values(event_seq=jobs.c.event_seq + 1).returning(jobs.c.event_seq)
    ).scalar_one()
    c.execute(events.insert().values(job_id=job_id, seq=seq, type=type_, data=data, time=time.time()))
    if seq % 1000 == 0:
        c.execute(events.delete().where(events.c.job_id == job_id, events.c.seq <= seq - EVENTS_KEPT))
    return seq


class HistoryMixin(StoreBase):
    """Logs, the event stream and the metric history of a job."""

    def log(self, job_id: str, message: str, level: str = "info") -> None:
        with self.tx() as c:
            _event(c, job_id, "log", {"level": level, "message": message})

    def events_after(
        self, job_id: str, after_seq: int, limit: int = 500, types: Iterable[str] | None = None
    ) -> list[dict]:
        q = sa.select(events).where(events.c.job_id == job_id, events.c.seq > after_seq)
        if types:
            q = q.where(events.c.type.in_(list(types)))
        with self._read() as c:
            rows = c.execute(q.order_by(events.c.seq).limit(limit)).all()
        return [{"seq": r.seq, "type": r.type, "data": r.data, "time": rfc3339(r.time)} for r in rows]

    def metric_history(self, job_id: str, after_step: int | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        q = sa.select(metric_points).where(metric_points.c.job_id == job_id)
        if after_step is not None:
            q = q.where(metric_points.c.env_step > after_step)
        with self._read() as c:
            rows = c.execute(q.order_by(metric_points.c.epoch).limit(limit)).all()
        return [
            {
                "env_step": r.env_step,
                "epoch": r.epoch,
                "attempt": r.attempt,
                "time": rfc3339(r.time),
                "values": r.values,
            }
            for r in rows
        ]
