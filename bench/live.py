"""The real service for benchmarks, and an open-loop HTTP load generator (soak, overload).

``LiveService`` starts what ``cvpo serve`` starts, as separate children on random loopback ports:
redis-server (``service.launcher.redis_command``), optionally one Celery worker, and ``cvpo api``
(uvicorn, one process), with a synthetic policy registered first (the same 2×256 artefact as
``bench/act_latency.py``). ``open_loop`` sends requests on a fixed schedule whatever the answers
(an open loop: a slow server cannot slow the offered load down, and latency is measured from the
moment a request was due, so client-side waiting is counted, not hidden).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.act_latency import ROOT, _request, _response_size, read_response, setup_policy
from service.launcher import free_port, redis_command, wait_for_redis

ADMIN_TOKEN = "bench-admin-token-not-secret"
EARLY_S = 0.0005  # the open loop sends a request this much before it is due rather than spin-wait


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (default: this one), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid or os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """Resident set size of a process (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class LiveService:
    """redis-server, an optional worker and ``cvpo api`` on loopback, under ``data_dir``."""

    data_dir: Path
    api_env: dict[str, str] = field(default_factory=dict)  # extra CVPO_* settings for the API
    api_cpu: int | None = None  # pin the API process (taskset) to one CPU
    worker: bool = False
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    redis_url: str = ""
    port: int = 0
    policy_id: str = ""
    controller_token: str = ""  # an act-only token owning the synthetic policy

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "CVPO_DATA_DIR": str(self.data_dir),
                "CVPO_API_TOKEN": ADMIN_TOKEN,
                "REDIS_URL": self.redis_url,
                "CVPO_PORT": str(self.port),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.api_env)
        return env

    def start(self) -> LiveService:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.procs["redis"] = subprocess.Popen(redis_command(self.data_dir, redis_port), stdout=subprocess.DEVNULL)
        wait_for_redis(redis_port, proc=self.procs["redis"])
        self.policy_id, self.controller_token, _ = setup_policy(self.data_dir)
        self.port = free_port()
        cli = [sys.executable, "-m", "service.cli"]  # serve/api/worker live in the service package
        if self.worker:
            with open(self.data_dir / "worker.log", "w") as log:
                self.procs["worker"] = subprocess.Popen(
                    [*cli, "worker", "--log-level", "warning"], env=self.env(), cwd=ROOT, stdout=log, stderr=log
                )
        # Warning-level logs, as act_latency: no access-log line per request.
        api = [*cli, "api", "--log-level", "warning"]
        if self.api_cpu is not None:
            api = ["taskset", "-c", str(self.api_cpu), *api]
        with open(self.data_dir / "api.log", "w") as log:
            self.procs["api"] = subprocess.Popen(api, env=self.env(), cwd=ROOT, stdout=log, stderr=log)
        deadline = time.monotonic() + 90  # a loaded 2-core host with a worker starting beside it
        while self.call("GET", "/livez", None)[0] != 200:
            if time.monotonic() > deadline or self.procs["api"].poll() is not None:
                self.stop()
                raise RuntimeError(f"the API did not come up; see {self.data_dir / 'api.log'}")
            time.sleep(0.2)
        return self

    @property
    def api_pid(self) -> int:
        """uvicorn runs in the ``cvpo api`` process itself (one worker), or in taskset's exec'd image."""
        return self.procs["api"].pid

    def call(self, method: str, path: str, token: str | None = ADMIN_TOKEN, body: Any = None) -> tuple[int, Any]:
        """One request on a fresh connection: (status, parsed JSON body or None); (0, None) if refused."""
        raw = b"" if body is None else json.dumps(body).encode()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
                sock.sendall(_request(method, path, token, raw) if method == "POST" else _request(method, path, token))
                size, buf = read_response(sock)
        except OSError:
            return 0, None
        if size is None:
            return 0, None
        payload = bytes(buf[buf.find(b"\r\n\r\n") + 4 : size[1]])
        try:
            return size[0], json.loads(payload) if payload else None
        except ValueError:
            return size[0], payload.decode(errors="replace")

    def stop(self) -> None:
        for name in ("api", "worker", "redis"):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60 if name == "worker" else 20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


# ------------------------------------------------------------------------------------ open loop


@dataclass(slots=True)
class Sample:
    due: float  # when the schedule said to send (perf_counter)
    sent: float
    done: float
    status: int  # 0: the connection failed
    retry_after: bool
    problem_json: bool

    @property
    def latency(self) -> float:
        """From the moment the request was due: client-side waiting counts (no coordinated omission).
        A request sent up to ``EARLY_S`` before it was due counts from its send."""
        return self.done - min(self.due, self.sent)


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        size = _response_size(self.buf)
        if size is not None and len(self.buf) >= size[1] and self.waiter is not None and not self.waiter.done():
            head = bytes(self.buf[: self.buf.find(b"\r\n\r\n")]).lower()
            del self.buf[: size[1]]
            self.waiter.set_result(head)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("server closed the connection"))


async def _open_loop(port: int, request: bytes, rate: float, seconds: float, max_conns: int) -> list[Sample]:
    loop = asyncio.get_running_loop()
    idle: list[_Conn] = []
    waiting: deque[asyncio.Future[_Conn]] = deque()
    n_open = 0
    samples: list[Sample] = []
    reconnects: set[asyncio.Task[None]] = set()

    async def connect() -> _Conn:
        _, conn = await loop.create_connection(_Conn, "127.0.0.1", port)
        return conn

    async def acquire() -> _Conn:
        nonlocal n_open
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
            n_open -= 1
        if n_open < max_conns:
            n_open += 1
            try:
                return await connect()
            except OSError:
                n_open -= 1
                raise
        fut: asyncio.Future[_Conn] = loop.create_future()
        waiting.append(fut)
        return await fut

    async def hand_over_new(fut: asyncio.Future[_Conn]) -> None:
        try:
            fut.set_result(await connect())
        except OSError as exc:
            fut.set_exception(exc)

    def release(conn: _Conn) -> None:
        nonlocal n_open
        if conn.closed:  # uvicorn's own 503 closes the connection: replace it for whoever waits
            if waiting:
                task = loop.create_task(hand_over_new(waiting.popleft()))
                reconnects.add(task)
                task.add_done_callback(reconnects.discard)
            else:
                n_open -= 1
        elif waiting:
            waiting.popleft().set_result(conn)
        else:
            idle.append(conn)

    async def one(due: float) -> None:
        try:
            conn = await acquire()
        except OSError:
            now = time.perf_counter()
            samples.append(Sample(due, now, now, 0, False, False))
            return
        sent = time.perf_counter()
        conn.waiter = loop.create_future()
        assert conn.transport is not None
        conn.transport.write(request)
        try:
            head = await conn.waiter
            status, retry, problem = int(head[9:12]), b"\r\nretry-after:" in head, b"problem+json" in head
        except ConnectionError:
            status, retry, problem = 0, False, False
        samples.append(Sample(due, sent, time.perf_counter(), status, retry, problem))
        release(conn)

    n = int(rate * seconds)
    tasks = []
    start = time.perf_counter() + 0.05
    i = 0
    while i < n:
        now = time.perf_counter()
        due = start + i / rate
        if due > now + EARLY_S:
            # The loop's timers have 1 ms resolution: a shorter sleep is no sleep at all, and
            # looping on it spun a whole CPU that the server under test needed.
            await asyncio.sleep(due - now)
            continue
        while i < n and start + i / rate <= now + EARLY_S:  # everything due by now goes out at once
            tasks.append(loop.create_task(one(start + i / rate)))
            i += 1
    await asyncio.gather(*tasks)
    for conn in idle:
        if conn.transport is not None:
            conn.transport.close()
    return samples


def open_loop(port: int, request: bytes, rate: float, seconds: float, max_conns: int = 32) -> list[Sample]:
    """Send ``request`` at ``rate`` per second for ``seconds`` over at most ``max_conns`` keep-alive
    connections (a request due while all are busy waits for one, and that wait is counted).

    The cyclic GC is off while it runs: with a hundred thousand samples and futures alive, its full
    collections stalled this client for tens of ms, and the burst it then sent at once was charged
    to the server as latency."""
    gc.collect()
    gc.disable()
    try:
        try:
            import uvloop

            return uvloop.run(_open_loop(port, request, rate, seconds, max_conns))
        except ImportError:
            return asyncio.run(_open_loop(port, request, rate, seconds, max_conns))
    finally:
        gc.enable()


def summarise(samples: list[Sample], seconds: float | None = None) -> dict[str, Any]:
    """Counts by status, req/s, and latency percentiles (ms) of all and of the 200s alone."""
    if not samples:
        return {"requests": 0}
    lat = np.array([s.latency for s in samples]) * 1e3
    ok = np.array([s.latency for s in samples if s.status == 200]) * 1e3
    span = seconds or (max(s.done for s in samples) - min(s.due for s in samples))
    statuses: dict[str, int] = {}
    for s in samples:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
    lag = np.array([s.sent - s.due for s in samples]) * 1e3

    def pct(a: np.ndarray, q: float) -> float | None:
        return float(np.percentile(a, q)) if a.size else None

    return {
        "requests": len(samples),
        "req_per_s": len(samples) / span,
        "statuses": statuses,
        "errors": sum(1 for s in samples if s.status != 200),
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "max_ms": float(lat.max()),
        "ok_p50_ms": pct(ok, 50),
        "ok_p99_ms": pct(ok, 99),
        "ok_max_ms": pct(ok, 100),
        "client_send_lag_p99_ms": pct(lag, 99),  # how late the client itself sent (its own CPU limit)
    }


def act_request(policy_id: str, token: str, rows: int = 1, obs_dim: int = 60) -> bytes:
    obs = np.random.default_rng(0).normal(0, 2, (rows, obs_dim))
    return _request("POST", f"/policies/{policy_id}/act", token, json.dumps({"observations": obs.tolist()}).encode())
