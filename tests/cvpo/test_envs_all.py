"""Every listed task imports, resets and steps with the six-value API and the catalogued shapes."""

from __future__ import annotations

import numpy as np
import pytest

from cvpo import envs
from cvpo.envs import TASKS


@pytest.mark.parametrize("task_id", list(TASKS))
def test_task_builds_resets_and_steps(task_id: str) -> None:
    task = TASKS[task_id]
    with envs.make(task_id, seed=1) as env:
        assert env.observation_space.shape == (task.obs_dim,)
        assert env.action_space.shape == (task.act_dim,)
        np.testing.assert_allclose(env.action_space.low, task.act_low)
        np.testing.assert_allclose(env.action_space.high, task.act_high)
        assert env.max_episode_steps == task.max_episode_steps
        obs, info = env.reset()
        assert obs.shape == (task.obs_dim,) and obs.dtype == np.float64
        assert isinstance(info, dict)
        rng = np.random.default_rng(0)
        for _ in range(5):
            out = env.step(rng.uniform(-1, 1, task.act_dim))
            assert len(out) == 6
            obs, reward, cost, terminated, truncated, info = out
            assert obs.shape == (task.obs_dim,)
            assert isinstance(reward, float) and np.isfinite(reward)
            assert isinstance(cost, float) and cost >= 0.0
            assert isinstance(terminated, bool) and isinstance(truncated, bool)
            assert isinstance(info, dict)
            if terminated or truncated:
                break
