"""Lease recovery and the outbox sweep (service-design.md §3.4). Idempotent: every action is a CAS.

| Condition | Action |
|---|---|
| starting/running, lease expired, attempt < max | queued, attempt + 1, sent again (resumes from its checkpoint) |
| the same on the last attempt | failed(worker_lost) |
| cancelling, lease expired | cancelled (last checkpoint kept) |
| queued and unsent (or sent long ago) | sent |
| Redis run_id changed | every queued job sent again; duplicates fail the claim |
| queued and sent, but the message gone (purged) or taken by a consumer that never claimed it | sent again |
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from core.queue import JobQueue
from core.store import Store

log = logging.getLogger("cvpo.reconciler")

RUN_ID_KEY = "broker_run_id"
UNCLAIMED_S = 60.0  # a delivered, unacked message whose job is still queued this long is presumed lost
PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: queue name + sep + priority, for priorities 3, 6, 9


def _held_task_ids(queue: JobQueue, unclaimed_s: float) -> set[str] | None:
    """Task ids of the messages Redis still holds for ``queue``: waiting in the list (and its
    priority lists) or delivered less than ``unclaimed_s`` ago and not yet acked. None when the
    broker cannot be read.

    A message delivered longer ago whose job is still queued was taken by a consumer that never
    claimed it (a worker killed right after the delivery): Redis would hand it out again only after
    the visibility timeout (49 h), so it counts as lost. The list is read before the unacked hash, so
    a message moving between them is seen at least once in the common case; one missed in that
    instant is sent twice and its duplicate fails the claim."""
    try:
        with queue._redis() as r:
            raw: list[bytes] = []
            for name in (queue.queue, *(f"{queue.queue}{PRIORITY_SEP}{p}" for p in (3, 6, 9))):
                raw.extend(r.lrange(name, 0, -1))
            held = {_task_id(m) for m in raw}
            recent = r.zrangebyscore("unacked_index", time.time() - unclaimed_s, "+inf")
            if recent:
                held |= {_task_id(v, unacked=True) for v in r.hmget("unacked", recent) if v is not None}
    except Exception as exc:
        log.warning("could not read the broker's queue: %s", exc)
        return None
    return held


def _task_id(raw: bytes, unacked: bool = False) -> str:
    try:
        msg = json.loads(raw)
        return str((msg[0] if unacked else msg)["headers"]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


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
    if not resend_all:
        # Sent, but the broker lost the message (a purge, a restart without AOF whose run_id we missed).
        sent_before = time.time() - outbox_grace_s
        sent = [j for j in store.queued_jobs() if j.enqueued_at is not None and j.enqueued_at <= sent_before]
        held = _held_task_ids(queue, max(outbox_grace_s, UNCLAIMED_S)) if sent else None
        if held is not None:
            lost = [j for j in sent if f"{j.id}:{j.attempt}" not in held]
            if lost:
                log.warning("the broker lost %d queued job(s); re-sending them", len(lost))
            todo += lost
    for job in todo:
        if queue.send(job):
            report["sent"].append(job.id)
    return report
