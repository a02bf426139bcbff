"""Training throughput: ms per update (critic, E-step, M-step) and end-to-end env-steps/s.

Part 1 times the learner's phases on synthetic minibatches (B=256, 256×256 nets) for
K ∈ {16, 32, 64}; part 2 runs the real trainer for a short budget per task and reports
env-steps/s end to end. Writes JSON; compare ratios within one run, absolute times are noisy.

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
from results_io import write_result

from cvpo.config import resolve_config
from cvpo.estep import estep_weights, solve_dual
from cvpo.learner import Learner, MinibatchTensors, sample_actions
from cvpo.mstep import gaussian_kl_terms, mstep_loss, weighted_mle
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


def time_phases(task: str, k: int, batch: int, repeats: int) -> dict[str, float]:
    """Per-phase ms of one update, mirroring Learner.update step by step."""
    cfg = resolve_config(
        {
            "env_id": task,
            "algo": {"num_samples": k, "batch_size": batch},
            "network": {"actor_hidden": [256, 256], "critic_hidden": [256, 256]},
        }
    )
    from cvpo.envs import get_task

    info = get_task(task)
    learner = Learner(cfg, info.obs_dim, info.act_dim, np.array([1.0]), torch.device("cpu"))
    b = synthetic_batch(info.obs_dim, info.act_dim, batch)
    a = cfg.algo
    times: dict[str, list[float]] = {
        "critic": [],
        "estep_sample_score": [],
        "estep_solve": [],
        "mstep": [],
        "total_update": [],
    }
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        learner.critic_step(b)
        t1 = time.perf_counter()
        with torch.no_grad():
            mean_old, tril_old = learner.actor_old(b.obs)
            samples = sample_actions(mean_old, tril_old, k)
            obs_k = b.obs.unsqueeze(0).expand(k, *b.obs.shape)
            q_r = learner.reward_target(obs_k, samples).min(dim=0).values
            q_c = learner.cost_target(obs_k, samples)
        q_r_np, q_c_np = q_r.T.double().numpy(), q_c.transpose(1, 2).double().numpy()
        t2 = time.perf_counter()
        sol = solve_dual(q_r_np, q_c_np, learner.thresholds, a.kl_bound, learner.temperature, learner.cost_multipliers)
        learner.temperature, learner.cost_multipliers = sol.temperature, sol.cost_multipliers
        w = torch.as_tensor(estep_weights(q_r_np, q_c_np, sol.temperature, sol.cost_multipliers), dtype=torch.float32)
        t3 = time.perf_counter()
        mean_new, tril_new = learner.actor(b.obs)
        mle = weighted_mle(samples.transpose(0, 1), w, mean_old, tril_old, mean_new, tril_new)
        c_mu, c_sigma = gaussian_kl_terms(mean_old, tril_old, mean_new, tril_new)
        loss = mstep_loss(mle, c_mu, c_sigma, 0.1, 0.1, a.mean_kl_bound, a.cov_kl_bound)
        learner.actor_opt.zero_grad()
        loss.backward()
        learner.actor_opt.step()
        t4 = time.perf_counter()
        learner.update(b)
        t5 = time.perf_counter()
        if i >= 3:  # warm-up iterations excluded
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                times[key].append(dt * 1e3)
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
