"""The task catalogue and the `cvpo envs` CLI as a user sees them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cvpo.envs import DEFAULT_COST_LIMIT, TASKS, UnknownTaskError, get_task

CVPO = shutil.which("cvpo", path=str(Path(sys.executable).parent))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    assert CVPO, "the cvpo console script is not installed next to this interpreter"
    return subprocess.run([CVPO, *args], capture_output=True, text=True, timeout=120)


def test_catalogue_covers_the_required_families() -> None:
    for robot in ("Point", "Car"):
        for task in ("Goal", "Button", "Push", "Circle"):
            for level in (0, 1, 2):
                assert f"Safety{robot}{task}{level}-v0" in TASKS
    for robot in ("HalfCheetah", "Hopper", "Swimmer", "Walker2d", "Ant", "Humanoid"):
        assert f"Safety{robot}Velocity-v1" in TASKS
    assert all(t.cost_limit == DEFAULT_COST_LIMIT == 25.0 for t in TASKS.values())
    assert TASKS["SafetyPointCircle1-v0"].max_episode_steps == 500
    assert TASKS["SafetyPointGoal1-v0"].max_episode_steps == 1000


def test_unknown_task_names_it_and_lists_valid_ids() -> None:
    with pytest.raises(UnknownTaskError) as err:
        get_task("SafetyPointGoal9-v0")
    msg = str(err.value)
    assert "SafetyPointGoal9-v0" in msg
    assert all(task_id in msg for task_id in TASKS)
    assert "Did you mean" in msg


def test_cli_json_matches_catalogue() -> None:
    out = run_cli("envs", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["id"] for r in rows] == list(TASKS)
    for row in rows:
        task = TASKS[row["id"]]
        for key in ("obs_dim", "act_dim", "max_episode_steps", "cost_limit"):
            assert row[key] == getattr(task, key)
        assert row["act_low"] == list(task.act_low)
        assert row["act_high"] == list(task.act_high)


def test_cli_table_lists_every_task() -> None:
    out = run_cli("envs")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["id", "family", "obs", "act"]
    assert {line.split()[0] for line in lines[1:]} == set(TASKS)


def test_cli_unknown_task_is_one_clear_line_not_a_traceback() -> None:
    out = run_cli("envs", "SafetyNope-v0")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "unknown task id 'SafetyNope-v0'" in out.stderr
    assert "SafetyPointGoal1-v0" in out.stderr


def test_cli_check_builds_and_steps_a_task() -> None:
    out = run_cli("envs", "SafetyPointCircle1-v0", "--check", "--json")
    assert out.returncode == 0, out.stderr
    [row] = json.loads(out.stdout)
    assert row == {**row, "id": "SafetyPointCircle1-v0", "ok": True, "problems": []}
