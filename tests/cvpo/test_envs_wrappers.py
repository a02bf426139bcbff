"""Seeding, action scaling, the observation normaliser and input errors of the env layer."""

from __future__ import annotations

import numpy as np
import pytest

from cvpo import envs
from cvpo.envs import ObservationNormalizer, TaskBuildError, UnknownTaskError, scale_action


def trajectory(task_id: str, seed: int, steps: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    actions = np.random.default_rng(123).uniform(-1, 1, (steps, envs.get_task(task_id).act_dim))
    with envs.make(task_id, seed=seed) as env:
        obs, _ = env.reset()
        observations, rewards_costs = [obs], []
        for a in actions:
            obs, reward, cost, *_ = env.step(a)
            observations.append(obs)
            rewards_costs.append((reward, cost))
    return np.array(observations), np.array(rewards_costs), actions


@pytest.mark.parametrize("task_id", ["SafetyPointGoal1-v0", "SafetyHalfCheetahVelocity-v1"])
def test_same_seed_same_trajectory_different_seed_differs(task_id: str) -> None:
    obs_a, rc_a, _ = trajectory(task_id, seed=5)
    obs_b, rc_b, _ = trajectory(task_id, seed=5)
    obs_c, _, _ = trajectory(task_id, seed=6)
    np.testing.assert_array_equal(obs_a, obs_b)
    np.testing.assert_array_equal(rc_a, rc_b)
    assert not np.array_equal(obs_a[0], obs_c[0])


def test_seed_applies_to_first_reset_only_and_stream_continues() -> None:
    with envs.make("SafetyPointGoal1-v0", seed=9) as env:
        first, _ = env.reset()
        second, _ = env.reset()
        assert not np.array_equal(first, second)
        again, _ = env.reset(seed=9)
        np.testing.assert_array_equal(first, again)


def test_scale_action_maps_unit_box_onto_env_box() -> None:
    low, high = np.array([-2.0, 0.0, -0.4]), np.array([2.0, 10.0, 0.4])
    env_action, clipped = scale_action(np.array([-1.0, 0.0, 1.0]), low, high)
    np.testing.assert_allclose(env_action, [-2.0, 5.0, 0.4])
    assert not clipped
    env_action, clipped = scale_action(np.array([[3.0, -7.0, 0.5], [0.0, 0.0, 0.0]]), low, high)
    np.testing.assert_allclose(env_action, [[2.0, 0.0, 0.2], [0.0, 5.0, 0.0]])
    assert clipped.tolist() == [True, False]
    big = np.random.default_rng(0).normal(0, 10, (1000, 3))
    env_action, _ = scale_action(big, low, high)
    assert np.all(env_action >= low) and np.all(env_action <= high)


def test_env_receives_the_scaled_action() -> None:
    with envs.make("SafetyHumanoidVelocity-v1", seed=0) as env:
        env.reset()
        seen = []
        original = env.env.step
        env.env.step = lambda a: (seen.append(np.array(a)), original(a))[1]
        env.step(np.full(env.act_dim, 5.0))  # far outside [-1, 1]
        np.testing.assert_allclose(seen[0], env.act_high)


def test_normalizer_matches_batch_statistics_and_round_trips() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal([1.0, -3.0, 10.0], [0.5, 2.0, 0.01], size=(1000, 3))
    norm = ObservationNormalizer(3, clip=5.0)
    for chunk in np.array_split(data, [1, 7, 300, 301]):
        norm.update(chunk)
    np.testing.assert_allclose(norm.mean, data.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(norm.var, data.var(axis=0), rtol=1e-9)
    assert norm.count == 1000
    z = norm.normalize(data)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-6)
    assert np.abs(norm.normalize(np.array([1e6, 0.0, 0.0]))).max() == 5.0
    other = ObservationNormalizer(3)
    other.load_state_dict(norm.state_dict())
    np.testing.assert_array_equal(other.normalize(data), z)
    assert other.count == norm.count and other.clip == norm.clip


def test_normalizer_rejects_bad_input_and_state() -> None:
    norm = ObservationNormalizer(2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        norm.update(np.array([[0.0, np.nan]]))
    assert norm.count == 0
    with pytest.raises(ValueError, match="expected"):
        norm.load_state_dict({"mean": np.zeros(3), "var": np.ones(3), "count": np.array([1.0])})
    with pytest.raises(ValueError):
        ObservationNormalizer(0)


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(UnknownTaskError, match="SafetyPointGoal1-v0"):
        envs.make("PointGoal1")
    with pytest.raises(TypeError, match="seed must be an int"):
        envs.make("SafetyPointGoal1-v0", seed="7")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed must be an int"):
        envs.make("SafetyPointGoal1-v0", seed=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed must be in"):
        envs.make("SafetyPointGoal1-v0", seed=-1)
    with envs.make("SafetyPointCircle1-v0", seed=0) as env:
        env.reset()
        with pytest.raises(ValueError, match="NaN or Inf"):
            env.step(np.array([np.nan, 0.0]))


def test_task_that_fails_to_build_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from cvpo.envs import compat

    sg = compat.safety_gymnasium()

    def broken_make(task_id: str) -> None:
        raise OSError("no such asset")

    monkeypatch.setattr(sg, "make", broken_make)
    with pytest.raises(TaskBuildError, match=r"SafetyCarGoal1-v0.*no such asset"):
        envs.make("SafetyCarGoal1-v0")


def test_normalizer_single_row_update_is_bit_identical_to_the_batch_formula() -> None:
    """The per-step fast path of update() does the general path's arithmetic exactly."""
    rng = np.random.default_rng(7)
    fast, ref = ObservationNormalizer(4), ObservationNormalizer(4)
    ref.update(rng.normal(size=(3, 4)))
    fast.load_state_dict(ref.state_dict())
    for _ in range(200):
        x = rng.normal(size=4) * 3.0 + 1.0
        fast.update(x)
        batch = x.reshape(1, 4)  # the general path, written out for n = 1
        total = ref.count + 1
        delta = batch.mean(axis=0) - ref.mean
        mean = ref.mean + delta * (1 / total)
        m2 = ref.var * ref.count + batch.var(axis=0) * 1 + delta**2 * (ref.count * 1 / total)
        ref.mean, ref.var, ref.count = mean, m2 / total, total
        assert np.array_equal(fast.mean, ref.mean) and np.array_equal(fast.var, ref.var)
    assert fast.count == ref.count
    with pytest.raises(ValueError):
        fast.update(np.array([np.nan, 0.0, 0.0, 0.0]))
