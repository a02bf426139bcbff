"""Certified policies end to end (issue #18): real app, Redis, Celery worker and store.

A 2 000-step policy on SafetyPointCircle1-v0 leaves the circle's bounds (hundreds of cost per
episode): against a limit of 25 no candidate certifies, so the job ends without a policy and
``POST /policies`` is a 409 carrying the certificate; an admin may override (the policy then says
``certified: false``, in its resource and on every /act answer). Trained against a limit it meets
(1000: its episodes cost ~350-470, so 400 is not met), the same run is certified and promoted.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import pytest

from tests.conftest import TINY_LIMIT, TINY_SPEC, Service, wait_until
from tests.e2e.test_jobs_api import assert_problem, post_job, wait_job

EPISODES = 8  # held-out episodes per certificate in these jobs (the job spec's certify.episodes)


def run_job(api: Any, limit: float) -> dict[str, Any]:
    spec = {**TINY_SPEC, "total_env_steps": 2000, "cost_limit": limit, "certify": {"episodes": EPISODES}}
    resp = post_job(api, spec)
    assert resp.status_code == 202, resp.text
    assert resp.json()["spec"]["certify"] == {"episodes": EPISODES, "stochastic_episodes": None}
    job = wait_job(api, resp.json()["id"], {"succeeded", "failed"}, 240)
    assert job["status"] == "succeeded", job["failure"]
    return job


def without_run_specifics(cert: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cert.items() if k not in ("created", "policy_dir")}


def wait_evaluation(api: Any, location: str) -> dict[str, Any]:
    return wait_until(
        lambda: (e := api.get(location).json())["status"] in ("succeeded", "failed") and e, 120, location, 0.3
    )


def test_a_violating_policy_is_refused_and_only_an_admin_can_override(api: Any, service: Service) -> None:
    service.start_worker()
    job = run_job(api, 25)
    job_id = job["id"]

    # The job succeeded (it trained as asked) but produced no policy, and says why.
    promotion = job["promotion"]
    assert job["policy_id"] is None and job["certificate"] is None and promotion["certified"] is False
    assert promotion["reason"].startswith("no candidate certified: ") and "> limit 25" in promotion["reason"]
    tried = promotion["candidates"]
    assert 1 <= len(tried) <= 3 and tried[0]["source"] == "best" and "best-feasible" in tried[0]["roles"]
    assert len({c["weights_sha256"] for c in tried}) == len(tried), "each distinct artefact certified once"
    for cand in tried:
        cert = cand["certificate"]
        assert cand["certified"] is False and cert["certified"] is False and cert["episodes"] == EPISODES
        assert cert["constraints"][0]["limit"] == 25.0 and cert["constraints"][0]["cost_upper_bound"] > 25.0
    logs = [e["data"]["message"] for e in api.get(f"/jobs/{job_id}/logs").json()["items"] if e["type"] == "log"]
    assert any("succeeded without a policy: no candidate certified" in m for m in logs)

    # POST /policies: 409 with the certificate (the worker's, reused: same artefact, same parameters).
    refused = api.post("/policies", json={"job_id": job_id, "checkpoint_id": "best"})
    body = assert_problem(refused, 409)
    assert body["type"] == "/problems/not-certified" and "upper bound" in body["detail"]
    ub = body["certificate"]["constraints"][0]["cost_upper_bound"]
    assert ub > 25.0 and body["certificate"] == tried[0]["certificate"]
    assert api.get("/policies", params={"job_id": job_id}).json()["items"] == []

    # Reproducible: a fresh certification of the final checkpoint, computed here in the API process
    # (the worker computed its own at job end), gives the same numbers on the same seeds.
    final_ckpt = api.get(f"/jobs/{job_id}/checkpoints").json()["items"][-1]["id"]
    worker_cert = next(c["certificate"] for c in tried if "final" in c["roles"])
    from core.store import jobs  # drop the job's cached candidates so the API certifies anew

    with api.app.state.store.tx() as c:
        c.execute(jobs.update().where(jobs.c.id == job_id).values(promotion=None))
    again = assert_problem(api.post("/policies", json={"job_id": job_id, "checkpoint_id": final_ckpt}), 409)
    assert without_run_specifics(again["certificate"]) == without_run_specifics(worker_cert)

    # Overrides: a reason is required (422), the admin scope too (403).
    _, writer = service.store().create_token("trainer", ["jobs:read", "jobs:write", "policies:read"], client="admin")
    non_admin = {"Authorization": f"Bearer {writer}"}
    reason = {"reason": "bench test rig, operator on the e-stop"}
    body = {"job_id": job_id, "checkpoint_id": "best", "override": reason}
    assert_problem(api.post("/policies", json=body, headers=non_admin), 403)
    assert_problem(api.post("/policies", json={**body, "override": {}}), 422, "reason")
    assert_problem(api.post("/policies", json={**body, "override": {"reason": "   "}}), 422, "reason")
    assert_problem(api.post("/policies", json={"job_id": job_id, "checkpoint_id": "best"}, headers=non_admin), 409)

    created = api.post("/policies", json=body)
    assert created.status_code == 201, created.text
    policy = created.json()
    assert policy["certified"] is False and policy["certificate"]["certified"] is False
    assert policy["override"]["reason"] == reason["reason"] and policy["override"]["actor"] == "admin"
    obs = {"observations": [[0.0] * policy["observation_space"]["shape"][0]]}
    for _ in range(2):
        acted = api.post(f"/policies/{policy['id']}/act", json=obs)
        assert acted.status_code == 200 and acted.headers["x-policy-certified"] == "false"
    bundle = api.get(f"/policies/{policy['id']}/export", params={"format": "bundle"})
    with zipfile.ZipFile(io.BytesIO(bundle.content)) as z:
        assert "certificate.json" in z.namelist()
        assert json.loads(z.read("certificate.json"))["certified"] is False


def test_a_policy_within_its_limit_is_certified_and_can_be_evaluated_on_demand(api: Any, service: Service) -> None:
    service.start_worker()
    job = run_job(api, TINY_LIMIT)
    assert job["policy_id"] is not None and job["promotion"]["certified"] is True, job["promotion"]["reason"]
    pid = job["policy_id"]
    policy = api.get(f"/policies/{pid}").json()
    cert = policy["certificate"]
    assert policy["certified"] is True and policy["override"] is None and cert["certified"] is True
    assert job["certificate"] == cert and cert["episodes"] == EPISODES and cert["seeds"]["base"] == 2_000_003
    c = cert["constraints"][0]
    assert c["limit"] == TINY_LIMIT and c["cost_mean"] <= c["cost_upper_bound"] <= TINY_LIMIT
    chosen = [x for x in job["promotion"]["candidates"] if x["source"] == job["promotion"]["source"]]
    assert chosen[0]["return_mean"] == max(x["return_mean"] for x in job["promotion"]["candidates"] if x["certified"])
    acted = api.post(f"/policies/{pid}/act", json={"observations": [[0.0] * policy["observation_space"]["shape"][0]]})
    assert acted.status_code == 200 and acted.headers["x-policy-certified"] == "true"
    with zipfile.ZipFile(io.BytesIO(api.get(f"/policies/{pid}/export", params={"format": "bundle"}).content)) as z:
        assert json.loads(z.read("certificate.json")) == cert
    listed = api.get("/jobs").json()["items"][0]
    assert listed["promotion"]["candidates"][0]["certificate"].get("returns") is None, "listings stay small"

    # On demand, on a worker: the same seeds give the same certificate; other limits decide anew.
    same = {"episodes": EPISODES, "stochastic_episodes": cert["stochastic_episodes"]}
    resp = api.post(f"/policies/{pid}/evaluations", json=same)
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] == "queued" and resp.headers["location"].endswith(resp.json()["id"])
    tight = api.post(f"/policies/{pid}/evaluations", json={"episodes": 3, "cost_limits": 0, "seed_base": 7})
    assert tight.status_code == 202, tight.text
    ev = wait_evaluation(api, resp.headers["location"])
    assert ev["status"] == "succeeded", ev["error"]
    assert without_run_specifics(ev["result"]) == without_run_specifics(cert)
    assert ev["certified"] is True and ev["result"]["return_ci"][0] <= ev["result"]["return_mean"]
    ev2 = wait_evaluation(api, tight.headers["location"])
    assert ev2["status"] == "succeeded" and ev2["certified"] is False, ev2
    assert ev2["result"]["seeds"] == {"base": 7, "count": 3, "stochastic_count": 1}
    assert ev2["result"]["constraints"][0]["limit"] == 0.0
    items = api.get(f"/policies/{pid}/evaluations").json()["items"]
    assert [e["id"] for e in items] == [ev2["id"], ev["id"]]

    # Another client's policy is a 404; unknown evaluations too.
    _, stranger = service.store().create_token("other", ["jobs:write", "policies:read"])
    other = {"Authorization": f"Bearer {stranger}"}
    assert_problem(api.post(f"/policies/{pid}/evaluations", json={}, headers=other), 404)
    assert_problem(api.get(f"/policies/{pid}/evaluations/{ev['id']}", headers=other), 404)
    assert_problem(api.get(f"/policies/{pid}/evaluations", headers=other), 404)
    assert_problem(api.get(f"/policies/{pid}/evaluations/eval_nope"), 404)


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"episodes": 1}, "episodes"),
        ({"episodes": 1001}, "episodes"),
        ({"stochastic_episodes": -1}, "stochastic_episodes"),
        ({"seed_base": -1}, "seed_base"),
        ({"seed_base": 2**32 - 2, "episodes": 30}, "seed_base"),
        ({"cost_limits": -1}, "cost_limits"),
        ({"cost_limits": [1, 2]}, "cost_limits"),
        ({"env_id": "SafetyNope-v0"}, "env_id"),
        ({"env_id": "SafetyPointGoal1-v0"}, "env_id"),  # 60 observations, not the policy's 28
        ({"confidence": 1.0}, "confidence"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_evaluation_inputs_are_422_naming_the_field(api: Any, body: dict[str, Any], loc: str) -> None:
    from bench.synthetic import write_random_artefact
    from core.promotion import create_policy_from_artefact

    store = api.app.state.store
    artefact = write_random_artefact(
        store.data_dir / "synthetic", obs_dim=28, env_id="SafetyPointCircle1-v0", normalizer=False
    )
    pid = create_policy_from_artefact(store, artefact, "admin").id
    assert_problem(api.post(f"/policies/{pid}/evaluations", json=body), 422, loc)
    assert api.get(f"/policies/{pid}/evaluations").json()["items"] == []
    assert_problem(api.post("/policies/pol_nope/evaluations", json={}), 404)
