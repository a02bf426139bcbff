"""Jobs outside their lease: submission (caps and ``Idempotency-Key`` replay, decided under one lock; the
outbox row), reads and cursor-paged lists, deletion, a queued job's place in line, and the reconciler's
reads. Status changes are core/store/state_machine.py's."""

from __future__ import annotations

import shutil
import time
from typing import Any

import sqlalchemy as sa

from core.store.base import StoreBase
from core.store.history import _event
from core.store.records import (
    ACTIVE,
    LEASED,
    STATUSES,
    TERMINAL,
    CapExceededError,
    ConflictError,
    IdempotencyMismatchError,
    JobRecord,
    _find_job,
    _job,
    new_id,
)
from core.store.schema import LOCK_CREATE_JOB, _serialize, checkpoints, events, idempotency, jobs, metric_points

IDEMPOTENCY_TTL_S = 24 * 3600


class SubmissionMixin(StoreBase):
    """Creating, reading, listing and deleting jobs."""

    def create_job(
        self,
        *,
        client: str,
        spec: dict[str, Any],
        config: dict[str, Any],
        max_attempts: int,
        time_limit_s: float,
        labels: dict[str, str],
        idempotency_key: str | None = None,
        body_sha256: str | None = None,
        max_active_per_client: int = 8,
        max_queued: int = 256,
    ) -> tuple[JobRecord, bool]:
        """Insert a queued job (outbox: ``enqueued_at`` stays null until sent). Returns (job, replayed)."""
        now = time.time()
        with self.tx() as c:
            # The key lookup and both cap counts decide the insert: concurrent submissions take turns.
            _serialize(c, LOCK_CREATE_JOB)
            if idempotency_key is not None:
                c.execute(idempotency.delete().where(idempotency.c.created_at < now - IDEMPOTENCY_TTL_S))
                prior = c.execute(
                    sa.select(idempotency).where(idempotency.c.client == client, idempotency.c.key == idempotency_key)
                ).first()
                if prior is not None:
                    if prior.body_sha256 != body_sha256:
                        raise IdempotencyMismatchError(
                            f"Idempotency-Key {idempotency_key!r} was used with a different body"
                        )
                    row = c.execute(sa.select(jobs).where(jobs.c.id == prior.job_id)).first()
                    if row is not None:
                        return _job(row), True
            active = c.execute(
                sa.select(sa.func.count()).where(jobs.c.client == client, jobs.c.status.in_(ACTIVE))
            ).scalar_one()
            if active >= max_active_per_client:
                raise CapExceededError(f"client has {active} unfinished jobs (cap {max_active_per_client})", 429, 30)
            queued = c.execute(sa.select(sa.func.count()).where(jobs.c.status == "queued")).scalar_one()
            if queued >= max_queued:
                raise CapExceededError(f"{queued} jobs are queued (cap {max_queued}); try later", 503, 30)
            job_id = new_id("job")
            run_dir = self.data_dir / "jobs" / job_id
            c.execute(
                jobs.insert().values(
                    id=job_id,
                    client=client,
                    status="queued",
                    attempt=1,
                    max_attempts=max_attempts,
                    env_id=spec["env_id"],
                    spec=spec,
                    config=config,
                    labels=labels,
                    time_limit_s=time_limit_s,
                    created_at=now,
                    updated_at=now,
                    cancel_requested=False,
                    requeue_requested=False,
                    total_env_steps=int(spec["total_env_steps"]),
                    env_step=0,
                    epoch=0,
                    run_dir=str(run_dir),
                    event_seq=0,
                )
            )
            _event(c, job_id, "status", {"status": "queued", "attempt": 1})
            if idempotency_key is not None:
                c.execute(
                    idempotency.insert().values(
                        client=client, key=idempotency_key, body_sha256=body_sha256, job_id=job_id, created_at=now
                    )
                )
            return _job(c.execute(sa.select(jobs).where(jobs.c.id == job_id)).one()), False

    def idempotent_job_id(self, client: str, key: str) -> str | None:
        """The job an unexpired ``Idempotency-Key`` of this client created, if any (its replay answers it)."""
        with self._read() as c:
            return c.execute(
                sa.select(idempotency.c.job_id).where(
                    idempotency.c.client == client,
                    idempotency.c.key == key,
                    idempotency.c.created_at >= time.time() - IDEMPOTENCY_TTL_S,
                )
            ).scalar_one_or_none()

    def get_job(self, job_id: str, client: str | None = None) -> JobRecord:
        """The job, or NotFoundError (also for another client's job: no existence leak)."""
        with self._read() as c:
            return _job(_find_job(c, job_id, client))

    def list_jobs(
        self,
        *,
        client: str | None,
        status: str | None = None,
        env_id: str | None = None,
        page_size: int = 50,
        page_token: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """Newest first, cursor-paged."""
        return self._page(jobs, _job, {"client": client, "status": status, "env_id": env_id}, page_size, page_token)

    def jobs_by_status(self) -> dict[str, int]:
        with self._read() as c:
            rows = c.execute(sa.select(jobs.c.status, sa.func.count()).group_by(jobs.c.status)).all()
        counts = dict.fromkeys(STATUSES, 0)
        counts.update({r[0]: r[1] for r in rows})
        return counts

    def oldest_heartbeat_age(self) -> float | None:
        """``now - min(lease_until)`` over live jobs (add the TTL for the age of the stalest renewal)."""
        with self._read() as c:
            row = c.execute(
                sa.select(sa.func.min(jobs.c.lease_until)).where(jobs.c.status.in_(LEASED))
            ).scalar_one_or_none()
        return None if row is None else time.time() - row

    def delete_job(self, job_id: str, client: str | None) -> None:
        with self.tx() as c:
            row = _find_job(c, job_id, client, lock=True)
            if row.status not in TERMINAL:
                raise ConflictError(f"job {job_id} is {row.status}; cancel it first")
            for table in (metric_points, checkpoints, events):
                c.execute(table.delete().where(table.c.job_id == job_id))
            c.execute(jobs.delete().where(jobs.c.id == job_id))
        # Policies promoted from it live on in their own directories; the run directory goes.
        shutil.rmtree(row.run_dir, ignore_errors=True)

    def queue_position(self, job: JobRecord) -> dict[str, int] | None:
        """Where a queued job stands: jobs are taken in the order they were handed to the broker
        (``enqueued_at``), those still in the outbox after them by creation. None unless queued."""
        if job.status != "queued":
            return None
        queued = jobs.c.status == "queued"
        if job.enqueued_at is None:
            before = sa.or_(jobs.c.enqueued_at.is_not(None), jobs.c.seq < job.seq)
        else:
            before = sa.and_(
                jobs.c.enqueued_at.is_not(None),
                sa.or_(
                    jobs.c.enqueued_at < job.enqueued_at,
                    sa.and_(jobs.c.enqueued_at == job.enqueued_at, jobs.c.seq < job.seq),
                ),
            )
        with self._read() as c:
            ahead = c.execute(sa.select(sa.func.count()).where(queued, before, jobs.c.id != job.id)).scalar_one()
            running = c.execute(sa.select(sa.func.count()).where(jobs.c.status.in_(LEASED))).scalar_one()
        return {"position": ahead + 1, "ahead": ahead, "running": running}

    # ------------------------------------------------------------------ reconciler queries

    def expired_leases(self, now: float) -> list[JobRecord]:
        with self._read() as c:
            rows = c.execute(sa.select(jobs).where(jobs.c.status.in_(LEASED), jobs.c.lease_until < now)).all()
        return [_job(r) for r in rows]

    def unsent(self, created_before: float) -> list[JobRecord]:
        """Queued jobs whose message was never handed to the broker (the outbox)."""
        with self._read() as c:
            rows = c.execute(
                sa.select(jobs).where(
                    jobs.c.status == "queued", jobs.c.enqueued_at.is_(None), jobs.c.updated_at <= created_before
                )
            ).all()
        return [_job(r) for r in rows]

    def queued_jobs(self) -> list[JobRecord]:
        with self._read() as c:
            rows = c.execute(sa.select(jobs).where(jobs.c.status == "queued")).all()
        return [_job(r) for r in rows]
