"""A queued job never waits silently (issue #23 item 12): GET /jobs/{id} says where it stands in the
queue and whether any worker is there to take it, from the records real Celery workers keep in the store."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Service, wait_until
from tests.e2e.test_jobs_api import post_job

pytestmark = pytest.mark.both_backends


def queue_of(api: Any, job_id: str) -> dict[str, Any] | None:
    return api.get(f"/jobs/{job_id}").json()["queue"]


def test_a_queued_job_says_where_it_stands_and_whether_a_worker_is_there(api: Any, service: Service) -> None:
    first, second = post_job(api).json()["id"], post_job(api).json()["id"]
    q1, q2 = queue_of(api, first), queue_of(api, second)
    assert (q1["position"], q1["ahead"], q2["position"], q2["ahead"]) == (1, 0, 2, 1)
    assert q1["name"] == service.settings.queue and q1["running"] == 0
    # Nobody has ever consumed this queue: said in so many words.
    assert q1["workers"] == 0 and q1["workers_seen_at"] is None and q1["no_worker_for_s"] is None
    assert "no worker has ever registered" in q1["waiting_for"]

    worker = service.start_worker()

    def moved_up() -> dict[str, Any] | None:
        q = queue_of(api, second)
        taken = api.get(f"/jobs/{first}").json()["status"] in ("starting", "running")
        return q if taken and q is not None and q["position"] == 1 and q["workers"] == 1 else None

    q = wait_until(moved_up, 180, "the worker to register and take the first job", 0.3)
    assert q["ahead"] == 0 and q["running"] == 1 and q["cuda_workers"] == 0
    assert q["workers_seen_at"] is not None and q["no_worker_for_s"] is None and q["waiting_for"] is None
    assert queue_of(api, first) is None, "a job that left the queue has no queue block"
    summary = service.store().worker_summary(service.settings.queue, service.settings.lease_ttl_s)
    assert summary["workers"] == 1 and summary["ever_seen"]  # what /readyz may show

    worker.kill()  # SIGKILL: no goodbye; its record ages out after CVPO_LEASE_TTL_S

    def no_worker() -> dict[str, Any] | None:
        q = queue_of(api, second)
        return q if q is not None and q["workers"] == 0 and q["no_worker_for_s"] is not None else None

    q = wait_until(no_worker, 60, "the queued job to say no worker is there", 0.3)
    assert q["position"] == 1 and q["workers_seen_at"] is not None and q["no_worker_for_s"] >= 0
    assert "no worker has been seen on queue" in q["waiting_for"]
