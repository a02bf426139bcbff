"""Replay buffer with n-step returns for CVPO's critics.

Why it looks the way it does (``docs/cvpo-algorithm.md``):

- §4.2/§4.3: the critics use n-step targets (n ∈ {1, 2, 3}) whose window stops at the episode
  end, and *termination* and *truncation* are different: truncation (time limit) bootstraps,
  termination does not for Q_r, and Q_c's mask is configurable. So the buffer keeps
  ``terminated`` and ``truncated`` separately and ``nstep`` hands the flag back instead of
  applying a mask itself.
- A truncated step's ``next_obs`` is the real final observation, never the reset observation,
  because the target bootstraps from it.
- I16: ``action`` is the raw policy sample whose log-probability the M-step uses, not the clipped
  env action, so nothing here clips.
- I15: ``nstep`` is exact enough to check against hand-computed numbers (tests/cvpo/test_buffer.py).
- service-design.md §3.5: a checkpoint holds the whole buffer for a bit-identical resume, written
  without pickle, so ``state_dict`` is a flat ``dict[str, np.ndarray]``.

Consecutive slots must be consecutive time steps of one trajectory stream (one env). Rows from
parallel envs at the same time step must not be interleaved into one buffer.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["NStepBatch", "ReplayBuffer"]

STATE_VERSION = 1

# Per-transition arrays saved by ``state_dict`` (``episode_end`` is derived, so not saved).
_FLOAT_FIELDS = ("obs", "next_obs", "action", "reward", "cost")
_BOOL_FIELDS = ("terminated", "truncated")
_SCALAR_FIELDS = ("version", "capacity", "ptr", "size")


@dataclass(frozen=True)
class NStepBatch:
    """n-step training batch for the critics (§4.2).

    For each sampled t, with n' = n cut short at the first episode end (terminated or truncated)
    in the window and at the buffer's write head:

    - ``reward_return`` (B,) = Σ_{i<n'} γ^i r_{t+i}; ``cost_return`` (B, m) likewise per constraint.
    - ``bootstrap_obs`` (B, o) = next_obs of step t+n'−1 (the true final obs after a truncation).
    - ``discount`` (B,) = γ^{n'}.
    - ``terminated`` (B,) = terminated at step t+n'−1. The caller computes
      y_r = reward_return + discount·(1−terminated)·Q̄_r and applies its configured cost mask
      (termination-only or never, §4.3 / P8) to y_c.
    - ``n_steps`` (B,) = n' itself (diagnostics and tests).
    """

    obs: np.ndarray
    action: np.ndarray
    reward_return: np.ndarray
    cost_return: np.ndarray
    bootstrap_obs: np.ndarray
    discount: np.ndarray
    terminated: np.ndarray
    n_steps: np.ndarray


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class ReplayBuffer:
    """Circular FIFO buffer of single-env transitions, preallocated as float32/bool numpy arrays.

    ``ptr`` is the next slot to write; ``size`` the number of stored transitions. Once full, the
    oldest transition is overwritten. Unfilled slots stay zero, so a buffer restored from a
    ``state_dict`` of only the filled part is bit-identical to the original.
    """

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, n_costs: int) -> None:
        self.capacity = _positive_int("capacity", capacity)
        self.obs_dim = _positive_int("obs_dim", obs_dim)
        self.act_dim = _positive_int("act_dim", act_dim)
        self.n_costs = _positive_int("n_costs", n_costs)
        cap = self.capacity
        # zeros (not empty): unwritten slots are deterministic, which keeps state round trips exact.
        self.obs = np.zeros((cap, self.obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((cap, self.obs_dim), dtype=np.float32)
        self.action = np.zeros((cap, self.act_dim), dtype=np.float32)
        self.reward = np.zeros(cap, dtype=np.float32)
        self.cost = np.zeros((cap, self.n_costs), dtype=np.float32)
        self.terminated = np.zeros(cap, dtype=bool)
        self.truncated = np.zeros(cap, dtype=bool)
        self.episode_end = np.zeros(cap, dtype=bool)  # terminated | truncated: where windows stop
        self.ptr = 0
        self.size = 0

    def __len__(self) -> int:
        return self.size

    # ------------------------------------------------------------------ writing

    def _check_rows(self, name: str, value: Any, n: int, width: int | None) -> np.ndarray:
        arr = np.asarray(value)
        expected = (n,) if width is None else (n, width)
        if arr.shape != expected:
            raise ValueError(f"{name} must have shape {expected}, got {arr.shape}")
        return arr

    def add(
        self,
        obs: Any,
        action: Any,
        reward: float,
        cost: Any,
        next_obs: Any,
        terminated: bool,
        truncated: bool,
    ) -> None:
        """Store one transition. ``cost`` is (n_costs,), or a scalar when n_costs == 1.

        ``action`` is the raw policy sample (I16); ``next_obs`` after a truncation is the true final
        observation (§4.2: truncation bootstraps from it).
        """
        obs_arr = np.asarray(obs)
        next_arr = np.asarray(next_obs)
        act_arr = np.asarray(action)
        cost_arr = np.asarray(cost)
        if cost_arr.ndim == 0 and self.n_costs == 1:
            cost_arr = cost_arr.reshape(1)
        for name, arr, shape in (
            ("obs", obs_arr, (self.obs_dim,)),
            ("next_obs", next_arr, (self.obs_dim,)),
            ("action", act_arr, (self.act_dim,)),
            ("cost", cost_arr, (self.n_costs,)),
        ):
            if arr.shape != shape:
                raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
        for name, flag in (("terminated", terminated), ("truncated", truncated)):
            if not isinstance(flag, bool | np.bool_):
                raise ValueError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
        i = self.ptr
        self.obs[i] = obs_arr
        self.next_obs[i] = next_arr
        self.action[i] = act_arr
        self.reward[i] = reward
        self.cost[i] = cost_arr
        self.terminated[i] = terminated
        self.truncated[i] = truncated
        self.episode_end[i] = bool(terminated) or bool(truncated)
        self.ptr = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def add_batch(
        self,
        obs: Any,
        action: Any,
        reward: Any,
        cost: Any,
        next_obs: Any,
        terminated: Any,
        truncated: Any,
    ) -> None:
        """Store N consecutive transitions of one trajectory stream, oldest first.

        Shapes: obs/next_obs (N, o), action (N, a), reward (N,), cost (N, m) or (N,) when m == 1,
        terminated/truncated (N,) bool. Same result as N calls to ``add``; if N > capacity only the
        last ``capacity`` transitions survive, as they would one by one.
        """
        reward = np.asarray(reward)
        if reward.ndim != 1:
            raise ValueError(f"reward must have shape (N,), got {reward.shape}")
        n = reward.shape[0]
        cost = np.asarray(cost)
        if cost.ndim == 1 and self.n_costs == 1:
            cost = cost[:, None]
        obs = self._check_rows("obs", obs, n, self.obs_dim)
        next_obs = self._check_rows("next_obs", next_obs, n, self.obs_dim)
        action = self._check_rows("action", action, n, self.act_dim)
        cost = self._check_rows("cost", cost, n, self.n_costs)
        terminated = self._check_rows("terminated", terminated, n, None)
        truncated = self._check_rows("truncated", truncated, n, None)
        for name, flag in (("terminated", terminated), ("truncated", truncated)):
            if flag.dtype != np.bool_:
                raise ValueError(f"{name} must be boolean, got dtype {flag.dtype}")
        if n == 0:
            return
        skip = max(0, n - self.capacity)  # rows that would be overwritten within this same call
        start = (self.ptr + skip) % self.capacity
        slots = (start + np.arange(n - skip)) % self.capacity
        self.obs[slots] = obs[skip:]
        self.next_obs[slots] = next_obs[skip:]
        self.action[slots] = action[skip:]
        self.reward[slots] = reward[skip:]
        self.cost[slots] = cost[skip:]
        self.terminated[slots] = terminated[skip:]
        self.truncated[slots] = truncated[skip:]
        self.episode_end[slots] = terminated[skip:] | truncated[skip:]
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    # ------------------------------------------------------------------ reading

    def sample_indices(self, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        """Uniform indices (with replacement) over the stored transitions.

        Stored slots are always ``[0, size)`` (filling starts at 0 and only wraps once full), so this
        never hits an unwritten slot. The rng is the caller's so that its state is checkpointed with
        the other RNG states (service-design.md §3.5).
        """
        batch_size = _positive_int("batch_size", batch_size)
        if self.size == 0:
            raise ValueError("cannot sample from an empty ReplayBuffer")
        return rng.integers(0, self.size, size=batch_size, dtype=np.int64)

    def nstep(self, indices: Any, n: int, gamma: float) -> NStepBatch:
        """n-step returns for the transitions at ``indices`` (§4.2; see ``NStepBatch``).

        The window from t stops after the first step that ends an episode (terminated or truncated)
        and before the write head ``ptr``: the slot at ``ptr`` is either unwritten or the oldest
        (overwritten) data, never the continuation of the newest transition. Returns are
        accumulated in float64 and returned as float32. Vectorised over the batch; loops over n.
        """
        n = _positive_int("n", n)
        gamma = float(gamma)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        idx0 = np.asarray(indices)
        if idx0.ndim != 1 or not np.issubdtype(idx0.dtype, np.integer):
            raise ValueError(f"indices must be a 1-D integer array, got shape {idx0.shape}, {idx0.dtype}")
        idx0 = idx0.astype(np.int64, copy=False)
        if idx0.size and (idx0.min() < 0 or idx0.max() >= self.size):
            raise ValueError(f"indices must lie in [0, {self.size}) (the stored transitions)")
        cap = self.capacity
        # Transitions stored from t up to and including the newest one (at ptr − 1), in circular order.
        available = (self.ptr - 1 - idx0) % cap + 1

        B = idx0.shape[0]
        reward_return = np.zeros(B, dtype=np.float64)
        cost_return = np.zeros((B, self.n_costs), dtype=np.float64)
        last = idx0.copy()
        n_steps = np.zeros(B, dtype=np.int64)
        alive = np.ones(B, dtype=bool)  # window still open before step k
        for k in range(n):
            alive &= k < available
            if not alive.any():
                break
            idx = (idx0 + k) % cap
            weight = np.where(alive, gamma**k, 0.0)
            reward_return += weight * self.reward[idx]
            cost_return += weight[:, None] * self.cost[idx]
            last = np.where(alive, idx, last)
            n_steps += alive
            alive &= ~self.episode_end[idx]

        return NStepBatch(
            obs=self.obs[idx0],
            action=self.action[idx0],
            reward_return=reward_return.astype(np.float32),
            cost_return=cost_return.astype(np.float32),
            bootstrap_obs=self.next_obs[last],
            discount=np.power(gamma, n_steps, dtype=np.float64).astype(np.float32),
            terminated=self.terminated[last],
            n_steps=n_steps,
        )

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self, copy: bool = True) -> dict[str, np.ndarray]:
        """Plain arrays only (safetensors / ``np.savez(allow_pickle=False)``), filled part only.

        Unfilled slots are always ``[size, capacity)`` and always zero, so they are not saved.
        ``copy=False`` returns views (no extra memory) that change with later ``add`` calls.
        """
        s = self.size
        state: dict[str, np.ndarray] = {
            "version": np.array(STATE_VERSION, dtype=np.int64),
            "capacity": np.array(self.capacity, dtype=np.int64),
            "ptr": np.array(self.ptr, dtype=np.int64),
            "size": np.array(s, dtype=np.int64),
        }
        for name in _FLOAT_FIELDS + _BOOL_FIELDS:
            arr = getattr(self, name)[:s]
            state[name] = arr.copy() if copy else arr
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore a ``state_dict`` exactly (contents, ``ptr``, ``size``), validating it first.

        Raises ValueError, leaving this buffer unchanged, on missing/unknown keys, a capacity or
        dimension mismatch, wrong dtypes, or an inconsistent ``ptr``/``size``.
        """
        expected_keys = set(_SCALAR_FIELDS + _FLOAT_FIELDS + _BOOL_FIELDS)
        missing = sorted(expected_keys - set(state))
        unknown = sorted(set(state) - expected_keys)
        if missing or unknown:
            raise ValueError(f"ReplayBuffer state: missing keys {missing}, unknown keys {unknown}")

        scalars: dict[str, int] = {}
        for name in _SCALAR_FIELDS:
            arr = np.asarray(state[name])
            if arr.size != 1 or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(
                    f"ReplayBuffer state: {name!r} must be a single integer, got shape {arr.shape} dtype {arr.dtype}"
                )
            scalars[name] = int(arr.reshape(()))
        if scalars["version"] != STATE_VERSION:
            raise ValueError(f"ReplayBuffer state: version {scalars['version']}, expected {STATE_VERSION}")
        if scalars["capacity"] != self.capacity:
            raise ValueError(
                f"ReplayBuffer state: capacity {scalars['capacity']} does not match this buffer's {self.capacity}"
            )
        size, ptr = scalars["size"], scalars["ptr"]
        if not 0 <= size <= self.capacity:
            raise ValueError(f"ReplayBuffer state: size {size} outside [0, {self.capacity}]")
        if not 0 <= ptr < self.capacity or (size < self.capacity and ptr != size):
            raise ValueError(
                f"ReplayBuffer state: ptr {ptr} inconsistent with size {size} and capacity {self.capacity}"
            )

        expected_shapes = {
            "obs": (size, self.obs_dim),
            "next_obs": (size, self.obs_dim),
            "action": (size, self.act_dim),
            "reward": (size,),
            "cost": (size, self.n_costs),
            "terminated": (size,),
            "truncated": (size,),
        }
        arrays: dict[str, np.ndarray] = {}
        for name, shape in expected_shapes.items():
            arr = np.asarray(state[name])
            dtype = np.dtype(bool) if name in _BOOL_FIELDS else np.dtype(np.float32)
            if arr.shape != shape:
                raise ValueError(f"ReplayBuffer state: {name!r} has shape {arr.shape}, expected {shape}")
            if arr.dtype != dtype:
                raise ValueError(f"ReplayBuffer state: {name!r} has dtype {arr.dtype}, expected {dtype}")
            arrays[name] = arr

        for name, arr in arrays.items():
            target = getattr(self, name)
            target[:size] = arr
            target[size:] = 0
        self.episode_end[:] = self.terminated | self.truncated
        self.ptr = ptr
        self.size = size
