"""The broker (issue #23 item 7): a queue that Redis lost is re-sent from the store's outbox, workers
ignore Celery remote control unless asked, and the Redis ``cvpo serve`` starts wants a password.

The job store is the truth: a job it holds as ``queued`` must reach a worker even when its broker
message is gone (``DEL`` of the queue, a purge, a Redis restarted without its AOF). Real Redis, real
Celery worker, real store; the reconciler is run by hand as the API's loop would run it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from service.launcher import free_port
from tests.conftest import ROOT, TINY_SPEC, Service, wait_until
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


def test_a_message_taken_by_a_consumer_that_died_unclaimed_is_resent(api: Any, service: Service) -> None:
    """A worker SIGKILLed right after Redis delivered it a message, before it claimed the job: the
    message sits in kombu's unacked hash, handed out again only after the visibility timeout (49 h).
    Redis is put in exactly that state by hand (what kombu's QoS.append writes on delivery)."""
    job = post_job(api, TINY_SPEC).json()
    r = redis.Redis.from_url(service.settings.redis_url)
    raw = r.rpop(service.settings.queue)
    assert raw is not None
    tag = json.loads(raw)["properties"]["delivery_tag"]
    r.hset("unacked", tag, json.dumps([json.loads(raw), "", service.settings.queue]))
    r.zadd("unacked_index", {tag: time.time()})
    assert service.reconcile()["sent"] == [], "just delivered: its consumer may be about to claim it"

    r.zadd("unacked_index", {tag: time.time() - 600})  # delivered 10 minutes ago, still unclaimed
    assert service.reconcile()["sent"] == [job["id"]]
    assert r.llen(service.settings.queue) == 1
    service.start_worker()
    final = wait_job(api, job["id"], {"succeeded", "failed"}, 240)
    assert final["status"] == "succeeded", final.get("failure")


def _worker_ready(worker: Any) -> bool:
    return " ready." in worker.log()


def test_workers_ignore_celery_remote_control_unless_asked(service: Service) -> None:
    """Anyone who reaches Redis could broadcast ``shutdown`` or ``pool_restart`` to every worker; the
    service never uses remote control, so workers do not listen unless CVPO_CELERY_REMOTE_CONTROL=on."""
    from core.celery_app import make_celery

    control = make_celery(service.settings).control
    quiet = service.start_worker()
    wait_until(lambda: _worker_ready(quiet), 90, "the worker to be ready")
    assert control.ping(timeout=3) == [], "a worker answered a broadcast"
    assert quiet.proc.poll() is None
    control.broadcast("shutdown")
    time.sleep(3)
    assert quiet.proc.poll() is None, "a broadcast shutdown stopped the worker"

    service.env["CVPO_CELERY_REMOTE_CONTROL"] = "on"
    listening = service.start_worker()
    wait_until(lambda: _worker_ready(listening), 90, "the second worker to be ready")
    replies = wait_until(lambda: control.ping(timeout=2), 30, "the opted-in worker to answer")
    assert len(replies) == 1, replies


def _serve_env(tmp: Path, port: int) -> dict[str, str]:
    drop = ("REDIS_URL", "CVPO_API_TOKEN", "DATABASE_URL", "CVPO_HOST", "CVPO_AUTH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update({"CVPO_DATA_DIR": str(tmp / "data"), "CVPO_PORT": str(port), "PYTHONUNBUFFERED": "1"})
    return env


def test_cvpo_serve_starts_redis_with_a_generated_password(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")  # noqa: SIM115 - the child writes it until it exits
    cmd = [sys.executable, "-m", "service.cli", "serve"]
    serve = subprocess.Popen(cmd, env=_serve_env(tmp_path, port), cwd=ROOT, stdout=log, stderr=log)
    try:
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return serve.poll() is not None

        wait_until(ready, 90, "the API to be ready (it pings the broker)")
        assert serve.poll() is None, log_path.read_text()[-3000:]
        wait_until(lambda: " ready." in log_path.read_text(), 90, "the worker to connect to the broker")
        secret_file = tmp_path / "data" / "redis_password"
        assert oct(secret_file.stat().st_mode & 0o777) == "0o600"
        password = secret_file.read_text().strip()
        assert len(password) >= 32
        banner = log_path.read_text()
        match = re.search(r"broker redis://:\*\*\*@127\.0\.0\.1:(\d+)/0", banner)
        assert match, banner[-2000:]
        redis_port = int(match.group(1))
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=redis_port, socket_timeout=2).ping()
        assert redis.Redis(port=redis_port, password=password, socket_timeout=2).ping()
        for pid in Path(f"/proc/{serve.pid}/task/{serve.pid}/children").read_text().split():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert password.encode() not in cmdline, "the password is on a command line (ps shows it)"
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(timeout=120)
        log.close()
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    assert password not in text, "the Redis password was logged"
