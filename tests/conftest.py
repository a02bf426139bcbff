"""Shared fixtures for service tests: a real redis-server, real Celery worker processes, a real job
store (SQLite, and PostgreSQL for modules marked ``both_backends``) and the real FastAPI app
(lifespan included), all on loopback with random ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings
from service.launcher import free_port, redis_command, wait_for_redis
from tests.pg import PostgresServer, PostgresUnavailableError

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-admin-token"

# A job that trains in seconds: tiny nets, few samples, 500-step epochs on the fastest task. Its
# policy leaves the circle's bounds (~300 cost per 500-step episode), so a job that must end with a
# certified policy trains against a limit it meets: Circle's episode cost is at most 500, and with
# the tests' 6 certification episodes (CERTIFY_EPISODES) no sample of costs in [0, 500] has a 95 %
# upper bound above ~810 (tests/worker/test_certification.py checks that bound).
TINY_LIMIT = 1000.0
CERTIFY_EPISODES = 6
TINY_SPEC: dict[str, Any] = {
    "env_id": "SafetyPointCircle1-v0",
    "total_env_steps": 1500,
    "seed": 1,
    "cost_limit": TINY_LIMIT,
    "eval": {"episodes": 1},
    "checkpoint_every_epochs": 1,
    "hyperparams": {
        "network.actor_hidden": [16, 16],
        "network.critic_hidden": [16, 16],
        "batch_size": 32,
        "num_samples": 4,
        "updates_per_step": 0.05,
        "steps_per_epoch": 500,
        "update_every": 100,
        "warmup_steps": 0,
        "buffer_size": 5000,
        "torch_threads": 1,
        # The circle preset serves a validated epoch (10 validation episodes per epoch); these jobs test
        # the service around training, so they serve the last epoch and stay fast. The validated path
        # has its own tests (tests/cvpo/test_trainer.py, tests/worker/test_certification.py).
        "loop.select": "final",
    },
}


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Poll with a deadline; the failure message says what never happened."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class RedisServer:
    data_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is required (scripts/setup.sh installs it)")
        self.proc = subprocess.Popen(redis_command(self.data_dir, self.port), stdout=subprocess.DEVNULL)
        wait_for_redis(self.port, proc=self.proc)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis-data")
    server.start()
    yield server
    server.stop(signal.SIGKILL)


BACKENDS = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``both_backends`` that use the store (``db_backend``, ``database_url``, ``service``,
    ``api``) run once per backend; every other test keeps SQLite, the default, and runs once."""
    if "db_backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_backends"):
        metafunc.parametrize("db_backend", BACKENDS, indirect=True)


@pytest.fixture
def db_backend(request: pytest.FixtureRequest) -> str:
    return getattr(request, "param", "sqlite")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL cluster for the session (tests/pg.py); it failing to start fails the
    tests that need it, with the reason (scripts/test.sh installs Debian's postgresql)."""
    server: PostgresServer | None = None
    try:
        server = PostgresServer()
        server.start()
    except (PostgresUnavailableError, OSError, subprocess.SubprocessError) as exc:
        if server is not None:
            server.stop()
        pytest.fail(f"PostgreSQL for the store tests could not start: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def database_url(request: pytest.FixtureRequest, db_backend: str, tmp_path: Path) -> Iterator[str]:
    """The job store's URL for this test: SQLite in ``tmp_path/data`` or a fresh PostgreSQL database
    (dropped afterwards, with whatever connections the test's processes left open)."""
    if db_backend == "sqlite":
        yield f"sqlite:///{(tmp_path / 'data' / 'cvpo.db').resolve()}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    url = server.create_database()
    yield url
    server.drop_database(url)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


@dataclass
class WorkerProcess:
    proc: subprocess.Popen
    log_path: Path

    def children(self) -> list[int]:
        return _children(self.proc.pid)

    def kill_children(self) -> list[int]:
        pids = self.children()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        for pid in self.children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Service:
    settings: Settings
    env: dict[str, str]
    tmp: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    def start_worker(self) -> WorkerProcess:
        log_path = self.tmp / f"worker-{len(self.workers)}.log"
        log = open(log_path, "w")  # noqa: SIM115 - the worker process owns it until it exits
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--log-level", "info"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        worker = WorkerProcess(proc, log_path)
        self.workers.append(worker)
        return worker

    def store(self) -> Any:
        from core.store import Store

        return Store(self.settings.resolved_database_url, self.settings.data_dir)

    def queue(self) -> Any:
        from core.celery_app import make_celery
        from core.queue import JobQueue

        return JobQueue(make_celery(self.settings), self.store(), self.settings.queue)

    def reconcile(self) -> dict[str, Any]:
        from core.reconciler import reconcile

        return reconcile(self.store(), self.queue(), outbox_grace_s=0)


def service_settings(tmp: Path, redis_url: str, **changes: Any) -> Settings:
    base = Settings(
        data_dir=tmp / "data",
        redis_url=redis_url,
        api_token=TOKEN,
        queue=f"cvpo-test-{os.getpid()}-{tmp.name[-8:]}",
        lease_ttl_s=4.0,
        heartbeat_s=0.5,
        reconcile_every_s=0.0,  # tests run the reconciler by hand
        outbox_grace_s=0.0,
        # Few held-out episodes and candidates: certification stays a few seconds per job.
        certify_episodes=CERTIFY_EPISODES,
        certify_stochastic_episodes=1,
        certify_candidates=1,
    )
    return base.with_(**changes)


def env_for(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "CVPO_DATA_DIR": str(settings.data_dir),
            "REDIS_URL": settings.redis_url,
            "CVPO_API_TOKEN": settings.api_token or "",
            "CVPO_QUEUE": settings.queue,
            "CVPO_LEASE_TTL_S": str(settings.lease_ttl_s),
            "CVPO_HEARTBEAT_S": str(settings.heartbeat_s),
            "CVPO_CERTIFY_EPISODES": str(settings.certify_episodes),
            "CVPO_CERTIFY_STOCHASTIC_EPISODES": str(settings.certify_stochastic_episodes),
            "CVPO_CERTIFY_CANDIDATES": str(settings.certify_candidates),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if settings.database_url:
        env["DATABASE_URL"] = settings.database_url
    return env


@pytest.fixture
def service(tmp_path: Path, redis_server: RedisServer, db_backend: str, database_url: str) -> Iterator[Service]:
    # SQLite keeps the default URL (the store in the data dir), as a deployment without DATABASE_URL has.
    settings = service_settings(
        tmp_path, redis_server.url, **({} if db_backend == "sqlite" else {"database_url": database_url})
    )
    svc = Service(settings, env_for(settings), tmp_path)
    yield svc
    for i, w in enumerate(svc.workers):
        w.kill()
        print(f"----- worker {i} log (tail) -----\n{w.log()[-4000:]}")  # shown by pytest on failure


@pytest.fixture
def api(service: Service) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app(service.settings)) as client:
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        yield client
