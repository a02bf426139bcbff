"""Fast resets change nothing a policy can see (environment-notes.md §4).

For fixed seeds, several episodes of observations, rewards, costs and layouts are bit-identical
between stock safety-gymnasium worlds (its decoded star_hd skybox) and ours.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from cvpo import envs


def rollout_digest(task_id: str, seed: int, fast: bool, episodes: int, steps: int) -> tuple[str, list[str]]:
    """Hash of everything observable over `episodes` resets, plus each episode's world XML."""
    digest = hashlib.sha256()
    xmls = []
    rng = np.random.default_rng(seed)
    with envs.make(task_id, seed=seed, fast_reset=fast) as env:
        for _ in range(episodes):
            obs, _ = env.reset()
            task = env.env.unwrapped.task
            xmls.append(task.world.xml_string)
            digest.update(obs.tobytes())
            for name, pos in sorted(task.world_info.layout.items()):
                digest.update(name.encode() + np.asarray(pos, dtype=np.float64).tobytes())
            digest.update(task.model.body_pos.tobytes())
            for _ in range(steps):
                obs, reward, cost, terminated, truncated, _ = env.step(rng.uniform(-1, 1, env.act_dim))
                digest.update(obs.tobytes() + np.array([reward, cost, terminated, truncated]).tobytes())
                if terminated or truncated:
                    break
    return digest.hexdigest(), xmls


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task_id", "episodes"),
    [
        ("SafetyPointGoal1-v0", 3),
        ("SafetyCarGoal1-v0", 2),
        ("SafetyPointButton1-v0", 2),
        ("SafetyPointCircle1-v0", 2),
    ],
)
def test_fast_reset_is_bit_identical_to_stock(task_id: str, episodes: int) -> None:
    stock, stock_xml = rollout_digest(task_id, seed=11, fast=False, episodes=episodes, steps=150)
    fast, fast_xml = rollout_digest(task_id, seed=11, fast=True, episodes=episodes, steps=150)
    # The comparison is meaningful only if the two really built different worlds.
    assert all("star_hd" in x for x in stock_xml)
    assert not any("star_hd" in x for x in fast_xml)
    assert stock == fast


def test_layouts_differ_between_seeds_and_episodes() -> None:
    """Guards the identity test against a digest that ignores the layout."""
    a, _ = rollout_digest("SafetyPointGoal1-v0", seed=1, fast=True, episodes=1, steps=0)
    b, _ = rollout_digest("SafetyPointGoal1-v0", seed=2, fast=True, episodes=1, steps=0)
    assert a != b
    with envs.make("SafetyPointGoal1-v0", seed=1) as env:
        env.reset()
        first = dict(env.env.unwrapped.task.world_info.layout)
        env.reset()
        second = env.env.unwrapped.task.world_info.layout
        assert any(not np.array_equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("max_dist", [None, 3.0])
@pytest.mark.parametrize("alias", [True, False])
def test_vectorised_lidar_reads_what_the_stock_loop_reads(max_dist: float | None, alias: bool) -> None:
    """The fast pseudo-lidar against safety-gymnasium's own loop on the same task, bit for bit: random
    agent poses and object sets (including objects sharing a bin and ones out of range)."""
    from cvpo.envs import compat

    rng = np.random.default_rng(5)
    with envs.make("SafetyPointGoal1-v0", seed=3) as env:
        env.reset()
        task = env.env.unwrapped.task
        stock = type(task)._obs_lidar_pseudo
        conf = task.lidar_conf
        saved = (conf.max_dist, conf.alias)
        conf.max_dist, conf.alias = max_dist, alias
        try:
            compared = 0
            for _ in range(40):
                env.step(rng.uniform(-1, 1, env.act_dim))  # moves and turns the agent
                for k in (2, 3, 8, 25):
                    positions = rng.uniform(-4, 4, (k, int(rng.choice([2, 3]))))
                    positions[-1, :2] = positions[0, :2] + 1e-3  # two objects in one bin
                    fast = compat._lidar_pseudo(task, positions)
                    np.testing.assert_array_equal(fast, stock(task, positions))
                    compared += int(fast.any())
            assert compared > 100  # readings were not all zero
        finally:
            conf.max_dist, conf.alias = saved
    with envs.make("SafetyPointGoal1-v0", seed=3) as fast_env:
        assert fast_env.env.unwrapped.task._obs_lidar_pseudo.__func__ is compat._lidar_pseudo
    with envs.make("SafetyPointGoal1-v0", seed=3, fast_reset=False) as slow_env:
        assert "_obs_lidar_pseudo" not in vars(slow_env.env.unwrapped.task)  # stock envs keep the loop
