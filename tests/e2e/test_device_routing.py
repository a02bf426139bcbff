"""``device: "cuda"`` needs a worker that has CUDA (issue #23 item 13): refused at submission with a 409
problem+json while none is registered, accepted once one is (registered through the same store function
the workers use), and never failed as an internal error by a CPU worker that receives it."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.conftest import TINY_SPEC, Service, wait_until
from tests.e2e.test_jobs_api import assert_problem, post_job

pytestmark = pytest.mark.both_backends

CUDA_SPEC = {**TINY_SPEC, "device": "cuda"}


def wait_registered(service: Service) -> dict[str, Any]:
    """The real worker's own record: it registers itself (capabilities probed on this CPU-only host)."""
    store, s = service.store(), service.settings
    return wait_until(lambda: store.live_workers(s.queue, s.lease_ttl_s), 120, "the worker to register", 0.2)[0]


@contextmanager
def cuda_worker_record(service: Service) -> Iterator[None]:
    """A GPU machine's worker record on this queue, kept alive the way a worker keeps its own
    (register_worker, then worker_seen every heartbeat), and stopped like one (worker_stopped)."""
    store, s, wid = service.store(), service.settings, "gpu-host:4242"
    store.register_worker(wid, s.queue, {"cpu": True, "cuda": True, "cuda_devices": 1, "host": "gpu-host"})
    halt = threading.Event()

    def beat() -> None:
        while not halt.wait(s.heartbeat_s):
            store.worker_seen(wid)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        halt.set()
        thread.join(timeout=10)
        store.worker_stopped(wid)


def test_cuda_job_is_refused_while_no_worker_with_cuda_is_registered(api: Any, service: Service) -> None:
    body = assert_problem(post_job(api, CUDA_SPEC), 409)
    assert body["type"] == "/problems/no-cuda-worker" and "no live worker" in body["detail"]
    assert body["cuda_workers"] == 0 and body["queue"] == service.settings.queue

    worker = service.start_worker()
    record = wait_registered(service)
    assert record["capabilities"]["cuda"] is False  # this machine has no GPU
    assert record["id"] == f"{socket.gethostname()}:{worker.proc.pid}"
    body = assert_problem(post_job(api, CUDA_SPEC), 409)
    assert "1 live worker(s), none with CUDA" in body["detail"] and "device 'auto' or 'cpu'" in body["detail"]
    assert api.get("/jobs").json()["items"] == [], "nothing was queued"

    assert worker.stop() == 0  # a graceful stop marks the record stopped: no longer live at once
    store, s = service.store(), service.settings
    assert store.get_worker(record["id"])["stopped_at"] is not None
    assert store.live_workers(s.queue, s.lease_ttl_s) == []


def test_cuda_job_is_accepted_with_a_cuda_worker_and_a_cpu_worker_hands_it_back(api: Any, service: Service) -> None:
    worker = service.start_worker()
    wait_registered(service)
    store = service.store()
    with cuda_worker_record(service):
        resp = post_job(api, CUDA_SPEC, **{"Idempotency-Key": "gpu-run-1"})
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        assert api.get(f"/jobs/{job_id}").json()["queue"]["cuda_workers"] == 1
        # The CPU worker shares the queue and gets the message: it leaves the job queued and unclaimed
        # for a CUDA worker (back in the outbox, re-sent by the reconciler), instead of failing it.
        wait_until(
            lambda: (j := store.get_job(job_id)).status != "queued" or j.enqueued_at is None,
            180,
            "the CPU worker to hand the job back",
            0.3,
        )
        job = store.get_job(job_id)
        assert job.status == "queued" and job.failure is None and job.attempt == 1
        assert "asks for CUDA and this worker has none; handed back" in worker.log()
    # The CUDA worker went away: the queued job says what it waits for.
    queue = api.get(f"/jobs/{job_id}").json()["queue"]
    assert queue["workers"] == 1 and queue["cuda_workers"] == 0
    assert "asks for device 'cuda'" in queue["waiting_for"]
    # A retry of the accepted request replays it; a new CUDA job is refused again.
    replay = post_job(api, CUDA_SPEC, **{"Idempotency-Key": "gpu-run-1"})
    assert replay.status_code == 202 and replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["id"] == job_id
    assert_problem(post_job(api, CUDA_SPEC, **{"Idempotency-Key": "gpu-run-2"}), 409)
