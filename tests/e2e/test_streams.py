"""Job event streams under real uvicorn (issue #23 item 4): capped per token and per process (429 +
Retry-After), bounded in time with a lossless resume through Last-Event-ID, ended when their token is
revoked or expires, and one store poller per job however many streams follow it."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from core.store import tokens
from service.launcher import free_port
from tests.conftest import TINY_SPEC, TOKEN, Service, wait_until

pytestmark = pytest.mark.both_backends

ADMIN = {"Authorization": f"Bearer {TOKEN}"}
READ_TIMEOUT_S = 10.0  # below the 15 s keep-alive: a silent stream fails the read
STREAM_WITHIN_S = 40.0  # a stream that should end by itself but does not fails the test after this


@contextlib.contextmanager
def live_api(service: Service, **changes: Any) -> Iterator[tuple[str, FastAPI]]:
    """``create_app`` with ``changes`` to the service's settings under a real uvicorn in a thread."""
    from api.app import create_app

    app = create_app(service.settings.with_(**changes))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", timeout_graceful_shutdown=2)
    )
    thread = threading.Thread(target=server.run, name="streams-api", daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), 60, "the API to start")
    assert server.started
    try:
        yield f"http://127.0.0.1:{server.config.port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    timeout = httpx.Timeout(10.0, read=READ_TIMEOUT_S)
    with httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=50)) as c:
        yield c


def new_job(client: httpx.Client, base: str) -> str:
    resp = client.post(f"{base}/jobs", json=TINY_SPEC, headers=ADMIN)
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def open_stream(client: httpx.Client, base: str, job_id: str, headers: dict[str, str]) -> httpx.Response:
    return client.send(client.build_request("GET", f"{base}/jobs/{job_id}/events", headers=headers), stream=True)


def read_frames(resp: httpx.Response, within_s: float = STREAM_WITHIN_S) -> Iterator[dict[str, str]]:
    """SSE frames until the server ends the stream: {"id", "event", "data"} or {"comment"}. Fails when
    the stream is still open after ``within_s``."""
    deadline = time.monotonic() + within_s
    frame: dict[str, str] = {}
    for line in resp.iter_lines():
        assert time.monotonic() < deadline, f"the stream was still open after {within_s:.0f} s"
        if not line:
            if frame:
                yield frame
            frame = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            field, _, value = line.partition(":")
            frame[field] = value.removeprefix(" ")
    if frame:
        yield frame


def assert_429(resp: httpx.Response, mentions: str) -> None:
    resp.read()
    assert resp.status_code == 429, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert int(resp.headers["retry-after"]) > 0
    body = resp.json()
    assert body["status"] == 429 and body["type"] == "/problems/too-many-streams" and mentions in body["detail"]


def test_streams_are_capped_per_token_and_per_process(service: Service, client: httpx.Client) -> None:
    with live_api(service, max_streams_per_token=2, max_streams=3, stream_max_s=120) as (base, _app):
        job_id = new_job(client, base)
        _, other = service.store().create_token("dashboard", ["jobs:read"], client="admin")
        other_h = {"Authorization": f"Bearer {other}"}
        open_ = [open_stream(client, base, job_id, ADMIN) for _ in range(2)]
        assert [r.status_code for r in open_] == [200, 200]
        assert_429(open_stream(client, base, job_id, ADMIN), "CVPO_MAX_STREAMS_PER_TOKEN")
        open_.append(open_stream(client, base, job_id, other_h))  # another token: its own allowance
        assert open_[-1].status_code == 200
        assert_429(open_stream(client, base, job_id, other_h), "CVPO_MAX_STREAMS")  # the process is full
        # Polling routes are not streams: they keep working.
        assert client.get(f"{base}/jobs/{job_id}", headers=ADMIN).status_code == 200

        open_.pop(0).close()  # a client goes away: its slot comes back

        def reopened() -> httpx.Response | None:
            resp = open_stream(client, base, job_id, ADMIN)
            if resp.status_code == 200:
                return resp
            resp.close()
            return None

        open_.append(wait_until(reopened, 30, "a stream slot freed by a closed stream", 0.2))
        for resp in open_:
            resp.close()


def test_a_stream_ends_after_its_lifetime_and_resumes_from_last_event_id_without_loss(
    service: Service, client: httpx.Client
) -> None:
    with live_api(service, stream_max_s=1.0) as (base, _app):
        job_id = new_job(client, base)
        store = service.store()
        seen: list[tuple[int, str, str]] = []
        connections = 0

        def follow() -> None:
            """One connection, resumed after the last event seen, read until the server ends it."""
            nonlocal connections
            headers = {**ADMIN, **({"Last-Event-ID": str(seen[-1][0])} if seen else {})}
            with client.stream("GET", f"{base}/jobs/{job_id}/events", headers=headers) as resp:
                assert resp.status_code == 200
                connections += 1
                seen.extend((int(f["id"]), f["event"], f["data"]) for f in read_frames(resp) if "id" in f)

        for i in range(20):  # before any stream
            store.log(job_id, f"line {i}")
        follow()  # ends by itself after its lifetime (the job is still queued)
        assert [s[0] for s in seen] == list(range(1, 22))
        for i in range(20, 40):  # while no stream is open
            store.log(job_id, f"line {i}")

        def writer() -> None:  # and while the streams end and resume
            for i in range(40, 60):
                store.log(job_id, f"line {i}")
                time.sleep(0.05)

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        while len(seen) < 61 or thread.is_alive():  # the "queued" status event and 60 log lines
            assert time.monotonic() < deadline, f"only {len(seen)} events after 120 s"
            follow()
        assert connections >= 2
        assert [s[0] for s in seen] == list(range(1, 62)), "events skipped or repeated across resumes"
        assert seen[0][1] == "status"
        assert [json.loads(s[2])["message"] for s in seen[1:]] == [f"line {i}" for i in range(60)]

        # Once the job ends, a resumed stream sends what is left and ends by itself.
        assert client.post(f"{base}/jobs/{job_id}/cancel", headers=ADMIN).status_code == 200
        follow()
        assert [(s[0], s[1]) for s in seen[61:]] == [(62, "status")]
        assert json.loads(seen[-1][2])["status"] == "cancelled"


def test_a_revoked_or_expired_token_ends_its_open_stream(service: Service, client: httpx.Client) -> None:
    with live_api(service, stream_auth_check_s=0.2, stream_max_s=300) as (base, _app):
        job_id = new_job(client, base)
        store = service.store()
        revoked_id, revoked = store.create_token("revoked", ["jobs:read"], client="admin")
        expiring_id, expiring = store.create_token(
            "expiring", ["jobs:read"], client="admin", expires_at=time.time() + 3600
        )
        streams = []
        for raw in (revoked, expiring):
            resp = open_stream(client, base, job_id, {"Authorization": f"Bearer {raw}"})
            assert resp.status_code == 200
            streams.append(resp)
        assert store.revoke_token(revoked_id)
        with store.tx() as c:  # the expiry passes
            c.execute(tokens.update().where(tokens.c.id == expiring_id).values(expires_at=time.time() - 1))
        for resp in streams:
            # Ends within the token cache's TTL plus a re-check (a ReadTimeout here means it never ended).
            comments = [f["comment"] for f in read_frames(resp) if "comment" in f]
            assert any("revoked or expired" in c for c in comments), comments
            resp.close()
        for raw in (revoked, expiring):
            again = client.get(f"{base}/jobs/{job_id}/events", headers={"Authorization": f"Bearer {raw}"})
            assert again.status_code == 401


def test_one_poller_per_job_fans_out_to_all_its_streams(service: Service, client: httpx.Client) -> None:
    with live_api(service, stream_max_s=300) as (base, app):
        job_a, job_b = new_job(client, base), new_job(client, base)
        streams = [open_stream(client, base, job_a, ADMIN) for _ in range(3)]
        streams.append(open_stream(client, base, job_b, ADMIN))
        assert all(r.status_code == 200 for r in streams)

        def hub_state() -> dict[str, int] | None:
            hub = getattr(app.state, "event_hub", None)
            state = {job: p.subscribers for job, p in dict(hub.pollers).items()} if hub else {}
            return state if state == {job_a: 3, job_b: 1} else None

        wait_until(hub_state, 30, "one poller for each job, with its streams as subscribers")
        service.store().log(job_a, "to everyone")
        for resp in streams[:3]:
            frames = read_frames(resp)
            assert any("to everyone" in f.get("data", "") for f in frames)  # each stream gets it
        for resp in streams:
            resp.close()
        hub = app.state.event_hub
        wait_until(lambda: not hub.pollers and hub.open == 0, 30, "pollers and slots gone with their streams")


def test_a_burst_larger_than_the_poller_buffer_reaches_every_stream_in_order(
    service: Service, client: httpx.Client
) -> None:
    from api.routes.events import SSE_BUFFER

    burst = SSE_BUFFER + 500
    with live_api(service, stream_max_s=300) as (base, _app):
        job_id = new_job(client, base)
        live = open_stream(client, base, job_id, ADMIN)  # follows from the start, read only after the burst
        assert live.status_code == 200
        store = service.store()
        for i in range(burst):
            store.log(job_id, f"burst {i}")
        late = open_stream(client, base, job_id, {**ADMIN, "Last-Event-ID": "10"})  # resumes far behind
        assert late.status_code == 200
        assert client.post(f"{base}/jobs/{job_id}/cancel", headers=ADMIN).status_code == 200  # streams can end
        total = burst + 2  # "queued", the burst, "cancelled"
        for resp, first in ((live, 1), (late, 11)):
            ids = [int(f["id"]) for f in read_frames(resp, within_s=120) if "id" in f]
            assert ids == list(range(first, total + 1)), (first, len(ids), ids[:3], ids[-3:])
            resp.close()
