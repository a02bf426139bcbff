"""Availability of ``POST /policies/{id}/act`` against slow and idle clients (issue #23 items 1 and 2),
on a real ``cvpo api`` (uvicorn with api/shedding.py's protocol) over loopback.

The API runs with ``CVPO_MAX_INFLIGHT=2`` (the setting README recommends for a control loop on two
cores), short header and body deadlines and a small per-address connection cap. The attackers bind
127.0.0.2 where a per-address cap matters, so that the controller on 127.0.0.1 is another client.
Assertions are about behaviour (answered, refused, closed), never about latency."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.launcher import free_port
from tests.conftest import TOKEN, wait_until
from tests.e2e.test_hardening import OBS_DIM, Live, act_body, live_service, read_response, request_bytes

HEADER_TIMEOUT_S = 5.0
BODY_TIMEOUT_S = 3.0
PER_PEER = 10
MAX_CONNECTIONS = 40
ATTACKER = "127.0.0.2"  # another client address on the loopback interface


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """Redis and ``cvpo api`` (no worker: nothing here trains) with a synthetic policy and an act-only token."""
    env = {
        "CVPO_MAX_INFLIGHT": "2",
        "CVPO_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "CVPO_MAX_CONNECTIONS_PER_PEER": str(PER_PEER),
        "CVPO_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "CVPO_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    }
    with live_service(tmp_path_factory.mktemp("guarded"), env, worker=False, log_level="info") as live:
        assert live.raw(act_request(live))[0] == 200  # loads the policy
        yield live


def act_request(live: Live) -> bytes:
    return request_bytes("POST", f"/policies/{live.policy_id}/act", live.controller, act_body())


def connect(live: Live, source: str = "127.0.0.1", timeout: float = 30.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", live.port), timeout=timeout, source_address=(source, 0))


def closed_by_server(sock: socket.socket) -> bytes:
    """What the server sent before closing (waits up to the socket's timeout; fails if it never closes)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError as exc:
            raise AssertionError(f"the server kept the connection open; it sent {data!r}") from exc
        if not chunk:
            return data
        data += chunk


def slow_body(live: Live, token: str | None, source: str = "127.0.0.1") -> socket.socket:
    """A POST /jobs that announces 1000 bytes and sends 10 of them."""
    sock = connect(live, source)
    sock.sendall(request_bytes("POST", "/jobs", token, b"x" * 1000)[:-990])
    return sock


# ----------------------------------------------------------------------------- item 1: slow bodies


def test_slow_bodies_do_not_take_the_inflight_slots_of_act(guarded: Live) -> None:
    """Four authenticated clients trickle ``POST /jobs`` bodies with CVPO_MAX_INFLIGHT=2: /act is still
    served (before, the first two held both slots for as long as they trickled and every /act was a
    503). After CVPO_BODY_TIMEOUT_S each slow request gets a 408 and its connection is closed."""
    held = [slow_body(guarded, TOKEN) for _ in range(4)]
    try:
        time.sleep(0.5)  # all four are inside the server, reading their bodies
        answers = [guarded.raw(act_request(guarded))[0] for _ in range(5)]
        assert answers == [200] * 5, answers
        for sock in held:
            status, headers, body = read_response(sock)  # within the socket's 30 s timeout
            assert status == 408 and headers["content-type"] == "application/problem+json", body
            assert headers["connection"] == "close" and "did not arrive" in json.loads(body)["detail"]
            assert closed_by_server(sock) == b""
    finally:
        for sock in held:
            sock.close()


@pytest.mark.parametrize("token", [None, "not-a-token", "Basic"])
def test_a_body_without_a_valid_token_is_401_before_it_is_read(guarded: Live, token: str | None) -> None:
    """Headers announcing a body and no valid token: a 401 comes before a byte of the body is sent,
    and the connection is closed (before, the server waited for the body, with no deadline, and
    only the route then found the token missing)."""
    sock = connect(guarded)  # no deadline of the server's would answer a request whose body never comes
    try:
        head = request_bytes("POST", f"/policies/{guarded.policy_id}/act", None, b"x" * 1000)[:-1000]
        if token == "Basic":
            head = head.replace(b"\r\n\r\n", f"\r\nAuthorization: Basic {TOKEN}\r\n\r\n".encode())
        elif token is not None:
            head = head.replace(b"\r\n\r\n", f"\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        sock.sendall(head)
        status, headers, body = read_response(sock)
        assert status == 401 and headers["www-authenticate"] == "Bearer", body
        assert headers["connection"] == "close" and json.loads(body)["status"] == 401
        assert closed_by_server(sock) == b""
    finally:
        sock.close()
    assert guarded.raw(act_request(guarded))[0] == 200


# ---------------------------------------------------------------------------- item 2: idle sockets


def test_idle_and_slow_header_connections_are_closed_after_the_header_deadline(guarded: Live) -> None:
    """A connection that sends nothing, and one that sends half a request line, are closed once
    CVPO_HEADER_TIMEOUT_S passes (the second after a 408); a keep-alive connection whose next request
    never completes its headers too. Before, they stayed open for ever, each holding a slot of
    CVPO_MAX_CONNECTIONS."""
    idle = connect(guarded)
    partial = connect(guarded)
    kept = connect(guarded)
    try:
        partial.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        kept.sendall(request_bytes("GET", "/livez", None).replace(b"Connection: close", b"Connection: keep-alive"))
        assert read_response(kept)[0] == 200
        kept.sendall(b"GET /livez HT")
        assert closed_by_server(idle) == b""
        sent = closed_by_server(partial)
        assert sent.startswith(b"HTTP/1.1 408 ") and b"application/problem+json" in sent, sent
        assert closed_by_server(kept).startswith(b"HTTP/1.1 408 ")
    finally:
        for sock in (idle, partial, kept):
            sock.close()
    assert guarded.raw(act_request(guarded))[0] == 200


def test_one_address_cannot_take_every_connection(guarded: Live) -> None:
    """One address opening twice CVPO_MAX_CONNECTIONS idle connections gets CVPO_MAX_CONNECTIONS_PER_PEER
    of them; each one more is answered 503 (problem+json, Retry-After) and closed at once. A client
    from another address still connects and is served. Before, the flood filled the global cap and
    every new connection from anyone was refused."""
    flood: list[socket.socket] = []
    refused: list[bytes] = []
    try:
        for _ in range(2 * MAX_CONNECTIONS):
            sock = connect(guarded, ATTACKER, timeout=10)
            flood.append(sock)
        keep = request_bytes("GET", "/livez", None).replace(b"Connection: close", b"Connection: keep-alive")
        flood[0].sendall(keep)  # the attacker's first connections are ordinary connections
        assert read_response(flood[0])[0] == 200
        for sock in flood[PER_PEER:]:
            refused.append(closed_by_server(sock))
        assert all(r.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in r for r in refused), refused[:2]
        assert b"too many open connections from this address" in refused[0]
        assert [guarded.raw(act_request(guarded))[0] for _ in range(3)] == [200] * 3
    finally:
        for sock in flood:
            sock.close()


# ------------------------------------------------------------------------- item 3: token floods


@pytest.fixture
def in_process(tmp_path: Path) -> Iterator[tuple[Any, int, str, str]]:
    """The app under uvicorn with api/shedding.py's protocol in a thread of this process (so a test can
    slow its store down), CVPO_MAX_INFLIGHT=2: (app, port, policy id, act-only token)."""
    import uvicorn

    from api.app import create_app
    from api.shedding import shedding_protocol
    from bench.synthetic import write_random_artefact
    from core.promotion import create_policy_from_artefact
    from core.settings import Settings
    from core.store import Store

    settings = Settings(
        data_dir=tmp_path / "data",
        redis_url="redis://127.0.0.1:9/0",  # nothing listens: /act never touches the broker
        api_token=TOKEN,
        reconcile_every_s=0.0,
        max_inflight=2,
    )
    store = Store(settings.resolved_database_url, settings.data_dir)
    artefact = write_random_artefact(settings.data_dir / "policies" / "synthetic", obs_dim=OBS_DIM)
    policy_id = create_policy_from_artefact(store, artefact, "admin", job_id="job_synthetic").id
    _, controller = store.create_token("arm", ["policies:act"], client="admin")
    store.engine.dispose()
    app = create_app(settings)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=shedding_protocol(2, 100), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 60, "the in-process server to start")
        yield app, port, policy_id, controller
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_unknown_tokens_being_looked_up_do_not_take_the_slots_of_act(in_process: tuple[Any, int, str, str]) -> None:
    """Four requests with new invalid tokens wait for a slow token lookup (the store is made to take
    3 s per lookup) when a controller with a cached token sends /act, with CVPO_MAX_INFLIGHT=2: the
    controller's 200 comes while the four still wait, and they then get 401. Before, /act looked
    tokens up on the event loop, so the controller waited behind every lookup (and the four counted
    as in flight meanwhile). A repeated invalid token is then answered 401 from its headers alone
    (its digest is cached as unknown)."""
    app, port, policy_id, controller = in_process
    live = Live(port, Path("."), Path("."), {}, policy_id, controller, None)  # type: ignore[arg-type]
    assert live.raw(act_request(live))[0] == 200  # loads the policy, caches the controller's token
    store = app.state.store
    real = store.lookup_token

    def slow(digest: str) -> Any:
        time.sleep(3.0)
        return real(digest)

    store.lookup_token = slow
    bad = [f"invalid-{i}-{time.monotonic_ns()}" for i in range(4)]
    flood = [connect(live) for _ in bad]
    try:
        for sock, token in zip(flood, bad, strict=True):
            sock.sendall(request_bytes("POST", f"/policies/{policy_id}/act", token, act_body()))
        time.sleep(0.3)  # all four are waiting for their lookups
        status, _, body, _ = live.raw(act_request(live))
        assert status == 200, body
        answered = select.select(flood, [], [], 0)[0]
        assert not answered, f"{len(answered)} invalid-token requests were answered before the controller"
        statuses = [read_response(sock)[0] for sock in flood]
        assert statuses == [401] * 4, statuses
    finally:
        for sock in flood:
            sock.close()
    status, headers, body, _ = live.raw(request_bytes("POST", "/jobs", bad[0], b"{}"))
    assert status == 401 and headers["www-authenticate"] == "Bearer", body
    assert json.loads(body)["detail"] == "unknown API token"
