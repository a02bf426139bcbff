"""The supported safety-gymnasium tasks: ids, spaces, episode length and default cost limit.

Static data, so that listing tasks (CLI, API) never builds a simulator. tests/cvpo/test_envs_all.py
builds and steps every entry and checks these numbers against the live environment.

Left out, with reasons:
- Vision variants (``…Vision-v0``) and Race/Fading tasks: image observations; CVPO here uses
  vector observations.
- Doggo, Racecar and Ant navigation robots: they work in safety-gymnasium but are an order of
  magnitude slower to simulate, beyond what this service's 2-core target can train.
- Velocity ``-v0`` ids: superseded by ``-v1`` (same robots, corrected cost).
- Multi-agent tasks: need gymnasium-robotics (see cvpo/envs/compat.py).
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_COST_LIMIT = 25.0  # the community standard for safety-gymnasium (OmniSafe, FSRL)


@dataclass(frozen=True)
class TaskInfo:
    """One supported task. ``act_low``/``act_high`` are the env's action Box."""

    id: str
    family: str  # "navigation" or "velocity"
    obs_dim: int
    act_dim: int
    act_low: tuple[float, ...]
    act_high: tuple[float, ...]
    max_episode_steps: int
    cost_limit: float
    cost: str  # what the per-step cost measures

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["act_low"] = list(self.act_low)
        d["act_high"] = list(self.act_high)
        return d


_NAV_COST = {
    "Goal": "entering hazards (level 1: hazards; level 2: hazards and vases)",
    "Button": "hazards, gremlins and pressing the wrong button",
    "Push": "hazards and pillars",
    "Circle": "leaving the boundary walls",
}
# obs_dim of (robot, task) per level 0, 1, 2; measured from safety-gymnasium 1.0.0.
_NAV_OBS = {
    ("Point", "Goal"): (28, 60, 60),
    ("Point", "Button"): (44, 76, 76),
    ("Point", "Push"): (44, 76, 76),
    ("Point", "Circle"): (28, 28, 28),
    ("Car", "Goal"): (40, 72, 72),
    ("Car", "Button"): (56, 88, 88),
    ("Car", "Push"): (56, 88, 88),
    ("Car", "Circle"): (40, 40, 40),
}
# (robot, obs_dim, act_dim, |action bound|)
_VELOCITY = (
    ("HalfCheetah", 17, 6, 1.0),
    ("Hopper", 11, 3, 1.0),
    ("Swimmer", 8, 2, 1.0),
    ("Walker2d", 17, 6, 1.0),
    ("Ant", 27, 8, 1.0),
    ("Humanoid", 376, 17, 0.4000000059604645),  # float32 0.4, as the env's Box stores it
)


def _build() -> dict[str, TaskInfo]:
    tasks: list[TaskInfo] = []
    for (robot, task), dims in _NAV_OBS.items():
        for level, obs_dim in enumerate(dims):
            tasks.append(
                TaskInfo(
                    id=f"Safety{robot}{task}{level}-v0",
                    family="navigation",
                    obs_dim=obs_dim,
                    act_dim=2,
                    act_low=(-1.0, -1.0),
                    act_high=(1.0, 1.0),
                    max_episode_steps=500 if task == "Circle" else 1000,
                    cost_limit=DEFAULT_COST_LIMIT,
                    cost=_NAV_COST[task] if level else f"{_NAV_COST[task]}; level 0 places few or none",
                )
            )
    for robot, obs_dim, act_dim, bound in _VELOCITY:
        tasks.append(
            TaskInfo(
                id=f"Safety{robot}Velocity-v1",
                family="velocity",
                obs_dim=obs_dim,
                act_dim=act_dim,
                act_low=(-bound,) * act_dim,
                act_high=(bound,) * act_dim,
                max_episode_steps=1000,
                cost_limit=DEFAULT_COST_LIMIT,
                cost="moving faster than the robot's velocity threshold",
            )
        )
    return {t.id: t for t in tasks}


TASKS: dict[str, TaskInfo] = _build()


class UnknownTaskError(ValueError):
    """A task id that is not in the catalogue; the message lists the valid ids."""

    def __init__(self, task_id: object) -> None:
        self.task_id = task_id
        close = difflib.get_close_matches(str(task_id), TASKS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        super().__init__(f"unknown task id {task_id!r}.{hint} Valid ids: {', '.join(TASKS)}")


def get_task(task_id: str) -> TaskInfo:
    """Look a task up, raising UnknownTaskError (which names the valid ids) if it is not listed."""
    if not isinstance(task_id, str) or task_id not in TASKS:
        raise UnknownTaskError(task_id)
    return TASKS[task_id]


def list_tasks() -> list[TaskInfo]:
    return list(TASKS.values())
