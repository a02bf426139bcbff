"""Checkpoint retention, disk use and the disk quota end to end (issue #23 item 11): the real app, a
real Redis, real Celery workers training tiny jobs, the real store (SQLite and PostgreSQL).

Full checkpoints hold the replay buffer; a job kept every one of them. With retention (here
CVPO_KEEP_CHECKPOINTS=1) the worker keeps the newest, the best and promoted ones, and every policy
artefact; it caches the run directory's size in the store for GET /jobs/{id} and /metrics. A kill -9
mid-job still resumes exactly once. A spec whose projected footprint is over the quota is refused at
submission with the estimate.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from core import retention
from core.footprint import estimate
from tests.conftest import TINY_SPEC, TOKEN, Service, wait_until

pytestmark = pytest.mark.both_backends
STEPS = 3000  # six 500-step epochs, a checkpoint after each


def rank(ck: Any) -> tuple:
    """The store's ranking (core.certification.rank_key): feasible by highest eval return, else lowest cost."""
    if ck.feasible:
        return (0, -(ck.eval_return if ck.eval_return is not None else -math.inf))
    return (1, ck.eval_cost if ck.eval_cost is not None else math.inf)


def spec(**changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(TINY_SPEC)
    body.update(changes)
    return body


def wait_job(api: Any, job_id: str, statuses: set[str], timeout_s: float = 180) -> dict[str, Any]:
    return wait_until(
        lambda: (j := api.get(f"/jobs/{job_id}").json())["status"] in statuses and j, timeout_s, f"{job_id}", 0.3
    )


def ckpt_dirs(run_dir: Path) -> set[str]:
    return {p.name for p in (run_dir / "checkpoints").iterdir()}


def test_retention_keeps_newest_best_and_promoted_and_reports_disk_use(api: Any, service: Service) -> None:
    service.env["CVPO_KEEP_CHECKPOINTS"] = "1"
    service.start_worker()
    r = api.post("/jobs", json=spec(total_env_steps=STEPS))
    assert r.status_code == 202, r.text
    job = wait_job(api, r.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job["failure"]
    store = service.store()
    record = store.get_job(job["id"])
    run_dir = Path(record.run_dir)
    ckpts = store.list_checkpoints(job["id"])
    assert len(ckpts) == 6

    # The files of the newest, the best (the store's ranking) and the promoted checkpoint stay.
    kept = {ckpts[-1].id, min(ckpts, key=rank).id}
    policy = store.get_policy(job["policy_id"]) if job["policy_id"] else None
    if policy is not None and policy.checkpoint_id:
        kept.add(policy.checkpoint_id)
    assert ckpt_dirs(run_dir) == {Path(ck.path).name for ck in ckpts if ck.id in kept}, "the others are deleted"
    assert len(kept) <= 3 < len(ckpts)
    assert {ck.id for ck in ckpts if ck.files_deleted_at is None} == kept, "the store knows which are gone"
    assert {p.name for p in (run_dir / "artefacts").iterdir()} == {Path(ck.path).name for ck in ckpts}, (
        "every checkpoint's policy artefact stays (certification and promotion use them)"
    )
    listing = {c["id"]: c for c in api.get(f"/jobs/{job['id']}/checkpoints").json()["items"]}
    assert {i for i, c in listing.items() if c["resumable"]} == kept
    assert all(c["promotable"] for c in listing.values())

    # Disk use: the worker's last measurement, after the final policy was written, is the directory's size.
    disk = job["disk"]
    assert disk["bytes"] == retention.dir_bytes(run_dir) and disk["measured_at"] is not None
    metrics = api.get("/metrics").text
    m = re.search(rf'^cvpo_job_disk_bytes{{job_id="{job["id"]}"}} (\S+)$', metrics, re.M)
    assert m is not None and float(m.group(1)) == disk["bytes"], metrics[-2000:]

    # The projected footprint bounds the real one; the buffer part is exact per transition.
    est = estimate(record.config, keep=1)
    assert disk["bytes"] <= est["total_bytes"]
    newest = Path(ckpts[-1].path)
    assert retention.dir_bytes(newest) <= est["checkpoint_bytes"]
    buffer = est["replay_buffer_bytes"]
    assert buffer <= (newest / "arrays.npz").stat().st_size <= buffer + 64 * 1024
    print(f"estimate {est}; measured run dir {disk['bytes']} B, newest checkpoint {retention.dir_bytes(newest)} B")


def test_kill_9_resumes_once_with_retention_on(api: Any, service: Service) -> None:
    service.env["CVPO_KEEP_CHECKPOINTS"] = "1"
    worker = service.start_worker()
    job_id = api.post("/jobs", json=spec(total_env_steps=STEPS)).json()["id"]
    store = service.store()
    run_dir = Path(store.get_job(job_id).run_dir)
    wait_until(
        lambda: len(ckpts := store.list_checkpoints(job_id)) >= 3 and len(ckpt_dirs(run_dir)) < len(ckpts),
        150,
        "retention to delete a checkpoint's files",
    )
    assert worker.kill_children(), "no worker child to kill"
    wait_until(lambda: service.reconcile()["requeued"] == [job_id], 30, "the reconciler to requeue the job", 0.5)
    job = wait_job(api, job_id, {"succeeded", "failed"}, 300)  # generous: 2 loaded cores
    assert job["status"] == "succeeded" and job["attempt"] == 2, job["failure"]
    assert [p["epoch"] for p in store.metric_history(job_id)] == list(range(6)), "each epoch once"
    ckpts = store.list_checkpoints(job_id)
    first2 = min(c.epoch for c in ckpts if c.attempt == 2)
    assert first2 > max(c.epoch for c in ckpts if c.attempt == 1) - 1, "attempt 2 resumed, not restarted"
    log = [e["data"]["message"] for e in store.events_after(job_id, 0, 1000, types=["log"])]
    resumed = [line for line in log if "resumes from" in line]
    assert resumed, log
    assert len(ckpt_dirs(run_dir)) <= 3


def test_a_spec_over_the_disk_quota_is_refused_with_the_estimate(api: Any, service: Service) -> None:
    huge = {
        "env_id": "SafetyHumanoidVelocity-v1",
        "total_env_steps": 20_000_000,
        "hyperparams": {"buffer_size": 20_000_000},
    }
    r = api.post("/jobs", json=huge)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["type"] == "/problems/over-disk-quota" and "CVPO_JOB_DISK_QUOTA_BYTES" in problem["detail"]
    est = problem["estimate"]
    assert est["total_bytes"] > problem["quota_bytes"] == service.settings.job_disk_quota_bytes
    assert est["buffer_transitions"] == 20_000_000 and est["checkpoint_bytes"] > est["replay_buffer_bytes"] > 0
    assert problem["errors"][0]["loc"] == ["body", "total_env_steps"]
    capped = api.post("/jobs", json={**huge, "total_env_steps": 20_000_000, "hyperparams": {"buffer_size": 19_000_000}})
    assert capped.json()["errors"][0]["loc"] == ["body", "hyperparams", "buffer_size"]

    # The default quota takes a 1 M-step navigation job with default retention, and every task at the
    # default buffer size up to the 20 M-step cap.
    nav = api.post("/jobs", json={"env_id": "SafetyPointGoal1-v0", "total_env_steps": 1_000_000})
    assert nav.status_code == 202, nav.text
    big = api.post("/jobs", json={"env_id": "SafetyHumanoidVelocity-v1", "total_env_steps": 20_000_000})
    assert big.status_code == 202, big.text

    # A tight quota refuses even a tiny job; 0 turns the check off.
    for quota, status in ((100_000, 422), (0, 202)):
        with TestClient(create_app(service.settings.with_(job_disk_quota_bytes=quota))) as client:
            client.headers["Authorization"] = f"Bearer {TOKEN}"
            got = client.post("/jobs", json=spec())
            assert got.status_code == status, got.text
