"""The training loop: collect, update, evaluate, track the best feasible policy, checkpoint.

Design for exact resume (service-design.md §3.5): every episode is reset with a seed derived from
(run seed, episode index), epochs and checkpoints fall on episode ends, and a checkpoint holds
all learner, buffer, normaliser and RNG state plus the epoch's running accumulators. So a run
stopped at any checkpoint and resumed on CPU reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cvpo import envs, trainstate
from cvpo.artefact import write_policy_artefact
from cvpo.buffer import ReplayBuffer
from cvpo.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from cvpo.config import TrainConfig, config_from_dict
from cvpo.envs import ObservationNormalizer, SafeEnv
from cvpo.learner import Learner, MinibatchTensors, sample_actions
from cvpo.metrics import policy_summary
from cvpo.nets import ActorSnapshot
from cvpo.runlog import RunLog
from cvpo.runtime import keep_freed_memory
from cvpo.selection import VALIDATION_SEED_BASE, Snapshot, better, candidate
from cvpo.thresholds import curriculum_limits, curriculum_threshold, per_step_threshold
from cvpo.trainstate import EpochStats

EVAL_SEED_BASE = 1_000_003  # evaluation layouts: the same episodes every epoch, apart from training's
# Metrics that legitimately differ between two runs of the same seed (wall clock).
TIMING_KEYS = ("wall_time_s", "env_steps_per_s", "epoch_time_s")
# The margin controller's error per probe episode, (J − target·C)/C, is clipped to this range so that
# one freak episode cannot swing δ; the upper end lets violations tighten faster than slack relaxes.
MARGIN_ERROR_RANGE = (-1.0, 3.0)


def episode_seed(run_seed: int, episode: int) -> int:
    """A distinct, reproducible reset seed per training episode."""
    return int(np.random.SeedSequence([run_seed, episode]).generate_state(1)[0])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available")
    return torch.device(name)


@dataclass
class TrainResult:
    run_dir: Path
    epochs: int
    env_steps: int
    stopped_early: bool
    last_metrics: dict[str, Any] | None
    best: dict[str, Any] | None


EpochCallback = Callable[[dict[str, Any]], None]


class Trainer:
    """Owns env, buffer, normaliser and learner for one run directory.

    ``on_epoch_end(metrics)`` callbacks see each epoch's metrics; ``on_checkpoint(path, metrics)``
    each written checkpoint. ``request_stop()`` (Ctrl-C, a cancel) ends the run at the next
    episode end, after a checkpoint.
    """

    def __init__(self, config: TrainConfig, run_dir: Path, quiet: bool = False) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.quiet = quiet
        self.device = resolve_device(config.device)
        keep_freed_memory()  # no page faults for each update's activations (cvpo/runtime.py)
        torch.set_num_threads(config.loop.torch_threads)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.rng = np.random.Generator(np.random.PCG64(config.seed))

        self.task = envs.get_task(config.env_id)
        self.env: SafeEnv = envs.make(config.env_id, seed=None)
        self.eval_env: SafeEnv = envs.make(config.env_id, seed=None)
        self.horizon = self.env.max_episode_steps
        m = config.num_constraints
        self.margin_integral = np.zeros(m)  # the margin controller's integral term I (checkpointed)
        self.normalizer = ObservationNormalizer(self.env.obs_dim, clip=config.loop.obs_clip)
        self.buffer = ReplayBuffer(config.loop.buffer_size, self.env.obs_dim, self.env.act_dim, m)
        self.learner = Learner(config, self.env.obs_dim, self.env.act_dim, self.thresholds(0), self.device)
        # Acting one state at a time goes through a NumPy copy of the (diagonal) actor, refreshed
        # whenever the actor changes; Cholesky actors act through torch.
        self.actor_snapshot = ActorSnapshot(self.learner.actor) if self.learner.diag else None
        # Seconds per phase of the loop (env, inference, minibatch, plus the learner's TIMED_PHASES)
        # when a benchmark calls enable_timing(); None costs nothing.
        self.timings: dict[str, float] | None = None

        self.env_steps = 0
        self.episodes = 0
        self.epoch = 0
        self.update_credit = 0.0
        self.steps_since_update = 0
        self.best: dict[str, Any] | None = None
        # loop.select = "validated": the chosen epoch's validation record and its policy (cvpo/selection.py).
        self.selected: dict[str, Any] | None = None
        self.selected_snapshot: Snapshot | None = None
        self.epoch_stats = EpochStats()
        self.elapsed_before = 0.0  # wall time of earlier attempts, for the metrics' wall_time_s
        self._stop = False
        # What the loop is doing, for a progress display read from another thread (the worker's heartbeat).
        self.phase = "training"
        self._t0 = time.perf_counter()  # reset when train() starts
        self.log = RunLog(self.run_dir)  # metrics.jsonl / metrics.csv / TensorBoard
        self.on_epoch_end: list[EpochCallback] = []
        self.on_checkpoint: list[Callable[[Path, dict[str, Any]], None]] = []

    # ------------------------------------------------------------------ helpers

    def thresholds(self, epoch: int) -> np.ndarray:
        """Per-step thresholds the E-step trains against: c̄ (or the curriculum's) times 1 − δ."""
        c, g = self.config.constraints, self.config.algo.gamma
        if c.curriculum_epochs > 0 and c.curriculum_start is not None:
            base = np.array(
                [
                    curriculum_threshold(epoch, c.curriculum_start, limit, c.curriculum_epochs, self.horizon, g)[0]
                    for limit in c.cost_limits
                ]
            )
        else:
            base = per_step_threshold(list(c.cost_limits), self.horizon, g)
        return base * (1.0 - self.margins())

    def margins(self) -> np.ndarray:
        """δ per constraint: the fixed margin plus the controller's integral, at most ``margin_max``."""
        c = self.config.constraints
        return np.clip(c.margin + self.margin_integral, 0.0, c.margin_max)

    def update_margin(self, episode_costs: np.ndarray) -> None:
        """One integral step of the margin controller on a finished episode's cost (docs/safety-margin.md)."""
        c = self.config.constraints
        if c.margin_control != "integral":
            return
        limits = np.asarray(self.current_limits(self.epoch), dtype=np.float64)
        finite = np.isfinite(limits)
        err = np.zeros_like(limits)
        err[finite] = (episode_costs[finite] - c.margin_target * limits[finite]) / np.maximum(limits[finite], 1.0)
        err = np.clip(err, *MARGIN_ERROR_RANGE)
        self.margin_integral = np.clip(self.margin_integral + c.margin_gain * err, 0.0, c.margin_max - c.margin)
        self.learner.set_thresholds(self.thresholds(self.epoch))

    def is_probe(self, episode: int) -> bool:
        """Every ``probe_every``-th training episode acts with the mean action (the served policy)."""
        k = self.config.constraints.probe_every
        return k > 0 and episode % k == k - 1

    def current_limits(self, epoch: int) -> list[float]:
        """Episodic limits in force at ``epoch`` (the curriculum's, converted back for reporting)."""
        c = self.config.constraints
        if c.curriculum_start is None:
            return list(c.cost_limits)
        return curriculum_limits(epoch, c.curriculum_start, c.cost_limits, c.curriculum_epochs)

    def costs_of(self, cost: float, info: dict[str, Any]) -> np.ndarray:
        signals = self.config.constraints.cost_signals or ("cost",) * self.config.num_constraints
        return envs.step_costs(signals, cost, info)

    def request_stop(self) -> None:
        self._stop = True

    def enable_timing(self) -> dict[str, float]:
        """Start summing wall seconds per phase into ``self.timings`` (shared with the learner's)."""
        self.timings = self.learner.enable_timing()
        return self.timings

    def policy_action(self, obs: np.ndarray, deterministic: bool) -> np.ndarray:
        """The actor's mean (evaluation) or a raw sample μ + σ·z (collection), in float64.

        Diagonal actors: NumPy snapshot, z from the trainer's checkpointed NumPy RNG (``self.rng``).
        Cholesky actors: torch, z from torch's global RNG (also checkpointed).
        """
        if self.actor_snapshot is not None:
            mean, std = self.actor_snapshot.mean_std(self.normalize(obs))
            if deterministic:
                return mean
            return mean + std * self.rng.standard_normal(mean.shape[0])
        with torch.no_grad():
            x = torch.as_tensor(self.normalize(obs), dtype=torch.float32, device=self.device).unsqueeze(0)
            mean, tril = self.learner.actor(x)
            action = mean if deterministic else sample_actions(mean, tril)
        return action[0].cpu().numpy().astype(np.float64)

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        return self.normalizer.normalize(obs) if self.config.loop.normalize_obs else np.asarray(obs)

    def minibatch(self) -> MinibatchTensors:
        a = self.config.algo
        idx = self.buffer.sample_indices(a.batch_size, self.rng)
        nb = self.buffer.nstep(idx, a.n_step, a.gamma)

        def t(x: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)

        return MinibatchTensors(
            obs=t(self.normalize(nb.obs)),
            action=t(nb.action),
            reward_return=t(nb.reward_return),
            cost_return=t(nb.cost_return),
            bootstrap_obs=t(self.normalize(nb.bootstrap_obs)),
            discount=t(nb.discount),
            terminated=t(nb.terminated.astype(np.float32)),
        )

    def run_updates(self) -> None:
        a = self.config.algo
        credit = self.update_credit + self.steps_since_update * a.updates_per_step
        self.steps_since_update = 0
        if len(self.buffer) < a.batch_size or self.env_steps < self.config.loop.warmup_steps:
            self.update_credit = 0.0  # no backlog of updates builds up during warm-up
            return
        n = int(credit)
        self.update_credit = credit - n
        if n == 0:
            return
        self.learner.start_phase()
        timings = self.timings
        for _ in range(n):
            if timings is None:
                batch = self.minibatch()
            else:
                t0 = time.perf_counter()
                batch = self.minibatch()
                timings["minibatch"] += time.perf_counter() - t0
            self.epoch_stats.add_update(self.learner.update(batch))
        self.learner.end_phase()
        if self.actor_snapshot is not None:
            self.actor_snapshot.refresh()

    # ------------------------------------------------------------------ collection and evaluation

    def run_episode(self) -> None:
        """One training episode with updates interleaved every ``update_every`` steps."""
        lp = self.config.loop
        timings = self.timings
        clock = time.perf_counter
        t0 = clock()
        obs, _ = self.env.reset(seed=episode_seed(self.config.seed, self.episodes))
        if timings is not None:
            timings["env"] += clock() - t0
        probe = self.is_probe(self.episodes) and self.env_steps >= lp.warmup_steps
        self.episodes += 1
        ep_return, ep_cost, length = 0.0, np.zeros(self.config.num_constraints), 0
        while True:
            t0 = clock() if timings is not None else 0.0
            if self.env_steps < lp.warmup_steps:
                action = self.rng.uniform(-1.0, 1.0, self.env.act_dim)
            else:
                action = self.policy_action(obs, deterministic=probe)
            if timings is None:
                next_obs, reward, cost, terminated, truncated, info = self.env.step(action)
            else:
                t1 = clock()
                next_obs, reward, cost, terminated, truncated, info = self.env.step(action)
                t2 = clock()
                timings["inference"] += t1 - t0
                timings["env"] += t2 - t1
            costs = self.costs_of(cost, info)
            if lp.normalize_obs:
                self.normalizer.update(obs)
            stored = np.clip(action, -1.0, 1.0) if self.config.algo.action_box == "clip" else action
            self.buffer.add(obs, stored, reward, costs, next_obs, terminated, truncated)
            ep_return += reward
            ep_cost += costs
            length += 1
            self.env_steps += 1
            self.steps_since_update += 1
            obs = next_obs
            if self.steps_since_update >= lp.update_every:
                self.run_updates()
            if terminated or truncated:
                break
        if probe:
            self.epoch_stats.probe_returns.append(ep_return)
            self.epoch_stats.probe_costs.append(ep_cost.tolist())
        else:
            self.epoch_stats.episode_returns.append(ep_return)
            self.epoch_stats.episode_costs.append(ep_cost.tolist())
        self.epoch_stats.episode_lengths.append(length)
        # The controller reads the served policy's cost when probes run, else the sampled policy's.
        if probe or (self.config.constraints.probe_every == 0 and self.env_steps > lp.warmup_steps):
            self.update_margin(ep_cost)

    def evaluate(self, episodes: int, stochastic_episodes: int = 0, seed_base: int = EVAL_SEED_BASE) -> dict[str, Any]:
        """Deterministic (mean-action) episodes on fixed evaluation layouts, then sampled-action ones.

        The sampled actions draw from their own generator seeded by (run seed, epoch), so evaluation
        leaves the training RNG streams untouched. On the sampled episodes the cost critic's prediction
        Q_c(s₀, a₀) is set against the realised discounted cost Σ γ^t c_t (its calibration).
        """
        gamma = self.config.algo.gamma
        rng = np.random.Generator(np.random.PCG64([self.config.seed, self.epoch, 7]))
        out: dict[str, Any] = {"returns": [], "costs": [], "s_returns": [], "s_costs": [], "pred": [], "real": []}
        for i in range(episodes + stochastic_episodes):
            sampled = i >= episodes
            obs, _ = self.eval_env.reset(seed=seed_base + (i - episodes if sampled else i))
            ep_return, ep_cost = 0.0, np.zeros(self.config.num_constraints)
            discounted, discount = np.zeros(self.config.num_constraints), 1.0
            first = True
            while True:
                if sampled:
                    mean, std = self.action_mean_std(obs)
                    action = mean + std @ rng.standard_normal(mean.shape[0])
                    if first:
                        out["pred"].append(self.predicted_cost(obs, action).tolist())
                        first = False
                else:
                    action = self.policy_action(obs, deterministic=True)
                obs, reward, cost, terminated, truncated, info = self.eval_env.step(action)
                costs = self.costs_of(cost, info)
                ep_return += reward
                ep_cost += costs
                discounted += discount * costs
                discount *= gamma
                if terminated or truncated:
                    break
            if sampled:
                out["s_returns"].append(ep_return)
                out["s_costs"].append(ep_cost.tolist())
                out["real"].append(discounted.tolist())
            else:
                out["returns"].append(ep_return)
                out["costs"].append(ep_cost.tolist())
        return out

    def validate(self, metrics: dict[str, Any]) -> None:
        """Validation episodes for ``loop.select = "validated"``; keeps the better policy (cvpo/selection.py)."""
        lp = self.config.loop
        val = self.evaluate(lp.validation_episodes, 0, seed_base=VALIDATION_SEED_BASE)
        limits = [float(x) for x in self.config.constraints.cost_limits]
        cand = candidate(
            self.epoch, self.env_steps, val["returns"], np.array(val["costs"]), limits, lp.validation_confidence
        )
        metrics.update(
            {
                "validation_return": cand["return"],
                "validation_cost": cand["costs"][0],
                "validation_costs": cand["costs"],
                "validation_cost_bound": cand["cost_bounds"][0],
                "validation_cost_bounds": cand["cost_bounds"],
                "validation_admissible": cand["admissible"],
            }
        )
        if better(cand, self.selected):
            self.selected = cand
            self.selected_snapshot = Snapshot(self.learner.actor, self.learner.cost_critic, self.normalizer)
        metrics["selected"] = self.selected

    @contextmanager
    def serving(self, snapshot: Snapshot) -> Iterator[None]:
        """Temporarily put a stored policy (actor, cost critic, normaliser) in place; restored exactly after."""
        parts = (self.learner.actor, self.learner.cost_critic, self.normalizer)
        live = Snapshot(*parts)
        snapshot.apply(*parts)
        if self.actor_snapshot is not None:
            self.actor_snapshot.refresh()
        try:
            yield
        finally:
            live.apply(*parts)
            if self.actor_snapshot is not None:
                self.actor_snapshot.refresh()

    def served_evaluation(self, metrics: dict[str, Any], evaluation: dict[str, Any]) -> None:
        """On the last epoch: the evaluation-layout numbers of the policy the run hands out as ``policy/``."""
        if self.selected_snapshot is not None and self.selected is not None and self.selected["epoch"] != self.epoch:
            with self.serving(self.selected_snapshot):
                evaluation = self.evaluate(self.config.loop.eval_episodes, 0)
        if not evaluation["returns"]:
            return
        costs = np.array(evaluation["costs"])
        limits = [float(x) for x in self.config.constraints.cost_limits]
        metrics.update(
            {
                "served_epoch": self.selected["epoch"] if self.selected is not None else self.epoch,
                "served_eval_return": float(np.mean(evaluation["returns"])),
                "served_eval_cost": float(costs[:, 0].mean()),
                "served_eval_costs": costs.mean(axis=0).tolist(),
                "served_feasible": bool(all(c <= lim for c, lim in zip(costs.mean(axis=0), limits, strict=True))),
            }
        )

    def action_mean_std(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The policy's raw mean (d,) and scale factor L (d, d) at one observation, float64."""
        if self.actor_snapshot is not None:
            mean, std = self.actor_snapshot.mean_std(self.normalize(obs))
            return mean, np.diag(std)
        with torch.no_grad():
            x = torch.as_tensor(self.normalize(obs), dtype=torch.float32, device=self.device).unsqueeze(0)
            mean, tril = self.learner.actor(x)
        return mean[0].cpu().numpy().astype(np.float64), tril[0].cpu().numpy().astype(np.float64)

    def predicted_cost(self, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        """The cost critics' Q_c(s, a) per constraint, shape (m,) (a clipped as the critics were trained;
        with ``network.cost_critics`` > 1 the members' mean)."""
        if self.config.algo.action_box == "clip":
            action = np.clip(action, -1.0, 1.0)
        with torch.no_grad():
            x = torch.as_tensor(self.normalize(obs), dtype=torch.float32, device=self.device).unsqueeze(0)
            a = torch.as_tensor(action, dtype=torch.float32, device=self.device).unsqueeze(0)
            return self.learner.cost_value(x, a)[:, 0].cpu().numpy().astype(np.float64)

    # ------------------------------------------------------------------ epochs

    def epoch_metrics(self, evaluation: dict[str, Any]) -> dict[str, Any]:
        es = self.epoch_stats
        limits = self.current_limits(self.epoch)
        m = self.config.num_constraints
        now = time.perf_counter()
        epoch_time = now - es.start_time
        metrics: dict[str, Any] = {
            "epoch": self.epoch,
            "env_steps": self.env_steps,
            "episodes": self.episodes,
            "updates": self.learner.updates,
            "train_return": float(np.mean(es.episode_returns)) if es.episode_returns else None,
            "train_cost": float(np.mean([c[0] for c in es.episode_costs])) if es.episode_costs else None,
            "train_costs": np.mean(es.episode_costs, axis=0).tolist() if es.episode_costs else None,
            "train_episode_length": float(np.mean(es.episode_lengths)) if es.episode_lengths else None,
            "cost_limits": limits,
        }
        if evaluation["returns"]:
            eval_costs = np.array(evaluation["costs"])
            metrics.update(
                {
                    "eval_return": float(np.mean(evaluation["returns"])),
                    "eval_return_std": float(np.std(evaluation["returns"])),
                    "eval_cost": float(eval_costs[:, 0].mean()),
                    "eval_cost_std": float(eval_costs[:, 0].std()),
                    "eval_costs": eval_costs.mean(axis=0).tolist(),
                    "eval_episode_returns": evaluation["returns"],
                    "eval_episode_costs": evaluation["costs"],
                }
            )
            metrics["feasible"] = bool(all(eval_costs.mean(axis=0)[i] <= limits[i] for i in range(m)))
        if evaluation.get("s_returns"):
            s_costs = np.array(evaluation["s_costs"])
            pred, real = np.array(evaluation["pred"]), np.array(evaluation["real"])
            metrics.update(
                {
                    "eval_return_stochastic": float(np.mean(evaluation["s_returns"])),
                    "eval_cost_stochastic": float(s_costs[:, 0].mean()),
                    "eval_costs_stochastic": s_costs.mean(axis=0).tolist(),
                    # Cost critic calibration on the sampled episodes' start states (discounted cost).
                    "critic_cost_predicted": float(pred[:, 0].mean()),
                    "critic_cost_realised": float(real[:, 0].mean()),
                    "critic_costs_predicted": pred.mean(axis=0).tolist(),
                    "critic_costs_realised": real.mean(axis=0).tolist(),
                }
            )
        if es.probe_costs:
            metrics["probe_return"] = float(np.mean(es.probe_returns))
            metrics["probe_cost"] = float(np.mean([c[0] for c in es.probe_costs]))
            metrics["probe_costs"] = np.mean(es.probe_costs, axis=0).tolist()
            metrics["probe_episodes"] = len(es.probe_costs)
        margins = self.margins()
        metrics["margin"] = float(margins[0])
        metrics["margins"] = margins.tolist()
        metrics["effective_cost_limits"] = [lim * (1.0 - d) for lim, d in zip(limits, margins, strict=True)]
        n = max(es.update_count, 1)
        for k, v in sorted(es.update_sums.items()):
            metrics[k] = v / n
        for k, v in sorted(es.update_max.items()):
            metrics[f"{k}_max"] = v
        metrics["update_count"] = es.update_count
        metrics["temperature_last"] = self.learner.temperature
        metrics["cost_multipliers"] = self.learner.cost_multipliers.tolist()
        metrics["per_step_thresholds"] = self.learner.thresholds.tolist()
        metrics["epoch_time_s"] = epoch_time
        metrics["env_steps_per_s"] = (self.env_steps - es.start_step) / max(epoch_time, 1e-9)
        metrics["wall_time_s"] = self.elapsed_before + (now - self._t0)
        return metrics

    def update_best(self, metrics: dict[str, Any]) -> bool:
        """Best = highest eval return among feasible epochs, else lowest eval cost (FSRL's rule)."""
        if "eval_return" not in metrics:
            return False
        cand = {
            "epoch": metrics["epoch"],
            "env_steps": metrics["env_steps"],
            "eval_return": metrics["eval_return"],
            "eval_cost": metrics["eval_cost"],
            "feasible": metrics["feasible"],
        }
        b = self.best
        better = (
            b is None
            or (cand["feasible"] and not b["feasible"])
            or (cand["feasible"] and b["feasible"] and cand["eval_return"] > b["eval_return"])
            or (not cand["feasible"] and not b["feasible"] and cand["eval_cost"] < b["eval_cost"])
        )
        if better:
            self.best = cand
        return better

    # ------------------------------------------------------------------ checkpoints and artefacts

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
        """Everything a bit-identical resume needs (cvpo/trainstate.py)."""
        return trainstate.pack(self)

    def save(self, metrics: dict[str, Any] | None) -> Path:
        state, arrays, meta = self.state()
        meta["metrics"] = metrics
        path = save_checkpoint(self.run_dir / "checkpoints" / f"ckpt_{self.env_steps:010d}", state, arrays, meta)
        for cb in self.on_checkpoint:
            cb(path, meta)
        return path

    def restore(self, path: Path) -> None:
        state, arrays, meta = load_checkpoint(path, map_location=str(self.device))
        trainstate.unpack(self, state, arrays, meta, path)
        self.learner.set_thresholds(self.thresholds(self.epoch))
        if self.actor_snapshot is not None:
            self.actor_snapshot.refresh()

    def write_policy(self, name: str, metrics: dict[str, Any] | None) -> Path:
        summary = policy_summary(metrics)
        summary["seed"] = self.config.seed
        return write_policy_artefact(
            self.run_dir / name,
            actor=self.learner.actor,
            normalizer=self.normalizer if self.config.loop.normalize_obs else None,
            env=self.env,
            config=self.config,
            summary=summary,
            cost_critic=self.learner.cost_critic,  # Q_c at serve time (/act "return": ["cost_to_go"])
            horizon=self.horizon,
        )

    # ------------------------------------------------------------------ metrics files

    # ------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        self.log.open(self.epoch)
        self._t0 = time.perf_counter()
        lp = self.config.loop
        total = self.config.total_env_steps
        last_metrics: dict[str, Any] | None = None
        progress = None
        if not self.quiet:
            from tqdm import tqdm

            progress = tqdm(total=total, initial=self.env_steps, unit="step", dynamic_ncols=True)
        try:
            while self.env_steps < total and not self._stop:
                self.epoch_stats.start_time = self.epoch_stats.start_time or time.perf_counter()
                before = self.env_steps
                self.run_episode()
                if progress is not None:
                    progress.update(self.env_steps - before)
                epoch_done = (
                    self.env_steps - self.epoch_stats.start_step >= lp.steps_per_epoch or self.env_steps >= total
                )
                if not epoch_done:
                    if self._stop:
                        self.save(None)  # mid-epoch: accumulators travel in the checkpoint
                    continue
                sampled = lp.eval_stochastic_episodes
                sampled = (lp.eval_episodes + 1) // 2 if sampled is None else sampled
                self.phase = "evaluating"
                evaluation = self.evaluate(lp.eval_episodes, sampled)
                self.phase = "training"
                metrics = self.epoch_metrics(evaluation)
                if lp.select == "validated":
                    self.validate(metrics)
                if self.env_steps >= total:
                    self.served_evaluation(metrics, evaluation)
                improved = self.update_best(metrics)
                metrics["best"] = self.best
                self.log.append(metrics)
                last_metrics = metrics
                if improved:
                    self.write_policy("best_policy", metrics)
                self.epoch += 1
                self.learner.set_thresholds(self.thresholds(self.epoch))
                self.epoch_stats = EpochStats(start_step=self.env_steps, start_time=time.perf_counter())
                if progress is not None:
                    lam = ", ".join(f"{x:.3g}" for x in self.learner.cost_multipliers)
                    progress.set_postfix_str(
                        f"R {metrics.get('eval_return', math.nan):.1f} "
                        f"C {metrics.get('eval_cost', math.nan):.1f}"
                        f" λ {lam} {metrics['env_steps_per_s']:.0f} st/s"
                    )
                for cb in self.on_epoch_end:
                    cb(metrics)
                if self.epoch % lp.checkpoint_every_epochs == 0 or self.env_steps >= total or self._stop:
                    self.save(metrics)
        finally:
            if progress is not None:
                progress.close()
            self.log.close()
        finished = self.env_steps >= total
        if finished:
            final = last_metrics or self.log.last()
            if self.selected_snapshot is not None:
                # The validated choice is what the run serves; the last epoch's policy stays beside it.
                self.write_policy("final_policy", final)
                with self.serving(self.selected_snapshot):
                    self.write_policy("policy", self._served_summary(final))
            else:
                self.write_policy("policy", final)
        return TrainResult(self.run_dir, self.epoch, self.env_steps, not finished, last_metrics, self.best)

    def _served_summary(self, final: dict[str, Any] | None) -> dict[str, Any]:
        """policy.json's summary for a validated choice: its epoch and its evaluation-layout numbers."""
        sel, final = self.selected or {}, final or {}
        return {
            "epoch": sel.get("epoch"),
            "env_steps": sel.get("env_steps"),
            "eval_return": final.get("served_eval_return"),
            "eval_cost": final.get("served_eval_cost"),
            "feasible": final.get("served_feasible"),
        }

    @classmethod
    def resume(cls, run_dir: Path, quiet: bool = False) -> Trainer:
        """A trainer restored from the newest complete checkpoint in ``run_dir``."""
        run_dir = Path(run_dir)
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints:
            raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from")
        _, _, meta = load_checkpoint(checkpoints[-1])
        trainer = cls(config_from_dict(meta["config"]), run_dir, quiet=quiet)
        trainer.restore(checkpoints[-1])
        return trainer
