"""Sending jobs to the broker: the outbox half of ``POST /jobs`` and of the reconciler (service-design.md §1.6).

A job is committed with ``enqueued_at`` null, then sent here; a send that fails (Redis down) is
logged and left for the reconciler, so the API never loses a job to a broker outage.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery

from core.celery_app import EVALUATE_TASK, TRAIN_TASK
from core.store import JobRecord, Store

log = logging.getLogger("cvpo.queue")


class JobQueue:
    def __init__(self, celery: Celery, store: Store, queue: str) -> None:
        self.celery = celery
        self.store = store
        self.queue = queue
        self.url = str(celery.conf.broker_url)
        self._probe: Any = None
        self._probe_lock = threading.Lock()

    def send(self, job: JobRecord) -> bool:
        """Publish ``{job_id, attempt}``; True when the broker took it. Duplicates fail the claim."""
        try:
            self.celery.send_task(
                TRAIN_TASK,
                args=[job.id, job.attempt],
                task_id=f"{job.id}:{job.attempt}",
                queue=self.queue,
                retry=True,
                retry_policy={"max_retries": 1, "interval_start": 0.2, "interval_step": 0.2, "interval_max": 0.5},
                # Celery's own hard limit backs up the runner's graceful deadline.
                time_limit=int(job.time_limit_s) + 600,
            )
        except Exception as exc:  # any broker error: the reconciler retries later
            log.warning("could not send %s attempt %d to the broker: %s", job.id, job.attempt, exc)
            return False
        self.store.mark_enqueued(job.id, job.attempt)
        return True

    def send_evaluation(self, eval_id: str, time_limit_s: int = 6 * 3600) -> bool:
        """Publish an on-demand policy evaluation to the same queue as jobs (a worker runs one at a time)."""
        try:
            self.celery.send_task(
                EVALUATE_TASK,
                args=[eval_id],
                task_id=eval_id,
                queue=self.queue,
                retry=True,
                retry_policy={"max_retries": 1, "interval_start": 0.2, "interval_step": 0.2, "interval_max": 0.5},
                time_limit=time_limit_s,
            )
        except Exception as exc:
            log.warning("could not send evaluation %s to the broker: %s", eval_id, exc)
            return False
        return True

    def _redis(self) -> Any:
        """One short-timeout client (and so one connection pool) for every probe of this queue:
        /readyz and /metrics must answer fast when Redis is down, and must not open a new TCP
        connection per call (issue #23 item 3). redis-py clients are thread-safe; a dropped
        connection is replaced on the next call."""
        with self._probe_lock:
            if self._probe is None:
                import redis

                self._probe = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1)
            return self._probe

    def depth(self) -> int | None:
        """Messages waiting in the queue (None when the broker is unreachable)."""
        try:
            return int(self._redis().llen(self.queue))
        except Exception:
            return None

    def broker_run_id(self) -> str | None:
        """Redis' run_id: it changes on every restart, which is when queued messages may be gone."""
        try:
            return str(self._redis().info("server")["run_id"])
        except Exception:
            return None

    def ping(self) -> bool:
        try:
            return bool(self._redis().ping())
        except Exception:
            return False
