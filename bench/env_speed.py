"""Environment speed: our env layer (fast resets) beside stock safety-gymnasium, in one run.

For each task: mean reset time (after a first warm-up reset), env-steps/s without resets (random
actions inside one episode) and env-steps/s including resets (whole episodes). Writes JSON; the
ratio columns are the figure, absolute times on a shared 2-core host are noisy (±30 %).

    .venv/bin/python bench/env_speed.py [--episodes 2] [--resets 5] [--out bench/results/env_speed.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.results_io import write_result
from cvpo import envs

TASKS = (
    "SafetyPointGoal1-v0",
    "SafetyCarGoal1-v0",
    "SafetyPointCircle1-v0",
    "SafetyPointButton1-v0",
    "SafetyHalfCheetahVelocity-v1",
)


def run_until_done(env: envs.SafeEnv, actions: np.ndarray) -> int:
    """Step through ``actions`` until the episode ends; return the steps taken."""
    for steps, a in enumerate(actions, start=1):
        _, _, _, terminated, truncated, _ = env.step(a)
        if terminated or truncated:
            return steps
    return len(actions)


def measure(task_id: str, fast: bool, resets: int, episodes: int, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    with envs.make(task_id, seed=seed, fast_reset=fast) as env:
        t0 = time.perf_counter()
        env.reset()
        first_reset = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(resets):
            env.reset()
        reset_s = (time.perf_counter() - t0) / resets

        # Steps without resets: up to one episode from a fresh reset, reset excluded from the clock.
        env.reset()
        actions = rng.uniform(-1, 1, (env.max_episode_steps, env.act_dim))
        t0 = time.perf_counter()
        steps = run_until_done(env, actions)
        no_reset_sps = steps / (time.perf_counter() - t0)

        # Whole episodes including their resets.
        total, t0 = 0, time.perf_counter()
        for _ in range(episodes):
            env.reset()
            total += run_until_done(env, actions)
        with_reset_sps = total / (time.perf_counter() - t0)
    return {
        "first_reset_s": first_reset,
        "reset_s": reset_s,
        "steps_per_s_without_resets": no_reset_sps,
        "steps_per_s_with_resets": with_reset_sps,
        "episode_steps": total / episodes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=2, help="whole episodes per task and variant (2)")
    parser.add_argument("--resets", type=int, default=5, help="timed resets per task and variant (5)")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--out", type=Path, default=Path("bench/results/env_speed.json"))
    args = parser.parse_args()

    rows = []
    for task_id in args.tasks:
        ours = measure(task_id, fast=True, resets=args.resets, episodes=args.episodes)
        stock = measure(task_id, fast=False, resets=args.resets, episodes=args.episodes)
        row = {
            "task": task_id,
            "ours": ours,
            "stock": stock,
            "reset_speedup": stock["reset_s"] / ours["reset_s"],
            "with_resets_speedup": ours["steps_per_s_with_resets"] / stock["steps_per_s_with_resets"],
        }
        rows.append(row)
        s, o = stock, ours
        print(
            f"{task_id:<30} reset {s['reset_s'] * 1e3:8.1f} ms -> {o['reset_s'] * 1e3:6.1f} ms "
            f"(x{row['reset_speedup']:.0f}); steps/s incl. resets {s['steps_per_s_with_resets']:7.0f} -> "
            f"{o['steps_per_s_with_resets']:7.0f} (x{row['with_resets_speedup']:.2f}); "
            f"without resets {s['steps_per_s_without_resets']:.0f} / {o['steps_per_s_without_resets']:.0f}",
            flush=True,
        )
    write_result(args.out, "env_speed", {"episodes": args.episodes, "resets": args.resets, "rows": rows})


if __name__ == "__main__":
    main()
