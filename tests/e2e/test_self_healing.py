"""``cvpo serve`` heals instead of stopping (issue #23 item 15).

A real process tree (Redis, a Celery worker, uvicorn) on free loopback ports with a temporary data
dir. Redis, then the worker, is SIGKILLed while one job runs and another waits in the queue: each is
restarted, ``/act`` answers 200 all along, and every job still succeeds. The service used to stop
altogether ("redis exited; stopping") and controllers lost ``/act`` until a person restarted it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.synthetic import write_random_artefact
from core.promotion import create_policy_from_artefact
from core.store import Store
from service.launcher import free_port
from tests.conftest import ROOT, TINY_SPEC, wait_until

TOKEN = "self-healing-admin-token"
OBS_DIM = 6


def _children(pid: int) -> dict[str, int]:
    """serve's children by role, from their command lines."""
    found: dict[str, int] = {}
    try:
        pids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return found
    for child in map(int, pids):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].split(b" ")[0].endswith(b"redis-server"):  # redis retitles itself
            found["redis"] = child
        elif b"service.cli" in argv and len(argv) > argv.index(b"service.cli") + 1:
            found[argv[argv.index(b"service.cli") + 1].decode()] = child
    return found


def _broker(tmp: Path, redis_pid: int) -> redis.Redis:
    """A client of serve's Redis: port from its process title, password from the data dir."""
    title = Path(f"/proc/{redis_pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    port = int(title.rsplit(":", 1)[1])
    password = (tmp / "data" / "redis_password").read_text().strip()
    return redis.Redis(port=port, password=password, socket_timeout=5)


def _spec(steps: int) -> dict[str, Any]:
    return {**TINY_SPEC, "total_env_steps": steps, "max_attempts": 5}


class Serve:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "serve.log"
        drop = ("REDIS_URL", "DATABASE_URL", "CVPO_HOST", "CVPO_AUTH")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update(
            {
                "CVPO_DATA_DIR": str(tmp / "data"),
                "CVPO_PORT": str(self.port),
                "CVPO_API_TOKEN": TOKEN,
                "CVPO_HEARTBEAT_S": "0.5",
                "CVPO_LEASE_TTL_S": "5",
                "CVPO_RECONCILE_EVERY_S": "1",
                "CVPO_OUTBOX_GRACE_S": "2",
                "CVPO_CERTIFY_EPISODES": "6",
                "CVPO_CERTIFY_STOCHASTIC_EPISODES": "1",
                "CVPO_CERTIFY_CANDIDATES": "1",
                "CVPO_RESTART_BACKOFF_MAX_S": "2",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.log = open(self.log_path, "w")  # noqa: SIM115 - the process tree writes it until it exits
        cmd = [sys.executable, "-m", "service.cli", "serve"]
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self.log, stderr=self.log)
        self.http = httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        self.seen: set[int] = set()  # every child pid, to make sure none outlives the test

    def children(self) -> dict[str, int]:
        kids = _children(self.proc.pid)
        self.seen.update(kids.values())
        return kids

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=150)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
        self.http.close()
        for pid in self.seen:  # only processes this test's serve started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return self.proc.returncode


def test_cvpo_serve_restarts_a_killed_redis_and_worker_and_act_keeps_answering(tmp_path: Path) -> None:
    serve = Serve(tmp_path)
    try:
        wait_until(lambda: serve.ready() or serve.proc.poll() is not None, 90, "cvpo serve to be ready")
        assert serve.proc.poll() is None, serve.text()[-3000:]
        assert set(serve.children()) == {"redis", "worker", "api"}

        # A controller's policy, registered straight into the store (no training needed for /act).
        store = Store(f"sqlite:///{tmp_path / 'data' / 'cvpo.db'}", tmp_path / "data")
        ctl_id, ctl_token = store.create_token("controller", ["policies:act"])
        artefact = write_random_artefact(tmp_path / "artefact", obs_dim=OBS_DIM)
        policy = create_policy_from_artefact(store, artefact, ctl_id)
        act_headers = {"Authorization": f"Bearer {ctl_token}"}
        act_body = {"observations": [[0.5] * OBS_DIM]}
        acts: list[int] = []

        def act() -> None:
            r = httpx.post(f"{serve.base}/policies/{policy.id}/act", json=act_body, headers=act_headers, timeout=15)
            assert r.status_code == 200, (r.status_code, r.text)
            acts.append(r.status_code)

        act()
        jobs = [serve.http.post("/jobs", json=_spec(n)).json()["id"] for n in (12000, 1500)]

        def statuses() -> dict[str, str]:
            return {j: serve.http.get(f"/jobs/{j}").json()["status"] for j in jobs}

        def running_and_queued() -> dict[str, str] | None:
            act()
            now = statuses()
            if "queued" not in now.values() and "running" in now.values():
                jobs.append(serve.http.post("/jobs", json=_spec(1500)).json()["id"])  # a queued one too
                now = statuses()
            return now if {"running", "queued"} <= set(now.values()) else None

        def replaced(victim: str, old: int) -> int | None:
            act()  # /act answers while the child is dead and while it comes back
            assert serve.proc.poll() is None, serve.text()[-3000:]
            new = serve.children().get(victim)
            return new if new is not None and new != old else None

        for victim in ("redis", "worker"):
            before = wait_until(running_and_queued, 240, f"a running and a queued job before killing {victim}", 0.5)
            old = serve.children()[victim]
            if victim == "redis":
                broker = _broker(tmp_path, old)
                broker.set("self-healing-marker", "written before the kill")
            os.kill(old, signal.SIGKILL)
            killed_at = time.monotonic()
            new = wait_until(functools.partial(replaced, victim, old), 90, f"{victim} to be restarted", 0.2)
            wait_until(lambda: act() is None and serve.ready(), 90, f"the service to be ready after {victim}")
            if victim == "redis":  # the write was in the AOF (write(2) before the reply) and came back
                assert _broker(tmp_path, new).get("self-healing-marker") == b"written before the kill"
            print(f"{victim}: killed {old} with {before}; {new} up after {time.monotonic() - killed_at:.1f} s")

        def finished() -> dict[str, str] | None:
            act()
            now = statuses()
            return now if set(now.values()) <= {"succeeded", "failed", "cancelled"} else None

        final = wait_until(finished, 480, "every job to finish", 1.0)
        assert set(final.values()) == {"succeeded"}, {j: serve.http.get(f"/jobs/{j}").json() for j in jobs}
        assert set(serve.children()) == {"redis", "worker", "api"}
        text = serve.text()
        assert "redis exited with status -9; restarting it" in text, text[-3000:]
        assert "worker exited with status -9; restarting it" in text, text[-3000:]
        assert len(acts) > 20 and set(acts) == {200}
    finally:
        code = serve.stop()
    assert code == 0, serve.text()[-3000:]


def test_cvpo_serve_restarts_a_killed_api(tmp_path: Path) -> None:
    serve = Serve(tmp_path)
    try:
        wait_until(lambda: serve.ready() or serve.proc.poll() is not None, 90, "cvpo serve to be ready")
        old = serve.children()["api"]
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: serve.children().get("api") not in (None, old), 60, "a new API process")
        wait_until(serve.ready, 90, "the restarted API to be ready")
        assert serve.http.get("/jobs").status_code == 200
        assert "api exited with status -9; restarting it in 1 s" in serve.text()
    finally:
        code = serve.stop()
    assert code == 0, serve.text()[-3000:]


def test_restart_backoff_doubles_while_a_child_dies_young() -> None:
    from service.launcher import STABLE_AFTER_S, Child

    child = Child("worker", ["true"])
    delays = []
    for _ in range(7):
        child.started_at = 100.0
        delays.append(child.schedule_restart(now=101.0, backoff_max_s=30.0))
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    assert child.proc is None and child.restart_at == 131.0
    child.started_at = 0.0
    assert child.schedule_restart(now=STABLE_AFTER_S + 1, backoff_max_s=30.0) == 1, "a long run resets the backoff"
