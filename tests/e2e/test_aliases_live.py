"""Aliases on a live service (issue #20): threads hammer ``POST /aliases/prod/act`` over keep-alive
connections while the main thread repoints and rolls the alias back several times. No request may
fail, and every answer must come, whole, from a policy that was the alias's target at some moment of
its request: its actions are exactly that policy's, ``X-Policy-Id`` agrees with the body, and the
policy was the target somewhere in [request start − bound, request end].

Two ways of changing the alias: through the API process that serves the load (bound 0: it answers
with the new target as soon as the PUT returns; run with CVPO_ALIAS_TTL_S=0 here, the store read on
every request) and behind its back, in the store, as another API process would (bound
CVPO_ALIAS_TTL_S = 1 s, the README's promise). Redis and ``cvpo api`` on loopback
(tests/e2e/test_hardening.py's ``live_service``); no worker.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.store import Actor, Store
from cvpo.artefact import load_policy
from tests.conftest import TOKEN
from tests.e2e.test_hardening import OBS_DIM, live_service

OBS = np.random.default_rng(7).normal(0, 2, (2, OBS_DIM))
BODY = json.dumps({"observations": OBS.tolist()}).encode()
# A stack model of the changes: put X pushes X, rollback pops (core/store/alias_store.py).
CHANGES = [("put", "b"), ("put", "c"), ("rollback", None), ("put", "a"), ("rollback", None), ("rollback", None)]
CHANGES += [("put", "c"), ("rollback", None), ("put", "b")]
HOLD_S = 0.4  # between changes
LOADERS = 4


@dataclass
class Answer:
    start: float
    end: float
    status: int
    policy_id: str | None
    header: str | None
    actions: Any


def hammer(port: int, token: str, stop: threading.Event, out: list[Answer], errors: list[BaseException]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    try:
        while not stop.is_set():
            start = time.monotonic()
            conn.request("POST", "/aliases/prod/act", body=BODY, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            end = time.monotonic()
            body = json.loads(raw) if resp.status == 200 else {"actions": raw.decode(errors="replace")}
            out.append(Answer(start, end, resp.status, body.get("policy_id"), resp.getheader("x-policy-id"), body))
    except BaseException as exc:  # surfaced by the test
        errors.append(exc)
    finally:
        conn.close()


def call(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        assert resp.status in (200, 201), (method, path, resp.status, doc)
        return doc
    finally:
        conn.close()


@pytest.mark.parametrize(("ttl", "via"), [(0.0, "api"), (1.0, "store")], ids=["through-the-api", "another-process"])
def test_repoint_and_rollback_under_concurrent_act_load(tmp_path: Path, ttl: float, via: str) -> None:
    env = {"CVPO_ALIAS_TTL_S": str(ttl)}
    with live_service(tmp_path, env, worker=False, log_level="warning") as live:
        from bench.synthetic import write_random_artefact
        from core.promotion import create_policy_from_artefact

        store = Store(f"sqlite:///{(live.data_dir / 'cvpo.db').resolve()}", live.data_dir)
        pids: dict[str, str] = {}
        expected: dict[str, list[list[float]]] = {}
        for i, name in enumerate("abc"):
            artefact = write_random_artefact(live.data_dir / "policies" / f"alias-{name}", obs_dim=OBS_DIM, seed=30 + i)
            sha = json.loads((artefact / "policy.json").read_text())["weights_sha256"]
            cert = {"certified": True, "artefact_sha256": sha}
            pids[name] = create_policy_from_artefact(store, artefact, "admin", certificate=cert).id
            expected[pids[name]] = load_policy(artefact).act(OBS)[0].tolist()
        _, controller = store.create_token("arm", ["alias:prod"], client="admin")  # this alias's /act only
        call(live.port, "PUT", "/aliases/prod", {"policy_id": pids["a"], "reason": "first"})

        answers: list[Answer] = []
        errors: list[BaseException] = []
        stop = threading.Event()
        threads = [
            threading.Thread(target=hammer, args=(live.port, controller, stop, answers, errors), daemon=True)
            for _ in range(LOADERS)
        ]
        # (earliest, latest) moment each target may have started being the target, and its policy id.
        timeline: list[tuple[float, float, str]] = [(0.0, time.monotonic(), pids["a"])]
        stack = [pids["a"]]
        for t in threads:
            t.start()
        try:
            time.sleep(HOLD_S)
            for action, name in CHANGES:
                before = time.monotonic()
                if action == "put":
                    assert name is not None
                    stack.append(pids[name])
                    if via == "api":
                        got = call(live.port, "PUT", "/aliases/prod", {"policy_id": pids[name], "reason": "roll out"})
                    else:
                        alias, _ = store.set_alias("admin", "prod", pids[name], actor=Actor("elsewhere"))
                        got = {"policy_id": alias.policy_id}
                else:
                    stack.pop()
                    if via == "api":
                        got = call(live.port, "POST", "/aliases/prod/rollback", {"reason": "misbehaves"})
                    else:
                        got = {"policy_id": store.rollback_alias("admin", "prod", actor=Actor("elsewhere")).policy_id}
                assert got["policy_id"] == stack[-1]
                timeline.append((before, time.monotonic(), stack[-1]))
                time.sleep(HOLD_S + ttl)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert errors == [] and len(answers) >= 100, (errors, len(answers))

        bad = [a for a in answers if a.status != 200]
        assert bad == [], bad[:3]
        for a in answers:
            assert a.header == a.policy_id and a.policy_id in expected, a
            assert a.actions["actions"] == expected[a.policy_id], "answered whole by the policy it names"
            assert a.actions["alias"] == "prod"
            # The target during [start − ttl, end]: some target whose tenure may overlap that window.
            ok = any(
                pid == a.policy_id
                and began <= a.end
                and (k + 1 == len(timeline) or timeline[k + 1][1] >= a.start - ttl)
                for k, (began, _, pid) in enumerate(timeline)
            )
            assert ok, f"{a.policy_id} was not the alias's target during {a.start - ttl:.3f}–{a.end:.3f}: {timeline}"
        for k, (_, settled, pid) in enumerate(timeline[1:], 1):  # every change reached the load
            nxt = timeline[k + 1][0] if k + 1 < len(timeline) else float("inf")
            assert any(a.policy_id == pid and settled + ttl < a.start and a.end < nxt for a in answers), k

        history = call(live.port, "GET", "/aliases/prod/history?page_size=100")["items"]
        assert [e["to_policy_id"] for e in reversed(history)] == [pid for *_, pid in timeline]
        assert [e["action"] for e in reversed(history)][1:] == [{"put": "set"}.get(a, a) for a, _ in CHANGES]
        store.engine.dispose()
