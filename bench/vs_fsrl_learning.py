"""Learning side by side with FSRL's CVPO: same task, config, env-step budget, seeds and cost limit.

Per seed, two arms, each a fresh process: ``fsrl`` (fast-safe-rl 0.1.0 as its users run it, stock
resets, through bench/fsrl_launch.py ``--budget`` in the virtualenv bench/fsrl_env.py builds) and
``ours`` (this checkout's engine with FSRL's config, bench/vs_fsrl.py ``ours_config``). Both train for
``--budget`` env steps with no evaluation during training, then evaluate the final policy with
deterministic mean actions for ``--eval-episodes`` episodes. Each arm's env-steps/s is its training
wall time over the whole budget (warm-up, FSRL's numba compile and our first collect included; the
final evaluation excluded). Runs go ``--jobs`` at a time with ``--threads`` torch threads each, so
with the defaults (2 jobs × 1 thread) every run has one core of the 2 — the same for both arms.

The JSON holds every run, per-arm means with 95 % t intervals, the ratio of mean env-steps/s, and
whether our mean eval cost is within the limit. Finished runs are kept and skipped when the script
is run again with the same settings (resumable).

    .venv/bin/python bench/vs_fsrl_learning.py [--task SafetyPointCircle1-v0] [--budget 50000]
        [--seeds 0 1 2 3 4] [--jobs 2] [--threads 1] [--out bench/results/vs_fsrl_learning.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

ARMS = ("fsrl", "ours")
COST_LIMIT = 25.0
CHILD = """
import json, sys, tempfile, time
from pathlib import Path
from cvpo.config import resolve_config
from cvpo.trainer import Trainer
cfg = resolve_config(json.loads(sys.argv[1]))
episodes = int(sys.argv[2])
with tempfile.TemporaryDirectory() as tmp:
    trainer = Trainer(cfg, Path(tmp), quiet=True)
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    ev = trainer.evaluate(episodes)
print(json.dumps({"env_steps": result.env_steps, "updates": trainer.learner.updates, "wall_s": wall,
                  "env_steps_per_s": result.env_steps / wall,
                  "eval_return": sum(ev["returns"]) / len(ev["returns"]),
                  "eval_cost": sum(c[0] for c in ev["costs"]) / len(ev["costs"]), "eval_episodes": episodes,
                  "config": cfg.to_dict()}))
"""


def ours_learning_config(task: str, seed: int, budget: int, threads: int) -> dict[str, Any]:
    """FSRL's config (vs_fsrl.ours_config) for ``budget`` env steps, no evaluation while training."""
    from bench.vs_fsrl import ours_config

    cfg = ours_config(task, seed, warmup=budget, window=0, threads=threads)
    cfg["loop"].update(eval_episodes=0)
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="SafetyPointCircle1-v0")
    parser.add_argument("--budget", type=int, default=50_000, help="env steps per run (50000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/vs_fsrl_learning.json")
    args = parser.parse_args()

    import torch

    from bench.fsrl_env import ensure_venv
    from bench.results_io import machine_load, write_result
    from bench.stats import feasible_fraction, mean_ci

    fsrl_python = ensure_venv(quiet=True)
    settings = {
        "task": args.task,
        "budget": args.budget,
        "eval_episodes": args.eval_episodes,
        "threads": args.threads,
        "jobs": args.jobs,
    }
    runs: list[dict[str, Any]] = []
    if args.out.exists():
        previous = json.loads(args.out.read_text())
        if previous.get("settings") == settings:
            runs = [r for r in previous.get("runs", []) if r["seed"] in args.seeds]
    todo = [(arm, s) for s in args.seeds for arm in ARMS if not any(r["arm"] == arm and r["seed"] == s for r in runs)]

    def summarise() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for arm in ARMS:
            rows = [r for r in runs if r["arm"] == arm]
            if rows:
                out[arm] = {k: mean_ci([r[k] for r in rows]) for k in ("eval_return", "eval_cost", "env_steps_per_s")}
                out[arm]["feasible_fraction"] = feasible_fraction([r["eval_cost"] for r in rows], COST_LIMIT)
        if all(a in out for a in ARMS):
            out["ratio_env_steps_per_s"] = (
                out["ours"]["env_steps_per_s"]["mean"] / out["fsrl"]["env_steps_per_s"]["mean"]
            )
        return out

    def save() -> None:
        write_result(
            args.out,
            "vs_fsrl_learning",
            {
                "settings": settings,
                "seeds": args.seeds,
                "cost_limit": COST_LIMIT,
                "ours_config": ours_learning_config(args.task, 0, args.budget, args.threads),
                "summary": summarise(),
                "runs": sorted(runs, key=lambda r: (r["arm"], r["seed"])),
            },
            torch=torch.__version__,
            cpus=os.cpu_count(),
            load_at_end=machine_load(),
        )

    def one(arm: str, seed: int) -> dict[str, Any]:
        if arm == "fsrl":
            cmd = [
                str(fsrl_python),
                str(ROOT / "bench/fsrl_launch.py"),
                "--task",
                args.task,
                "--seed",
                str(seed),
                "--threads",
                str(args.threads),
                "--skybox",
                "stock",
                "--budget",
                str(args.budget),
                "--eval-episodes",
                str(args.eval_episodes),
            ]
        else:
            cfg = ours_learning_config(args.task, seed, args.budget, args.threads)
            cmd = [sys.executable, "-W", "ignore", "-c", CHILD, json.dumps(cfg), str(args.eval_episodes)]
        before = machine_load()
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                cwd=tmp,
                timeout=4 * 3600,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        if out.returncode != 0:
            raise RuntimeError(f"{arm} seed {seed} failed:\n{out.stderr[-3000:]}")
        row = {
            **json.loads(out.stdout.strip().splitlines()[-1]),
            "arm": arm,
            "seed": seed,
            "load_before": before,
            "load_after": machine_load(),
            "finished": time.strftime("%H:%M:%S"),
        }
        print(
            f"{arm} seed {seed}: {row['env_steps_per_s']:.1f} env-steps/s, eval return {row['eval_return']:.2f} "
            f"cost {row['eval_cost']:.2f}",
            flush=True,
        )
        return row

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in as_completed([pool.submit(one, *job) for job in todo]):
            runs.append(future.result())
            save()
    save()
    print(json.dumps(summarise(), indent=2))


if __name__ == "__main__":
    main()
