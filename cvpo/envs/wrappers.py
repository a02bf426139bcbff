"""Environment-side responsibilities, each in exactly one place.

- ``scale_action``: the only mapping from the policy's [-1, 1] convention to an env's action Box
  (cvpo-algorithm.md §5.3, P10). The policy stores raw samples; only what reaches the env is clipped.
- ``ObservationNormalizer``: running mean/var/count with clipping; travels in checkpoints and the
  policy artefact, so serving normalises exactly as training did.
- ``SafeEnv``: seeding through ``reset(seed=…)``, the six-value step, episode length from the spec.

This module imports only numpy (the policy runtime uses the normaliser without a simulator).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

StepResult = tuple[np.ndarray, float, float, bool, bool, dict[str, Any]]


def scale_action(action: np.ndarray, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clip a policy action to [-1, 1] and map it linearly onto [low, high].

    Returns the env action and, per row, whether clipping changed anything. Works on one action
    (shape (d,)) or a batch (shape (B, d)).
    """
    action = np.asarray(action, dtype=np.float64)
    clipped_action = np.clip(action, -1.0, 1.0)
    was_clipped = np.any(clipped_action != action, axis=-1)
    env_action = low + (clipped_action + 1.0) * 0.5 * (high - low)
    # Guard the top edge against rounding: the result must lie inside the Box.
    return np.clip(env_action, low, high), was_clipped


class ObservationNormalizer:
    """Running observation statistics (parallel Welford/Chan update), normalise and clip.

    ``update`` is called by the trainer on collected observations; evaluation and serving use
    the frozen statistics. ``clip`` bounds normalised values (5.0, OmniSafe's value).
    """

    def __init__(self, dim: int, clip: float = 5.0, epsilon: float = 1e-8) -> None:
        if dim <= 0:
            raise ValueError(f"observation dim must be positive, got {dim}")
        if not clip > 0:
            raise ValueError(f"clip must be positive, got {clip}")
        self.dim = dim
        self.clip = float(clip)
        self.epsilon = float(epsilon)
        self.mean = np.zeros(dim, dtype=np.float64)
        self.var = np.ones(dim, dtype=np.float64)
        self.count = 0.0

    def update(self, obs: np.ndarray) -> None:
        batch = np.asarray(obs, dtype=np.float64).reshape(-1, self.dim)
        if not np.all(np.isfinite(batch)):
            raise ValueError("observation contains NaN or Inf; refusing to update normaliser")
        n = batch.shape[0]
        if n == 0:
            return
        if n == 1:  # the per-step call: the same arithmetic as below with b_mean = x, b_var = 0
            total = self.count + 1.0
            delta = batch[0] - self.mean
            self.mean = self.mean + delta * (1.0 / total)
            self.var = (self.var * self.count + delta**2 * (self.count / total)) / total
            self.count = total
            return
        b_mean = batch.mean(axis=0)
        b_var = batch.var(axis=0)
        total = self.count + n
        delta = b_mean - self.mean
        new_mean = self.mean + delta * (n / total)
        m2 = self.var * self.count + b_var * n + delta**2 * (self.count * n / total)
        self.mean = new_mean
        self.var = m2 / total
        self.count = total

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float64)
        z = (obs - self.mean) / np.sqrt(self.var + self.epsilon)
        return np.clip(z, -self.clip, self.clip)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays only, so it can be stored in safetensors/npz without pickling."""
        return {
            "mean": self.mean.copy(),
            "var": self.var.copy(),
            "count": np.array([self.count], dtype=np.float64),
            "clip": np.array([self.clip], dtype=np.float64),
            "epsilon": np.array([self.epsilon], dtype=np.float64),
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        mean = np.asarray(state["mean"], dtype=np.float64)
        var = np.asarray(state["var"], dtype=np.float64)
        if mean.shape != (self.dim,) or var.shape != (self.dim,):
            raise ValueError(f"normaliser state has shape {mean.shape}/{var.shape}, expected ({self.dim},)")
        if np.any(var < 0) or not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var))):
            raise ValueError("normaliser state holds negative or non-finite values")
        self.mean = mean.copy()
        self.var = var.copy()
        self.count = float(np.asarray(state["count"]).reshape(-1)[0])
        if "clip" in state:
            self.clip = float(np.asarray(state["clip"]).reshape(-1)[0])
        if "epsilon" in state:
            self.epsilon = float(np.asarray(state["epsilon"]).reshape(-1)[0])


class SafeEnv:
    """A safety-gymnasium env with the project's conventions.

    - ``step`` takes a policy action in [-1, 1] and returns (obs, reward, cost, terminated,
      truncated, info) with obs float64, reward and cost Python floats.
    - The first ``reset()`` uses the seed given to ``make``; later resets continue the env's own
      random stream (so a run is reproducible from one seed), unless a seed is passed explicitly.
    - Episodes are truncated at ``max_episode_steps`` from the env spec.
    """

    def __init__(self, env: Any, task_id: str, seed: int | None, fast_reset: bool = True) -> None:
        self.env = env
        self.task_id = task_id
        self.seed = seed
        self.fast_reset = fast_reset
        self.observation_space = env.observation_space
        self.action_space = env.action_space
        self.act_low = np.asarray(env.action_space.low, dtype=np.float64)
        self.act_high = np.asarray(env.action_space.high, dtype=np.float64)
        self.obs_dim = int(np.prod(env.observation_space.shape))
        self.act_dim = int(np.prod(env.action_space.shape))
        self.max_episode_steps = int(env.spec.max_episode_steps)
        self._pending_seed = seed
        if seed is not None:
            self.action_space.seed(seed)

    def _skybox_context(self) -> Any:
        from cvpo.envs import compat  # the simulator is already imported when a SafeEnv exists

        return compat.skybox(fast=self.fast_reset)

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        if seed is None:
            seed, self._pending_seed = self._pending_seed, None
        else:
            self._pending_seed = None
        with self._skybox_context():
            obs, info = self.env.reset(seed=seed)
        return np.asarray(obs, dtype=np.float64), info

    def step(self, action: np.ndarray) -> StepResult:
        action = np.asarray(action, dtype=np.float64).reshape(self.act_dim)
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action contains NaN or Inf: {action}")
        env_action, _ = scale_action(action, self.act_low, self.act_high)
        obs, reward, cost, terminated, truncated, info = self.env.step(env_action)
        return (
            np.asarray(obs, dtype=np.float64),
            float(reward),
            float(cost),
            bool(terminated),
            bool(truncated),
            info,
        )

    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> SafeEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def step_costs(signals: Sequence[str], cost: float, info: dict[str, Any]) -> np.ndarray:
    """Per-constraint step costs: ``"cost"`` is the env's total, any other name an ``info`` entry."""
    out = np.empty(len(signals))
    for i, name in enumerate(signals):
        if name == "cost":
            out[i] = cost
        elif name in info:
            out[i] = float(info[name])
        else:
            keys = sorted(k for k in info if k.startswith("cost"))
            raise ValueError(f"cost signal {name!r} is not in this task's info; available: cost, {keys}")
    return out
