"""The job state machine and its fencing: the heart of the store's reliability design (service-design.md
§1.5 and §3.3).

Every status change is a compare-and-set on ``(status, attempt)`` through ``_transition``, allowed only if
it is in ``TRANSITIONS``. A worker runs one attempt under a lease: ``claim`` takes it (queued → starting
for exactly that attempt, so a duplicate broker message fails there), ``heartbeat`` renews
``lease_until``, and every worker write (``begin_attempt``, ``record_epoch``, ``register_checkpoint``,
``retire_checkpoints``, ``record_disk_usage``, ``finish``) carries the attempt and the lease owner and
matches ``_owned_by`` (this attempt, this owner, a leased status) or writes nothing. When a lease runs
out the reconciler's ``requeue_lost`` puts the job back with ``attempt + 1``, so the lost worker's late
writes match no row and it stops. ``_owned`` also locks the row on PostgreSQL (SQLite: ``BEGIN
IMMEDIATE``) so a requeue or a cancel cannot land between the check and the write.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from core.store.base import StoreBase
from core.store.history import _event
from core.store.records import (
    LEASED,
    TERMINAL,
    CheckpointRecord,
    ConflictError,
    JobRecord,
    _checkpoint,
    _find_job,
    _job,
    new_id,
)
from core.store.schema import checkpoints, jobs, metric_points, policies
from cvpo.metrics import summary

# The job state machine (service-design.md §1.5): the only moves ``transition`` performs.
TRANSITIONS: frozenset[tuple[str, str]] = frozenset(
    {
        ("queued", "starting"),
        ("queued", "cancelled"),
        ("starting", "running"),
        ("starting", "queued"),
        ("running", "queued"),
        ("starting", "failed"),
        ("running", "failed"),
        ("running", "succeeded"),
        ("starting", "cancelling"),
        ("running", "cancelling"),
        ("cancelling", "cancelled"),
        ("cancelling", "succeeded"),
        ("cancelling", "failed"),
    }
)


def _owned_by(job_id: str, attempt: int, owner: str) -> Any:
    """The fencing condition of every worker write: this attempt, this lease owner, still live."""
    return sa.and_(
        jobs.c.id == job_id, jobs.c.attempt == attempt, jobs.c.lease_owner == owner, jobs.c.status.in_(LEASED)
    )


class StateMachineMixin(StoreBase):
    """Status changes, the lease, and every write a worker makes under it."""

    # ------------------------------------------------------------------ moves (compare-and-set on status and attempt)

    def _transition(
        self,
        c: Connection,
        job_id: str,
        from_statuses: Iterable[str],
        to: str,
        *,
        attempt: int | None = None,
        owner: str | None = None,
        values: dict[str, Any] | None = None,
        event: dict[str, Any] | None = None,
    ) -> bool:
        froms = [s for s in from_statuses if (s, to) in TRANSITIONS]
        if not froms:
            raise ValueError(f"no transition to {to!r} from {list(from_statuses)}")
        now = time.time()
        vals = {"status": to, "updated_at": now, **(values or {})}
        if to in TERMINAL:
            vals.setdefault("finished_at", now)
            vals.setdefault("lease_owner", None)
            vals.setdefault("lease_until", None)
        q = jobs.update().where(jobs.c.id == job_id, jobs.c.status.in_(froms))
        if attempt is not None:
            q = q.where(jobs.c.attempt == attempt)
        if owner is not None:
            q = q.where(jobs.c.lease_owner == owner)
        if c.execute(q.values(**vals)).rowcount != 1:
            return False
        _event(c, job_id, "status", {"status": to, **(event or {})})
        return True

    def transition(self, job_id: str, from_statuses: Iterable[str], to: str, **kw: Any) -> bool:
        with self.tx() as c:
            return self._transition(c, job_id, list(from_statuses), to, **kw)

    def mark_enqueued(self, job_id: str, attempt: int) -> None:
        with self.tx() as c:
            c.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.attempt == attempt, jobs.c.status == "queued")
                .values(enqueued_at=time.time())
            )

    # ------------------------------------------------------------------ the lease and the worker's fenced writes

    def claim(self, job_id: str, attempt: int, owner: str, ttl_s: float) -> bool:
        """queued → starting for exactly this attempt; every duplicate message fails here (§3.3)."""
        now = time.time()
        with self.tx() as c:
            return self._transition(
                c,
                job_id,
                ["queued"],
                "starting",
                attempt=attempt,
                values={
                    "lease_owner": owner,
                    "lease_until": now + ttl_s,
                    "started_at": now,
                    "requeue_requested": False,
                },
                event={"attempt": attempt, "worker": owner},
            )

    def heartbeat(
        self, job_id: str, attempt: int, owner: str, ttl_s: float, progress: dict[str, Any] | None = None
    ) -> JobRecord | None:
        """Renew the lease; None means we lost it and must stop without writing (fencing).

        ``progress`` ({"env_step", "env_steps_per_s", "phase"}) moves the job's progress between epoch
        ends (env_step never goes back) and becomes a ``progress`` event for the job's stream.
        """
        values: dict[str, Any] = {"lease_until": time.time() + ttl_s}
        if progress is not None:
            step = int(progress["env_step"])
            values["env_step"] = sa.case((jobs.c.env_step < step, step), else_=jobs.c.env_step)
            values["phase"] = progress.get("phase")
            if progress.get("env_steps_per_s") is not None:
                values["steps_per_s"] = float(progress["env_steps_per_s"])
        with self.tx() as c:
            n = c.execute(jobs.update().where(_owned_by(job_id, attempt, owner)).values(**values)).rowcount
            if n != 1:
                return None
            if progress is not None:
                _event(c, job_id, "progress", dict(progress))
            return _job(c.execute(sa.select(jobs).where(jobs.c.id == job_id)).one())

    def _owned(self, c: Connection, job_id: str, attempt: int, owner: str) -> Any:
        """The job's row if this attempt still owns it, locked until commit on PostgreSQL: the writes that
        follow must not race a requeue or a cancel that changes it in between (SQLite: BEGIN IMMEDIATE)."""
        return c.execute(sa.select(jobs).where(_owned_by(job_id, attempt, owner)).with_for_update()).first()

    def begin_attempt(self, job_id: str, attempt: int, owner: str, resumed_epoch: int) -> bool:
        """starting → running; drops metric points a lost attempt wrote after our checkpoint."""
        with self.tx() as c:
            if self._owned(c, job_id, attempt, owner) is None:
                return False
            c.execute(
                metric_points.delete().where(metric_points.c.job_id == job_id, metric_points.c.epoch >= resumed_epoch)
            )
            c.execute(jobs.update().where(jobs.c.id == job_id).values(epoch=resumed_epoch, updated_at=time.time()))
            if resumed_epoch > 0:
                _event(c, job_id, "attempt", {"attempt": attempt, "resumed_from_epoch": resumed_epoch})
            job = c.execute(sa.select(jobs.c.status).where(jobs.c.id == job_id)).scalar_one()
            if job == "starting":
                return self._transition(c, job_id, ["starting"], "running", attempt=attempt, owner=owner)
            return True  # already cancelling: the loop will stop at its first epoch end

    def record_epoch(self, job_id: str, attempt: int, owner: str, metrics: dict[str, Any]) -> JobRecord | None:
        """Metric point and the job's ``latest``/progress in one transaction (§1.4); None if fenced."""
        now = time.time()
        with self.tx() as c:
            if self._owned(c, job_id, attempt, owner) is None:
                return None
            epoch = int(metrics["epoch"])
            c.execute(metric_points.delete().where(metric_points.c.job_id == job_id, metric_points.c.epoch >= epoch))
            c.execute(
                metric_points.insert().values(
                    job_id=job_id,
                    epoch=epoch,
                    attempt=attempt,
                    env_step=int(metrics["env_steps"]),
                    time=now,
                    values=metrics,
                )
            )
            latest = summary(metrics)  # cvpo/metrics.py: the one view of an epoch's metrics
            best = metrics.get("best")
            c.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .values(
                    env_step=int(metrics["env_steps"]),
                    epoch=epoch + 1,
                    steps_per_s=metrics.get("env_steps_per_s"),
                    latest=latest,
                    best=best,
                    updated_at=now,
                )
            )
            _event(c, job_id, "metrics", {"epoch": epoch, "env_step": int(metrics["env_steps"]), **latest})
            return _job(c.execute(sa.select(jobs).where(jobs.c.id == job_id)).one())

    def register_checkpoint(
        self, job_id: str, attempt: int, owner: str, path: Path, artefact_path: Path | None, metrics: dict | None
    ) -> str | None:
        """Record a checkpoint written by the current attempt; None if fenced."""
        m = metrics or {}
        with self.tx() as c:
            row = self._owned(c, job_id, attempt, owner)
            if row is None:
                return None
            ckpt_id = new_id("ckpt")
            c.execute(
                checkpoints.insert().values(
                    id=ckpt_id,
                    job_id=job_id,
                    attempt=attempt,
                    epoch=int(m.get("epoch", row.epoch - 1)),
                    env_step=int(m.get("env_steps", row.env_step)),
                    path=str(path),
                    artefact_path=str(artefact_path) if artefact_path else None,
                    eval_return=m.get("eval_return"),
                    eval_cost=m.get("eval_cost"),
                    feasible=m.get("feasible"),
                    created_at=time.time(),
                )
            )
            _event(c, job_id, "checkpoint", {"checkpoint_id": ckpt_id, "env_step": int(m.get("env_steps", 0))})
            return ckpt_id

    def finish(
        self,
        job_id: str,
        attempt: int,
        owner: str,
        to: str,
        *,
        failure: dict[str, str] | None = None,
        policy_id: str | None = None,
        promotion: dict[str, Any] | None = None,
    ) -> bool:
        """End this attempt in a terminal state (or back to ``queued`` for a graceful shutdown)."""
        values: dict[str, Any] = {}
        if failure is not None:
            values["failure"] = failure
        if policy_id is not None:
            values["policy_id"] = policy_id
        if promotion is not None:
            values["promotion"] = promotion
        if to == "queued":
            values.update({"lease_owner": None, "lease_until": None, "enqueued_at": None, "requeue_requested": False})
        froms = {
            "succeeded": ["running", "cancelling"],
            "failed": LEASED,
            "cancelled": ["cancelling"],
            "queued": LEASED,
        }
        with self.tx() as c:
            return self._transition(
                c, job_id, froms[to], to, attempt=attempt, owner=owner, values=values, event={"failure": failure}
            )

    # ------------------------------------------------------------------ requests from outside the lease

    def request_cancel(self, job_id: str, client: str | None) -> str:
        """Queued → cancelled now; live → cancelling (the loop stops within an epoch). Returns the status."""
        with self.tx() as c:
            row = _find_job(c, job_id, client, lock=True)
            if row.status in ("cancelling", "cancelled"):
                return row.status  # repeat cancel is idempotent
            if row.status in TERMINAL:
                raise ConflictError(f"job {job_id} already {row.status}")
            if row.status == "queued":
                self._transition(c, job_id, ["queued"], "cancelled", attempt=row.attempt)
                return "cancelled"
            c.execute(jobs.update().where(jobs.c.id == job_id).values(cancel_requested=True))
            self._transition(c, job_id, [row.status], "cancelling", attempt=row.attempt)
            return "cancelling"

    def request_requeue(self, owner_prefix: str) -> int:
        """Ask every job leased by a shutting-down worker to checkpoint and go back to the queue."""
        with self.tx() as c:
            return c.execute(
                jobs.update()
                .where(jobs.c.status.in_(("starting", "running")), jobs.c.lease_owner.like(f"{owner_prefix}%"))
                .values(requeue_requested=True)
            ).rowcount

    # ------------------------------------------------------------------ the outbox and the reconciler

    def hand_back(self, job_id: str, attempt: int) -> bool:
        """A worker that cannot run this queued attempt (no CUDA) leaves it unclaimed and back in the outbox:
        the reconciler sends it again after CVPO_OUTBOX_GRACE_S, for a worker that can."""
        with self.tx() as c:
            return (
                c.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id, jobs.c.attempt == attempt, jobs.c.status == "queued")
                    .values(enqueued_at=None, updated_at=time.time())
                ).rowcount
                == 1
            )

    def requeue_lost(self, job: JobRecord) -> bool:
        """A lost attempt: back to queued with ``attempt + 1`` (CAS on the attempt we saw)."""
        with self.tx() as c:
            return self._transition(
                c,
                job.id,
                [job.status],
                "queued",
                attempt=job.attempt,
                values={
                    "attempt": job.attempt + 1,
                    "lease_owner": None,
                    "lease_until": None,
                    "enqueued_at": None,
                },
                event={"attempt": job.attempt + 1, "reason": "worker_lost"},
            )

    # ------------------------------------------------------------------ fenced bookkeeping of the run directory

    def record_disk_usage(self, job_id: str, attempt: int, owner: str, nbytes: int) -> bool:
        """The run directory's size as the worker measured it (fenced: a lost attempt writes nothing)."""
        with self.tx() as c:
            if self._owned(c, job_id, attempt, owner) is None:
                return False
            c.execute(
                jobs.update().where(jobs.c.id == job_id).values(disk_bytes=int(nbytes), disk_measured_at=time.time())
            )
            return True

    def retire_checkpoints(
        self, job_id: str, attempt: int, owner: str, ids: Iterable[str]
    ) -> list[CheckpointRecord] | None:
        """Mark these checkpoints' files deleted (retention, issue #23 item 11) before the worker deletes
        them, so no row that resume trusts ever points at a half-deleted directory; promoted ones are
        skipped. Returns the rows marked now; None if fenced."""
        wanted = list(ids)
        with self.tx() as c:
            if self._owned(c, job_id, attempt, owner) is None:
                return None
            if not wanted:
                return []
            promoted = sa.select(policies.c.checkpoint_id).where(
                policies.c.job_id == job_id, policies.c.checkpoint_id.is_not(None)
            )
            which = sa.and_(
                checkpoints.c.job_id == job_id,
                checkpoints.c.id.in_(wanted),
                checkpoints.c.files_deleted_at.is_(None),
                checkpoints.c.id.not_in(promoted),
            )
            rows = c.execute(sa.select(checkpoints).where(which).order_by(checkpoints.c.seq)).all()
            if rows:
                ids_now = [r.id for r in rows]
                c.execute(
                    checkpoints.update().where(checkpoints.c.id.in_(ids_now)).values(files_deleted_at=time.time())
                )
        return [_checkpoint(r) for r in rows]
