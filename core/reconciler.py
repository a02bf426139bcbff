"""Lease recovery and the outbox sweep (service-design.md §3.4). Idempotent: every action is a CAS.

| Condition | Action |
|---|---|
| starting/running, lease expired, attempt < max | queued, attempt + 1, sent again (resumes from its checkpoint) |
| the same on the last attempt | failed(worker_lost) |
| cancelling, lease expired | cancelled (last checkpoint kept) |
| queued and unsent (or sent long ago) | sent |
| Redis run_id changed | every queued job sent again; duplicates fail the claim |
"""

from __future__ import annotations

import logging
import time
from typing import Any

from core.queue import JobQueue
from core.store import Store

log = logging.getLogger("cvpo.reconciler")

RUN_ID_KEY = "broker_run_id"


def reconcile(store: Store, queue: JobQueue, outbox_grace_s: float = 30.0, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    report: dict[str, Any] = {"requeued": [], "failed": [], "cancelled": [], "sent": []}
    for job in store.expired_leases(now):
        if job.status == "cancelling":
            if store.transition(job.id, ["cancelling"], "cancelled", attempt=job.attempt):
                report["cancelled"].append(job.id)
        elif job.attempt < job.max_attempts:
            if store.requeue_lost(job):
                store.log(
                    job.id, f"attempt {job.attempt} lost its worker; retrying as attempt {job.attempt + 1}", "warning"
                )
                report["requeued"].append(job.id)
        elif store.transition(
            job.id,
            [job.status],
            "failed",
            attempt=job.attempt,
            values={
                "failure": {
                    "reason": "worker_lost",
                    "message": f"worker lost on attempt {job.attempt} of {job.max_attempts}",
                }
            },
        ):
            report["failed"].append(job.id)

    run_id = queue.broker_run_id()
    resend_all = False
    if run_id is not None:
        previous = store.get_kv(RUN_ID_KEY)
        if previous is not None and previous != run_id:
            log.warning("the broker restarted (run_id changed); re-sending every queued job")
            resend_all = True
        if previous != run_id:
            store.set_kv(RUN_ID_KEY, run_id)
    # Unsent jobs older than the grace period (younger ones are being sent by the API right now).
    todo = store.queued_jobs() if resend_all else store.unsent(created_before=time.time() - outbox_grace_s)
    for job in todo:
        if queue.send(job):
            report["sent"].append(job.id)
    return report
