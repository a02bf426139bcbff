"""Training throughput: ms per update (critic, E-step, M-step) and end-to-end env-steps/s.

Part 1 times the learner's phases (its own timers: critic, E-step sampling and scoring, dual solve
and weights, M-step, targets) on synthetic minibatches (B=256, 256×256 nets) for K ∈ {16, 32, 64};
part 2 runs the real trainer for a short budget per task and reports env-steps/s end to end. Writes
JSON; compare ratios within one run, absolute times are noisy. The comparison with FSRL's CVPO is
bench/vs_fsrl.py.

    .venv/bin/python bench/train_throughput.py [--steps 3000] [--out bench/results/train_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.results_io import write_result
from cvpo.config import resolve_config
from cvpo.learner import TIMED_PHASES, Learner, MinibatchTensors
from cvpo.trainer import Trainer

TASKS = ("SafetyPointCircle1-v0", "SafetyPointGoal1-v0")


def synthetic_batch(obs_dim: int, act_dim: int, batch: int) -> MinibatchTensors:
    g = torch.Generator().manual_seed(0)
    return MinibatchTensors(
        obs=torch.randn(batch, obs_dim, generator=g),
        action=torch.randn(batch, act_dim, generator=g),
        reward_return=torch.randn(batch, generator=g),
        cost_return=torch.rand(batch, 1, generator=g),
        bootstrap_obs=torch.randn(batch, obs_dim, generator=g),
        discount=torch.full((batch,), 0.99),
        terminated=torch.zeros(batch),
    )


def time_phases(task: str, k: int, batch: int, repeats: int, hidden: int = 256) -> dict[str, float]:
    """Per-phase ms of one ``Learner.update`` (the learner's own timers), median over ``repeats``."""
    cfg = resolve_config(
        {
            "env_id": task,
            "algo": {"num_samples": k, "batch_size": batch},
            "network": {"actor_hidden": [hidden, hidden], "critic_hidden": [hidden, hidden]},
        }
    )
    from cvpo.envs import get_task

    info = get_task(task)
    learner = Learner(cfg, info.obs_dim, info.act_dim, np.array([1.0]), torch.device("cpu"))
    b = synthetic_batch(info.obs_dim, info.act_dim, batch)
    for _ in range(3):  # warm-up
        learner.update(b)
    times: dict[str, list[float]] = {key: [] for key in (*TIMED_PHASES, "total_update")}
    for _ in range(repeats):
        learner.enable_timing()
        t0 = time.perf_counter()
        learner.update(b)
        times["total_update"].append((time.perf_counter() - t0) * 1e3)
        for key in TIMED_PHASES:
            times[key].append(learner.timings.get(key, 0.0) * 1e3)
    return {f"{key}_ms": float(np.median(v)) for key, v in times.items()}


def end_to_end(task: str, steps: int) -> dict[str, float]:
    cfg = resolve_config(
        {
            "env_id": task,
            "total_env_steps": steps,
            "seed": 0,
            "loop": {"steps_per_epoch": steps, "eval_episodes": 0, "warmup_steps": 0},
            "algo": {"batch_size": 256, "num_samples": 32},
            "network": {"actor_hidden": [256, 256], "critic_hidden": [256, 256]},
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), quiet=True)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    return {
        "env_steps": trainer.env_steps,
        "updates": trainer.learner.updates,
        "wall_s": wall,
        "env_steps_per_s": trainer.env_steps / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="env steps per end-to-end run (3000)")
    parser.add_argument("--repeats", type=int, default=20, help="timed updates per K (20)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/train_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    phases = []
    for task in TASKS:
        for k in (16, 32, 64):
            row = {"task": task, "K": k, "B": 256, "hidden": [256, 256], **time_phases(task, k, 256, args.repeats)}
            phases.append(row)
            print(json.dumps(row), flush=True)
    e2e = []
    for task in TASKS:
        row = {"task": task, "K": 32, **end_to_end(task, args.steps)}
        e2e.append(row)
        print(json.dumps(row), flush=True)
    write_result(
        args.out,
        "train_throughput",
        {"update_phases": phases, "end_to_end": e2e},
        torch=torch.__version__,
        threads=args.threads,
    )


if __name__ == "__main__":
    main()
