"""safety-gymnasium tasks for CVPO: the catalogue, ``make``, and the env-side wrappers.

Importing this package does not import the simulator; ``make`` does, through
``cvpo.envs.compat`` (the only import path for safety_gymnasium).
"""

from __future__ import annotations

import numbers

from cvpo.envs.catalogue import DEFAULT_COST_LIMIT, TASKS, TaskInfo, UnknownTaskError, get_task, list_tasks
from cvpo.envs.wrappers import ObservationNormalizer, SafeEnv, scale_action, step_costs

__all__ = [
    "DEFAULT_COST_LIMIT",
    "TASKS",
    "ObservationNormalizer",
    "SafeEnv",
    "TaskBuildError",
    "TaskInfo",
    "UnknownTaskError",
    "get_task",
    "list_tasks",
    "make",
    "scale_action",
    "step_costs",
]

MAX_SEED = 2**32 - 1  # numpy's SeedSequence accepts larger, but MuJoCo tasks reseed with uint32


class TaskBuildError(RuntimeError):
    """A listed task failed to construct on this machine; the message names the task."""


def _check_seed(seed: object) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int in [0, {MAX_SEED}] or None, got {type(seed).__name__} {seed!r}")
    if not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}], got {seed}")
    return int(seed)


def make(task_id: str, seed: int | None = None, fast_reset: bool = True) -> SafeEnv:
    """Create a listed task as a ``SafeEnv``.

    ``seed`` seeds the first ``reset()`` and the action space; ``fast_reset=False`` builds worlds
    with safety-gymnasium's own skybox and computes lidar with its own Python loop (identical
    observations; ~1 s slower navigation resets and slower navigation steps).
    """
    info = get_task(task_id)
    seed = _check_seed(seed)
    from cvpo.envs import compat

    sg = compat.safety_gymnasium()
    try:
        with compat.skybox(fast=fast_reset):
            env = sg.make(info.id)
    except Exception as exc:
        raise TaskBuildError(f"task {info.id!r} failed to build: {type(exc).__name__}: {exc}") from exc
    if fast_reset and hasattr(env.unwrapped, "task"):
        compat.install_fast_lidar(env.unwrapped.task)
    return SafeEnv(env, info.id, seed, fast_reset=fast_reset)
