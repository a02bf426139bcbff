"""Run FSRL's CVPO as its users do, timed; executed by ``.venv-fsrl/bin/python`` (see bench/vs_fsrl.py).

It imports our ``cvpo.envs.compat`` first, the only way safety-gymnasium imports on Python 3.11
(environment-notes.md §2), so nothing in FSRL's virtualenv is patched. ``--skybox stock`` keeps
safety-gymnasium's own slow resets (stock FSRL); ``--skybox fast`` applies our fast skybox
(environment-notes.md §4): identical observations, rewards and costs.

FSRL's safety-gymnasium default config (``MujocoBaseCfg``: 128×128, K = 16, batch 256, 0.2 updates per
env step, n-step 3, γ 0.995, τ 0.05, 10 episodes per collect, unbounded mean), one training env in a
``DummyVectorEnv``, ``thread`` torch threads, TensorBoard logger, no test envs. One epoch of
``first collect + window`` steps. Throughput is measured over the window: from the start of the second
collect (after the first collect, its updates and numba's compile) to the end of the last update
phase. Prints one JSON object.

With ``--budget N`` (bench/vs_fsrl_learning.py) it instead trains for N env steps in all, times the
whole of training, then evaluates the final policy with FSRL's own ``agent.evaluate`` (deterministic
mean actions, ``--eval-episodes`` episodes on a fresh env seeded ``EVAL_SEED_BASE + seed``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

# Run by FSRL's virtualenv with PYTHONPATH=<repo root> (bench/vs_fsrl*.py set it): the engine's
# fast-reset compat layer is the only piece of this repository it needs.
from cvpo.envs import compat  # must come before anything imports safety_gymnasium

_STOCK: Any = None
EVAL_SEED_BASE = 1_000_003  # cvpo.trainer's evaluation seed base (not imported: FSRL's venv lacks our deps)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", required=True, help="our task id, e.g. SafetyPointCircle1-v0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=20_000, help="timed env steps after the first collect")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skybox", choices=("stock", "fast"), default="stock")
    p.add_argument("--budget", type=int, help="learning mode: total env steps; then evaluate")
    p.add_argument("--eval-episodes", type=int, default=10)
    args = p.parse_args()

    compat.safety_gymnasium()
    if args.skybox == "stock":
        # For the whole process. Keep the context manager referenced: a collected generator-based
        # context manager runs its exit and would switch the fast skybox back on.
        global _STOCK
        _STOCK = compat.stock_skybox()
        _STOCK.__enter__()

    import gymnasium as gym
    from fsrl.agent import CVPOAgent
    from fsrl.config.cvpo_cfg import MujocoBaseCfg
    from fsrl.trainer import OffpolicyTrainer
    from fsrl.utils import TensorboardLogger
    from tianshou.env import DummyVectorEnv

    gym_id = args.task.replace("-v", "Gymnasium-v")
    resets: list[float] = []

    class ResetTimer(gym.Wrapper):
        """Times env resets (skybox decode and layout build); steps pass straight through."""

        def reset(self, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = self.env.reset(**kwargs)
            resets.append(time.perf_counter() - t0)
            return out

    # FSRL's defaults, with the one-env setting of this comparison recorded in the config itself.
    cfg = MujocoBaseCfg(task=gym_id, thread=args.threads, seed=args.seed, worker="DummyVectorEnv", training_num=1)
    demo_env = gym.make(gym_id)
    horizon = demo_env.spec.max_episode_steps
    first_collect = cfg.episode_per_collect * horizon
    phases: list[dict[str, float]] = []

    orig_train_step = OffpolicyTrainer.train_step
    orig_update = OffpolicyTrainer.policy_update_fn

    def train_step(self: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        n_resets = len(resets)
        stats = orig_train_step(self)
        phases.append(
            {
                "collect_start": t0,
                "collect_end": time.perf_counter(),
                "steps": int(stats["n/st"]),
                "reset_s": sum(resets[n_resets:]),
                "resets": len(resets) - n_resets,
            }
        )
        return stats

    def policy_update_fn(self: Any, stats_train: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        orig_update(self, stats_train)
        phases[-1].update(
            update_s=time.perf_counter() - t0,
            update_end=time.perf_counter(),
            updates=round(self.update_per_step * stats_train["n/st"]),
        )

    OffpolicyTrainer.train_step = train_step
    OffpolicyTrainer.policy_update_fn = policy_update_fn

    with tempfile.TemporaryDirectory() as logdir:
        logger = TensorboardLogger(logdir, log_txt=True, name=f"cvpo-{gym_id}-{args.seed}")
        agent = CVPOAgent(
            env=demo_env,
            logger=logger,
            cost_limit=cfg.cost_limit,
            device=cfg.device,
            thread=cfg.thread,
            seed=cfg.seed,
            estep_iter_num=cfg.estep_iter_num,
            estep_kl=cfg.estep_kl,
            estep_dual_max=cfg.estep_dual_max,
            estep_dual_lr=cfg.estep_dual_lr,
            sample_act_num=cfg.sample_act_num,
            mstep_iter_num=cfg.mstep_iter_num,
            mstep_kl_mu=cfg.mstep_kl_mu,
            mstep_kl_std=cfg.mstep_kl_std,
            mstep_dual_max=cfg.mstep_dual_max,
            mstep_dual_lr=cfg.mstep_dual_lr,
            actor_lr=cfg.actor_lr,
            critic_lr=cfg.critic_lr,
            gamma=cfg.gamma,
            n_step=cfg.n_step,
            tau=cfg.tau,
            hidden_sizes=cfg.hidden_sizes,
            double_critic=cfg.double_critic,
            conditioned_sigma=cfg.conditioned_sigma,
            unbounded=cfg.unbounded,
            last_layer_scale=cfg.last_layer_scale,
            deterministic_eval=cfg.deterministic_eval,
            action_scaling=cfg.action_scaling,
            action_bound_method=cfg.action_bound_method,
        )
        train_envs = DummyVectorEnv([lambda: ResetTimer(gym.make(gym_id))])
        train_envs.seed(args.seed)
        t_start = time.perf_counter()
        agent.learn(
            train_envs=train_envs,
            test_envs=None,
            epoch=1,
            episode_per_collect=cfg.episode_per_collect,
            step_per_epoch=args.budget or first_collect + args.window,
            update_per_step=cfg.update_per_step,
            buffer_size=cfg.buffer_size,
            testing_num=cfg.testing_num,
            batch_size=cfg.batch_size,
            reward_threshold=cfg.reward_threshold,
            save_interval=cfg.save_interval,
            save_ckpt=cfg.save_ckpt,
            verbose=False,
            show_progress=False,
        )
        t_total = time.perf_counter() - t_start
        head = {
            "impl": f"fsrl-{args.skybox}",
            "task": args.task,
            "seed": args.seed,
            "threads": args.threads,
            "vector_env": "DummyVectorEnv",
            "config": {k: v for k, v in vars(cfg).items() if not k.startswith("_")},
        }
        if args.budget:
            test_envs = DummyVectorEnv([lambda: gym.make(gym_id)])
            test_envs.seed(EVAL_SEED_BASE + args.seed)
            rew, _, cost = agent.evaluate(test_envs, eval_episodes=args.eval_episodes)
            steps = sum(ph["steps"] for ph in phases)
            print(
                json.dumps(
                    {
                        **head,
                        "env_steps": steps,
                        "updates": sum(ph["updates"] for ph in phases),
                        "wall_s": t_total,
                        "env_steps_per_s": steps / t_total,
                        "eval_return": float(rew),
                        "eval_cost": float(cost),
                        "eval_episodes": args.eval_episodes,
                        "pid": os.getpid(),
                    }
                )
            )
            return

    timed = phases[1:]
    wall = timed[-1]["update_end"] - timed[0]["collect_start"]
    steps = sum(ph["steps"] for ph in timed)
    updates = sum(ph["updates"] for ph in timed)
    update_s = sum(ph["update_s"] for ph in timed)
    reset_s = sum(ph["reset_s"] for ph in timed)
    collect_s = sum(ph["collect_end"] - ph["collect_start"] for ph in timed)
    print(
        json.dumps(
            {
                **head,
                "warmup_steps": phases[0]["steps"],
                "env_steps": steps,
                "updates": updates,
                "wall_s": wall,
                "env_steps_per_s": steps / wall,
                "ms_per_update": 1e3 * update_s / max(updates, 1),
                "split_s": {
                    "env_resets": reset_s,
                    "collect_other": collect_s - reset_s,  # env steps, inference, buffer, collector
                    "updates": update_s,
                    "other": wall - collect_s - update_s,
                },
                "resets": sum(ph["resets"] for ph in timed),
                "total_wall_s": t_total,
                "pid": os.getpid(),
            }
        )
    )


if __name__ == "__main__":
    main()
