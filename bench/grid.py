"""Benchmark grid: tasks × seeds of `cvpo train`, in parallel, resumable; then runs.jsonl, summary, plots.

    .venv/bin/python bench/grid.py bench/grids/standard.toml [--workers N] [--out results/standard]
    .venv/bin/python bench/grid.py bench/grids/standard.toml --report-only   # re-aggregate only

Each (task, seed) is its own `cvpo train` process (own memory, own crash) with one torch thread,
so N workers use N cores; at most ``--workers`` run at once (default: the usable core count).
Run dirs are ``<out>/runs/<task>__s<seed>/``. Rerunning the command skips finished runs (those
with a final ``policy/``) and resumes the others from their newest checkpoint (`--resume`), so an
interrupted grid loses at most one epoch per run. Ctrl-C (or SIGTERM) is forwarded once to every
child, which stops at its next episode end and checkpoints; a second Ctrl-C aborts them. Children
run in their own process group so a terminal Ctrl-C reaches each child exactly once, via us.

The engine keeps every checkpoint (each holds the replay buffer: ~0.5 GB at 1 M steps), so the
grid prunes each run to its newest ``keep_checkpoints`` while it runs.

Grid file (TOML)::

    name = "standard"                 # default --out: results/<name>
    tasks = ["SafetyPointGoal1-v0"]   # standard safety-gymnasium ids (random layouts)
    seeds = [0, 1, 2, 3, 4]
    total_env_steps = 1_000_000
    cost_limit = 25                   # → constraints.cost_limits
    keep_checkpoints = 2              # optional
    [overrides]                       # resolve_config keys for every run (preset still applies)
    loop.eval_episodes = 10
    [task_overrides."SafetyHalfCheetahVelocity-v1"]   # optional, merged over [overrides]
    total_env_steps = 500_000

Outputs in ``<out>``: ``runs.jsonl`` (one line per run × epoch), ``summary.json`` (per task:
final eval return/cost mean and 95 % bootstrap CI over seeds, feasible fraction, steps, wall
time) and ``plots/<task>.png``. ``bench/report.py`` turns summaries into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.results_io import write_result
from bench.stats import align_curves, band, bootstrap_ci, feasible_fraction
from cvpo.checkpoint import list_checkpoints
from cvpo.config import ConfigError, build_overrides, config_from_dict, expand_overrides, resolve_config
from cvpo.metrics import summary

ROOT = Path(__file__).resolve().parents[1]
CONFIDENCE = 0.95
N_RESAMPLES = 10_000
GRID_KEYS = {
    "name",
    "description",
    "tasks",
    "seeds",
    "total_env_steps",
    "cost_limit",
    "keep_checkpoints",
    "overrides",
    "task_overrides",
}
# Keys the grid owns: overriding them per run would break the tasks × seeds layout.
RESERVED = ("env_id", "seed")


class GridError(Exception):
    """A bad grid file or a run dir that does not match it: one line for the user, exit 2."""


@dataclass
class Grid:
    name: str
    tasks: list[str]
    seeds: list[int]
    total_env_steps: int
    cost_limit: float
    keep_checkpoints: int = 2
    description: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    task_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    path: str = ""


@dataclass
class Run:
    task: str
    seed: int
    run_dir: Path
    overrides: dict[str, Any]
    config: dict[str, Any]  # the effective config the child must end up with (JSON form)

    @property
    def label(self) -> str:
        return f"{self.task} s{self.seed}"

    def status(self) -> str:
        """``finished`` (final policy written), ``resume`` (has a checkpoint) or ``new``."""
        if (self.run_dir / "policy" / "policy.json").is_file():
            return "finished"
        return "resume" if list_checkpoints(self.run_dir) else "new"


def load_grid(path: Path) -> Grid:
    """Parse and check a grid file; every run's config is resolved later, before anything starts."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise GridError(f"cannot read grid file {path}: {exc}") from exc
    unknown = sorted(set(raw) - GRID_KEYS)
    if unknown:
        raise GridError(f"{path}: unknown key(s) {unknown}; valid: {sorted(GRID_KEYS)}")
    for key in ("tasks", "seeds", "total_env_steps", "cost_limit"):
        if key not in raw:
            raise GridError(f"{path}: missing {key!r}")
    tasks, seeds = raw["tasks"], raw["seeds"]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise GridError(f"{path}: tasks must be a non-empty list of task ids")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise GridError(f"{path}: seeds must be a non-empty list of integers ≥ 0")
    if len(set(tasks)) != len(tasks) or len(set(seeds)) != len(seeds):
        raise GridError(f"{path}: tasks and seeds must not repeat")
    overrides = expand_overrides(raw.get("overrides", {}))
    task_overrides = {t: expand_overrides(o) for t, o in raw.get("task_overrides", {}).items()}
    for where, table in [("overrides", overrides), *((f"task_overrides.{t}", o) for t, o in task_overrides.items())]:
        clash = [k for k in RESERVED if k in table]
        if clash:
            raise GridError(f"{path}: [{where}] sets {clash}; tasks and seeds come from the grid's lists")
    stray = sorted(set(task_overrides) - set(tasks))
    if stray:
        raise GridError(f"{path}: task_overrides for task(s) not in tasks: {stray}")
    keep = raw.get("keep_checkpoints", 2)
    if not isinstance(keep, int) or keep < 1:
        raise GridError(f"{path}: keep_checkpoints must be an integer ≥ 1")
    return Grid(
        name=str(raw.get("name", Path(path).stem)),
        tasks=tasks,
        seeds=seeds,
        total_env_steps=int(raw["total_env_steps"]),
        cost_limit=float(raw["cost_limit"]),
        keep_checkpoints=keep,
        description=str(raw.get("description", "")),
        overrides=overrides,
        task_overrides=task_overrides,
        raw=raw,
        path=_display_path(Path(path)),
    )


def _display_path(path: Path) -> str:
    """Repo-relative when inside the repo, so summaries do not carry a machine's absolute paths."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def plan_runs(grid: Grid, out: Path) -> list[Run]:
    """One Run per (task, seed), each config resolved now so a typo fails before hours of training."""
    runs = []
    for task in grid.tasks:
        for seed in grid.seeds:
            base = {
                "total_env_steps": grid.total_env_steps,
                "constraints": {"cost_limits": [grid.cost_limit]},
                "loop": {"torch_threads": 1},  # one core per run: workers × 1 thread = the core budget
            }
            overrides = build_overrides(
                base, grid.overrides, grid.task_overrides.get(task), {"env_id": task, "seed": seed}
            )
            try:
                config = resolve_config(overrides)
            except ConfigError as exc:
                raise GridError(f"{task} seed {seed}: bad engine override {exc}") from exc
            runs.append(
                Run(task, seed, out / "runs" / f"{task}__s{seed}", overrides, json.loads(json.dumps(config.to_dict())))
            )
    return runs


def check_run_dir(run: Run) -> None:
    """A run dir trained under another grid definition cannot be resumed into this one."""
    path = run.run_dir / "config.json"
    if run.status() != "new" and path.is_file():
        saved = json.loads(path.read_text())
        # Read with today's defaults: knobs the engine gained since the run started do not count (an
        # unreadable config stays as it is, differs, and the message below says where).
        with contextlib.suppress(ConfigError):
            saved = json.loads(json.dumps(config_from_dict(saved).to_dict()))
        if saved != run.config:
            before, now = dict(_flatten(saved)), dict(_flatten(run.config))
            diff = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
            raise GridError(
                f"{run.run_dir} was trained with a different config ({', '.join(diff)}); "
                "the grid file changed since — use another --out, or delete that run dir to retrain it"
            )


# ------------------------------------------------------------------ running


def _toml_literal(value: Any) -> str:
    """A value as `cvpo train --set KEY=VALUE` parses it (a TOML literal)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    raise GridError(f"cannot pass {value!r} to cvpo train")


def _flatten(overrides: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in overrides.items():
        key = f"{prefix}{k}"
        out.extend(_flatten(v, key + ".") if isinstance(v, dict) else [(key, v)])
    return out


def train_command(run: Run) -> list[str]:
    """The child's command line: a fresh `cvpo train` with every override as --set, or --resume."""
    cli = [sys.executable, "-m", "cvpo.cli", "train", "--quiet"]
    if run.status() == "resume":
        return [*cli, "--resume", str(run.run_dir)]
    sets = [f"{k}={_toml_literal(v)}" for k, v in _flatten(run.overrides) if k != "env_id"]
    return [*cli, "--env", run.task, "--out", str(run.run_dir), *(x for s in sets for x in ("--set", s))]


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (the child only ever writes newer ones)."""
    for path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def _metric_lines(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(x: Any, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def _die_with_parent() -> None:
    """Child pre-exec (Linux): SIGTERM the child if the grid process dies, even by SIGKILL.

    An orphaned `cvpo train` would keep writing its run dir while a rerun of the grid resumes the
    same run in a second process; SIGTERM makes it checkpoint and exit instead.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _lock(out: Path) -> Any:
    """Hold ``<out>/runs/.grid.lock`` for the whole run: two grid processes on one dir would train a run twice."""
    import fcntl

    (out / "runs").mkdir(parents=True, exist_ok=True)
    handle = open(out / "runs" / ".grid.lock", "w")  # noqa: SIM115 - held until the process exits
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        raise GridError(f"another bench/grid.py is already running on {out}") from exc
    return handle


class _Interrupts:
    """Counts SIGINT/SIGTERM; the main loop forwards each new one to the children."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, signum: int, frame: object) -> None:
        self.count += 1


def _report_epochs(run: Run, lines: list[dict[str, Any]], already: int) -> None:
    for m in lines[already:]:
        print(
            f"  {run.label} epoch {m['epoch']}: {m['env_steps']}/{run.config['total_env_steps']} steps, "
            f"eval R {_fmt(m.get('eval_return'))} C {_fmt(m.get('eval_cost'))}, "
            f"λ {', '.join(f'{x:.3g}' for x in m['cost_multipliers'])} "
            f"(epoch mean {_fmt(m.get('cost_multiplier_0'), '.3g')})",
            flush=True,
        )


def run_grid(grid: Grid, runs: list[Run], workers: int) -> int:
    """Run unfinished runs, ≤ ``workers`` at once. Returns 0, 1 (a run failed) or 130 (interrupted)."""
    for run in runs:
        check_run_dir(run)
    todo = []
    for run in runs:
        status = run.status()
        if status == "finished":
            print(f"skip {run.label}: finished", flush=True)
        else:
            todo.append(run)
    n_resume = sum(r.status() == "resume" for r in todo)
    print(
        f"grid {grid.name}: {len(runs)} runs, {len(runs) - len(todo)} finished, {n_resume} to resume, "
        f"{len(todo) - n_resume} new; up to {min(workers, len(todo))} at a time",
        flush=True,
    )
    interrupts = _Interrupts()
    old = {s: signal.signal(s, interrupts) for s in (signal.SIGINT, signal.SIGTERM)}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    running: dict[subprocess.Popen[bytes], tuple[Run, Any, int]] = {}  # → (run, log file, metrics size)
    printed: dict[Path, int] = {}  # epochs already echoed per run dir
    failed: list[str] = []
    forwarded, done, last_prune = 0, len(runs) - len(todo), 0.0
    try:
        while running or (todo and not interrupts.count):  # once interrupted, nothing new starts
            if interrupts.count > forwarded:
                forwarded = interrupts.count
                what = "stop at the next episode end and checkpoint" if forwarded == 1 else "abort"
                print(f"interrupt: asking {len(running)} run(s) to {what} (Ctrl-C again to abort)", flush=True)
                for proc in running:
                    proc.send_signal(signal.SIGINT)
            while todo and len(running) < workers and not interrupts.count:
                run = todo.pop(0)
                cmd = train_command(run)
                run.run_dir.mkdir(parents=True, exist_ok=True)
                log = open(run.run_dir / "train.log", "ab")  # noqa: SIM115 - closed when the child exits
                log.write(f"\n# {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n".encode())
                log.flush()
                proc = subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=ROOT,
                    process_group=0,
                    preexec_fn=_die_with_parent,
                )
                printed[run.run_dir] = len(_metric_lines(run.run_dir))
                running[proc] = (run, log, -1)
                verb = "resume" if "--resume" in cmd else "start"
                print(f"{verb} {run.label} (pid {proc.pid}, log {run.run_dir / 'train.log'})", flush=True)
            time.sleep(0.2)
            prune_now = time.monotonic() - last_prune > 30
            for proc, (run, log, seen) in list(running.items()):
                path = run.run_dir / "metrics.jsonl"
                size = path.stat().st_size if path.is_file() else 0
                if size != seen:  # parse only when the child appended an epoch (files grow to MBs)
                    lines = _metric_lines(run.run_dir)
                    _report_epochs(run, lines, printed.get(run.run_dir, 0))
                    printed[run.run_dir] = len(lines)
                running[proc] = (run, log, size)
                if prune_now:
                    prune_checkpoints(run.run_dir, grid.keep_checkpoints)
                if proc.poll() is None:
                    continue
                log.close()
                del running[proc]
                prune_checkpoints(run.run_dir, grid.keep_checkpoints)
                if run.status() == "finished":
                    done += 1
                    print(f"[{done}/{len(runs)}] finished {run.label}", flush=True)
                elif interrupts.count:
                    print(f"stopped {run.label} (exit {proc.returncode}); rerun the command to resume", flush=True)
                else:
                    failed.append(run.label)
                    print(f"FAILED {run.label} (exit {proc.returncode}); see {run.run_dir / 'train.log'}", flush=True)
            if prune_now:
                last_prune = time.monotonic()
    finally:
        for proc, (_, log, _) in running.items():  # only on an unexpected error in this loop
            proc.kill()
            proc.wait()
            log.close()
        for s, handler in old.items():
            signal.signal(s, handler)
    for run in runs:
        if run.status() == "finished":
            check_run_dir(run)  # the child resolved the same config the grid planned
    if interrupts.count:
        return 130
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; rerun the command to retry them", flush=True)
        return 1
    return 0


# ------------------------------------------------------------------ aggregation


def collect_rows(grid: Grid, runs: list[Run], previous: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """runs.jsonl rows: one per run × epoch, the per-epoch numbers the report and plots need.

    Run dirs are git-ignored (checkpoints are large) while runs.jsonl is committed, so a run whose
    dir is absent keeps its ``previous`` rows: --report-only on a fresh clone rebuilds, not erases.
    """
    rows = []
    for run in runs:
        metrics = _metric_lines(run.run_dir)
        if not metrics:
            rows += [r for r in previous or [] if r["task"] == run.task and r["seed"] == run.seed]
            continue
        finished = run.status() == "finished"
        for m in metrics:
            rows.append(
                {
                    "grid": grid.name,
                    "task": run.task,
                    "seed": run.seed,
                    **summary(m),  # cvpo/metrics.py: the one view of an epoch's metrics
                    "eval_episodes": len(m.get("eval_episode_returns") or []),
                    "updates": m.get("updates"),
                    "wall_time_s": m.get("wall_time_s"),
                    "run_finished": finished,
                }
            )
    return rows


# Final trust signals (issue "Safe by default") that the summary gives a CI each, as summary keys.
TRUST_KEYS = (
    "eval_cost_stochastic",
    "policy_std",
    "margin",
    "probe_cost",
    "critic_cost_predicted",
    "critic_cost_realised",
    "lambda_at_floor_share",
    "lambda_at_cap_share",
    "estep_kl_max",
)


def _served(row: dict[str, Any]) -> dict[str, Any]:
    """A finished run's final row with eval_return/eval_cost of the policy it serves.

    Engines before ``served_eval_*`` existed served the last epoch, whose numbers the row already has.
    The last epoch's own numbers stay as ``last_epoch_eval_*``.
    """
    out = {**row, "last_epoch_eval_return": row["eval_return"], "last_epoch_eval_cost": row["eval_cost"]}
    if row.get("served_eval_return") is not None:
        out["eval_return"], out["eval_cost"] = row["served_eval_return"], row["served_eval_cost"]
    return out


def _ci(values: list[float]) -> dict[str, Any]:
    mean, low, high = bootstrap_ci(values, CONFIDENCE, N_RESAMPLES)
    return {"mean": mean, "ci_low": low, "ci_high": high, "per_seed": values}


def summarize(grid: Grid, runs: list[Run], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task: the final epoch of every finished seed → mean and 95 % CI, feasible fraction, cost."""
    tasks: dict[str, Any] = {}
    for task in grid.tasks:
        task_runs = [r for r in runs if r.task == task]
        finals, started = [], 0
        for run in task_runs:
            mine = [row for row in rows if row["task"] == task and row["seed"] == run.seed]
            started += bool(mine)
            if mine and mine[-1]["run_finished"] and mine[-1]["eval_return"] is not None:
                finals.append(_served(mine[-1]))
        entry: dict[str, Any] = {
            "seeds_planned": [r.seed for r in task_runs],
            "seeds_started": started,
            "seeds": [f["seed"] for f in finals],
            "n_seeds": len(finals),
            "budget_env_steps": task_runs[0].config["total_env_steps"],
            "cost_limit": task_runs[0].config["constraints"]["cost_limits"][0],
            "preset": task_runs[0].config["preset"],
            "engine": _engine_facts(task_runs[0].config),
            "plot": f"plots/{task}.png" if started else None,
        }
        if finals:
            costs = [f["eval_cost"] for f in finals]
            served_epochs = [f.get("served_epoch") for f in finals]
            walls = [f["wall_time_s"] for f in finals]
            steps = [f["env_steps"] for f in finals]
            entry.update(
                {
                    "eval_return": _ci([f["eval_return"] for f in finals]),
                    "eval_cost": _ci(costs),
                    "last_epoch_eval_return": _ci([f["last_epoch_eval_return"] for f in finals]),
                    "last_epoch_eval_cost": _ci([f["last_epoch_eval_cost"] for f in finals]),
                    "served_epochs": served_epochs,
                    "train_return": _ci([f["train_return"] for f in finals if f["train_return"] is not None]),
                    "train_cost": _ci([f["train_cost"] for f in finals if f["train_cost"] is not None]),
                    "lagrange_multiplier": _ci(
                        [f["lagrange_multiplier"] for f in finals if f["lagrange_multiplier"] is not None]
                    ),
                    "feasible_fraction": feasible_fraction(costs, entry["cost_limit"]),
                    "feasible_seeds": int(sum(c <= entry["cost_limit"] for c in costs)),
                    "eval_episodes": min(f["eval_episodes"] for f in finals),
                    "env_steps": {"min": min(steps), "max": max(steps)},
                    "wall_time_s": {"mean": float(np.mean(walls)), "max": max(walls), "total": float(sum(walls))},
                    "env_steps_per_s": float(np.mean([s / w for s, w in zip(steps, walls, strict=True)])),
                }
            )
            # Final trust signals where the engine reported them (grids from before the issue have none).
            trust = {k: [f[k] for f in finals if f.get(k) is not None] for k in TRUST_KEYS}
            entry["trust"] = {k: _ci(v) for k, v in trust.items() if v}
        tasks[task] = entry
    return {
        "grid": grid.name,
        "description": grid.description,
        "grid_path": grid.path,
        "grid_file": grid.raw,
        "confidence": CONFIDENCE,
        "n_resamples": N_RESAMPLES,
        "final": (
            "the policy each finished seed serves (its last epoch's, or with loop.select = validated the"
            " epoch chosen on validation layouts): deterministic eval episodes on fixed eval layouts"
        ),
        "runs": {
            "planned": len(runs),
            "finished": len({(r["task"], r["seed"]) for r in rows if r["run_finished"]}),
        },
        "tasks": tasks,
    }


def _engine_facts(config: dict[str, Any]) -> dict[str, Any]:
    """The settings a reader needs to judge a result (the full config is in each run's config.json)."""
    a, n, lp = config["algo"], config["network"], config["loop"]
    return {
        "actor_hidden": n["actor_hidden"],
        "critic_hidden": n["critic_hidden"],
        "num_samples": a["num_samples"],
        "batch_size": a["batch_size"],
        "updates_per_step": a["updates_per_step"],
        "gamma": a["gamma"],
        "steps_per_epoch": lp["steps_per_epoch"],
        "eval_episodes": lp["eval_episodes"],
        "warmup_steps": lp["warmup_steps"],
    }


def plot_task(task: str, rows: list[dict[str, Any]], cost_limit: float, path: Path) -> None:
    """Eval return and eval cost vs env steps: per-seed lines, mean, 95 % bootstrap band, cost limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({r["seed"] for r in rows if r["task"] == task})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, key, label in ((axes[0], "eval_return", "eval return"), (axes[1], "eval_cost", "eval cost")):
        curves = []
        for seed in seeds:
            pts = [(r["env_steps"], r[key]) for r in rows if r["task"] == task and r["seed"] == seed]
            pts = [p for p in pts if p[1] is not None]
            if pts:
                x, y = np.array(pts, dtype=float).T
                curves.append((x, y))
                ax.plot(x, y, color="tab:blue", alpha=0.25, linewidth=0.8)
        if curves:
            grid_x, Y = align_curves(curves)
            mean, low, high = band(Y, CONFIDENCE)
            ax.plot(grid_x, mean, color="tab:blue", linewidth=2, label=f"mean of {len(curves)} seeds")
            ax.fill_between(grid_x, low, high, color="tab:blue", alpha=0.25, label="95 % bootstrap CI")
        if key == "eval_cost":
            ax.axhline(cost_limit, color="tab:red", linestyle="--", linewidth=1.5, label=f"cost limit {cost_limit:g}")
        ax.set_xlabel("env steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"{task}: deterministic evaluation, thin lines = seeds")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def aggregate(grid: Grid, runs: list[Run], out: Path) -> dict[str, Any]:
    """Write runs.jsonl, summary.json and one plot per started task; return the summary."""
    path = out / "runs.jsonl"
    previous = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    rows = collect_rows(grid, runs, previous)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = summarize(grid, runs, rows)
    for task, entry in summary["tasks"].items():
        if entry["plot"]:
            plot_task(task, rows, entry["cost_limit"], out / entry["plot"])
    import torch

    write_result(
        out / "summary.json",
        "grid",
        summary,
        cpus=os.cpu_count(),
        platform=platform.platform(),
        torch=torch.__version__,
    )
    print(f"wrote {out / 'runs.jsonl'} ({len(rows)} rows) and plots in {out / 'plots'}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path, help="grid file (see bench/grids/)")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser.add_argument("--workers", type=int, default=usable, help=f"runs at once (default: cores, {usable})")
    parser.add_argument("--out", type=Path, help="results dir (default results/<grid name>)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild runs.jsonl, summary and plots")
    args = parser.parse_args(argv)
    try:
        grid = load_grid(args.grid)
        if args.workers < 1:
            raise GridError("--workers must be ≥ 1")
        out = args.out or ROOT / "results" / grid.name
        runs = plan_runs(grid, out)
        lock = _lock(out)
        rc = 0 if args.report_only else run_grid(grid, runs, args.workers)
        aggregate(grid, runs, out)
        lock.close()
    except GridError as exc:
        print(f"grid: error: {exc}", file=sys.stderr)
        return 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
