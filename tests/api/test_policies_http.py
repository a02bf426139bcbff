"""The policy routes over HTTP with the real app (lifespan, auth, limits middleware, problem+json)."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import zipfile
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import REGISTRY, generate_latest

import api.act as act_module
import api.routes.act as act_route_module
from core.promotion import create_policy_from_artefact
from cvpo.artefact import load_policy
from tests.api.conftest import HIGH, LOW, OBS_DIM, Served

ROWS = np.random.default_rng(0).normal(0, 3, (8, OBS_DIM))


def act(served: Served, name_or_id: str, body: Any = None, role: str | None = None, **kw: Any) -> httpx.Response:
    pid = served.policies.get(name_or_id, name_or_id)
    headers = served.auth(role) if role else {}
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    headers.setdefault("content-type", "application/json")
    return served.client.post(f"/policies/{pid}/act", content=body, headers=headers | kw.pop("headers", {}), **kw)


def assert_problem(r: httpx.Response, status: int, loc: list[Any] | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status and body["type"].startswith("/problems/") and "Traceback" not in r.text
    if loc is not None:
        assert body["errors"][0]["loc"] == loc, body
    return body


def runtime(served: Served, name: str) -> Any:
    return load_policy(served.store.get_policy(served.policies[name]).path)


# ------------------------------------------------------------------------------------------ /act


def test_act_answers_per_the_contract(served: Served) -> None:
    r = act(served, "plain", {"observations": ROWS.tolist(), "request_id": "c-913"}, role="owner")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json" and r.headers["x-request-id"]
    out = r.json()
    expected, clipped = runtime(served, "plain").act(ROWS)
    assert out["actions"] == expected.tolist() and out["clipped"] == clipped.tolist() and any(out["clipped"])
    assert np.all(np.array(out["actions"]) >= LOW) and np.all(np.array(out["actions"]) <= HIGH)
    assert out["policy_id"] == served.policies["plain"] and out["request_id"] == "c-913"
    assert out["deterministic"] is True and "shield" not in out
    assert out["artefact_sha256"] == served.store.get_policy(served.policies["plain"]).sha256

    single = act(served, "plain", {"observations": ROWS[0].tolist()}, role="owner").json()
    assert single["actions"] == [out["actions"][0]] and single["request_id"] is None
    seeded = {"observations": ROWS.tolist(), "deterministic": False, "seed": 7}
    assert act(served, "plain", seeded).json() == act(served, "plain", seeded).json()


def test_act_refuses_bad_input_with_the_culprit(served: Served) -> None:
    good = json.dumps({"observations": ROWS[:2].tolist()})
    nan = good.replace(str(ROWS[1][3]), "NaN", 1).encode()
    body = assert_problem(act(served, "plain", nan), 422, ["body", "observations", 1, 3])
    assert body["errors"][0]["input"] == "NaN" and body["detail"] == "observations[1][3] is NaN"
    assert body["type"] == "/problems/non-finite-value" and body["instance"].endswith("/act")
    overflow = good.replace(str(ROWS[0][0]), "1e309", 1).encode()
    assert assert_problem(act(served, "plain", overflow), 422, ["body", "observations", 0, 0])["errors"][0][
        "input"
    ] == ("Infinity")
    rows = ROWS[:2].tolist()
    rows[1][2] = "nan"
    assert_problem(act(served, "plain", {"observations": rows}), 422, ["body", "observations", 1, 2])
    rows[1][2] = True
    assert_problem(act(served, "plain", {"observations": rows}), 422, ["body", "observations", 1, 2])
    ragged = [ROWS[0].tolist(), ROWS[1].tolist()[:-1]]
    detail = assert_problem(act(served, "plain", {"observations": ragged}), 422, ["body", "observations", 1])["detail"]
    assert f"has {OBS_DIM - 1} values" in detail and f"[B, {OBS_DIM}]" in detail
    assert_problem(act(served, "plain", {"observations": []}), 422, ["body", "observations"])
    assert_problem(act(served, "plain", {"observations": [ROWS[0].tolist()], "extra": 1}), 422, ["body", "extra"])
    assert_problem(act(served, "plain", {"observations": [ROWS[0].tolist()] * 17}), 413)
    assert_problem(act(served, "plain", b"{not json"), 400)
    assert_problem(act(served, "plain", good.encode(), headers={"content-type": "text/plain"}), 415)
    big = json.dumps({"observations": [[1.0] * 20000] * 2}).encode()
    assert_problem(act(served, "plain", big), 413)


def test_the_act_body_limit_applies_to_act_routes_only(served: Served) -> None:
    """The /act byte limit (64 KiB here) is for /policies/{id}/act: another path that merely ends in
    /act has the general limit (1 MiB), so a 100 KB body there is a 404, not a 413."""
    body = json.dumps({"observations": [[1.0] * 5000] * 4}).encode()
    assert 64 * 1024 < len(body) < 1024 * 1024
    assert_problem(act(served, "plain", body), 413)
    headers = {"content-type": "application/json"}  # the client sends the admin token
    assert_problem(served.client.post("/jobs/job_x/act", content=body, headers=headers), 404)


def test_act_auth_and_ownership(served: Served) -> None:
    body = {"observations": ROWS[:1].tolist()}
    assert act(served, "plain", body, role="owner").status_code == 200
    assert act(served, "controlled", body, role="act_only").status_code == 200
    assert_problem(act(served, "controlled", body, role="reader"), 403)
    assert_problem(act(served, "plain", body, headers={"Authorization": ""}), 401)
    assert_problem(act(served, "plain", body, headers={"Authorization": "Bearer nope"}), 401)
    # Another client's policy does not exist for you, loaded or not; an admin sees everything.
    assert_problem(act(served, "foreign", body, role="owner"), 404)
    assert act(served, "foreign", body, role="other").status_code == 200
    assert_problem(act(served, "foreign", body, role="owner"), 404)
    assert act(served, "foreign", body).status_code == 200
    assert_problem(act(served, "pol_does_not_exist", body), 404)


def test_shielded_policies_report_interventions(served: Served) -> None:
    boxed = act(served, "boxed", {"observations": ROWS.tolist()}).json()
    nominal = runtime(served, "boxed").act(ROWS)[0]
    safe = np.clip(nominal, [-0.5, -1.5], [1.0, 0.25])
    assert boxed["actions"] == safe.tolist()
    assert boxed["shield"]["applied"] == np.any(safe != nominal, axis=1).tolist()
    hooked = act(served, "hooked", {"observations": ROWS.tolist()}).json()
    assert np.all(np.linalg.norm(hooked["actions"], axis=1) <= 0.5 + 1e-12) and any(hooked["shield"]["applied"])
    metrics = generate_latest(REGISTRY).decode()  # what /metrics appends to the HTTP metrics
    assert f'act_shield_interventions_total{{policy_id="{served.policies["boxed"]}"}}' in metrics
    assert "act_batch_size_bucket" in metrics and "act_clipped_total" in metrics


def test_heavy_requests_run_in_the_threadpool_with_the_same_answer(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {"observations": ROWS.tolist()}
    inline = act(served, "plain", body).json()
    monkeypatch.setattr(act_route_module, "INLINE_MACS", 0)
    assert act(served, "plain", body).json() == inline
    monkeypatch.setattr(act_route_module, "INLINE_BODY_BYTES", 0)
    assert act(served, "plain", body).json() == inline
    assert_problem(act(served, "plain", {"observations": [[1.0]]}), 422, ["body", "observations", 0])


def test_a_corrupt_policy_is_500_once_then_not_ready(served: Served) -> None:
    pid = served.register("corrupt", seed=5)
    body = {"observations": ROWS[:2].tolist()}
    assert act(served, pid, body).status_code == 200
    entry = served.client.app.state.policy_cache.lookup(pid)
    entry.runtime.mean_b = np.full(2, np.nan)  # memory corruption after a clean load
    problem = assert_problem(act(served, pid, body), 500)
    assert problem["type"] == "/problems/corrupt-policy" and "actions" not in problem, "never 200 with null"
    again = act(served, pid, body)
    assert_problem(again, 503)
    assert again.headers["retry-after"]
    assert served.client.get(f"/policies/{pid}").json()["ready"] is False
    assert served.store.get_policy(pid).ready is False


def test_a_tampered_artefact_is_never_loaded(served: Served) -> None:
    pid = served.register("tampered", seed=6)
    weights = served.root / "tampered" / "policy.safetensors"
    data = bytearray(weights.read_bytes())
    data[-2] ^= 0x01
    weights.write_bytes(bytes(data))
    assert "sha256" in assert_problem(act(served, pid, {"observations": ROWS[:1].tolist()}), 503)["detail"]
    assert served.client.get(f"/policies/{pid}").json()["ready"] is False
    assert_problem(served.client.get(f"/policies/{pid}/export", params={"format": "bundle"}), 503)


def test_act_is_503_while_the_artefact_loads(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    pid = served.register("slow_load", seed=7)
    real, started = act_module.load_policy, threading.Event()

    def slow(path: Any) -> Any:
        started.set()
        time.sleep(1.0)
        return real(path)

    monkeypatch.setattr(act_module, "load_policy", slow)
    body = {"observations": ROWS[:1].tolist()}
    first: list[httpx.Response] = []
    t = threading.Thread(target=lambda: first.append(act(served, pid, body)))
    t.start()
    assert started.wait(10)
    loading = act(served, pid, body)
    t.join(30)
    assert_problem(loading, 503)
    assert loading.headers["retry-after"] == "1" and first[0].status_code == 200


def test_a_hook_the_server_lacks_is_503(served: Served) -> None:
    cache = served.client.app.state.policy_cache
    pid = served.register("unconfigured_hook", seed=8, shield={"type": "hook", "name": "slow"})
    saved = dict(cache.hooks)
    cache.hooks.clear()
    try:
        assert "slow" in assert_problem(act(served, pid, {"observations": ROWS[:1].tolist()}), 503)["detail"]
    finally:
        cache.hooks.update(saved)
    assert served.store.get_policy(pid).ready is True, "a config gap is not the artefact's fault"


# ------------------------------------------------------------------------------ metadata, listing


def test_metadata_mirrors_the_artefact(served: Served) -> None:
    meta = served.client.get(f"/policies/{served.policies['boxed']}").json()
    record = served.store.get_policy(served.policies["boxed"])
    assert meta["id"] == record.id and meta["env_id"] == "SafetyPointGoal1-v0" and meta["ready"] is True
    assert meta["observation_space"] == {"shape": [OBS_DIM], "low": None, "high": None}
    assert meta["action_space"] == {"shape": [2], "low": LOW, "high": HIGH}
    assert meta["normalizer"] == {"present": True, "clip": 5.0} and meta["max_batch"] == 16
    assert meta["shield"] == {"type": "box", "low": [-0.5, -1.5], "high": [1.0, 0.25]}
    assert meta["sha256"] == record.sha256 and meta["cost_limits"] == [25.0]
    assert meta["source"]["job_id"] == "job_boxed" and meta["created_at"].endswith("Z")
    assert meta["links"]["act"] == f"/policies/{record.id}/act"
    assert served.client.get(f"/policies/{served.policies['plain']}", headers=served.auth("owner")).status_code == 200
    assert_problem(served.client.get(f"/policies/{served.policies['foreign']}", headers=served.auth("owner")), 404)
    controlled = served.policies["controlled"]
    assert_problem(served.client.get(f"/policies/{controlled}", headers=served.auth("act_only")), 403)
    assert_problem(served.client.get("/policies/pol_nope"), 404)


def test_list_is_per_client_filtered_and_paged(served: Served) -> None:
    mine = served.client.get("/policies", headers=served.auth("owner")).json()["items"]
    ids = {p["id"] for p in mine}
    assert served.policies["plain"] in ids and served.policies["foreign"] not in ids
    assert {p["id"] for p in served.client.get("/policies").json()["items"]} >= set(served.policies.values())
    page1 = served.client.get("/policies", params={"page_size": 1}).json()
    page2 = served.client.get("/policies", params={"page_size": 1, "page_token": page1["next_page_token"]}).json()
    assert len(page1["items"]) == 1 and page1["items"][0]["id"] != page2["items"][0]["id"]
    only = served.client.get("/policies", params={"job_id": "job_hooked"}).json()["items"]
    assert [p["id"] for p in only] == [served.policies["hooked"]]
    assert served.client.get("/policies", params={"env_id": "SafetyCarGoal1-v0"}).json()["items"] == []
    assert_problem(served.client.get("/policies", params={"page_token": "garbage!"}), 422, ["query", "page_token"])
    # A well-formed token whose number does not fit the 64-bit seq column (issue #23 item 10): 422, not 500.
    import base64

    for seq in (2**63, 10**30, -(2**63) - 1):
        huge = base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")
        assert_problem(served.client.get("/policies", params={"page_token": huge}), 422, ["query", "page_token"])
    assert_problem(served.client.get("/policies", params={"page_size": 0}), 422)


# ------------------------------------------------------------------------------------------ export


def test_onnx_export_matches_act(served: Served) -> None:
    for name in ("plain", "boxed"):
        r = served.client.get(f"/policies/{served.policies[name]}/export", params={"format": "onnx"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        sess = ort.InferenceSession(r.content, providers=["CPUExecutionProvider"])
        onnx_actions = sess.run(["actions"], {"observations": ROWS.astype(np.float32)})[0]
        served_actions = act(served, name, {"observations": ROWS.astype(np.float32).astype(np.float64).tolist()})
        np.testing.assert_allclose(onnx_actions, served_actions.json()["actions"], atol=1e-5)
    assert served.client.get(f"/policies/{served.policies['boxed']}/export").content == r.content, "onnx is the default"
    assert_problem(served.client.get(f"/policies/{served.policies['hooked']}/export"), 422, ["query", "format"])
    assert_problem(served.client.get(f"/policies/{served.policies['plain']}/export", params={"format": "pt"}), 422)
    forbidden = served.client.get(f"/policies/{served.policies['controlled']}/export", headers=served.auth("act_only"))
    assert_problem(forbidden, 403)


def test_bundle_export_holds_the_native_files(served: Served) -> None:
    r = served.client.get(f"/policies/{served.policies['hooked']}/export", params={"format": "bundle"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        assert sorted(z.namelist()) == ["policy.json", "policy.safetensors", "shield.json"]
        meta = json.loads(z.read("policy.json"))
        assert hashlib.sha256(z.read("policy.safetensors")).hexdigest() == meta["weights_sha256"]
        assert json.loads(z.read("shield.json")) == {"type": "hook", "name": "slow"}


# ----------------------------------------------------------------------------- certificates


def test_act_says_whether_the_policy_is_certified(served: Served) -> None:
    """X-Policy-Certified on every /act answer; policies without a certificate count as not certified."""
    from bench.synthetic import write_random_artefact

    plain = act(served, "plain", {"observations": ROWS.tolist()}, role="owner")
    assert plain.status_code == 200 and plain.headers["x-policy-certified"] == "false"
    meta = served.client.get(f"/policies/{served.policies['plain']}").json()
    assert meta["certified"] is False and meta["certificate"] is None and meta["override"] is None

    artefact = write_random_artefact(served.root / "certified", obs_dim=OBS_DIM, act_low=LOW, act_high=HIGH, seed=9)
    sha = json.loads((artefact / "policy.json").read_text())["weights_sha256"]
    cert = {"certified": True, "artefact_sha256": sha, "episodes": 30, "constraints": []}
    record = create_policy_from_artefact(served.store, artefact, served.ids["owner"], certificate=cert)
    served.policies["certified"] = record.id
    for _ in range(2):  # first request loads the policy, the second is served from the cache
        r = act(served, "certified", {"observations": ROWS.tolist()}, role="owner")
        assert r.status_code == 200 and r.headers["x-policy-certified"] == "true"
    meta = served.client.get(f"/policies/{record.id}", headers=served.auth("owner")).json()
    assert meta["certified"] is True and meta["certificate"] == cert
    bundle = served.client.get(f"/policies/{record.id}/export", params={"format": "bundle"})
    with zipfile.ZipFile(io.BytesIO(bundle.content)) as z:
        assert json.loads(z.read("certificate.json")) == cert


def test_metrics_show_a_tenant_only_its_own_policies(served: Served) -> None:
    """Issue #23 item 9: /metrics listed every tenant's policy ids to any token with metrics:read."""
    from api.act import ACT_CLIPPED

    mine, theirs = served.policies["plain"], served.policies["foreign"]
    for pid in (mine, theirs):
        ACT_CLIPPED.labels(pid).inc(0)  # a labelled series for each, as /act creates them
    _, tenant = served.store.create_token("scraper", ["metrics:read"], served.ids["owner"])
    body = served.client.get("/metrics", headers={"Authorization": f"Bearer {tenant}"}).text
    assert f'policy_id="{mine}"' in body and theirs not in body
    assert "# TYPE act_clipped_total counter" in body and "cvpo_jobs" in body  # the rest is unchanged
    admin = served.client.get("/metrics").text
    assert f'policy_id="{mine}"' in admin and f'policy_id="{theirs}"' in admin
