"""The client against a tiny stdlib HTTP server (fast, no service): problem+json → exception classes,
keep-alive reuse, reconnecting after the server dropped an idle connection, which requests are resent,
pagination and ``wait``'s progress callback and timeout."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

from cvpo_client import (
    AuthError,
    Busy,
    Client,
    Conflict,
    CvpoAPIError,
    CvpoConnectionError,
    InvalidRequest,
    Job,
    NotFound,
    WaitTimeout,
)
from tests.conftest import wait_until


@dataclass
class Fake:
    """What the fake server saw and how it should answer."""

    url: str = ""
    requests: list[tuple[int, str, str, dict[str, str], bytes]] = field(default_factory=list)  # conn, method, path…
    connections: int = 0
    closed: int = 0  # connections the server has closed
    vanish: set[str] = field(default_factory=set)  # paths answered once by closing without a response
    routes: dict[str, Callable[[dict[str, list[str]], bytes], tuple[int, dict[str, str], bytes]]] = field(
        default_factory=dict
    )


def problem(status: int, **extra: Any) -> tuple[int, dict[str, str], bytes]:
    body = {"type": f"/problems/p{status}", "title": f"Title {status}", "status": status, "detail": f"detail {status}"}
    body["instance"] = "/somewhere"
    return status, {"Content-Type": "application/problem+json"}, json.dumps(body | extra).encode()


def ok(doc: Any) -> tuple[int, dict[str, str], bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(doc).encode()


@pytest.fixture
def fake() -> Iterator[Fake]:
    state = Fake()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive

        def setup(self) -> None:
            super().setup()
            state.connections += 1
            self.conn_id = state.connections

        def finish(self) -> None:
            super().finish()
            state.closed += 1

        def log_message(self, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            url = urlsplit(self.path)
            state.requests.append((self.conn_id, self.command, url.path, dict(self.headers), body))
            if url.path in state.vanish:  # read the request, then close without a word
                state.vanish.discard(url.path)
                self.close_connection = True
                return
            if url.path == "/drop-after":  # answer, then close silently (no Connection: close header)
                status, headers, data = ok({"conn": self.conn_id})
                self.close_connection = True
            elif url.path in state.routes:
                status, headers, data = state.routes[url.path](parse_qs(url.query), body)
            else:
                status, headers, data = ok({"conn": self.conn_id, "auth": self.headers.get("Authorization")})
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PUT = _serve  # noqa: N815 - http.server names its handlers so

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def client(fake: Fake) -> Iterator[Client]:
    with Client(fake.url, token="tok", timeout=5) as c:
        yield c


def test_one_keep_alive_connection_carries_every_request_and_the_token(client: Client, fake: Fake) -> None:
    answers = [client.request("GET", f"/x{i}")[0] for i in range(5)]
    assert {a["conn"] for a in answers} == {1} and fake.connections == 1
    assert answers[0]["auth"] == "Bearer tok"


def test_token_and_url_come_from_the_environment(fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVPO_API_URL", fake.url)
    monkeypatch.setenv("CVPO_API_TOKEN", "from-env")
    with Client() as c:
        assert c.request("GET", "/x")[0]["auth"] == "Bearer from-env"
        assert "from-env" not in repr(c)


def test_an_idle_connection_the_server_closed_is_replaced_before_sending(client: Client, fake: Fake) -> None:
    assert client.request("GET", "/drop-after")[0]["conn"] == 1
    wait_until(lambda: fake.closed == 1, 5, "the server to close the connection")
    # The server closed connection 1 after answering; the next request (a POST: never resent) goes
    # out on a new connection, and the server sees it exactly once.
    assert client.request("POST", "/policies", body={"job_id": "j"}, retry_safe=False)[0]["conn"] == 2
    assert [r[2] for r in fake.requests].count("/policies") == 1


def test_a_connection_dropped_under_a_request_is_retried_once_when_safe(client: Client, fake: Fake) -> None:
    client.request("GET", "/warm")
    fake.vanish.add("/jobs/job_1")
    assert client.request("GET", "/jobs/job_1")[0]["conn"] == 2  # resent on a new connection
    assert [r[2] for r in fake.requests].count("/jobs/job_1") == 2


def test_an_unsafe_request_is_not_resent_after_a_drop(client: Client, fake: Fake) -> None:
    client.request("GET", "/warm")
    fake.vanish.add("/policies")
    with pytest.raises(CvpoConnectionError, match="connection lost"):
        client.promote("job_1", "final")
    assert [r[2] for r in fake.requests].count("/policies") == 1
    assert client.request("GET", "/after")[0]["conn"] == 2  # and the client carries on


def test_a_fresh_connection_that_drops_is_not_resent(client: Client, fake: Fake) -> None:
    fake.vanish.add("/first")
    with pytest.raises(CvpoConnectionError):
        client.request("GET", "/first")
    assert len(fake.requests) == 1


def test_a_refused_connection_is_a_connection_error() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}", timeout=2) as c, pytest.raises(CvpoConnectionError):
        c.job("job_1")


@pytest.mark.parametrize(
    ("status", "cls"),
    [(401, AuthError), (403, AuthError), (404, NotFound), (409, Conflict), (422, InvalidRequest), (429, Busy),
     (503, Busy), (500, CvpoAPIError), (413, CvpoAPIError)],
)  # fmt: skip
def test_problems_become_exceptions_with_their_fields(client: Client, fake: Fake, status: int, cls: type) -> None:
    fake.routes["/p"] = lambda q, b: problem(status, request_id="rid-1")
    with pytest.raises(cls) as info:
        client.request("GET", "/p")
    exc = info.value
    assert type(exc) is cls and isinstance(exc, CvpoAPIError)
    assert (exc.status, exc.type, exc.title, exc.detail, exc.instance) == (
        status,
        f"/problems/p{status}",
        f"Title {status}",
        f"detail {status}",
        "/somewhere",
    )
    assert str(exc) == f"{status} Title {status}: detail {status}"
    assert exc.body["status"] == status and exc.request_id == "rid-1"
    assert exc.headers["content-type"] == "application/problem+json"


def test_invalid_request_carries_errors_and_busy_its_retry_after(client: Client, fake: Fake) -> None:
    errors = [{"loc": ["body", "observations", 0, 3], "msg": "expected 6 numbers"}]
    fake.routes["/422"] = lambda q, b: problem(422, errors=errors)
    with pytest.raises(InvalidRequest) as info:
        client.request("GET", "/422")
    assert info.value.errors == errors

    fake.routes["/429"] = lambda q, b: (lambda s, h, d: (s, h | {"Retry-After": "30"}, d))(*problem(429))
    with pytest.raises(Busy) as busy:
        client.request("GET", "/429")
    assert busy.value.retry_after == 30.0

    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    fake.routes["/503"] = lambda q, b: (lambda s, h, d: (s, h | {"Retry-After": when}, d))(*problem(503))
    with pytest.raises(Busy) as dated:
        client.request("GET", "/503")
    assert dated.value.retry_after is not None and 100 < dated.value.retry_after <= 120


def test_an_answer_that_is_not_problem_json_still_maps(client: Client, fake: Fake) -> None:
    fake.routes["/plain"] = lambda q, b: (404, {"Content-Type": "text/plain"}, b"nothing here")
    with pytest.raises(NotFound) as info:
        client.request("GET", "/plain")
    assert info.value.detail == "nothing here" and info.value.body == "nothing here"
    assert info.value.type == "about:blank" and info.value.title == "Not Found"


def _job(step: int, status: str = "running") -> dict[str, Any]:
    return {"id": "job_1", "status": status, "env_id": "E", "progress": {"env_step": step, "total_env_steps": 30}}


def test_wait_reports_progress_and_returns_the_ended_job(client: Client, fake: Fake) -> None:
    states = iter([_job(0, "queued"), _job(10), _job(10), _job(20), _job(30, "succeeded")])
    fake.routes["/jobs/job_1"] = lambda q, b: ok(next(states))
    seen: list[Job] = []
    job = client.wait("job_1", poll_s=0.01, on_progress=seen.append)
    assert job.status == "succeeded" and job.done and job.fraction == 1.0
    assert [(j.status, j.env_step) for j in seen] == [
        ("queued", 0),
        ("running", 10),
        ("running", 20),
        ("succeeded", 30),
    ]


def test_wait_times_out_with_the_last_state(client: Client, fake: Fake) -> None:
    fake.routes["/jobs/job_1"] = lambda q, b: ok(_job(5))
    with pytest.raises(WaitTimeout, match="job job_1 is running at env_step 5/30") as info:
        client.wait("job_1", timeout=0.2, poll_s=0.05)
    assert isinstance(info.value.last, Job) and isinstance(info.value, TimeoutError)


def test_wait_rides_out_a_busy_server(client: Client, fake: Fake) -> None:
    answers = iter([problem(503), ok(_job(30, "failed"))])
    fake.routes["/jobs/job_1"] = lambda q, b: (lambda s, h, d: (s, h | {"Retry-After": "0"}, d))(*next(answers))
    assert client.wait("job_1", poll_s=0.01).status == "failed"


def test_lists_and_metrics_follow_every_page(client: Client, fake: Fake) -> None:
    def jobs(q: dict[str, list[str]], _: bytes) -> tuple[int, dict[str, str], bytes]:
        if q.get("page_token") == ["p2"]:
            return ok({"items": [_job(3)], "next_page_token": None})
        assert q["status"] == ["running"]
        return ok({"items": [_job(1), _job(2)], "next_page_token": "p2"})

    fake.routes["/jobs"] = jobs
    assert [j.env_step for j in client.jobs(status="running")] == [1, 2, 3]

    def metrics(q: dict[str, list[str]], _: bytes) -> tuple[int, dict[str, str], bytes]:
        assert q["keys"] == ["eval_return,eval_cost"]
        point = {"epoch": 0, "env_step": 500, "attempt": 1, "time": "t", "values": {"eval_return": 1.5, "epoch": 0}}
        if "after_step" not in q:
            return ok({"points": [point], "next_after_step": 500})
        return ok({"points": [point | {"epoch": 1, "env_step": 1000}], "next_after_step": None})

    fake.routes["/jobs/job_1/metrics"] = metrics
    assert client.metrics("job_1", keys=["eval_return", "eval_cost"]) == [
        {"epoch": 0, "env_step": 500, "eval_return": 1.5},
        {"epoch": 1, "env_step": 1000, "eval_return": 1.5},
    ]


def test_act_sends_numpy_rows_and_shapes_the_answer(client: Client, fake: Fake) -> None:
    sent: list[Any] = []

    def act(_: dict[str, list[str]], body: bytes) -> tuple[int, dict[str, str], bytes]:
        doc = json.loads(body)
        sent.append(doc)
        rows = doc["observations"] if isinstance(doc["observations"][0], list) else [doc["observations"]]
        answer = {"policy_id": "pol_1", "artefact_sha256": "s", "request_id": None, "deterministic": True}
        answer |= {"actions": [[sum(r), -1.0] for r in rows], "clipped": [False] * len(rows)}
        if doc.get("return"):
            answer["cost_to_go"] = [[0.5] for _ in rows]
        return 200, {"Content-Type": "application/json", "X-Policy-Certified": "true"}, json.dumps(answer).encode()

    fake.routes["/policies/pol_1/act"] = act
    one = client.act("pol_1", np.array([1.0, 2.0], dtype=np.float32))
    assert one.shape == (2,) and one.dtype == np.float64 and one.tolist() == [3.0, -1.0]
    batch = client.act("pol_1", [[1, 2], [3, 4], [5, 6]])
    assert batch.shape == (3, 2) and batch[:, 0].tolist() == [3.0, 7.0, 11.0]
    full = client.act("pol_1", [1.0, 2.0], returns=["cost_to_go"], deterministic=False, seed=3)
    assert full.actions.shape == (2,) and full.cost_to_go is not None and full.cost_to_go.tolist() == [0.5]
    assert full.clipped.shape == () and not full.clipped and full.certified is True
    assert sent[0] == {"observations": [1.0, 2.0], "deterministic": True}
    assert sent[2]["return"] == ["cost_to_go"] and sent[2]["seed"] == 3 and sent[2]["deterministic"] is False
    with pytest.raises(ValueError, match="1-D"):
        client.act("pol_1", np.zeros((1, 2, 3)))


def _alias(version: int, policy_id: str) -> dict[str, Any]:
    event = {"seq": version, "alias": "prod", "action": "set", "from_policy_id": None, "to_policy_id": policy_id}
    return {"name": "prod", "client": "c", "policy_id": policy_id, "version": version, "last_change": event}


def test_alias_calls_send_what_the_routes_take(client: Client, fake: Fake) -> None:
    fake.routes["/aliases/prod"] = lambda q, b: ok(_alias(1, json.loads(b)["policy_id"]) if b else _alias(1, "pol_a"))
    fake.routes["/aliases/prod/rollback"] = lambda q, b: ok(_alias(3, "pol_a"))
    fake.routes["/aliases/prod/history"] = lambda q, b: ok({"items": [_alias(1, "x")["last_change"]]})
    alias = client.set_alias("prod", "pol_b", reason="why", override_reason="admin says", client="c")
    assert alias.policy_id == "pol_b" and alias.last_change is not None and alias.last_change.to_policy_id == "pol_b"
    _, method, path, _, body = fake.requests[-1]
    assert (method, path) == ("PUT", "/aliases/prod")
    assert json.loads(body) == {"policy_id": "pol_b", "reason": "why", "override": {"reason": "admin says"}}
    assert client.rollback_alias("prod").version == 3 and fake.requests[-1][1:3] == ("POST", "/aliases/prod/rollback")
    assert json.loads(fake.requests[-1][4]) == {}
    assert [e.to_policy_id for e in client.alias_history("prod")] == ["x"]
    # A rollback resent after a drop would go one step further back: it is not resent.
    fake.vanish.add("/aliases/prod/rollback")
    with pytest.raises(CvpoConnectionError):
        client.rollback_alias("prod")
    assert [r[2] for r in fake.requests].count("/aliases/prod/rollback") == 2
