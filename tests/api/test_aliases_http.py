"""Aliases (issue #20) over HTTP with the real app: repoint, history, rollback, the certification gate,
ownership, alias-scoped tokens, /act through an alias, and the per-process resolution cache's bound.
The store's repoint under concurrent writers runs on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest

from api.routes.act import is_act_path
from core.store import Actor, NothingToRollBackError, Store
from cvpo.artefact import load_policy
from tests.api.conftest import OBS_DIM, Served
from tests.api.test_policies_http import assert_problem

ROWS = np.random.default_rng(1).normal(0, 2, (4, OBS_DIM))
BODY = {"observations": ROWS.tolist()}


@pytest.fixture(scope="module")
def team(served: Served) -> Served:
    """Certified policies a, b, c and an uncertified u of the owner's client; a deployer token
    (aliases:write) and an alias-scoped controller token (alias:prod) of that client."""
    owner = served.ids["owner"]
    for role, scopes in {"deployer": ["aliases:write", "policies:read"], "prod_only": ["alias:prod"]}.items():
        served.ids[role], served.tokens[role] = served.store.create_token(role, scopes, owner)
    for i, name in enumerate("abc"):
        served.register(name, certified=True, seed=10 + i)
    served.register("u", seed=13)
    served.register("theirs", owner="other", certified=True, seed=14)
    return served


def put(s: Served, name: str, policy: str, role: str | None = "deployer", **body: Any) -> httpx.Response:
    headers = s.auth(role) if role else {}
    return s.client.put(f"/aliases/{name}", json={"policy_id": s.policies.get(policy, policy), **body}, headers=headers)


def rollback(s: Served, name: str, role: str | None = "deployer", **body: Any) -> httpx.Response:
    headers = s.auth(role) if role else {}
    return s.client.post(f"/aliases/{name}/rollback", json=body or None, headers=headers)


def alias_act(s: Served, name: str, role: str | None = "owner", body: Any = None) -> httpx.Response:
    headers = s.auth(role) if role else {}
    return s.client.post(f"/aliases/{name}/act", json=BODY if body is None else body, headers=headers)


def target(s: Served, name: str, role: str = "owner") -> str:
    r = alias_act(s, name, role)
    assert r.status_code == 200, r.text
    assert r.headers["x-policy-id"] == r.json()["policy_id"] and r.json()["alias"] == name
    return r.json()["policy_id"]


def test_put_get_list_and_history(team: Served) -> None:
    s, a, b = team, team.policies["a"], team.policies["b"]
    created = put(s, "deploy-1", "a", reason="first rollout")
    assert created.status_code == 201, created.text
    assert created.headers["location"] == "/aliases/deploy-1"
    view = created.json()
    assert view["policy_id"] == a and view["version"] == 1 and view["certified"] is True
    assert view["client"] == s.ids["owner"] and view["can_roll_back"] is False
    assert view["links"]["act"] == "/aliases/deploy-1/act"
    assert put(s, "deploy-1", "a").json()["version"] == 1, "the current target again changes nothing"
    moved = put(s, "deploy-1", "b", reason="canary passed")
    assert moved.status_code == 200 and moved.json()["version"] == 2 and moved.json()["policy_id"] == b
    assert s.client.get("/aliases/deploy-1", headers=s.auth("owner")).json()["policy_id"] == b

    items = s.client.get("/aliases/deploy-1/history", headers=s.auth("owner")).json()["items"]
    assert [(e["from_policy_id"], e["to_policy_id"], e["version"]) for e in items] == [(a, b, 2), (None, a, 1)]
    assert [e["reason"] for e in items] == ["canary passed", "first rollout"]
    assert {e["action"] for e in items} == {"set"} and all(e["certified"] and e["override"] is None for e in items)
    who = items[0]["actor"]
    assert who == {"client": s.ids["owner"], "token_id": s.ids["deployer"], "token_name": "deployer"}
    assert items[0]["at"].endswith("Z") and items[0]["seq"] > items[1]["seq"]
    page = s.client.get("/aliases/deploy-1/history", params={"page_size": 1}, headers=s.auth("owner")).json()
    assert len(page["items"]) == 1 and page["next_page_token"]
    rest = s.client.get(
        "/aliases/deploy-1/history", params={"page_token": page["next_page_token"]}, headers=s.auth("owner")
    ).json()
    assert [e["version"] for e in rest["items"]] == [1] and rest["next_page_token"] is None

    mine = [x["name"] for x in s.client.get("/aliases", headers=s.auth("owner")).json()["items"]]
    assert "deploy-1" in mine
    assert "deploy-1" not in [x["name"] for x in s.client.get("/aliases", headers=s.auth("other")).json()["items"]]
    everyone = s.client.get("/aliases").json()["items"]  # the admin sees every client's
    assert any(x["name"] == "deploy-1" and x["client"] == s.ids["owner"] for x in everyone)


def test_rollback_is_one_call_and_an_undo_stack(team: Served) -> None:
    s = team
    a, b, c = (s.policies[k] for k in "abc")
    for name in "abc":
        assert put(s, "stack", name).status_code in (200, 201)
    assert target(s, "stack") == c
    back = rollback(s, "stack", reason="c misbehaves")
    assert back.status_code == 200, back.text
    assert back.json()["policy_id"] == b and back.json()["version"] == 4 and target(s, "stack") == b
    assert rollback(s, "stack").json()["policy_id"] == a, "a second rollback goes further back, not to c"
    assert target(s, "stack") == a
    body = assert_problem(rollback(s, "stack"), 409)
    assert body["type"] == "/problems/nothing-to-roll-back"
    assert put(s, "stack", "c").json()["can_roll_back"] is True
    assert rollback(s, "stack").json()["policy_id"] == a

    events = s.client.get("/aliases/stack/history", headers=s.auth("owner")).json()["items"]
    assert [(e["action"], e["from_policy_id"], e["to_policy_id"]) for e in events] == [
        ("rollback", c, a),
        ("set", a, c),
        ("rollback", b, a),
        ("rollback", c, b),
        ("set", b, c),
        ("set", a, b),
        ("set", None, a),
    ]
    assert events[3]["reason"] == "c misbehaves" and [e["version"] for e in events] == [7, 6, 5, 4, 3, 2, 1]


def test_only_certified_policies_unless_an_admin_overrides(team: Served) -> None:
    s, u = team, team.policies["u"]
    body = assert_problem(put(s, "gate", "u"), 409)
    assert body["type"] == "/problems/not-certified" and body["policy_id"] == u and body["certificate"] is None
    assert s.client.get("/aliases/gate", headers=s.auth("owner")).status_code == 404, "nothing was created"
    reason = {"reason": "bench rig, operator on the e-stop"}
    assert_problem(put(s, "gate", "u", override=reason), 403)
    assert_problem(put(s, "gate", "u", role=None, override={"reason": "  "}), 422)
    owner = {"client": s.ids["owner"]}
    forced = s.client.put("/aliases/gate", params=owner, json={"policy_id": u, "override": reason})
    assert forced.status_code == 201, forced.text
    assert forced.json()["certified"] is False and forced.json()["last_change"]["override"] == reason
    assert forced.json()["last_change"]["actor"]["client"] == "admin"
    assert put(s, "gate", "a").status_code == 200 and target(s, "gate") == s.policies["a"]

    # Rolling back to the uncertified target needs the override again.
    assert assert_problem(rollback(s, "gate"), 409)["type"] == "/problems/not-certified"
    assert_problem(rollback(s, "gate", override=reason), 403)
    back = s.client.post("/aliases/gate/rollback", params=owner, json={"override": reason, "reason": "a regressed"})
    assert back.status_code == 200 and back.json()["policy_id"] == u and target(s, "gate") == u
    newest = s.client.get("/aliases/gate/history", headers=s.auth("owner")).json()["items"][0]
    assert newest["certified"] is False and newest["override"] == reason and newest["reason"] == "a regressed"


def test_act_through_an_alias_names_the_policy_and_matches_it(team: Served) -> None:
    s = team
    assert put(s, "act", "a").status_code in (200, 201)
    for name in ("a", "b"):
        pid = s.policies[name]
        r = alias_act(s, "act")
        assert r.status_code == 200 and r.json()["policy_id"] == pid and r.headers["x-policy-id"] == pid
        expected, _ = load_policy(s.store.get_policy(pid).path).act(ROWS)
        assert r.json()["actions"] == expected.tolist(), "answered by the policy it names"
        assert r.headers["x-policy-certified"] == "true"
        put(s, "act", "b")  # this process answers with the new target at once
    direct = s.client.post(f"/policies/{s.policies['b']}/act", json=BODY, headers=s.auth("owner"))
    assert direct.headers["x-policy-id"] == s.policies["b"] and "alias" not in direct.json()
    assert is_act_path("/aliases/act/act") and not is_act_path("/aliases/act/x/act")
    big = json.dumps({"observations": [[1.0] * 5000] * 4}).encode()  # over the /act limit (64 KiB here)
    headers = s.auth("owner") | {"content-type": "application/json"}
    assert_problem(s.client.post("/aliases/act/act", content=big, headers=headers), 413)
    assert_problem(alias_act(s, "act", body={"observations": [[1.0] * (OBS_DIM + 1)]}), 422)


def test_missing_foreign_and_malformed_are_problems(team: Served) -> None:
    s = team
    put(s, "known", "a")
    for r in (
        s.client.get("/aliases/nope", headers=s.auth("owner")),
        s.client.get("/aliases/nope/history", headers=s.auth("owner")),
        rollback(s, "nope"),
        alias_act(s, "nope"),
        put(s, "known", "pol_0000000000000000"),
        put(s, "known", "theirs"),  # another client's policy does not exist for this one
        s.client.get("/aliases/known", headers=s.auth("other")),  # nor does its alias
        s.client.get("/aliases/known", params={"client": s.ids["other"]}, headers=s.auth("owner")),
        alias_act(s, "known", "other"),
    ):
        assert_problem(r, 404)
    for bad in ("Prod", "-x", "_x", "a" * 64, "x%20y"):
        assert_problem(s.client.get(f"/aliases/{bad}", headers=s.auth("owner")), 422)
        assert_problem(put(s, bad, "a"), 422)
        assert_problem(alias_act(s, bad), 422)
    assert_problem(put(s, "known", "a", extra=1), 422, ["body", "extra"])
    assert_problem(s.client.put("/aliases/known", json={}, headers=s.auth("deployer")), 422, ["body", "policy_id"])
    assert_problem(s.client.get("/aliases", params={"page_token": "zz"}, headers=s.auth("owner")), 422)
    assert_problem(put(s, "known", "b", role="owner"), 403)  # policies:read/act cannot repoint
    assert_problem(put(s, "known", "b", role="reader"), 403)
    assert_problem(rollback(s, "known", role="act_only"), 403)
    assert_problem(s.client.get("/aliases", headers=s.auth("act_only")), 403)
    assert_problem(alias_act(s, "known", "reader"), 403)


def test_an_alias_scoped_token_acts_through_that_alias_only(team: Served) -> None:
    s = team
    put(s, "prod", "c")
    put(s, "staging", "a")
    assert target(s, "prod", "prod_only") == s.policies["c"]
    assert_problem(alias_act(s, "staging", "prod_only"), 403)
    assert_problem(s.client.post(f"/policies/{s.policies['c']}/act", json=BODY, headers=s.auth("prod_only")), 403)
    assert_problem(s.client.get("/aliases/prod", headers=s.auth("prod_only")), 403)
    assert_problem(rollback(s, "prod", role="prod_only"), 403)
    with pytest.raises(ValueError, match="alias:<name>"):
        s.store.create_token("bad", ["alias:Prod!"], s.ids["owner"])


def test_cvpo_tokens_create_accepts_alias_scopes_and_refuses_bad_ones(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    monkeypatch.setenv("CVPO_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["tokens", "create", "--name", "arm-3", "--scopes", "alias:arm-3", "--client", "admin"]) == 0
    token_id = capsys.readouterr().out.split()[0]
    listed = Store(f"sqlite:///{tmp_path}/cvpo.db", tmp_path).list_tokens()
    assert [t["scopes"] for t in listed if t["id"] == token_id] == [["alias:arm-3"]]
    assert main(["tokens", "create", "--name", "x", "--scopes", "alias:ARM 3"]) == 2
    assert "alias:<name>" in capsys.readouterr().err


def test_another_processs_repoint_shows_within_the_ttl(team: Served) -> None:
    """Resolution is cached per process for CVPO_ALIAS_TTL_S (default 1 s; 3 s here, so a loaded machine
    cannot blur it): a repoint made elsewhere (in the store, as another API process would) is answered
    with the old target until the TTL since this process last read or set the alias, the new one after."""
    from core.settings import Settings

    assert Settings().alias_ttl_s == 1.0 and Settings.from_env({"CVPO_ALIAS_TTL_S": "0"}).alias_ttl_s == 0.0
    s = team
    resolver = s.client.app.state.aliases
    resolver.ttl_s = 3.0
    try:
        set_at = time.monotonic()
        put(s, "ttl", "a")  # this process remembers a for 3 s from here
        s.store.set_alias(s.ids["owner"], "ttl", s.policies["b"], actor=Actor("elsewhere"))
        assert target(s, "ttl") == s.policies["a"], "answered from the resolution cache"
        seen = target(s, "ttl")
        while seen != s.policies["b"] and time.monotonic() - set_at < 10:
            time.sleep(0.05)
            seen = target(s, "ttl")
        assert seen == s.policies["b"] and time.monotonic() - set_at <= 3.0 + 1.0
    finally:
        resolver.ttl_s = 1.0


# ------------------------------------------------------------------------------ the store, both backends


@pytest.mark.both_backends
def test_concurrent_repoints_keep_one_consistent_history(database_url: str, tmp_path: Any) -> None:
    """Writers racing on one alias: every change is one event, versions 1..N without gaps, each event's
    ``from`` the previous one's ``to``, and the alias ends at the last event's target."""
    from bench.synthetic import write_random_artefact
    from core.promotion import create_policy_from_artefact

    store = Store(database_url, tmp_path / "data")
    pids = []
    for i in range(4):
        artefact = write_random_artefact(tmp_path / f"p{i}", obs_dim=3)
        sha = json.loads((artefact / "policy.json").read_text())["weights_sha256"]
        cert = {"certified": True, "artefact_sha256": sha}
        pids.append(create_policy_from_artefact(store, artefact, "team", certificate=cert).id)
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for j in range(12):
                if (j + k) % 4 == 3:
                    with contextlib.suppress(NothingToRollBackError):
                        store.rollback_alias("team", "prod", actor=Actor(f"w{k}"))
                else:
                    store.set_alias("team", "prod", pids[(j * 3 + k) % 4], actor=Actor(f"w{k}"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    events = list(reversed(store.alias_history("team", "prod", page_size=100)[0]))
    assert [e.version for e in events] == list(range(1, len(events) + 1)) and len(events) > 4
    assert events[0].from_policy is None
    assert all(e.from_policy == prev.to_policy for prev, e in itertools.pairwise(events))
    alias = store.get_alias("team", "prod")
    assert alias is not None and alias.policy_id == events[-1].to_policy and alias.version == len(events)
    store.engine.dispose()
