"""Worker reliability with real parts (service-design.md §3, §5.1): a real redis-server, real Celery
worker processes, the real store (SQLite and PostgreSQL). Faults are injected with real signals."""

from __future__ import annotations

import copy
import signal
import subprocess
import sys
from typing import Any

import pytest

from api.routes.jobs import resolve_spec
from api.schemas import JobSpec
from tests.conftest import ROOT, TINY_LIMIT, TINY_SPEC, Service, wait_until

pytestmark = pytest.mark.both_backends


def submit(service: Service, send: bool = True, **changes: Any) -> str:
    spec = copy.deepcopy(TINY_SPEC)
    spec.update(changes)
    echoed, config = resolve_spec(JobSpec.model_validate(spec))
    job, _ = service.store().create_job(
        client="tester",
        spec=echoed,
        config=config,
        max_attempts=spec.get("max_attempts", 3),
        time_limit_s=spec.get("time_limit_s", 3600),
        labels={},
    )
    if send:
        assert service.queue().send(job)
    return job.id


def status(service: Service, job_id: str) -> Any:
    return service.store().get_job(job_id)


def wait_status(service: Service, job_id: str, wanted: set[str], timeout_s: float = 120) -> Any:
    return wait_until(
        lambda: (j := status(service, job_id)).status in wanted and j, timeout_s, f"{job_id} to become {wanted}", 0.2
    )


def epochs_of(service: Service, job_id: str) -> list[int]:
    return [p["epoch"] for p in service.store().metric_history(job_id)]


def test_worker_and_api_import_without_torch() -> None:
    """No CUDA in the Celery parent before fork (§3.1), and the API serves without torch (§2.3)."""
    code = (
        "import sys, core.celery_app, worker.tasks, core.store, api.app, api.routes.policies;"
        "assert 'torch' not in sys.modules and 'cvpo.trainer' not in sys.modules, 'torch or the trainer was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_job_runs_to_success_and_promotes_a_policy(service: Service) -> None:
    job_id = submit(service)
    service.start_worker()
    job = wait_status(service, job_id, {"succeeded", "failed"})
    assert job.status == "succeeded", job.failure
    assert job.attempt == 1 and job.env_step == 1500
    assert epochs_of(service, job_id) == [0, 1, 2]
    assert job.latest["eval_cost"] is not None and job.latest["cost_limit"] == TINY_LIMIT
    policy = service.store().get_policy(job.policy_id)
    assert policy is not None and policy.job_id == job_id and policy.meta["env_id"] == "SafetyPointCircle1-v0"
    assert policy.certified is True and policy.certificate["artefact_sha256"] == policy.sha256


def test_kill_9_child_mid_job_resumes_from_checkpoint_once(service: Service) -> None:
    job_id = submit(service, total_env_steps=3000)
    worker = service.start_worker()
    wait_until(lambda: len(service.store().list_checkpoints(job_id)) >= 2, 120, "two checkpoints")
    killed = worker.kill_children()
    assert killed, "no worker child to kill"
    at_kill = status(service, job_id)
    assert at_kill.status == "running" and at_kill.attempt == 1
    # The redelivered copy of attempt 1 must fail its claim; the reconciler requeues after the lease.
    wait_until(lambda: service.reconcile()["requeued"] == [job_id], 30, "the reconciler to requeue the job", 0.5)
    job = wait_status(service, job_id, {"succeeded", "failed"})
    assert job.status == "succeeded", job.failure
    assert job.attempt == 2
    assert epochs_of(service, job_id) == list(range(6)), "one metric point per epoch, none duplicated"
    ckpts = service.store().list_checkpoints(job_id)
    assert {c.attempt for c in ckpts} == {1, 2}
    first_of_attempt2 = min(c.epoch for c in ckpts if c.attempt == 2)
    assert first_of_attempt2 > max(c.epoch for c in ckpts if c.attempt == 1) - 1, "attempt 2 resumed, not restarted"
    log = service.store().events_after(job_id, 0, 1000, types=["log"])
    assert any("resumes from" in e["data"]["message"] for e in log)


def test_repeated_kills_fail_after_max_attempts(service: Service) -> None:
    job_id = submit(service, total_env_steps=20_000, max_attempts=2)
    worker = service.start_worker()
    for attempt in (1, 2):
        wait_until(
            lambda a=attempt: (j := status(service, job_id)).status == "running" and j.attempt == a,
            120,
            f"attempt {attempt} running",
        )
        worker.kill_children()
        key = "requeued" if attempt == 1 else "failed"
        wait_until(lambda k=key: service.reconcile()[k], 30, "the reconciler", 0.5)
    job = status(service, job_id)
    assert job.status == "failed" and job.attempt == 2
    assert job.failure["reason"] == "worker_lost"
    # No further training: the claim of any leftover message fails.
    wait_until(lambda: not worker.children() or status(service, job_id).status == "failed", 10, "quiet")
    assert status(service, job_id).status == "failed"


def test_cancel_running_job_stops_within_an_epoch_and_keeps_a_checkpoint(service: Service) -> None:
    job_id = submit(service, total_env_steps=50_000)
    service.start_worker()
    wait_until(lambda: status(service, job_id).epoch >= 1, 120, "one epoch")
    epoch_at_cancel = status(service, job_id).epoch
    assert service.store().request_cancel(job_id, None) == "cancelling"
    job = wait_status(service, job_id, {"cancelled", "failed", "succeeded"}, 60)
    assert job.status == "cancelled"
    assert job.epoch <= epoch_at_cancel + 1, "stopped within one epoch"
    ckpts = service.store().list_checkpoints(job_id)
    assert ckpts and ckpts[-1].artefact_path, "a final checkpoint with a promotable artefact"


def test_sigterm_requeues_without_spending_an_attempt(service: Service) -> None:
    job_id = submit(service, total_env_steps=3000)
    worker = service.start_worker()
    wait_until(lambda: status(service, job_id).epoch >= 1, 120, "one epoch")
    assert worker.stop(timeout_s=90) is not None
    job = status(service, job_id)
    assert job.status == "queued" and job.attempt == 1, (job.status, job.attempt)
    service.start_worker()
    job = wait_status(service, job_id, {"succeeded", "failed"})
    assert job.status == "succeeded" and job.attempt == 1
    assert epochs_of(service, job_id) == list(range(6))


def test_time_limit_fails_with_timeout_and_keeps_checkpoint(service: Service) -> None:
    job_id = submit(service, total_env_steps=50_000, time_limit_s=3)
    service.start_worker()
    job = wait_status(service, job_id, {"failed", "succeeded"}, 120)
    assert job.status == "failed" and job.failure["reason"] == "timeout"
    assert service.store().list_checkpoints(job_id)


def test_redis_restart_keeps_queued_jobs(service: Service, redis_server: Any) -> None:
    graceful = submit(service)
    service.reconcile()  # records the broker's run_id
    redis_server.stop(signal.SIGTERM)
    redis_server.start()  # same port and AOF directory
    service.start_worker()
    job = wait_status(service, graceful, {"succeeded", "failed"})
    assert job.status == "succeeded" and job.attempt == 1


def test_redis_killed_run_id_change_resends_queued_jobs(service: Service, redis_server: Any) -> None:
    job_id = submit(service)
    service.reconcile()
    redis_server.stop(signal.SIGKILL)
    # Wipe the AOF as if the message had been lost with the crash.
    import shutil

    shutil.rmtree(redis_server.data_dir)
    redis_server.start()
    report = service.reconcile()
    assert job_id in report["sent"], report
    service.start_worker()
    job = wait_status(service, job_id, {"succeeded", "failed"})
    assert job.status == "succeeded" and job.attempt == 1
    assert epochs_of(service, job_id) == [0, 1, 2]


def test_duplicate_messages_train_once(service: Service) -> None:
    job_id = submit(service)
    assert service.queue().send(service.store().get_job(job_id)), "a second copy of the same message"
    worker = service.start_worker()
    job = wait_status(service, job_id, {"succeeded", "failed"})
    assert job.status == "succeeded" and job.attempt == 1
    assert epochs_of(service, job_id) == [0, 1, 2]
    wait_until(lambda: "not claimable" in worker.log(), 30, "the duplicate to fail its claim")
    assert len(service.store().list_policies(client=None, job_id=job_id)[0]) == 1


def test_whole_worker_killed_then_new_worker_resumes_via_reconciler(service: Service) -> None:
    job_id = submit(service, total_env_steps=3000)
    first = service.start_worker()
    wait_until(lambda: len(service.store().list_checkpoints(job_id)) >= 1, 120, "a checkpoint")
    first.kill()  # parent and child: nothing requeues the message but the reconciler
    service.start_worker()
    wait_until(lambda: service.reconcile()["requeued"] == [job_id], 30, "the reconciler to requeue", 0.5)
    job = wait_status(service, job_id, {"succeeded", "failed"})
    assert job.status == "succeeded" and job.attempt == 2
    assert epochs_of(service, job_id) == list(range(6))
