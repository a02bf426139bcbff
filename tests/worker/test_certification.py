"""The service's side of certified policies without Redis or a worker: the store's additive
migration, candidate choice, the reason text, the job-spec field, and the bound the test jobs rely on."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from bench.synthetic import write_random_artefact
from core import store as store_module
from core.certification import candidates, job_params, shortfall, stochastic_for
from core.promotion import resolve_artefact
from core.settings import Settings
from core.store import Store
from cvpo.certify import cost_upper_bound
from tests.conftest import CERTIFY_EPISODES, TINY_LIMIT

ENV = "SafetyPointCircle1-v0"
NEW_COLUMNS = {"jobs": {"promotion"}, "policies": {"certificate", "certified", "override"}}


pytestmark = pytest.mark.both_backends


def old_store(url: str) -> str:
    """A store as it was before certificates: jobs and policies without the new columns, no evaluations."""
    old = sa.MetaData()
    for table in store_module.metadata.sorted_tables:
        if table.name == "evaluations":
            continue
        cols = [c.copy() for c in table.columns if c.name not in NEW_COLUMNS.get(table.name, set())]
        sa.Table(table.name, old, *cols)
    engine = store_module.make_engine(url)  # makes a SQLite file's directory
    old.create_all(engine)
    with engine.begin() as c:
        c.execute(
            old.tables["policies"].insert().values(
                id="pol_old", client="admin", env_id="SafetyPointCircle1-v0", path="/nowhere", sha256="0" * 64,
                meta={"env_id": "SafetyPointCircle1-v0"}, created_at=1.0, ready=True,
            )
        )  # fmt: skip
    engine.dispose()
    return url


def test_an_existing_store_gains_the_new_columns_and_keeps_its_rows(tmp_path: Path, database_url: str) -> None:
    url = old_store(database_url)
    store = Store(url, tmp_path)
    added = ["jobs.promotion", "policies.certificate", "policies.certified", "policies.override"]
    assert sorted(store.migrated) == added
    policy = store.get_policy("pol_old")
    assert policy is not None and policy.certified is None and policy.certificate is None and policy.override is None
    assert store.create_evaluation("pol_old", "admin", {"episodes": 2}).status == "queued"
    again = Store(url, tmp_path)  # a second process starting on the migrated store: nothing to do
    assert again.migrated == []
    cols = {c["name"] for c in sa.inspect(again.engine).get_columns("policies")}
    assert NEW_COLUMNS["policies"] <= cols


def test_job_params_come_from_the_spec_then_the_settings() -> None:
    settings = Settings(certify_episodes=30, certify_stochastic_episodes=10)
    assert job_params({}, settings)["episodes"] == 30 and job_params({}, settings)["stochastic_episodes"] == 10
    p = job_params({"certify": {"episodes": 6, "stochastic_episodes": None}}, settings)
    assert (p["episodes"], p["stochastic_episodes"], p["seed_base"]) == (6, 2, 2_000_003)
    assert job_params({"certify": {"episodes": 6, "stochastic_episodes": 0}}, settings)["stochastic_episodes"] == 0
    assert stochastic_for(100, 10) == 10 and stochastic_for(2, 10) == 1 and stochastic_for(30, 0) == 0


def test_the_reason_names_each_failing_constraint() -> None:
    cert = {
        "constraints": [
            {"signal": "cost", "limit": 25.0, "cost_upper_bound": 61.23, "certified": False},
            {"signal": "cost_hazards", "limit": 5.0, "cost_upper_bound": 1.0, "certified": True},
        ]
    }
    assert shortfall(cert) == "cost upper bound 61.23 > limit 25"


def test_candidates_are_best_final_and_the_top_by_eval_once_each(tmp_path: Path, database_url: str) -> None:
    store = Store(database_url, tmp_path)
    job, _ = store.create_job(
        client="admin", spec={"env_id": "SafetyPointCircle1-v0", "total_env_steps": 10}, config={},
        max_attempts=1, time_limit_s=60, labels={},
    )  # fmt: skip
    owner = "test:1:2"
    assert store.claim(job.id, 1, owner, 60) and store.begin_attempt(job.id, 1, owner, 0)
    run = Path(job.run_dir)
    rows = [  # (seed, eval_return, eval_cost, feasible)
        (0, 5.0, 10.0, True), (1, 9.0, 20.0, True), (2, 50.0, 90.0, False), (3, 7.0, 5.0, True),
    ]  # fmt: skip
    for seed, ret, cost, feasible in rows:
        art = write_random_artefact(run / "artefacts" / f"c{seed}", obs_dim=28, seed=seed, env_id=ENV)
        metrics = {"epoch": seed, "env_steps": seed, "eval_return": ret, "eval_cost": cost, "feasible": feasible}
        store.register_checkpoint(job.id, 1, owner, run / f"ck{seed}", art, metrics)
    # The trainer's best-feasible policy: the same weights as checkpoint 1 (seed 1).
    write_random_artefact(run / "best_policy", obs_dim=28, seed=1, env_id=ENV)
    ckpts = store.list_checkpoints(job.id)

    def roles(k: int) -> list[tuple[Any, list[str]]]:
        return [(c["checkpoint_id"] or c["source"], c["roles"]) for c in candidates(store, store.get_job(job.id), k)]

    assert roles(0) == [("best", ["best-feasible"]), (ckpts[3].id, ["final"])]
    # Ranked as the trainer ranks: feasible by return (1: 9.0 is best's own weights, 3: 7.0, 0: 5.0), then cost.
    assert roles(2) == [("best", ["best-feasible", "top-by-eval"]), (ckpts[3].id, ["final", "top-by-eval"]),
                        (ckpts[0].id, ["top-by-eval"]), (ckpts[2].id, ["top-by-eval"])]  # fmt: skip
    shas = [c["weights_sha256"] for c in candidates(store, store.get_job(job.id), 5)]
    assert len(shas) == len(set(shas)) == 4
    best = json.loads((run / "best_policy" / "policy.json").read_text())
    assert candidates(store, store.get_job(job.id), 0)[0]["weights_sha256"] == best["weights_sha256"]

    # The run's served policy/ (a validated choice, here the weights of no checkpoint) is a candidate of
    # its own, and promotable by that name; with the weights of a checkpoint it adds a role instead.
    write_random_artefact(run / "policy", obs_dim=28, seed=99, env_id=ENV)
    assert roles(0)[1] == ("served", ["served"])
    assert resolve_artefact(store, store.get_job(job.id), "served") == (None, run / "policy")
    write_random_artefact(run / "policy", obs_dim=28, seed=3, env_id=ENV)
    assert roles(0) == [("best", ["best-feasible"]), ("served", ["served", "final"])]


def test_the_test_jobs_limit_certifies_any_circle_costs() -> None:
    """conftest's TINY_LIMIT with CERTIFY_EPISODES episodes: whatever the episode costs in [0, 500]
    (Circle: at most 1 per step, 500 steps), the 95 % upper bound stays below the limit, so the
    tests that need a policy from a tiny job never depend on how it trained."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for pattern in itertools.product([0.0, 500.0], repeat=CERTIFY_EPISODES):
        worst = max(worst, cost_upper_bound(pattern))
    for _ in range(20_000):
        x = rng.uniform(0, 500, CERTIFY_EPISODES) * (rng.random(CERTIFY_EPISODES) < rng.random())
        worst = max(worst, cost_upper_bound(x))
    assert worst < TINY_LIMIT, worst


@pytest.mark.parametrize(
    ("certify", "loc"),
    [({"episodes": 1}, "episodes"), ({"episodes": 1001}, "episodes"), ({}, "episodes"), (7, "certify"),
     ({"episodes": 5, "stochastic_episodes": -1}, "stochastic_episodes"), ({"episodes": 5, "x": 1}, "x")],
)  # fmt: skip
def test_the_certify_spec_field_is_validated(certify: Any, loc: str) -> None:
    from pydantic import ValidationError

    from api.schemas import JobSpec

    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate({"env_id": "SafetyPointCircle1-v0", "total_env_steps": 10, "certify": certify})
    assert any(loc in [str(p) for p in e["loc"]] for e in info.value.errors()), info.value.errors()
    ok = JobSpec.model_validate({"env_id": "SafetyPointCircle1-v0", "total_env_steps": 10, "certify": {"episodes": 2}})
    assert ok.certify is not None and ok.certify.episodes == 2
