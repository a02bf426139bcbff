"""policy.json is integrity-checked like the weights (issue #23 item 10).

The weights' sha256 is recorded inside policy.json, so an edited policy.json (a wider action box, a
dropped mean bound) used to pass every check. Promotion now records policy.json's own sha256 in the
store; /act's loader and the exports refuse a policy whose policy.json differs (503, policy not
ready). Policies registered before the hash existed keep working, checked on their weights only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from api.routes.jobs import resolve_spec
from api.schemas import JobSpec
from bench.synthetic import write_random_artefact
from core.promotion import promote
from core.store import policies
from tests.api.conftest import HIGH, LOW, OBS_DIM, Served
from tests.api.test_policies_http import ROWS, act, assert_problem

BODY = {"observations": ROWS[:2].tolist()}


def promoted(served: Served, name: str, seed: int) -> str:
    """A policy made by the real promotion path: a job's best_policy artefact through ``core.promotion.promote``."""
    echoed, config = resolve_spec(JobSpec.model_validate({"env_id": "SafetyPointGoal1-v0", "total_env_steps": 1000}))
    job, _ = served.store.create_job(
        client=served.ids["owner"], spec=echoed, config=config, max_attempts=1, time_limit_s=60, labels={}
    )
    write_random_artefact(Path(job.run_dir) / "best_policy", obs_dim=OBS_DIM, act_low=LOW, act_high=HIGH, seed=seed)
    return promote(served.store, job=job, source="best", client=served.ids["owner"]).id


def edit_meta(served: Served, policy_id: str, change: Any) -> None:
    path = Path(served.store.get_policy(policy_id).path) / "policy.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta, indent=2) + "\n")


def widen_box(meta: dict[str, Any]) -> None:
    meta["action_space"]["high"] = [100.0, 100.0]


def test_promotion_records_the_hash_of_policy_json(served: Served) -> None:
    pid = promoted(served, "recorded", seed=11)
    policy = served.store.get_policy(pid)
    assert policy.meta_sha256 == hashlib.sha256((Path(policy.path) / "policy.json").read_bytes()).hexdigest()
    assert act(served, pid, BODY, role="owner").status_code == 200, "an untouched policy serves"
    onnx = served.client.get(f"/policies/{pid}/export", params={"format": "onnx"})
    assert onnx.status_code == 200, onnx.text


def test_act_refuses_a_policy_whose_policy_json_was_edited(served: Served) -> None:
    pid = promoted(served, "edited_box", seed=12)
    edit_meta(served, pid, widen_box)
    r = act(served, pid, BODY, role="owner")
    problem = assert_problem(r, 503)
    assert problem["type"] == "/problems/policy-not-ready" and "policy.json" in problem["detail"], problem
    assert "actions" not in problem, "never an answer from the edited box"
    assert served.client.get(f"/policies/{pid}").json()["ready"] is False
    assert_problem(act(served, pid, BODY, role="owner"), 503)  # and it stays out


def test_exports_refuse_a_policy_whose_policy_json_was_edited(served: Served) -> None:
    pid = promoted(served, "edited_bound", seed=13)

    def bound_mean(meta: dict[str, Any]) -> None:
        meta["architecture"]["mean_bound"] = 0.01

    edit_meta(served, pid, bound_mean)
    problem = assert_problem(served.client.get(f"/policies/{pid}/export", params={"format": "onnx"}), 503)
    assert problem["type"] == "/problems/policy-not-ready" and "policy.json" in problem["detail"], problem
    pid2 = promoted(served, "edited_bundle", seed=14)
    edit_meta(served, pid2, widen_box)
    problem = assert_problem(served.client.get(f"/policies/{pid2}/export", params={"format": "bundle"}), 503)
    assert "policy.json" in problem["detail"], problem


def test_policies_registered_before_the_hash_are_checked_on_weights_only(served: Served) -> None:
    pid = promoted(served, "legacy", seed=15)
    with served.store.tx() as c:  # as a store from before the column was added has it
        c.execute(sa.update(policies).where(policies.c.id == pid).values(meta_sha256=None))
    assert served.store.get_policy(pid).meta_sha256 is None
    edit_meta(served, pid, lambda meta: meta["summary"].update(note="edited"))
    r = act(served, pid, BODY, role="owner")
    assert r.status_code == 200, r.text
    assert np.isfinite(np.asarray(r.json()["actions"])).all()
    assert served.client.get(f"/policies/{pid}/export", params={"format": "onnx"}).status_code == 200
