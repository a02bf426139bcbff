"""Risk at serve time: /act "return": ["cost_to_go"], the hook protocol's cost_to_go/config keywords,
the cost_budget_fallback shield on a hand-made critic, GET /policies and the ONNX cost head over HTTP."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from api.act import PolicyCache, _macs_per_row, act, parse_act_request
from api.errors import Problem
from api.shield import ShieldSpecError, build_shield, cost_budget_fallback, hook_params, validate_shield_spec
from bench.synthetic import write_random_artefact
from cvpo.artefact import PolicyRuntime, load_policy
from tests.api.conftest import ADMIN, Served, served_settings

OBS, ACT, MAX_BATCH = 6, 2, 32
LOW, HIGH = [-0.5, -2.0], [1.5, 0.25]


def hand_made_critic_artefact(path: Path) -> Path:
    """obs 3 → act 2, no normaliser, and a 2-member critic with known weights:
    Q_0(s, a) = relu(s_0) and Q_1(s, a) = 2·relu(s_1) (the action does not matter)."""
    import torch

    from cvpo.artefact import write_policy_artefact
    from cvpo.config import resolve_config
    from cvpo.nets import EnsembleCritic, GaussianActor

    torch.manual_seed(0)
    actor = GaussianActor(3, 2, (8,))
    critic = EnsembleCritic(3, 2, 2, hidden=(2,))
    with torch.no_grad():
        for p in [*critic.weights, *critic.biases]:
            p.zero_()
        critic.weights[0][0, 0, 0] = 1.0  # member 0, hidden unit 0 reads s_0
        critic.weights[1][0, 0, 0] = 1.0
        critic.weights[0][1, 1, 0] = 1.0  # member 1, hidden unit 0 reads s_1
        critic.weights[1][1, 0, 0] = 2.0
    env = SimpleNamespace(obs_dim=3, act_dim=2, act_low=np.array(LOW), act_high=np.array(HIGH))
    config = resolve_config({"env_id": "SafetyPointGoal1-v0", "constraints": {"cost_limits": [25.0, 50.0]}})
    return write_policy_artefact(path, actor, None, env, config, {}, cost_critic=critic, horizon=1000)


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ctg")
    return {
        "critic": write_random_artefact(root / "critic", obs_dim=OBS, act_low=LOW, act_high=HIGH, cost_critic=2),
        "old": write_random_artefact(root / "old", obs_dim=OBS, act_low=LOW, act_high=HIGH, seed=1),
        "raw_critic": write_random_artefact(root / "raw", obs_dim=OBS, normalizer=False, cost_critic=1, seed=2),
        "hand": hand_made_critic_artefact(root / "hand"),
    }


@pytest.fixture(scope="module")
def runtimes(artefacts: dict[str, Path]) -> dict[str, PolicyRuntime]:
    return {k: load_policy(v) for k, v in artefacts.items()}


def run(runtime: PolicyRuntime, body: dict[str, Any], shield: Any = None) -> dict[str, Any]:
    req = parse_act_request(json.dumps(body).encode(), runtime.obs_dim, MAX_BATCH)
    return orjson.loads(act(runtime, req, shield, "pol_ctg"))


def problem(runtime: PolicyRuntime, body: dict[str, Any], shield: Any = None) -> Problem:
    with pytest.raises(Problem) as info:
        run(runtime, body, shield)
    return info.value


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


ROWS = np.random.default_rng(3).normal(0, 3, size=(9, OBS))


# -------------------------------------------------------------------------------------- parsing


def test_return_is_parsed_and_unknown_entries_are_422() -> None:
    body = {"observations": [[0.0] * OBS]}
    assert not parse_act_request(json.dumps(body).encode(), OBS, 4).cost_to_go
    for value, expected in ((["cost_to_go"], True), ([], False), (["cost_to_go", "cost_to_go"], True)):
        assert parse_act_request(json.dumps({**body, "return": value}).encode(), OBS, 4).cost_to_go is expected
    for value, loc in (
        (["value"], ["body", "return", 0]),
        (["cost_to_go", "actions"], ["body", "return", 1]),
        ([1], ["body", "return", 0]),
        ("cost_to_go", ["body", "return"]),
        ({"cost_to_go": True}, ["body", "return"]),
        (["cost_to_go"] * 9, ["body", "return"]),
    ):
        with pytest.raises(Problem) as info:
            parse_act_request(json.dumps({**body, "return": value}).encode(), OBS, 4)
        assert info.value.status == 422 and info.value.errors[0]["loc"] == loc, value
    with pytest.raises(Problem) as info:
        parse_act_request(json.dumps({**body, "return": ["value"]}).encode(), OBS, 4)
    assert "allowed: ['cost_to_go']" in info.value.detail


# ---------------------------------------------------------------------------------------- acting


def test_act_returns_the_critics_cost_to_go_of_the_policys_action(runtimes: dict[str, PolicyRuntime]) -> None:
    rt = runtimes["critic"]
    out = run(rt, {"observations": ROWS.tolist(), "return": ["cost_to_go"]})
    expected = rt.cost_to_go(ROWS, rt.raw_action(ROWS))
    assert np.array(out["cost_to_go"]).shape == (9, 2)
    np.testing.assert_allclose(out["cost_to_go"], expected, rtol=0, atol=1e-12)
    plain = run(rt, {"observations": ROWS.tolist()})
    assert "cost_to_go" not in plain and plain["actions"] == out["actions"]  # the default path is unchanged
    # a seeded sample: Q_c of that sample (raw, before clipping), not of the mean
    sampled = run(rt, {"observations": ROWS.tolist(), "return": ["cost_to_go"], "deterministic": False, "seed": 4})
    raw = rt.raw_action(ROWS, False, np.random.default_rng(4))
    np.testing.assert_allclose(sampled["cost_to_go"], rt.cost_to_go(ROWS, raw), rtol=0, atol=1e-12)
    assert not np.allclose(sampled["cost_to_go"], out["cost_to_go"])
    single = run(rt, {"observations": ROWS[0].tolist(), "return": ["cost_to_go"]})
    np.testing.assert_allclose(single["cost_to_go"], [out["cost_to_go"][0]], rtol=1e-12, atol=1e-12)


def test_cost_to_go_of_a_policy_without_critics_is_422(runtimes: dict[str, PolicyRuntime]) -> None:
    p = problem(runtimes["old"], {"observations": ROWS.tolist(), "return": ["cost_to_go"]})
    assert p.status == 422 and p.errors[0]["loc"] == ["body", "return"] and "no cost critic" in p.detail
    assert "cost_to_go" not in run(runtimes["old"], {"observations": ROWS.tolist(), "return": []})


def test_a_non_finite_cost_to_go_is_handled_like_a_non_finite_action(runtimes: dict[str, PolicyRuntime]) -> None:
    """Without a normaliser a client's huge input can overflow the critic (422); with one, only a
    broken critic can (a corrupt policy, as for the actor)."""
    from api.act import CorruptPolicyError

    def broken(rt: PolicyRuntime) -> PolicyRuntime:
        out = copy.copy(rt)
        assert rt.cost_critic is not None
        w, b = rt.cost_critic[-1]
        out.cost_critic = [*rt.cost_critic[:-1], (w, np.full_like(b, np.inf))]
        return out

    p = problem(broken(runtimes["raw_critic"]), {"observations": ROWS.tolist(), "return": ["cost_to_go"]})
    assert p.status == 422 and "cost critic overflowed" in p.detail
    with pytest.raises(CorruptPolicyError, match="cost critic"):
        run(broken(runtimes["critic"]), {"observations": ROWS.tolist(), "return": ["cost_to_go"]})
    run(broken(runtimes["critic"]), {"observations": ROWS.tolist()})  # not asked for: not computed


# --------------------------------------------------------------------------------- hook protocol

CALLS: list[dict[str, Any]] = []


def old_hook(raw_obs: np.ndarray, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    CALLS.append({"kind": "old"})
    return action, np.zeros(len(action), bool), [None] * len(action)


def optional_hook(
    raw_obs: np.ndarray, action: np.ndarray, cost_to_go: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    CALLS.append({"kind": "optional", "cost_to_go": cost_to_go})
    return action, np.zeros(len(action), bool), [None] * len(action)


def kwargs_hook(raw_obs: np.ndarray, action: np.ndarray, **kw: Any) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    CALLS.append({"kind": "kwargs", **kw})
    return action, np.zeros(len(action), bool), [None] * len(action)


HOOKS = {"old": old_hook, "optional": optional_hook, "kwargs": kwargs_hook, "budget": cost_budget_fallback}


def test_hook_signatures_are_read_once(runtimes: dict[str, PolicyRuntime]) -> None:
    assert hook_params(old_hook).cost_to_go == "no" and not hook_params(old_hook).config
    assert hook_params(optional_hook).cost_to_go == "optional"
    assert hook_params(kwargs_hook).cost_to_go == "optional" and hook_params(kwargs_hook).config
    assert hook_params(cost_budget_fallback).cost_to_go == "required" and hook_params(cost_budget_fallback).config
    assert hook_params(len).cost_to_go == "no"


def test_hooks_get_cost_to_go_when_they_take_it(runtimes: dict[str, PolicyRuntime]) -> None:
    rt, old = runtimes["critic"], runtimes["old"]
    expected = rt.cost_to_go(ROWS, rt.raw_action(ROWS))
    CALLS.clear()
    for name in ("old", "optional", "kwargs"):
        shield = build_shield({"type": "hook", "name": name}, rt.meta, HOOKS)
        out = run(rt, {"observations": ROWS.tolist()}, shield)
        assert "cost_to_go" not in out and not any(out["shield"]["applied"])
    assert CALLS[0] == {"kind": "old"}
    np.testing.assert_allclose(CALLS[1]["cost_to_go"], expected, atol=1e-12)
    np.testing.assert_allclose(CALLS[2]["cost_to_go"], expected, atol=1e-12)
    assert CALLS[2]["config"] == {}
    # A policy without critics: optional hooks get nothing (the default), old hooks are unaffected.
    CALLS.clear()
    for name in ("old", "optional", "kwargs"):
        run(old, {"observations": ROWS.tolist()}, build_shield({"type": "hook", "name": name}, old.meta, HOOKS))
    assert CALLS == [{"kind": "old"}, {"kind": "optional", "cost_to_go": None}, {"kind": "kwargs", "config": {}}]


def test_hook_specs_are_checked_against_the_hook_and_the_artefact(runtimes: dict[str, PolicyRuntime]) -> None:
    old, hand = runtimes["old"].meta, runtimes["hand"].meta
    with pytest.raises(ShieldSpecError, match="needs the policy's cost critic"):
        validate_shield_spec({"type": "hook", "name": "budget"}, old, HOOKS)
    with pytest.raises(ShieldSpecError, match="takes no config"):
        validate_shield_spec({"type": "hook", "name": "old", "config": {"x": 1}}, hand, HOOKS)
    with pytest.raises(ShieldSpecError, match="config must be an object"):
        validate_shield_spec({"type": "hook", "name": "kwargs", "config": [1]}, hand, HOOKS)
    with pytest.raises(ShieldSpecError, match="over 4096 bytes"):
        validate_shield_spec({"type": "hook", "name": "kwargs", "config": {"x": "y" * 5000}}, hand, HOOKS)
    assert validate_shield_spec({"type": "hook", "name": "old"}, hand, HOOKS) == {"type": "hook", "name": "old"}
    for config, match in (
        ({"budgets": 1}, "unknown field"),
        ({"budget": [1.0]}, "budget must be"),
        ({"budget": [1.0, "x"]}, r"budget\[1\]"),
        ({"budget": [None, None]}, "unbudgeted"),
        ({"budget": float("inf")}, "budget"),
        ({"safe_action": [0.0]}, "list of 2 numbers"),
        ({"safe_action": [2.0, 0.0]}, "inside the action Box"),
        ({"safe_action": [True, 0.0]}, "finite numbers"),
    ):
        with pytest.raises(ShieldSpecError, match=match):
            validate_shield_spec({"type": "hook", "name": "budget", "config": config}, hand, HOOKS)


# --------------------------------------------------------------------------- cost_budget_fallback


def test_cost_budget_fallback_on_a_hand_made_critic(
    runtimes: dict[str, PolicyRuntime], caplog: pytest.LogCaptureFixture
) -> None:
    rt = runtimes["hand"]
    rows = [[0.5, 0.2, 0.0], [1.5, 0.0, 0.0], [0.0, 0.9, 0.0], [-3.0, -3.0, 1.0], [2.0, 2.0, 0.0]]
    q = rt.cost_to_go(np.array(rows), rt.raw_action(np.array(rows)))
    np.testing.assert_allclose(q, [[0.5, 0.4], [1.5, 0.0], [0.0, 1.8], [0.0, 0.0], [2.0, 4.0]], atol=1e-12)

    spec = validate_shield_spec(
        {"type": "hook", "name": "budget", "config": {"budget": 1.0, "safe_action": [0.25, -1.0]}}, rt.meta, HOOKS
    )
    assert spec == {
        "type": "hook",
        "name": "budget",
        "config": {"budget": [1.0, 1.0], "budget_source": "config", "safe_action": [0.25, -1.0]},
    }
    shield = build_shield(spec, rt.meta, HOOKS)
    before = sample("act_shield_interventions_total", {"policy_id": "pol_ctg"})
    with caplog.at_level(logging.INFO, logger="cvpo.shield"):
        out = run(rt, {"observations": rows}, shield)
    nominal = rt.act(np.array(rows))[0]
    applied = [False, True, True, False, True]
    assert out["shield"]["applied"] == applied and "cost_to_go" not in out
    for i, a in enumerate(applied):
        assert out["actions"][i] == ([0.25, -1.0] if a else nominal[i].tolist())
    reasons = out["shield"]["reasons"]
    assert reasons[0] is None and reasons[3] is None
    assert reasons[1] == "cost budget: Q_c[0]=1.5 > budget 1; safe action"
    assert reasons[2] == "cost budget: Q_c[1]=1.8 > budget 1; safe action"
    assert reasons[4] == "cost budget: Q_c[0]=2 > budget 1, Q_c[1]=4 > budget 1; safe action"
    assert sample("act_shield_interventions_total", {"policy_id": "pol_ctg"}) - before == 3
    logged = [r.getMessage() for r in caplog.records if r.name == "cvpo.shield"]
    assert len(logged) == 3 and "row=1" in logged[0] and "safe=[0.25, -1.0]" in logged[0]

    # The same request asking for cost_to_go gets the nominal action's Q_c beside the shielded actions.
    both = run(rt, {"observations": rows, "return": ["cost_to_go"]}, shield)
    np.testing.assert_allclose(both["cost_to_go"], q, atol=1e-12)
    assert both["actions"] == out["actions"]

    # Per-constraint budgets, one of them unbudgeted (null).
    spec = validate_shield_spec({"type": "hook", "name": "budget", "config": {"budget": [None, 1.0]}}, rt.meta, HOOKS)
    out = run(rt, {"observations": rows}, build_shield(spec, rt.meta, HOOKS))
    assert out["shield"]["applied"] == [False, False, True, False, True]
    assert out["actions"][2] == [0.0, 0.0]  # the default safe action: zeros (inside this Box)


def test_cost_budget_defaults_to_the_artefacts_per_step_thresholds(runtimes: dict[str, PolicyRuntime]) -> None:
    rt = runtimes["hand"]
    cbar = rt.meta["cost_critic"]["per_step_thresholds"]  # c̄ of the limits 25 and 50 at T = 1000
    spec = validate_shield_spec({"type": "hook", "name": "budget"}, rt.meta, HOOKS)
    assert spec["config"] == {"budget": cbar, "budget_source": "thresholds", "safe_action": [0.0, 0.0]}
    rows = [[cbar[0] - 0.1, 0.0, 0.0], [cbar[0] + 0.1, 0.0, 0.0], [0.0, cbar[1] / 2 + 0.1, 0.0]]
    out = run(rt, {"observations": rows}, build_shield(spec, rt.meta, HOOKS))
    assert out["shield"]["applied"] == [False, True, True]
    # The hook on its own: plain arrays in, (safe, applied, reasons) out.
    safe, applied, reasons = cost_budget_fallback(
        np.zeros((2, 3)), np.ones((2, 2)), cost_to_go=np.array([[0.0, 99.0], [0.0, 0.0]]), config=spec["config"]
    )
    assert applied.tolist() == [True, False] and safe.tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert reasons[1] is None and reasons[0].startswith("cost budget: Q_c[1]=99 > budget 9.93")


def test_the_policy_cache_sizes_and_serves_a_budget_shield(artefacts: dict[str, Path]) -> None:
    cache = PolicyCache(SimpleNamespace(shield_hooks="budget=api.shield:cost_budget_fallback"))
    entry = cache.get("pol_b", artefacts["hand"], {"type": "hook", "name": "budget", "config": {"budget": 1.0}})
    assert entry.shield is not None and entry.shield.wants_cost_to_go
    assert entry.critic_macs_per_row == 2 * (5 * 2 + 2 * 1)
    assert entry.macs_per_row > entry.critic_macs_per_row  # the shield always evaluates the critic
    plain = cache.get("pol_p", artefacts["critic"], None)
    assert plain.critic_macs_per_row > 0 and plain.macs_per_row == _macs_per_row(plain.runtime)  # actor only


# ------------------------------------------------------------------------------------------ HTTP


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from api.app import create_app

    tmp = tmp_path_factory.mktemp("served_ctg")
    hooks = "slow=api.shield:speed_limiter,budget=api.shield:cost_budget_fallback"
    with TestClient(create_app(served_settings(tmp, shield_hooks=hooks))) as client:
        client.headers["Authorization"] = f"Bearer {ADMIN}"
        s = Served(client, client.app.state.store, tmp / "artefacts")
        s.ids["owner"], s.tokens["owner"] = s.store.create_token("owner", ["policies:read", "policies:act"])
        s.register("critic", cost_critic=2)
        s.register("old", seed=1)
        s.register("budget", shield={"type": "hook", "name": "budget", "config": {"budget": -1e9}}, cost_critic=1)
        yield s


def post_act(served: Served, name: str, body: dict[str, Any]) -> Any:
    return served.client.post(f"/policies/{served.policies[name]}/act", json=body, headers=served.auth("owner"))


def test_http_act_returns_cost_to_go_and_422s(served: Served) -> None:
    rt = load_policy(served.store.get_policy(served.policies["critic"]).path)
    r = post_act(served, "critic", {"observations": ROWS.tolist(), "return": ["cost_to_go"]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["cost_to_go"], rt.cost_to_go(ROWS, rt.raw_action(ROWS)), atol=1e-12)
    assert "cost_to_go" not in post_act(served, "critic", {"observations": ROWS.tolist()}).json()

    r = post_act(served, "old", {"observations": ROWS.tolist(), "return": ["cost_to_go"]})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["errors"][0]["loc"] == ["body", "return"] and "no cost critic" in r.json()["detail"]
    assert post_act(served, "old", {"observations": ROWS.tolist()}).status_code == 200  # still serves
    r = post_act(served, "critic", {"observations": ROWS.tolist(), "return": ["risk"]})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "return", 0]

    shielded = post_act(served, "budget", {"observations": ROWS.tolist()}).json()
    assert all(shielded["shield"]["applied"]) and shielded["actions"] == [[0.0, 0.0]] * len(ROWS)


def test_http_metadata_and_onnx_cost_head(served: Served) -> None:
    meta = served.client.get(f"/policies/{served.policies['critic']}").json()
    assert meta["has_cost_critic"] is True and meta["cost_critic"]["members"] == 2
    assert meta["cost_critic"]["per_step_thresholds"] and meta["cost_critic"]["gamma"] > 0
    old = served.client.get(f"/policies/{served.policies['old']}").json()
    assert old["has_cost_critic"] is False and old["cost_critic"] is None
    budget = served.client.get(f"/policies/{served.policies['budget']}").json()
    assert budget["shield"]["config"] == {"budget": -1e9}  # as registered (promotion stores the normalised form)

    pid = served.policies["critic"]
    model = served.client.get(f"/policies/{pid}/export", params={"format": "onnx", "cost_head": "true"})
    assert model.status_code == 200
    sess = ort.InferenceSession(model.content, providers=["CPUExecutionProvider"])
    obs = ROWS.astype(np.float32)
    (q,) = sess.run(["cost_to_go"], {"observations": obs})
    served_q = post_act(served, "critic", {"observations": obs.astype(np.float64).tolist(), "return": ["cost_to_go"]})
    np.testing.assert_allclose(q, served_q.json()["cost_to_go"], rtol=1e-6, atol=1e-5)
    default = served.client.get(f"/policies/{pid}/export", params={"format": "onnx"})
    assert [o.name for o in ort.InferenceSession(default.content).get_outputs()] == ["actions", "clipped"]
    r = served.client.get(f"/policies/{served.policies['old']}/export", params={"format": "onnx", "cost_head": "true"})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query", "cost_head"]
