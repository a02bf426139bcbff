"""``cvpo_client`` against a live service: ``cvpo api`` on loopback, a real Redis and a real Celery
worker training a tiny job (tests/conftest.py's TINY_SPEC). Submit → wait (progress callback) →
metrics rows → promote → act (one observation and a batch) → evaluation, aliases (point, act through,
history, roll back), an error of each class, and README's "Python client" example run as written (its
job shrunk to the tiny one)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cvpo_client
from cvpo_client import ActResult, AuthError, Client, Conflict, InvalidRequest, Job, NotFound, Policy
from tests.conftest import ROOT, TINY_LIMIT, TINY_SPEC, TOKEN
from tests.e2e.test_hardening import Live, live_service

pytestmark = pytest.mark.slow

JOB_KEY = "client-tests-tiny-job"  # the README example's submit replays the trained job through it


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with live_service(tmp_path_factory.mktemp("client"), {}, worker=True, log_level="info") as service:
        yield service


@pytest.fixture(scope="module")
def client(live: Live) -> Iterator[Client]:
    with Client(f"http://127.0.0.1:{live.port}", token=TOKEN, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def trained(client: Client) -> tuple[Job, list[Job]]:
    """The tiny job, submitted and waited for once per module, with every state the callback saw."""
    submitted = client.submit(**TINY_SPEC, idempotency_key=JOB_KEY)
    assert submitted.status == "queued" and submitted.id.startswith("job_")
    seen: list[Job] = []
    job = client.wait(submitted.id, timeout=240, poll_s=0.2, on_progress=seen.append)
    return job, seen


@pytest.fixture(scope="module")
def policy(client: Client, trained: tuple[Job, list[Job]]) -> Policy:
    return client.promote(trained[0].id, "final")


def test_submit_and_wait_report_progress_then_metrics_rows(client: Client, trained: tuple[Job, list[Job]]) -> None:
    job, seen = trained
    assert job.status == "succeeded", job.failure
    assert job.done and job.env_step == job.total_env_steps == 1500 and job.policy_id is not None
    steps = [j.env_step for j in seen]
    assert steps == sorted(steps) and seen[0].status in ("queued", "starting", "running")
    assert seen[-1] == job, "the callback sees the final state"
    assert any(j.status == "running" and 0 < j.env_step < 1500 for j in seen), [(j.status, j.env_step) for j in seen]
    assert isinstance(job.latest["eval_return"], float) and isinstance(job.latest["eval_cost"], float)

    assert job.id in {j.id for j in client.jobs()} and job.id in {j.id for j in client.jobs(status="succeeded")}
    assert job.id not in {j.id for j in client.jobs(status="queued")}

    rows = client.metrics(job.id)
    assert [r["epoch"] for r in rows] == [0, 1, 2] and [r["env_step"] for r in rows] == [500, 1000, 1500]
    assert all(isinstance(r["eval_return"], float) and isinstance(r["eval_cost"], float) for r in rows)
    assert rows[-1]["eval_cost"] == job.latest["eval_cost"]
    only = client.metrics(job.id, keys=["eval_cost", "train_return"])
    assert [set(r) for r in only] == [{"epoch", "env_step", "eval_cost", "train_return"}] * 3

    ckpts = client.checkpoints(job.id)
    assert len(ckpts) == 3 and sum(c.is_best for c in ckpts) == 1 and all(c.promotable for c in ckpts)


def test_promote_then_act_on_one_observation_and_a_batch(client: Client, policy: Policy, live: Live) -> None:
    assert policy.certified and policy.ready and policy.env_id == TINY_SPEC["env_id"]
    assert client.policy(policy.id) == policy and policy.id in {p.id for p in client.policies()}
    low, high = policy.action_low, policy.action_high
    assert low.shape == high.shape == (policy.act_dim,) and np.all(low < high)

    rng = np.random.default_rng(0)
    batch_obs = rng.normal(0, 3, size=(16, policy.obs_dim)).astype(np.float32)
    opened = live_connections(client)
    one = client.act(policy.id, batch_obs[0])
    assert one.shape == (policy.act_dim,) and one.dtype == np.float64
    batch = client.act(policy.id, batch_obs)
    assert batch.shape == (16, policy.act_dim) and batch.dtype == np.float64
    assert np.all(batch >= low) and np.all(batch <= high)
    np.testing.assert_allclose(batch[0], one, rtol=0, atol=1e-12)  # deterministic: the mean action
    for _ in range(10):
        client.act(policy.id, batch_obs[:2])
    assert live_connections(client) == opened, "every /act above went over the one keep-alive connection"

    sampled = [client.act(policy.id, batch_obs, deterministic=False, seed=7) for _ in range(2)]
    np.testing.assert_array_equal(sampled[0], sampled[1])
    assert not np.array_equal(sampled[0], batch) and np.all(sampled[0] >= low) and np.all(sampled[0] <= high)

    assert policy.has_cost_critic
    full = client.act(policy.id, batch_obs, returns=["cost_to_go"])
    assert isinstance(full, ActResult) and full.certified is True and full.policy_id == policy.id
    assert full.cost_to_go is not None and full.cost_to_go.shape == (16, 1) and np.isfinite(full.cost_to_go).all()
    assert full.clipped.shape == (16,) and full.clipped.dtype == np.bool_
    np.testing.assert_array_equal(full.actions, batch)
    single = client.act(policy.id, batch_obs[0], full=True)
    assert single.actions.shape == (policy.act_dim,) and single.clipped.shape == () and single.cost_to_go is None


def live_connections(client: Client) -> int:
    return client._http.connections_opened


def test_evaluation_is_created_and_waited_for(client: Client, policy: Policy) -> None:
    created = client.evaluate(policy.id, episodes=2, stochastic_episodes=0, cost_limits=TINY_LIMIT)
    assert created.status == "queued" and created.params["episodes"] == 2
    seen: list[str] = []
    done = client.wait_evaluation(
        policy.id, created.id, timeout=180, poll_s=0.3, on_progress=lambda e: seen.append(e.status)
    )
    assert done.status == "succeeded", done.error
    assert done.result is not None and done.result["episodes"] == 2 and done.certified is not None
    assert seen[-1] == "succeeded" and [e.id for e in client.evaluations(policy.id)] == [created.id]


def test_each_error_class_carries_the_problem(client: Client, live: Live, trained: tuple[Job, list[Job]]) -> None:
    job = trained[0]
    with Client(client.base_url, token="not-a-token") as stranger, pytest.raises(AuthError) as unauthorized:
        stranger.job(job.id)
    assert unauthorized.value.status == 401 and unauthorized.value.type == "/problems/unauthorized"
    assert unauthorized.value.detail == "unknown API token"
    assert unauthorized.value.headers["www-authenticate"] == "Bearer"
    assert str(unauthorized.value) == "401 Unauthorized: unknown API token"

    with Client(client.base_url, token=live.controller) as controller, pytest.raises(AuthError) as forbidden:
        controller.job(job.id)  # an act-only token reads no jobs
    assert forbidden.value.status == 403 and "jobs:read" in forbidden.value.detail

    with pytest.raises(NotFound) as missing:
        client.job("job_does_not_exist")
    assert missing.value.status == 404 and missing.value.type == "/problems/not-found"
    assert missing.value.instance == "/jobs/job_does_not_exist" and missing.value.request_id
    with pytest.raises(NotFound):
        client.act("pol_does_not_exist", np.zeros(3))

    with pytest.raises(InvalidRequest) as bad_shape:
        client.act(job.policy_id or "", np.zeros((2, 3)))
    problem = bad_shape.value
    assert problem.status == 422 and problem.type == "/problems/validation" and problem.detail
    assert problem.errors and problem.errors[0]["loc"][:2] == ["body", "observations"], problem.errors

    with pytest.raises(Conflict) as finished:
        client.cancel(job.id)
    assert finished.value.status == 409 and job.id in finished.value.detail


README_BLOCK = re.compile(r"### Python client\n.*?```python\n(.*?)```", re.S)


def test_the_readme_example_runs(live: Live, trained: tuple[Job, list[Job]], monkeypatch: pytest.MonkeyPatch) -> None:
    """README's example, verbatim, against the live service; only its job is shrunk: ``submit`` sends
    the tiny spec under the trained job's Idempotency-Key, so it answers that (finished) job."""
    code = README_BLOCK.search(Path(ROOT, "README.md").read_text())
    assert code, "README has a '### Python client' section with a python block"

    class TinyJobClient(Client):
        def submit(self, env_id: str, total_env_steps: int, *args: Any, **kwargs: Any) -> Job:
            assert env_id and total_env_steps > 0
            return super().submit(**TINY_SPEC, idempotency_key=JOB_KEY)

    monkeypatch.setattr(cvpo_client, "Client", TinyJobClient)
    monkeypatch.setenv("CVPO_API_URL", f"http://127.0.0.1:{live.port}")
    monkeypatch.setenv("CVPO_API_TOKEN", TOKEN)
    scope: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(code.group(1), "README.md", "exec"), scope)
    assert scope["job"].id == trained[0].id and scope["job"].status == "succeeded"
    policy = scope["policy"]
    assert scope["action"].shape == (policy.act_dim,) and scope["actions"].shape[1] == policy.act_dim


def test_aliases_point_act_record_and_roll_back(client: Client, live: Live, trained: tuple[Job, list[Job]]) -> None:
    job = trained[0]
    best = job.policy_id or ""
    final = client.promote(job.id, "final")  # a second certified policy to repoint to
    created = client.set_alias("production", best, reason="first rollout")
    assert (created.name, created.policy_id, created.version, created.certified) == ("production", best, 1, True)
    assert created.last_change is not None and created.last_change.from_policy_id is None

    obs = np.random.default_rng(1).normal(0, 3, size=(4, final.obs_dim))
    np.testing.assert_array_equal(client.act_alias("production", obs), client.act(best, obs))
    through = client.act_alias("production", obs[0], full=True)
    assert through.alias == "production" and through.policy_id == best and through.actions.shape == (final.act_dim,)

    moved = client.set_alias("production", final.id, reason="final epoch")
    assert moved.policy_id == final.id and moved.version == 2 and moved.can_roll_back
    assert client.act_alias("production", obs, full=True).policy_id == final.id
    assert client.alias("production") == moved and "production" in {a.name for a in client.aliases()}
    history = client.alias_history("production")
    assert [(e.from_policy_id, e.to_policy_id, e.reason) for e in history] == [
        (best, final.id, "final epoch"),
        (None, best, "first rollout"),
    ]
    assert history[0].actor["client"] == "admin" and history[0].action == "set"

    back = client.rollback_alias("production", reason="regression")
    assert back.policy_id == best and back.version == 3
    assert client.alias_history("production")[0].action == "rollback"

    with pytest.raises(Conflict) as uncertified:  # the synthetic policy carries no certificate
        client.set_alias("production", live.policy_id)
    assert uncertified.value.type == "/problems/not-certified" and client.alias("production").policy_id == best
    with pytest.raises(NotFound):
        client.alias("no-such-alias")
    with pytest.raises(NotFound):
        client.act_alias("no-such-alias", obs)
