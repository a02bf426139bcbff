"""A queue that Redis lost is re-sent from the store's outbox (issue #23 item 7).

The job store is the truth: a job it holds as ``queued`` must reach a worker even when its broker
message is gone (``DEL`` of the queue, a purge, a Redis restarted without its AOF). Real Redis, real
Celery worker, real store; the reconciler is run by hand as the API's loop would run it.
"""

from __future__ import annotations

from typing import Any

import redis

from tests.conftest import TINY_SPEC, Service
from tests.e2e.test_jobs_api import post_job, wait_job


def test_a_purged_queue_is_resent_from_the_outbox_and_the_job_runs(api: Any, service: Service) -> None:
    job = post_job(api, TINY_SPEC).json()
    store = service.store()
    assert store.get_job(job["id"]).enqueued_at is not None, "the API handed the job to the broker"
    r = redis.Redis.from_url(service.settings.redis_url)
    assert r.llen(service.settings.queue) == 1
    first = service.reconcile()
    assert first["sent"] == [], "a message still in the queue is not sent twice"

    r.delete(service.settings.queue)  # what a purge (or a Redis restart without AOF) leaves behind
    assert r.llen(service.settings.queue) == 0
    report = service.reconcile()
    assert report["sent"] == [job["id"]], report
    assert r.llen(service.settings.queue) == 1
    assert service.reconcile()["sent"] == [], "re-sent once, not on every pass"

    service.start_worker()
    final = wait_job(api, job["id"], {"succeeded", "failed"}, 240)
    assert final["status"] == "succeeded", final.get("failure")
    assert final["attempt"] == 1
