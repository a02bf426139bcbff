"""Progress a person can watch (issue #23 item 16): env steps, rate, ETA and phase between epoch ends."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import TINY_SPEC, Service, wait_until
from tests.e2e.test_jobs_api import post_job, wait_job

pytestmark = pytest.mark.both_backends


def test_progress_moves_while_the_first_epoch_runs(api: Any, service: Service) -> None:
    # One 3 000-step epoch: before this change env_step stayed 0 until the epoch (and the job) ended.
    spec = {**TINY_SPEC, "total_env_steps": 3000, "hyperparams": {**TINY_SPEC["hyperparams"], "steps_per_epoch": 3000}}
    service.start_worker()
    job_id = post_job(api, spec).json()["id"]

    def mid_epoch() -> dict[str, Any] | None:
        job = api.get(f"/jobs/{job_id}").json()
        p = job["progress"]
        if job["status"] == "running" and 0 < p["env_step"] < 3000 and p["epoch"] == 0:
            return job
        assert job["status"] in ("queued", "starting", "running"), job["status"]
        return None

    job = wait_until(mid_epoch, 120, "env_step > 0 inside the first epoch", 0.1)
    assert job["latest"] is None  # no epoch has ended: the numbers come from the heartbeat
    assert job["progress"]["phase"] in ("training", "evaluating")
    running = wait_until(
        lambda: (j := api.get(f"/jobs/{job_id}").json())["progress"]["env_steps_per_s"] and j, 60, "a rate", 0.1
    )
    p = running["progress"]
    assert p["env_steps_per_s"] > 0 and p["eta_s"] is not None and p["eta_s"] >= 0

    done = wait_job(api, job_id, {"succeeded", "failed"})
    assert done["status"] == "succeeded", done["failure"]
    assert done["progress"]["env_step"] == 3000 and done["progress"]["phase"] is None
    with api.stream("GET", f"/jobs/{job_id}/events") as stream:
        text = "".join(stream.iter_text())
    kinds = [line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event: ")]
    assert "progress" in kinds and kinds.index("progress") < kinds.index("metrics")
