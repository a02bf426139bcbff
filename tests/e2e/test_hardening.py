"""Hardening (issue #9) on real parts: job caps, scopes, the in-flight cap and chunked bodies on a real
uvicorn, tokens absent from every log, and Hypothesis over ``POST /jobs`` bodies.

The live-server tests share one module-scoped service (redis-server, a Celery worker, ``cvpo api``
at debug log level, loopback, random ports) because the in-flight cap and streamed bodies only
exist on a real socket; the others use the in-process app of tests/conftest.py."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.launcher import free_port
from tests.conftest import (
    ROOT,
    TINY_SPEC,
    TOKEN,
    RedisServer,
    Service,
    WorkerProcess,
    env_for,
    service_settings,
    wait_until,
)
from tests.e2e.test_jobs_api import MINIMAL, assert_problem, post_job

OBS_DIM = 6

# ------------------------------------------------------------------------------- queue and scopes


def test_global_queue_cap_is_503_with_retry_after_and_loses_nothing(service: Service) -> None:
    """Past CVPO_MAX_QUEUED the next job from any client is a 503 (not the per-client 429); the
    queued jobs are untouched, and a cancelled one frees its slot."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    settings = service.settings.with_(max_queued=3, max_active_jobs_per_client=100)
    _, other = service.store().create_token("other-team", ["jobs:read", "jobs:write"])
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        ids = [post_job(client, {**MINIMAL, "seed": i}).json()["id"] for i in range(3)]
        full = post_job(client, MINIMAL)
        assert "queued" in assert_problem(full, 503)["detail"] and full.headers["retry-after"] == "30"
        foreign = client.post("/jobs", json=MINIMAL, headers={"Authorization": f"Bearer {other}"})
        assert_problem(foreign, 503)
        assert foreign.headers["retry-after"] == "30"
        listed = client.get("/jobs").json()["items"]
        assert sorted(j["id"] for j in listed) == sorted(ids) and {j["status"] for j in listed} == {"queued"}
        assert [client.get(f"/jobs/{i}").json()["spec"]["seed"] for i in ids] == [0, 1, 2]
        assert client.post(f"/jobs/{ids[0]}/cancel").json()["status"] == "cancelled"
        again = client.post("/jobs", json=MINIMAL, headers={"Authorization": f"Bearer {other}"})
        assert again.status_code == 202, again.text


def test_act_only_token_cannot_train_read_jobs_or_download(api: Any, service: Service) -> None:
    """A controller's token (policies:act only, same client as the admin) acts, and nothing else."""
    service.start_worker()
    job_id = post_job(api).json()["id"]
    job = wait_until(
        lambda: (j := api.get(f"/jobs/{job_id}").json())["status"] in ("succeeded", "failed") and j, 180, "the job", 0.3
    )
    assert job["status"] == "succeeded", job["failure"]
    pid = job["policy_id"]
    _, controller = service.store().create_token("arm", ["policies:act"], client="admin")
    auth = {"Authorization": f"Bearer {controller}"}
    obs = api.get(f"/policies/{pid}").json()["observation_space"]["shape"][0]
    assert api.post(f"/policies/{pid}/act", json={"observations": [[0.0] * obs]}, headers=auth).status_code == 200
    for method, path, body in [
        ("POST", "/jobs", MINIMAL),
        ("GET", "/jobs", None),
        ("GET", f"/jobs/{job_id}", None),
        ("GET", f"/jobs/{job_id}/metrics", None),
        ("GET", f"/jobs/{job_id}/checkpoints", None),
        ("POST", f"/jobs/{job_id}/cancel", None),
        ("DELETE", f"/jobs/{job_id}", None),
        ("POST", "/policies", {"job_id": job_id, "checkpoint_id": "final"}),
        ("GET", f"/policies/{pid}", None),
        ("GET", f"/policies/{pid}/export?format=onnx", None),
        ("GET", f"/policies/{pid}/export?format=bundle", None),
        ("GET", "/metrics", None),
    ]:
        problem = assert_problem(api.request(method, path, json=body, headers=auth), 403)
        assert problem["type"] == "/problems/missing-scope", (method, path)
    assert api.get(f"/jobs/{job_id}").json()["status"] == "succeeded", "nothing changed"


def test_another_clients_job_is_404_on_every_route(api: Any, service: Service) -> None:
    """A token with every job scope but another client's sees no trace of the job, and cannot
    cancel, delete or promote it; the job is untouched."""
    job_id = post_job(api, MINIMAL).json()["id"]
    _, stranger = service.store().create_token("stranger", ["jobs:read", "jobs:write", "policies:read"])
    auth = {"Authorization": f"Bearer {stranger}"}
    for method, path, body in [
        ("GET", f"/jobs/{job_id}", None),
        ("GET", f"/jobs/{job_id}/metrics", None),
        ("GET", f"/jobs/{job_id}/logs", None),
        ("GET", f"/jobs/{job_id}/checkpoints", None),
        ("GET", f"/jobs/{job_id}/events", None),
        ("POST", f"/jobs/{job_id}/cancel", None),
        ("DELETE", f"/jobs/{job_id}", None),
        ("POST", "/policies", {"job_id": job_id, "checkpoint_id": "best"}),
    ]:
        problem = assert_problem(api.request(method, path, json=body, headers=auth), 404)
        assert job_id in problem["detail"] and "another" not in problem["detail"]
    assert api.get("/jobs", headers=auth).json()["items"] == []
    assert api.get(f"/jobs/{job_id}").json()["status"] == "queued", "nothing changed"


# ------------------------------------------------------------------------------ Hypothesis: /jobs

TASKS = ["SafetyPointCircle1-v0", "SafetyCarGoal1-v0", "SafetyHopperVelocity-v1"]
finite = st.floats(min_value=0, max_value=1e6, allow_nan=False)
valid_specs = st.fixed_dictionaries(
    {"env_id": st.sampled_from(TASKS), "total_env_steps": st.integers(1, 20_000_000)},
    optional={
        "seed": st.integers(0, 2**31 - 1),
        "cost_limit": st.one_of(finite, st.lists(finite, min_size=1, max_size=3)),
        "max_attempts": st.integers(1, 5),
        "time_limit_s": st.floats(min_value=1, max_value=48 * 3600),
        "checkpoint_every_epochs": st.integers(1, 10_000),
        "eval": st.fixed_dictionaries({"episodes": st.integers(1, 100)}),
        "labels": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
        "device": st.sampled_from(["auto", "cpu", "cuda"]),
    },
)
json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**30), max_value=10**30),
        st.floats(),  # NaN and ±inf included: json.dumps writes them as NaN/Infinity literals
        st.text(max_size=20),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)
FIELDS = ["env_id", "total_env_steps", "seed", "cost_limit", "preset", "device", "hyperparams", "eval",
          "checkpoint_every_epochs", "time_limit_s", "max_attempts", "labels", "algorithm", "surprise"]  # fmt: skip


@st.composite
def mutated_specs(draw: st.DrawFn) -> dict[str, Any]:
    spec = draw(valid_specs)
    for _ in range(draw(st.integers(1, 2))):
        spec[draw(st.sampled_from(FIELDS))] = draw(json_values)
    return spec


def test_hypothesis_job_bodies(service: Service) -> None:
    """Any valid spec is a 202 whose echo and resolved config agree with it; any spec with a field
    set to an arbitrary JSON value (NaN/Infinity literals, huge integers, containers) is a 202, a 400
    or a 422 naming a body field; never a 5xx. A fixed budget, derandomised, for the test command."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    # device "cuda" is valid only where a CUDA worker is registered (issue #23 item 13): one is, through
    # the workers' own store function, and counts as live for the whole run (a long lease TTL).
    app = create_app(service.settings.with_(max_active_jobs_per_client=10**6, max_queued=10**6, lease_ttl_s=24 * 3600))
    service.store().register_worker("gpu-host:1", service.settings.queue, {"cpu": True, "cuda": True})
    seen: dict[str, list[int]] = {"valid": [], "mutated": []}
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {TOKEN}"

        @settings(max_examples=60, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(spec=valid_specs)
        def valid(spec: dict[str, Any]) -> None:
            r = client.post("/jobs", json=spec)
            seen["valid"].append(r.status_code)
            assert r.status_code == 202, r.text
            job = r.json()
            assert job["status"] == "queued" and job["config"]["total_env_steps"] == spec["total_env_steps"]
            assert all(job["spec"][k] == v for k, v in spec.items()), job["spec"]
            limits = spec.get("cost_limit")
            if limits is not None:
                assert job["cost_limits"] == (limits if isinstance(limits, list) else [limits])

        @settings(max_examples=150, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(spec=mutated_specs())
        def mutated(spec: dict[str, Any]) -> None:
            raw = json.dumps(spec).encode()  # allow_nan: NaN/Infinity go out as literals
            r = client.post("/jobs", content=raw, headers={"content-type": "application/json"})
            seen["mutated"].append(r.status_code)
            assert r.status_code in (202, 400, 422), (r.status_code, r.text[:300])
            if r.status_code != 202:
                problem = assert_problem(r, r.status_code)
                if r.status_code == 422:
                    assert problem["errors"][0]["loc"][0] in ("body", "header"), problem

        valid()
        mutated()
    assert len(seen["valid"]) >= 60 and set(seen["valid"]) == {202}
    assert len(seen["mutated"]) >= 150 and {202, 422} <= set(seen["mutated"]), seen["mutated"]


# ------------------------------------------------------------------------------ a live service


@dataclass
class Live:
    port: int
    data_dir: Path
    redis_dir: Path
    logs: dict[str, Path]
    policy_id: str
    controller: str  # an act-only token of the admin client
    api: subprocess.Popen

    def raw(self, data: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes, float]:
        """One request on a fresh connection: (status, headers, body, seconds to the answer)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            t0 = time.perf_counter()
            sock.sendall(data)
            return (*read_response(sock), time.perf_counter() - t0)


def request_bytes(method: str, path: str, token: str | None, body: bytes | None = None, **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {buf!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body[:length]


MAX_CONNECTIONS = 90


@contextlib.contextmanager
def live_service(tmp: Path, env_extra: dict[str, str], *, worker: bool, log_level: str = "debug") -> Iterator[Live]:
    """Redis, ``cvpo api`` (and a worker) on free loopback ports, with a synthetic policy and an act-only
    token; every process stopped (SIGTERM, then SIGKILL) and the API log's tail printed on the way out."""
    from bench.synthetic import write_random_artefact
    from core.promotion import create_policy_from_artefact
    from core.store import Store

    redis = RedisServer(tmp / "redis-data")
    redis.start()
    settings = service_settings(tmp, redis.url)
    env = env_for(settings) | {"CVPO_PORT": str(port := free_port()), "CVPO_RECONCILE_EVERY_S": "0"} | env_extra
    settings.data_dir.mkdir(parents=True)
    store = Store(settings.resolved_database_url, settings.data_dir)
    artefact = write_random_artefact(settings.data_dir / "policies" / "synthetic", obs_dim=OBS_DIM)
    policy_id = create_policy_from_artefact(store, artefact, "admin", job_id="job_synthetic").id
    _, controller = store.create_token("arm", ["policies:act"], client="admin")
    store.engine.dispose()
    names = (["worker"] if worker else []) + ["api"]
    logs = {name: tmp / f"{name}.log" for name in names}
    procs: list[WorkerProcess] = []  # SIGTERM then SIGKILL on teardown, the worker's pool children too
    try:
        for name in names:
            with open(logs[name], "w") as log:
                cmd = [sys.executable, "-m", "service.cli", name, "--log-level", log_level]
                proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
                procs.append(WorkerProcess(proc, logs[name]))
        live = Live(port, settings.data_dir, tmp / "redis-data", logs, policy_id, controller, procs[-1].proc)

        def up() -> bool:
            with contextlib.suppress(OSError):
                return live.raw(request_bytes("GET", "/livez", None), timeout=1)[0] == 200
            return False

        wait_until(up, 60, "the API to listen")
        yield live
    finally:
        for proc in reversed(procs):
            proc.stop(timeout_s=30)
        if procs:
            print(f"----- api log (tail) -----\n{procs[-1].log()[-3000:]}")
        redis.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    limits = {"CVPO_MAX_INFLIGHT": "2", "CVPO_MAX_CONNECTIONS": str(MAX_CONNECTIONS)}
    with live_service(
        tmp_path_factory.mktemp("live"), limits | {"CVPO_ACT_BODY_LIMIT": str(64 * 1024)}, worker=True
    ) as service:
        yield service


def act_body(rows: int = 1) -> bytes:
    return json.dumps({"observations": [[0.5] * OBS_DIM] * rows}).encode()


@contextlib.contextmanager
def two_requests_in_the_app(live: Live) -> Iterator[Callable[[], None]]:
    """Two requests inside the app, each waiting on the threadpool for SQLite's write lock, which this
    holds until the function it yields is called. (A request still sending its body no longer counts
    as in flight, issue #23 item 1; reads take no lock, so tokens and /readyz still resolve.)"""
    lock = sqlite3.connect(live.data_dir / "cvpo.db", isolation_level=None, timeout=30)
    lock.execute("BEGIN IMMEDIATE")
    held = []

    def release() -> None:
        if lock.in_transaction:
            lock.execute("ROLLBACK")

    try:
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", live.port), timeout=10)
            sock.sendall(request_bytes("POST", "/jobs/job_held/cancel", TOKEN))
            held.append(sock)
        time.sleep(0.3)  # both are inside the app, waiting for the lock
        yield release
    finally:
        release()
        lock.close()
        for sock in held:
            sock.close()


def test_inflight_cap_answers_503_at_once(live: Live) -> None:
    """With CVPO_MAX_INFLIGHT=2 and two requests held in the app, /act gets an immediate 503 with
    Retry-After instead of waiting; health probes still answer; once the held requests end, /act is
    served again."""
    act_path = f"/policies/{live.policy_id}/act"
    good = request_bytes("POST", act_path, live.controller, act_body())
    assert live.raw(good)[0] == 200  # loads the policy
    with two_requests_in_the_app(live) as release:
        status, headers, body, seconds = live.raw(good)
        assert status == 503, body
        assert headers["retry-after"] == "1" and headers["content-type"] == "application/problem+json"
        assert json.loads(body)["status"] == 503 and seconds < 1.0
        assert live.raw(request_bytes("GET", "/readyz", None))[0] == 200
        release()
        wait_until(lambda: live.raw(good)[0] == 200, 10, "a free in-flight slot")


def test_act_over_the_cap_is_answered_before_the_app_and_keeps_the_connection(live: Live) -> None:
    """Over the cap, /act is shed by the HTTP protocol itself (api/shedding.py): the documented 503
    (problem+json, Retry-After, the client's X-Request-ID echoed), counted in act_shed_total, which
    only that path increments. The dropped body leaves the keep-alive connection in step: a second
    request on it is answered, and once a slot frees the same connection is served."""
    act_path = f"/policies/{live.policy_id}/act"

    def act(rid: str) -> bytes:
        data = request_bytes("POST", act_path, live.controller, act_body(3), X_Request_ID=rid)
        return data.replace(b"Connection: close", b"Connection: keep-alive")

    def shed_count() -> float:
        status, _, body, _ = live.raw(request_bytes("GET", "/metrics", TOKEN))
        assert status == 200
        lines = [ln for ln in body.decode().splitlines() if ln.startswith("act_shed_total ")]
        return float(lines[0].split()[1]) if lines else 0.0

    assert live.raw(request_bytes("POST", act_path, live.controller, act_body()))[0] == 200
    before = shed_count()
    conn = socket.create_connection(("127.0.0.1", live.port), timeout=10)
    with contextlib.closing(conn), two_requests_in_the_app(live) as release:
        for rid in ("probe-1", "probe-2"):
            conn.sendall(act(rid))
            status, headers, body = read_response(conn)
            assert status == 503, body
            assert headers["retry-after"] == "1" and headers["content-type"] == "application/problem+json"
            assert headers["x-request-id"] == rid and "close" not in headers.get("connection", "")
            doc = json.loads(body)
            assert doc["status"] == 503 and doc["instance"] == act_path and doc["request_id"] == rid
        release()

        def served() -> bool:
            conn.sendall(act("probe-3"))
            return read_response(conn)[0] == 200

        wait_until(served, 10, "a free in-flight slot on the same connection")
    # The /metrics call itself is one request in flight: sheds are counted, the middleware's are not.
    assert shed_count() >= before + 2


def test_idle_connections_are_not_requests_and_the_connection_cap_answers_503(live: Live) -> None:
    """Seventy idle keep-alive connections (more than uvicorn's old limit_concurrency of 64, which
    counted them and then answered every request with a bare 503) leave /act served. Connections
    opened past CVPO_MAX_CONNECTIONS get a problem+json 503 with Retry-After and are closed; health
    probes still answer there; earlier connections keep working, and freed slots serve again."""
    act_path = f"/policies/{live.policy_id}/act"
    good = request_bytes("POST", act_path, live.controller, act_body())
    idle = [socket.create_connection(("127.0.0.1", live.port), timeout=10) for _ in range(70)]
    try:
        time.sleep(0.2)
        assert live.raw(good)[0] == 200
        idle += [socket.create_connection(("127.0.0.1", live.port), timeout=10) for _ in range(MAX_CONNECTIONS - 70)]
        time.sleep(0.2)
        status, headers, body, _ = live.raw(good)
        assert status == 503, body
        assert headers["retry-after"] == "1" and headers["connection"] == "close"
        assert json.loads(body)["detail"] == "too many open connections to this API process"
        assert live.raw(request_bytes("GET", "/livez", None))[0] == 200
        keep = good.replace(b"Connection: close", b"Connection: keep-alive")
        idle[0].sendall(keep)  # an earlier connection is still served
        assert read_response(idle[0])[0] == 200
    finally:
        for sock in idle:
            sock.close()
    wait_until(lambda: live.raw(good)[0] == 200, 10, "connection slots to free")


def test_open_event_streams_do_not_fill_the_inflight_cap(live: Live) -> None:
    """Three dashboards following a job's event stream (a queued job: the streams stay open) with
    CVPO_MAX_INFLIGHT=2: /act is still served. Counted, the streams filled the cap and every
    controller got a 503 for as long as they stayed open."""
    from api.routes.jobs import resolve_spec
    from api.schemas import JobSpec
    from core.store import Store

    store = Store(f"sqlite:///{live.data_dir / 'cvpo.db'}", live.data_dir)
    echoed, config = resolve_spec(JobSpec.model_validate(dict(TINY_SPEC)))
    job, _ = store.create_job(client="admin", spec=echoed, config=config, max_attempts=1, time_limit_s=600, labels={})
    store.engine.dispose()
    streams = []
    try:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", live.port), timeout=10)
            sock.sendall(request_bytes("GET", f"/jobs/{job.id}/events", TOKEN, Accept="text/event-stream"))
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(4096)
            assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head, head
            streams.append(sock)
        act = request_bytes("POST", f"/policies/{live.policy_id}/act", live.controller, act_body())
        assert [live.raw(act)[0] for _ in range(3)] == [200, 200, 200]
    finally:
        for sock in streams:
            sock.close()


def test_inflight_cap_sheds_a_burst_of_inline_act_requests(live: Live) -> None:
    """A burst of /act requests that arrive together (the API is stopped while 12 connections send,
    then resumed): the cap of 2 serves the first and answers the rest 503 + Retry-After at once.
    Regression: /act runs inline without awaiting, so requests ran one by one, the count never
    passed 1, and all 12 were served after queueing instead."""
    good = request_bytes("POST", f"/policies/{live.policy_id}/act", live.controller, act_body())
    good = good.replace(b"Connection: close", b"Connection: keep-alive")
    socks = [socket.create_connection(("127.0.0.1", live.port), timeout=10) for _ in range(12)]
    try:
        for sock in socks:  # the connections are accepted and idle before the burst
            deadline = time.monotonic() + 10
            while True:
                sock.sendall(good)
                status = read_response(sock)[0]
                # The previous request's task may still be finishing after its response went out
                # (a loaded CI machine): it counts as in flight, so a 503 here is the cap working.
                if status != 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert status == 200
        time.sleep(0.5)  # every warm-up task has left uvicorn's task set before the burst
        live.api.send_signal(signal.SIGSTOP)
        try:
            for sock in socks:
                sock.sendall(good)
        finally:
            live.api.send_signal(signal.SIGCONT)
        answers = [read_response(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    statuses = [status for status, _, _ in answers]
    assert 1 <= statuses.count(200) <= 2 and statuses.count(503) == 12 - statuses.count(200), statuses
    assert all(h["retry-after"] == "1" for s, h, _ in answers if s == 503)


@pytest.mark.parametrize(("path", "limit"), [("/jobs", 1024 * 1024), ("/policies/{pid}/act", 64 * 1024)])
def test_chunked_body_over_the_limit_is_413_before_it_ends(live: Live, path: str, limit: int) -> None:
    """Transfer-Encoding: chunked, no Content-Length, and a body that never ends: the 413 comes as
    soon as the byte count passes the limit (a server reading it all would never answer)."""
    path = path.replace("{pid}", live.policy_id)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()  # fmt: skip
    chunk = b"[" * 16384
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(head)
        for _ in range(limit // len(chunk) + 2):  # just past the limit; the terminating chunk never goes
            sock.sendall(framed)
        status, headers, body = read_response(sock)
    assert status == 413 and headers["content-type"] == "application/problem+json", body
    assert str(limit) in json.loads(body)["detail"]
    # A chunked body within the limit is read and served as usual.
    small = act_body(2)
    chunked = (f"POST /policies/{live.policy_id}/act HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
               f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
               f"Transfer-Encoding: chunked\r\n\r\n{len(small):x}\r\n").encode() + small + b"\r\n0\r\n\r\n"  # fmt: skip
    status, _, body, _ = live.raw(chunked)
    assert status == 200 and len(json.loads(body)["actions"]) == 2


def test_long_and_odd_ids_over_http(live: Live) -> None:
    """Long (60 000 characters) and percent-encoded ids reach the app and are a 404. uvicorn itself
    answers 400 (plain text, before the app) to a request line over 64 KiB and to raw non-ASCII
    bytes in it, which are not HTTP."""
    for path in (f"/jobs/{'x' * 60_000}", f"/policies/{'%C3%A9' * 10_000}", "/jobs/%00%FF%ED%A0%80"):
        status, headers, body, _ = live.raw(request_bytes("GET", path, TOKEN))
        assert status == 404 and headers["content-type"] == "application/problem+json", (path[:40], body[:200])
    assert live.raw(request_bytes("POST", f"/policies/{'x' * 60_000}/act", TOKEN, act_body()))[0] == 404
    for line in (f"GET /jobs/{'x' * 70_000} HTTP/1.1", "GET /jobs/é HTTP/1.1"):
        status, _, body, _ = live.raw(f"{line}\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        assert status == 400 and body == b"Invalid HTTP request received."


def test_tokens_never_reach_a_log_the_broker_or_the_data_dir(live: Live) -> None:
    """Authenticated traffic with good, act-only, wrong and malformed tokens, and a job trained end
    to end, at debug log level: neither a token nor its SHA-256 (nor their first or last 12 characters)
    appears in the API or worker logs, in Redis' append-only file or in the data directory (the
    store's database holds the digests by design, and is the one file left out)."""
    wrong = "wrong-" + hashlib.sha256(b"guess").hexdigest()[:30]
    act_path = f"/policies/{live.policy_id}/act"
    job = live.raw(request_bytes("POST", "/jobs", TOKEN, json.dumps(TINY_SPEC).encode()))
    assert job[0] == 202, job[2]
    job_id = json.loads(job[2])["id"]
    for token, expected in ((TOKEN, 200), (live.controller, 200), (wrong, 401)):
        assert live.raw(request_bytes("POST", act_path, token, act_body()))[0] == expected
    assert live.raw(request_bytes("GET", "/jobs", live.controller))[0] == 403
    for header in (f"Basic {TOKEN}", f"Bearer {wrong} extra", f"bearer {hashlib.sha256(TOKEN.encode()).hexdigest()}"):
        assert live.raw(request_bytes("GET", "/jobs", None, Authorization=header))[0] == 401

    def done() -> bool:
        _, _, body, _ = live.raw(request_bytes("GET", f"/jobs/{job_id}", TOKEN))
        return json.loads(body)["status"] in ("succeeded", "failed")

    wait_until(done, 240, "the job to finish", 0.5)
    time.sleep(1.5)  # Redis' AOF is fsynced every second
    secrets = {TOKEN, live.controller, wrong}
    needles = {s for t in secrets for s in (t, hashlib.sha256(t.encode()).hexdigest())}
    needles |= {part for s in needles for part in (s[:12], s[-12:])}
    api_log = live.logs["api"].read_text(errors="replace")
    assert f"POST {act_path}" in api_log and "401" in api_log, "the access log was written"
    assert "job" in live.logs["worker"].read_text(errors="replace")
    files = [*live.logs.values(), *live.redis_dir.rglob("*")]
    files += [p for p in live.data_dir.rglob("*") if not p.name.startswith("cvpo.db")]
    scanned = 0
    for path in files:
        if path.is_file():
            data = path.read_bytes()
            scanned += len(data)
            leaks = [n for n in needles if n.encode() in data]
            assert not leaks, f"{path} holds {leaks}"
    assert scanned > 100_000, "logs, the AOF and the job's files were read"
    assert any(p.suffix == ".aof" or "appendonly" in p.name for p in live.redis_dir.rglob("*")), os.listdir(
        live.redis_dir
    )
