"""bench/grid.py end to end on a tiny grid: parallel runs, skip-when-finished, Ctrl-C and resume, outputs."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from cvpo.checkpoint import list_checkpoints, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
GRID = ROOT / "bench" / "grid.py"
REPORT = ROOT / "bench" / "report.py"
TASK = "SafetyPointCircle1-v0"


def tiny_grid(path: Path, seeds: list[int], steps: int, **loop: int) -> Path:
    """The smoke grid's engine overrides, narrowed to one task, 500-step epochs and 1 eval episode."""
    smoke = tomllib.loads((ROOT / "bench" / "grids" / "smoke.toml").read_text())
    overrides = smoke["overrides"]
    # select = final: the circle preset serves a validated epoch; these runs check the grid's
    # bookkeeping on the last epoch's numbers (the served-epoch rows have their own checks).
    overrides["loop"].update({"steps_per_epoch": 500, "eval_episodes": 1, "select": "final", **loop})
    lines = [f'name = "{path.stem}"', f'tasks = ["{TASK}"]', f"seeds = {seeds}", f"total_env_steps = {steps}"]
    lines += ["cost_limit = 25", "keep_checkpoints = 1", "[overrides]"]
    lines += [f"{section}.{k} = {json.dumps(v)}" for section, table in overrides.items() for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_grid(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GRID), *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_grid_runs_in_parallel_skips_finished_runs_and_aggregates(tmp_path: Path) -> None:
    grid = tiny_grid(tmp_path / "tiny.toml", seeds=[0, 1], steps=1000)
    out = tmp_path / "out"
    first = run_grid(grid, "--workers", "2", "--out", out)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 runs, 0 finished, 0 to resume, 2 new" in first.stdout and first.stdout.count("start ") == 2
    assert f"{TASK} s1 epoch 1: 1000/1000 steps" in first.stdout  # progress echoed from metrics.jsonl

    run_dirs = [out / "runs" / f"{TASK}__s{s}" for s in (0, 1)]
    for d in run_dirs:
        assert (d / "policy" / "policy.json").is_file()
        assert len(list_checkpoints(d)) == 1  # keep_checkpoints = 1 pruned the epoch-0 checkpoint

    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [(r["seed"], r["epoch"], r["env_steps"]) for r in rows] == [
        (0, 0, 500),
        (0, 1, 1000),
        (1, 0, 500),
        (1, 1, 1000),
    ]
    for r in rows:
        assert r["task"] == TASK and r["eval_episodes"] == 1 and r["cost_limit"] == 25.0
        for key in ("eval_return", "eval_cost", "train_return", "train_cost", "lagrange_multiplier", "wall_time_s"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
        assert r["lagrange_multipliers"] == [r["lagrange_multiplier"]]
        lower, upper = 1e-6 * (1 - 1e-9), 1e5 * (1 + 1e-9)  # AlgoConfig's dual bounds; a mean rounds
        mean = r["lagrange_multiplier_mean"]
        assert isinstance(mean, float) and lower <= mean <= upper

    summary = json.loads((out / "summary.json").read_text())
    t = summary["tasks"][TASK]
    finals = [r for r in rows if r["epoch"] == 1]
    assert t["n_seeds"] == 2 and t["seeds"] == [0, 1] and t["budget_env_steps"] == 1000
    assert t["eval_return"]["per_seed"] == [r["eval_return"] for r in finals]
    assert t["eval_return"]["mean"] == pytest.approx(sum(r["eval_return"] for r in finals) / 2)
    assert t["eval_return"]["ci_low"] <= t["eval_return"]["mean"] <= t["eval_return"]["ci_high"]
    assert t["feasible_fraction"] == sum(r["eval_cost"] <= 25 for r in finals) / 2
    assert t["wall_time_s"]["max"] == max(r["wall_time_s"] for r in finals)
    width, height = png_size(out / t["plot"])
    assert width > 500 and height > 200

    # Rerun: both runs are skipped untouched, the aggregates are rebuilt.
    mtimes = {p: p.stat().st_mtime_ns for d in run_dirs for p in (d / "metrics.jsonl", *list_checkpoints(d))}
    (out / "summary.json").unlink()
    second = run_grid(grid, "--workers", "2", "--out", out)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"skip {TASK} s0: finished" in second.stdout and f"skip {TASK} s1: finished" in second.stdout
    assert "start " not in second.stdout and "resume " not in second.stdout
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert json.loads((out / "summary.json").read_text())["tasks"][TASK]["eval_return"] == t["eval_return"]

    # A changed grid file must not silently mix configs in one results dir.
    changed = tiny_grid(tmp_path / "tiny.toml", seeds=[0, 1], steps=1500)
    third = run_grid(changed, "--out", out)
    assert third.returncode == 2 and "total_env_steps" in third.stderr

    # The report is built from this summary.
    report = subprocess.run(
        [sys.executable, str(REPORT), str(out), "--out", str(tmp_path / "bench.md"), "--fsrl-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "bench.md").read_text()
    assert "![SafetyPointCircle1-v0" in text and "out/plots/SafetyPointCircle1-v0.png" in text
    assert "Pending: no `bench/results/vs_fsrl*.json`" in text

    # Run dirs are git-ignored: on a fresh clone --report-only rebuilds from the committed runs.jsonl.
    shutil.rmtree(out / "runs")
    rebuilt = run_grid(tiny_grid(tmp_path / "tiny.toml", seeds=[0, 1], steps=1000), "--out", out, "--report-only")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert json.loads((out / "summary.json").read_text())["tasks"][TASK] == t
    assert [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()] == rows


def test_interrupted_grid_checkpoints_and_resumes(tmp_path: Path) -> None:
    # Two seeds on one worker: seed 1 has not started when Ctrl-C comes, and the grid must still exit
    # (it used to wait forever for runs it would never start).
    grid = tiny_grid(tmp_path / "resume.toml", seeds=[0, 1], steps=3000)
    out = tmp_path / "out"
    run_dir = out / "runs" / f"{TASK}__s0"
    proc = subprocess.Popen(
        [sys.executable, str(GRID), str(grid), "--workers", "1", "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not list_checkpoints(run_dir):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the grid ended"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGINT)  # what a terminal Ctrl-C delivers to the grid process
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert "stop at the next episode end" in output and f"stopped {TASK} s0" in output
    assert not (run_dir / "policy").exists()
    stopped_at = [json.loads(x)["env_steps"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert stopped_at and stopped_at[-1] < 3000

    resumed = run_grid(grid, "--workers", "1", "--out", out)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resume {TASK} s0" in resumed.stdout
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["env_steps"]) for r in rows] == [(e, 500 * (e + 1)) for e in range(6)]
    assert (run_dir / "policy" / "policy.json").is_file()
    assert (out / "runs" / f"{TASK}__s1" / "policy" / "policy.json").is_file()


BASE = 'tasks = ["SafetyPointCircle1-v0"]\nseeds = [0]\ntotal_env_steps = 10\ncost_limit = 25\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(BASE + "workers = 3\n", "workers", id="unknown-key"),
        pytest.param(BASE.replace("[0]", "[0, 0]"), "repeat", id="repeated-seed"),
        pytest.param(BASE + "[overrides]\nalgo.num_samples = 1\n", "algo.num_samples", id="bad-override"),
        pytest.param(BASE.replace("SafetyPointCircle1-v0", "NoSuchTask-v0"), "NoSuchTask-v0", id="unknown-task"),
        pytest.param(BASE + "[overrides]\nseed = 3\n", "seeds come from the grid", id="reserved-key"),
    ],
)
def test_bad_grid_files_fail_before_any_run_starts(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = run_grid(path, "--out", tmp_path / "out")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "out" / "runs").exists()


def test_a_run_started_before_the_engine_gained_a_knob_still_resumes(tmp_path: Path) -> None:
    """config.json without a knob added since (at its default) matches; a changed value does not."""
    from bench import grid

    g = grid.load_grid(tiny_grid(tmp_path / "g.toml", [0], 1000))
    run = grid.plan_runs(g, tmp_path / "out")[0]
    run.run_dir.mkdir(parents=True)
    save_checkpoint(run.run_dir / "checkpoints" / "ckpt_0000000500", {}, {}, {})  # status "resume" needs one
    assert run.status() == "resume"
    old = json.loads(json.dumps(run.config))
    del old["network"]["cost_critics"], old["constraints"]["cost_ucb"]  # written by an engine before them
    (run.run_dir / "config.json").write_text(json.dumps(old))
    grid.check_run_dir(run)
    old["algo"]["tau"] = 0.5
    (run.run_dir / "config.json").write_text(json.dumps(old))
    with pytest.raises(grid.GridError, match=r"algo\.tau"):
        grid.check_run_dir(run)
