"""Training throughput against FSRL's CVPO (fast-safe-rl 0.1.0) on the same task, config and machine.

Per task, in one invocation and each in a fresh process, one after another: stock FSRL, FSRL with our
fast resets (bench/fsrl_launch.py, run by FSRL's own virtualenv, built by bench/fsrl_env.py), and
ours. Same config (FSRL's safety-gymnasium defaults: 128×128, one reward and one cost critic,
K = 16, batch 256, 0.2 updates per env step, n-step 3, γ 0.995, τ 0.05, ε 0.02, cost limit 25),
same seeds, one training env, 2 torch threads, no evaluation. End-to-end env-steps/s over a
window of ``--window`` env steps after a warm-up of one FSRL collect (10 episodes: 5 000 steps
on Circle, 10 000 on Goal; for FSRL that also hides numba's compile). Our split of the window:
env (steps and resets), inference, minibatch, critic, E-step (sampling and scoring; dual solve and
weights), M-step, other. The machine is shared, so the JSON
records load averages and CPU pressure around every row; compare ratios within one invocation.

    .venv/bin/python bench/vs_fsrl.py [--tasks SafetyPointCircle1-v0 ...] [--window 20000]
        [--seeds 0] [--repeats 1] [--out bench/results/vs_fsrl.json]

Rows of tasks not run now are kept from an existing ``--out`` with the same window (``--fresh`` drops
them), so one task per invocation (~7 min per round) builds up one file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.results_io import machine_load

ROOT = Path(__file__).resolve().parents[1]


TASKS = ("SafetyPointCircle1-v0", "SafetyPointGoal1-v0")
FSRL_ROWS = ("fsrl-stock", "fsrl-fast")
OURS_ROWS = ("ours", "ours-1t")  # ours with --threads torch threads (as FSRL), and with one thread


def ours_config(task: str, seed: int, warmup: int, window: int, threads: int) -> dict[str, Any]:
    """Our config matching FSRL's safety-gymnasium defaults; ``warmup`` steps form epoch 0."""
    from cvpo.config import preset_for

    update_every = 500 if preset_for(task) == "circle" else 1000  # our presets' cadence
    return {
        "env_id": task,
        "total_env_steps": warmup + window,
        "seed": seed,
        "device": "cpu",
        "constraints": {"cost_limits": [25.0]},
        # FSRL's agent default double_critic=False: one reward critic and one cost critic.
        "network": {"actor_hidden": [128, 128], "critic_hidden": [128, 128], "reward_critics": 1},
        "algo": {
            "gamma": 0.995,
            "n_step": 3,
            "num_samples": 16,
            "kl_bound": 0.02,
            "mean_kl_bound": 5e-3,
            "cov_kl_bound": 5e-4,
            "actor_lr": 5e-4,
            "critic_lr": 1e-3,
            "tau": 0.05,
            "batch_size": 256,
            "updates_per_step": 0.2,
            "pi_old": "phase",
            "mstep_iters": 1,
        },
        "loop": {
            "steps_per_epoch": warmup,
            "update_every": update_every,
            "warmup_steps": 0,
            "buffer_size": 200_000,
            "eval_episodes": 0,
            "checkpoint_every_epochs": 1000,
            "torch_threads": threads,
        },
    }


def run_ours(task: str, seed: int, warmup: int, window: int, threads: int) -> dict[str, Any]:
    """Train in this process; time the window after epoch 0 (the warm-up)."""
    from cvpo.config import resolve_config
    from cvpo.trainer import Trainer

    cfg = resolve_config(ours_config(task, seed, warmup, window, threads))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), quiet=True)
        timings = trainer.enable_timing()
        marks: list[tuple[float, int, dict[str, float], int]] = []
        trainer.on_epoch_end.append(
            lambda m: marks.append((time.perf_counter(), m["env_steps"], dict(timings), trainer.learner.updates))
        )
        t_start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t_start
    (t0, s0, p0, u0), (t1, s1, p1, u1) = marks[0], marks[-1]
    wall = t1 - t0
    split = {k: p1.get(k, 0.0) - p0.get(k, 0.0) for k in p1}
    estep = split.get("estep_score", 0.0) + split.get("estep_solve", 0.0)
    named = {
        "env": split.get("env", 0.0),
        "inference": split.get("inference", 0.0),
        "minibatch": split.get("minibatch", 0.0),
        "critic": split.get("critic", 0.0),
        "estep_sample_score": split.get("estep_score", 0.0),
        "estep_solve_weights": split.get("estep_solve", 0.0),
        "mstep": split.get("mstep", 0.0),
        "targets": split.get("targets", 0.0),
    }
    named["other"] = wall - sum(named.values())
    updates = u1 - u0
    return {
        "impl": "ours",
        "task": task,
        "seed": seed,
        "threads": threads,
        "config": cfg.to_dict(),
        "warmup_steps": s0,
        "env_steps": s1 - s0,
        "updates": updates,
        "wall_s": wall,
        "env_steps_per_s": (s1 - s0) / wall,
        "ms_per_update": 1e3
        * (
            split.get("critic", 0.0)
            + estep
            + split.get("mstep", 0.0)
            + split.get("targets", 0.0)
            + split.get("minibatch", 0.0)
        )
        / max(updates, 1),
        "split_s": named,
        "split_share": {k: v / wall for k, v in named.items()},
        "total_wall_s": total,
    }


def child(cmd: list[str], timeout: float) -> dict[str, Any]:
    before = machine_load()
    # PYTHONPATH: FSRL's virtualenv lacks this repository; bench/fsrl_launch.py imports cvpo.envs.compat.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["load_before"], row["load_after"] = before, machine_load()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--window", type=int, default=20_000, help="timed env steps after the warm-up (20000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of all rows per task and seed; odd rounds run the rows in reverse order",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", nargs="+", default=[*FSRL_ROWS, *OURS_ROWS], choices=[*FSRL_ROWS, *OURS_ROWS])
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/vs_fsrl.json")
    parser.add_argument("--fresh", action="store_true", help="drop rows of other tasks kept in --out")
    parser.add_argument("--_ours", nargs=2, metavar=("TASK", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    from cvpo.envs import get_task

    if args._ours:  # child mode: one of our runs, JSON on stdout
        task, seed = args._ours[0], int(args._ours[1])
        warmup = 10 * get_task(task).max_episode_steps  # one FSRL collect of 10 episodes
        print(json.dumps(run_ours(task, seed, warmup, args.window, args.threads)))
        return

    import torch

    from bench.fsrl_env import ensure_venv
    from bench.results_io import write_result

    fsrl_python = ensure_venv(quiet=True) if any(r in args.rows for r in FSRL_ROWS) else None
    rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    kept_tasks: list[str] = []
    if args.out.exists() and not args.fresh:  # keep other tasks' rows: one task per invocation stays short
        previous = json.loads(args.out.read_text())
        if previous.get("window_env_steps") == args.window:
            rows = [r for r in previous.get("rows", []) if r["task"] not in args.tasks]
            summary = [e for e in previous.get("summary", []) if e["task"] not in args.tasks]
            kept_tasks = sorted({r["task"] for r in rows})

    def medians() -> dict[str, Any]:
        """Per task: median env-steps/s of each row over seeds and repeats, and ratios of medians."""
        import statistics

        out: dict[str, Any] = {}
        for task in [*kept_tasks, *args.tasks]:
            med = {
                impl: statistics.median(r["env_steps_per_s"] for r in rows if r["task"] == task and r["impl"] == impl)
                for impl in args.rows
                if any(r["task"] == task and r["impl"] == impl for r in rows)
            }
            ratios = {f"{m}_vs_{f}": med[m] / med[f] for m in OURS_ROWS for f in FSRL_ROWS if m in med and f in med}
            out[task] = {"median_env_steps_per_s": med, "ratios": ratios}
        return out

    def save() -> None:
        write_result(
            args.out,
            "vs_fsrl",
            {"window_env_steps": args.window, "medians": medians(), "summary": summary, "rows": rows},
            torch=torch.__version__,
            threads=args.threads,
            cpus=os.cpu_count(),
            load_at_end=machine_load(),
        )

    for task in args.tasks:
        for seed in args.seeds:
            for rep in range(args.repeats):
                by_impl: dict[str, float] = {}
                for impl in args.rows if rep % 2 == 0 else args.rows[::-1]:  # alternate to spread drift
                    if impl in OURS_ROWS:
                        threads = 1 if impl == "ours-1t" else args.threads
                        cmd = [
                            sys.executable,
                            __file__,
                            "--_ours",
                            task,
                            str(seed),
                            "--window",
                            str(args.window),
                            "--threads",
                            str(threads),
                        ]
                    else:
                        cmd = [
                            str(fsrl_python),
                            str(ROOT / "bench/fsrl_launch.py"),
                            "--task",
                            task,
                            "--seed",
                            str(seed),
                            "--window",
                            str(args.window),
                            "--threads",
                            str(args.threads),
                            "--skybox",
                            impl.removeprefix("fsrl-"),
                        ]
                    row = child(cmd, timeout=1800)
                    row["repeat"] = rep
                    row["impl"] = impl
                    rows.append(row)
                    by_impl[impl] = row["env_steps_per_s"]
                    print(
                        f"{task} seed {seed} rep {rep} {impl}: {row['env_steps_per_s']:.1f} env-steps/s, "
                        f"{row['ms_per_update']:.2f} ms/update, load {row['load_after']['loadavg']}",
                        flush=True,
                    )
                entry: dict[str, Any] = {
                    "task": task,
                    "seed": seed,
                    "repeat": rep,
                    **{f"{k}_env_steps_per_s": v for k, v in by_impl.items()},
                }
                for mine in OURS_ROWS:
                    for impl in FSRL_ROWS:
                        if mine in by_impl and impl in by_impl:
                            entry[f"ratio_{mine}_vs_{impl}"] = by_impl[mine] / by_impl[impl]
                summary.append(entry)
                save()
    save()


if __name__ == "__main__":
    main()
