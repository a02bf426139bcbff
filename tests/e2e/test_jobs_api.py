"""The jobs API end to end: real app (lifespan), real Redis, real Celery worker, real store (SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.conftest import TINY_LIMIT, TINY_SPEC, Service, wait_until

pytestmark = pytest.mark.both_backends

MINIMAL = {"env_id": "SafetyPointCircle1-v0", "total_env_steps": 2000, "seed": 0, "cost_limit": 25}


def post_job(api: Any, body: dict[str, Any] | None = None, **headers: str) -> Any:
    return api.post("/jobs", json=body or TINY_SPEC, headers=headers)


def wait_job(api: Any, job_id: str, statuses: set[str], timeout_s: float = 120) -> dict[str, Any]:
    return wait_until(
        lambda: (j := api.get(f"/jobs/{job_id}").json())["status"] in statuses and j,
        timeout_s,
        f"{job_id} {statuses}",
        0.3,
    )


def assert_problem(resp: Any, status: int, loc_contains: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status and body["type"].startswith("/problems/") and body["detail"]
    if loc_contains is not None:
        assert any(loc_contains in [str(p) for p in e["loc"]] for e in body["errors"]), body
    return body


def test_minimal_body_is_accepted_with_location_and_resolved_spec(api: Any) -> None:
    resp = post_job(api, MINIMAL)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/jobs/{job['id']}" and job["id"].startswith("job_")
    assert job["status"] == "queued" and job["attempt"] == 1 and job["policy_id"] is None
    assert job["spec"]["seed"] == 0 and job["config"]["total_env_steps"] == 2000
    assert job["config"]["constraints"]["cost_limits"] == [25.0]
    assert resp.headers["x-request-id"]
    unseeded = post_job(api, {k: v for k, v in MINIMAL.items() if k != "seed"}).json()
    assert isinstance(unseeded["spec"]["seed"], int), "a missing seed is drawn and stored"


def test_happy_path_trains_reports_reward_and_cost_and_promotes(api: Any, service: Service) -> None:
    service.start_worker()
    job_id = post_job(api).json()["id"]
    job = wait_job(api, job_id, {"succeeded", "failed"})
    assert job["status"] == "succeeded", job["failure"]
    assert job["progress"]["env_step"] == 1500 and job["progress"]["fraction"] == 1.0
    latest = job["latest"]
    for key in ("train_return", "train_cost", "eval_return", "eval_cost", "lagrange_multiplier"):
        assert isinstance(latest[key], float), key
    # λ's epoch mean: one per constraint, inside the dual bounds (a mean of values clipped to them).
    assert latest["lagrange_multipliers_mean"] == [latest["lagrange_multiplier_mean"]]
    assert 1e-6 * (1 - 1e-9) <= latest["lagrange_multiplier_mean"] <= 1e5 * (1 + 1e-9)
    assert latest["cost_limit"] == TINY_LIMIT and latest["feasible"] == (latest["eval_cost"] <= TINY_LIMIT)
    assert job["best"]["epoch"] in (0, 1, 2)
    # Trust signals: sampled-action eval cost, policy σ, margin, critic calibration, λ shares, max KL.
    for key in (
        "eval_cost_stochastic",
        "policy_std",
        "margin",
        "critic_cost_predicted",
        "critic_cost_realised",
        "lambda_at_floor_share",
        "lambda_at_cap_share",
        "estep_kl_max",
    ):
        assert isinstance(latest[key], float), key
    assert latest["policy_std"] > 0 and 0 <= latest["lambda_at_floor_share"] + latest["lambda_at_cap_share"] <= 1
    assert latest["margin"] == 0.0 and latest["effective_cost_limits"] == [TINY_LIMIT]

    history = api.get(f"/jobs/{job_id}/metrics").json()["points"]
    assert [p["epoch"] for p in history] == [0, 1, 2]
    assert all("eval_return" in p["values"] and "eval_cost" in p["values"] for p in history)
    assert [p["env_step"] for p in history] == sorted(p["env_step"] for p in history)
    only = api.get(f"/jobs/{job_id}/metrics", params={"keys": "eval_cost", "after_step": history[0]["env_step"]})
    assert [list(p["values"]) for p in only.json()["points"]] == [["eval_cost"], ["eval_cost"]]
    csv_text = api.get(f"/jobs/{job_id}/metrics", params={"format": "csv"}).text
    assert csv_text.splitlines()[0].startswith("env_step,epoch,attempt,time,") and len(csv_text.splitlines()) == 4

    policy = api.get(f"/policies/{job['policy_id']}")
    assert policy.status_code == 200, policy.text
    assert policy.json()["env_id"] == "SafetyPointCircle1-v0"
    # The promoted policy is the best certified candidate; the job shows its certificate.
    assert policy.json()["certified"] is True and policy.json()["certificate"]["certified"] is True
    assert job["promotion"]["policy_id"] == job["policy_id"] and job["promotion"]["reason"] is None
    assert job["certificate"] == policy.json()["certificate"]
    assert job["certificate"]["constraints"][0]["limit"] == TINY_LIMIT and job["certificate"]["episodes"] == 6

    # A controller's act-only token of the same client acts; another client's sees nothing.
    _, controller = service.store().create_token("arm", ["policies:act"], client="admin")
    _, stranger = service.store().create_token("other", ["policies:act", "policies:read"])
    obs = {"observations": [[0.0] * policy.json()["observation_space"]["shape"][0]] * 3}
    acted = api.post(f"/policies/{job['policy_id']}/act", json=obs, headers={"Authorization": f"Bearer {controller}"})
    assert acted.status_code == 200, acted.text
    low, high = policy.json()["action_space"]["low"], policy.json()["action_space"]["high"]
    assert all(lo <= a <= hi for row in acted.json()["actions"] for a, lo, hi in zip(row, low, high, strict=True))
    assert acted.json()["actions"][0] == acted.json()["actions"][2], "deterministic by default"
    export = api.get(f"/policies/{job['policy_id']}/export", headers={"Authorization": f"Bearer {controller}"})
    assert_problem(export, 403)  # act-only tokens cannot download weights
    foreign = api.post(f"/policies/{job['policy_id']}/act", json=obs, headers={"Authorization": f"Bearer {stranger}"})
    assert_problem(foreign, 404)

    ckpts = api.get(f"/jobs/{job_id}/checkpoints").json()["items"]
    assert len(ckpts) == 3 and sum(c["is_best"] for c in ckpts) == 1
    final = api.post("/policies", json={"job_id": job_id, "checkpoint_id": "final"})
    assert final.status_code == 201, final.text
    assert final.json()["id"] != job["policy_id"] and final.json()["certified"] is True

    with api.stream("GET", f"/jobs/{job_id}/events") as stream:
        text = "".join(stream.iter_text())
    kinds = [line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event: ")]
    assert kinds.count("metrics") == 3 and kinds.count("checkpoint") == 3 and "status" in kinds
    ids = [int(line.removeprefix("id: ")) for line in text.splitlines() if line.startswith("id: ")]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    with api.stream("GET", f"/jobs/{job_id}/events", headers={"Last-Event-ID": str(ids[-2])}) as stream:
        resumed = [ln for ln in "".join(stream.iter_text()).splitlines() if ln.startswith("id: ")]
    assert resumed == [f"id: {ids[-1]}"]

    assert_problem(api.post(f"/jobs/{job_id}/cancel"), 409)
    assert api.delete(f"/jobs/{job_id}").status_code == 204
    assert_problem(api.get(f"/jobs/{job_id}"), 404)
    assert api.get(f"/policies/{job['policy_id']}").status_code == 200, "policies outlive their job"


def test_idempotency_key_replays_and_rejects_other_bodies(api: Any) -> None:
    first = post_job(api, MINIMAL, **{"Idempotency-Key": "k-1"})
    again = post_job(api, MINIMAL, **{"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert len(api.get("/jobs").json()["items"]) == 1
    other = post_job(api, {**MINIMAL, "seed": 1}, **{"Idempotency-Key": "k-1"})
    assert_problem(other, 422, "Idempotency-Key")
    assert post_job(api, MINIMAL, **{"Idempotency-Key": "k-2"}).json()["id"] != first.json()["id"]


def test_cancel_queued_is_immediate_and_idempotent(api: Any) -> None:
    job_id = post_job(api).json()["id"]
    resp = api.post(f"/jobs/{job_id}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    assert api.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert_problem(api.post("/jobs/job_nope/cancel"), 404)


def test_cursors_beyond_the_stores_integers_are_422_not_500(api: Any) -> None:
    """Found by the route fuzzer: an after_seq past SQLite's int64 used to overflow in the driver."""
    job_id = post_job(api).json()["id"]
    huge = str(2**63)
    assert_problem(api.get(f"/jobs/{job_id}/logs", params={"after_seq": huge}), 422, "after_seq")
    assert_problem(api.get(f"/jobs/{job_id}/metrics", params={"after_step": huge}), 422, "after_step")
    assert_problem(api.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": huge}), 422, "Last-Event-ID")
    last = str(2**63 - 1)
    resp = api.get(f"/jobs/{job_id}/logs", params={"after_seq": last})
    assert resp.status_code == 200 and resp.json()["items"] == [], resp.text


def test_cancel_running_keeps_checkpoint_which_promotes(api: Any, service: Service) -> None:
    service.start_worker()
    job_id = post_job(api, {**TINY_SPEC, "total_env_steps": 100_000}).json()["id"]
    wait_until(lambda: api.get(f"/jobs/{job_id}").json()["progress"]["epoch"] >= 1, 120, "an epoch")
    resp = api.post(f"/jobs/{job_id}/cancel")
    assert resp.status_code == 202 and resp.json()["status"] == "cancelling"
    assert_problem(api.delete(f"/jobs/{job_id}"), 409)
    job = wait_job(api, job_id, {"cancelled", "failed", "succeeded"}, 60)
    assert job["status"] == "cancelled" and job["policy_id"] is None
    promoted = api.post("/policies", json={"job_id": job_id, "checkpoint_id": "final"})
    assert promoted.status_code == 201, promoted.text
    assert api.get(f"/policies/{promoted.json()['id']}").json()["env_id"] == TINY_SPEC["env_id"]


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"env_id": "SafetyNope-v0"}, "env_id"),
        ({"surprise": 1}, "surprise"),
        ({"total_env_steps": 0}, "total_env_steps"),
        ({"total_env_steps": 20_000_001}, "total_env_steps"),
        ({"cost_limit": -1}, "cost_limit"),
        ({"max_attempts": 9}, "max_attempts"),
        ({"hyperparams": {"algo.bogus": 1}}, "algo.bogus"),
        ({"hyperparams": {"batch_size": "many"}}, "algo.batch_size"),
        ({"hyperparams": {"seed": 3}}, "seed"),
        ({"preset": "nope"}, "preset"),
        ({"device": "tpu"}, "device"),
        ({"certify": {"episodes": 1}}, "episodes"),
        ({"certify": {"episodes": 1001}}, "episodes"),
        ({"certify": {"runs": 3}}, "runs"),
    ],
)
def test_bad_specs_are_422_naming_the_field(api: Any, change: dict[str, Any], loc: str) -> None:
    assert_problem(post_job(api, {**MINIMAL, **change}), 422, loc)
    assert api.get("/jobs").json()["items"] == [], "nothing was created"


def test_malformed_bodies_and_auth(api: Any, service: Service) -> None:
    assert_problem(api.post("/jobs", content=b"{not json", headers={"content-type": "application/json"}), 400)
    nan = api.post("/jobs", content=b'{"env_id": "SafetyPointCircle1-v0", "total_env_steps": 10, "cost_limit": NaN}',
                   headers={"content-type": "application/json"})  # fmt: skip
    assert_problem(nan, 422)
    assert_problem(api.post("/jobs", content=b"env_id=x", headers={"content-type": "text/plain"}), 415)
    big = b'{"env_id": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    assert_problem(api.post("/jobs", content=big, headers={"content-type": "application/json"}), 413)

    anon = {"Authorization": ""}
    assert_problem(api.get("/jobs", headers=anon), 401)
    assert api.get("/jobs", headers=anon).headers["www-authenticate"] == "Bearer"
    assert_problem(api.get("/jobs", headers={"Authorization": "Bearer wrong"}), 401)
    assert api.get("/livez", headers=anon).status_code == 200
    _, act_only = service.store().create_token("controller", ["policies:act"])
    assert_problem(api.post("/jobs", json=MINIMAL, headers={"Authorization": f"Bearer {act_only}"}), 403)
    _, reader = service.store().create_token("dashboard", ["jobs:read"])
    job_id = post_job(api, MINIMAL).json()["id"]
    assert_problem(api.get(f"/jobs/{job_id}", headers={"Authorization": f"Bearer {reader}"}), 404), "no leak"
    assert api.get("/jobs", headers={"Authorization": f"Bearer {reader}"}).json()["items"] == []


def test_list_filters_and_pages(api: Any) -> None:
    ids = [post_job(api, {**MINIMAL, "seed": i}).json()["id"] for i in range(3)]
    api.post(f"/jobs/{ids[0]}/cancel")
    page1 = api.get("/jobs", params={"page_size": 2}).json()
    assert [j["id"] for j in page1["items"]] == ids[::-1][:2] and page1["next_page_token"]
    page2 = api.get("/jobs", params={"page_size": 2, "page_token": page1["next_page_token"]}).json()
    assert [j["id"] for j in page2["items"]] == [ids[0]] and page2["next_page_token"] is None
    assert [j["id"] for j in api.get("/jobs", params={"status": "cancelled"}).json()["items"]] == [ids[0]]
    assert_problem(api.get("/jobs", params={"status": "bogus"}), 422, "status")
    assert_problem(api.get("/jobs", params={"page_token": "garbage!"}), 422, "page_token")


def test_active_job_cap_is_429_with_retry_after(service: Service) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from tests.conftest import TOKEN

    with TestClient(create_app(service.settings.with_(max_active_jobs_per_client=2))) as client:
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        assert post_job(client, MINIMAL).status_code == 202
        assert post_job(client, MINIMAL).status_code == 202
        third = post_job(client, MINIMAL)
        assert_problem(third, 429)
        assert third.headers["retry-after"] == "30"


def test_catalogue_health_and_prometheus(api: Any, service: Service) -> None:
    envs = api.get("/envs").json()["items"]
    assert len(envs) == 30 and all(e["action_space"]["low"] for e in envs)
    assert api.get("/envs/SafetyPointGoal1-v0").json()["observation_space"]["shape"] == [60]
    assert_problem(api.get("/envs/SafetyNope-v0"), 404)
    assert {p["id"] for p in api.get("/presets").json()["items"]} >= {"navigation", "velocity"}
    ready = api.get("/readyz", headers={"Authorization": ""})
    body = ready.json()
    assert ready.status_code == 200 and {k: body[k] for k in ("status", "store", "broker")} == {
        "status": "ready",
        "store": True,
        "broker": True,
    }
    assert body["workers"]["workers"] == 0 and body["workers"]["queue"]  # no worker in this test: said, still ready
    post_job(api, MINIMAL)
    text = api.get("/metrics").text
    assert 'cvpo_jobs{status="queued"} 1.0' in text and "cvpo_queue_depth" in text
    assert "http_requests_total" in text or "http_request_duration" in text


def test_readyz_is_503_while_the_broker_is_down(api: Any, redis_server: Any) -> None:
    redis_server.stop()
    resp = api.get("/readyz")
    assert resp.status_code == 503 and resp.json()["broker"] is False and resp.headers["retry-after"]
    # A job submitted while the broker is down is kept (outbox) and sent once it is back.
    job = post_job(api, MINIMAL)
    assert job.status_code == 202
    redis_server.start()
    assert api.get("/readyz").status_code == 200


def test_openapi_documents_job_spec(api: Any) -> None:
    spec = api.get("/openapi.json").json()
    body = spec["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "env_id" in orjson.dumps(body).decode()


def test_api_reconciler_loop_recovers_a_killed_worker(service: Service) -> None:
    """The reconciler that ships (a loop in the API process), not a test's manual call."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from tests.conftest import TOKEN

    worker = service.start_worker()
    with TestClient(create_app(service.settings.with_(reconcile_every_s=0.5))) as client:
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        job_id = post_job(client, {**TINY_SPEC, "total_env_steps": 3000}).json()["id"]
        wait_until(lambda: client.get(f"/jobs/{job_id}/checkpoints").json()["items"], 120, "a checkpoint")
        worker.kill_children()
        job = wait_job(client, job_id, {"succeeded", "failed"}, 180)
        assert job["status"] == "succeeded" and job["attempt"] == 2
        assert [p["epoch"] for p in client.get(f"/jobs/{job_id}/metrics").json()["points"]] == list(range(6))


def test_public_paths_open_read_routes_only(service: Service) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    settings = service.settings.with_(public_paths=service.settings.public_paths | {"/metrics", "/jobs"})
    with TestClient(create_app(settings)) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/jobs").status_code == 200
        assert_problem(client.post("/jobs", json=MINIMAL), 403)  # anonymous readers cannot write
        assert_problem(client.get("/envs"), 401)


def test_tokens_cli_create_scope_and_revoke(api: Any, service: Service) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "service.cli", "tokens", *args],
            env=service.env, cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    created = cli("create", "--name", "arm-3", "--scopes", "policies:read,policies:act")
    assert created.returncode == 0, created.stderr
    token_id, raw = created.stdout.split()
    listed = cli("list").stdout
    assert token_id in listed and "arm-3" in listed and raw not in listed
    auth = {"Authorization": f"Bearer {raw}"}
    api.app.state.tokens.ttl_s = 0.0  # the cache would otherwise honour a revoked token for up to 5 s
    assert_problem(api.post("/jobs", json=MINIMAL, headers=auth), 403)
    assert api.get("/policies", headers=auth).status_code == 200
    assert cli("revoke", token_id).returncode == 0
    assert_problem(api.get("/policies", headers=auth), 401)
    assert cli("revoke", token_id).returncode == 2
    assert cli("create", "--name", "x", "--scopes", "bogus").returncode == 2
