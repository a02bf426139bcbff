"""Failure messages a client sees carry no internal exception text (issue #23 item 10)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from core.settings import Settings
from core.store import Store
from cvpo.config import resolve_config
from worker.runner import run_job

pytestmark = pytest.mark.both_backends


def test_an_internal_error_reaches_the_client_without_its_exception_text(
    tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(database_url, tmp_path)
    config = resolve_config({"env_id": "SafetyPointCircle1-v0", "total_env_steps": 500, "loop": {"torch_threads": 1}})
    job, _ = store.create_job(
        client="admin", spec={"env_id": config.env_id, "total_env_steps": 500}, config=config.to_dict(),
        max_attempts=1, time_limit_s=60, labels={},
    )  # fmt: skip
    # The run dir cannot be created (a file stands in its place): an OSError naming a server path.
    Path(job.run_dir).parent.mkdir(parents=True, exist_ok=True)
    Path(job.run_dir).write_text("in the way")
    owner = "test:1:2"
    assert store.claim(job.id, 1, owner, 60)
    settings = Settings(data_dir=tmp_path, heartbeat_s=30.0)
    with caplog.at_level(logging.ERROR):
        assert run_job(store, None, settings, job.id, 1, owner) == "failed"  # type: ignore[arg-type]
    failure = store.get_job(job.id).failure
    assert failure["reason"] == "internal"
    message = failure["message"]
    assert "Error" not in message and str(tmp_path) not in message and "Errno" not in message, message
    assert f"{job.id} attempt 1" in message
    # Nor does the job's log or event stream (GET /jobs/{id}/logs, /events).
    events = store.events_after(job.id, 0, 1000, types=["log", "status"])
    assert events and str(tmp_path) not in repr(events) and "Errno" not in repr(events)
    # The full exception is in the worker's log, under the same reference.
    record = next(r for r in caplog.records if f"{job.id} attempt 1" in r.getMessage())
    assert record.exc_info is not None and record.exc_info[0] in (FileExistsError, NotADirectoryError)
