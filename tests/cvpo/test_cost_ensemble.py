"""Cost-critic ensembles (``network.cost_critics`` = N) and the E-step's UCB (``constraints.cost_ucb`` = k).

The learner holds m·N cost members (member c·N + i is constraint c's i-th), each trained on its own
TD target from its own target network; the E-step scores samples with mean_i Q_c,i + k·std_i Q_c,i
per constraint; the artefact serves each constraint's ensemble mean (docs/safety-margin.md).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

import cvpo.learner as learner_module
from bench.synthetic import write_random_artefact
from cvpo.artefact import load_policy, write_policy_artefact
from cvpo.config import ConfigError, resolve_config
from cvpo.learner import Learner, MinibatchTensors
from cvpo.nets import EnsembleCritic
from cvpo.onnx_export import export_onnx

OBS, ACT, M, N = 3, 2, 2, 3


def _learner(members: int = N, ucb: float = 1.5, action_box: str = "raw", **constraints: Any) -> Learner:
    config = resolve_config(
        {
            "env_id": "SafetyPointCircle1-v0",
            "constraints": {"cost_limits": [25.0, 10.0], "cost_ucb": ucb, **constraints},
            "network": {"actor_hidden": [16], "critic_hidden": [16, 16], "cost_critics": members},
            "algo": {"num_samples": 8, "batch_size": 16, "action_box": action_box},
        },
        preset="none",
    )
    torch.manual_seed(5)
    return Learner(config, OBS, ACT, per_step_thresholds=np.array([1.0, 0.5]), device=torch.device("cpu"))


def _batch(size: int = 16, seed: int = 9) -> MinibatchTensors:
    g = torch.Generator().manual_seed(seed)
    return MinibatchTensors(
        obs=torch.randn(size, OBS, generator=g),
        action=torch.randn(size, ACT, generator=g),
        reward_return=torch.randn(size, generator=g),
        cost_return=torch.rand(size, M, generator=g),
        bootstrap_obs=torch.randn(size, OBS, generator=g),
        discount=torch.full((size,), 0.97),
        terminated=(torch.rand(size, generator=g) < 0.2).float(),
    )


def _members_numpy(critic: EnsembleCritic, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
    """Every member's Q(s, a), (members, *S), recomputed in float64 from the critic's weights."""
    obs = np.broadcast_to(obs, (*act.shape[:-1], obs.shape[-1]))
    x = np.concatenate([obs, act], axis=-1).astype(np.float64)
    last = len(critic.weights) - 1
    out = []
    for j in range(critic.n_members):
        h = x
        for layer, (w, b) in enumerate(zip(critic.weights, critic.biases, strict=True)):
            h = h @ w[j].detach().double().numpy() + b[j, 0].detach().double().numpy()
            if layer < last:
                h = np.maximum(h, 0.0)
        out.append(h[..., 0])
    return np.stack(out)


def test_config_knobs_default_off_and_are_validated() -> None:
    default = resolve_config({})
    assert default.network.cost_critics == 1 and default.constraints.cost_ucb == 0.0
    ok = resolve_config({"network": {"cost_critics": 3}, "constraints": {"cost_ucb": 1.0}})
    assert ok.network.cost_critics == 3 and ok.constraints.cost_ucb == 1.0
    assert resolve_config({"network": {"cost_critics": 2}}).constraints.cost_ucb == 0.0  # mean only
    for overrides, field, fragment in (
        ({"network": {"cost_critics": 0}}, "network.cost_critics", "[1, 16]"),
        ({"constraints": {"cost_ucb": -0.5}}, "constraints.cost_ucb", "≥ 0"),
        ({"constraints": {"cost_ucb": "inf"}, "network": {"cost_critics": 2}}, "constraints.cost_ucb", "finite"),
        ({"constraints": {"cost_ucb": 1.0}}, "constraints.cost_ucb", "cost_critics ≥ 2"),
    ):
        with pytest.raises(ConfigError) as err:
            resolve_config(overrides)
        assert err.value.field == field and fragment in str(err.value), (overrides, str(err.value))


def test_estep_scores_each_constraint_with_the_members_mean_plus_k_std(monkeypatch: pytest.MonkeyPatch) -> None:
    k = 1.5
    learner = _learner(ucb=k)
    assert learner.cost_critic.n_members == learner.cost_target.n_members == M * N
    target_before = copy.deepcopy(learner.cost_target)  # the E-step reads the targets before Polyak
    scored: dict[str, Any] = {}
    real_solve = learner_module.solve_dual

    def capture_solve(q_r: np.ndarray, q_c: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        scored["q_c"] = q_c.copy()
        return real_solve(q_r, q_c, *args, **kwargs)

    real_forward = learner.cost_target.forward

    def capture_forward(obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        if act.dim() == 3:  # the E-step's (K, B, d) samples
            scored["obs"], scored["samples"] = obs.clone(), act.clone()
        return real_forward(obs, act)

    monkeypatch.setattr(learner_module, "solve_dual", capture_solve)
    monkeypatch.setattr(learner.cost_target, "forward", capture_forward)
    stats = learner.update(_batch())

    members = _members_numpy(target_before, scored["obs"].numpy(), scored["samples"].numpy())  # (m·N, K, B)
    per_constraint = members.reshape(M, N, *members.shape[1:])  # member c·N + i
    mean, std = per_constraint.mean(axis=1), per_constraint.std(axis=1, ddof=0)
    got = scored["q_c"]  # (m, B, K) as handed to the dual
    np.testing.assert_allclose(got, (mean + k * std).transpose(0, 2, 1), rtol=1e-5, atol=1e-5)
    assert np.abs(got - mean.transpose(0, 2, 1)).min() > 1e-4, "the bound must differ from the plain mean"
    assert stats["cost_ensemble_std"] == pytest.approx(std.mean(), rel=1e-4)

    # k = 0: the members' mean; the E-step combines nothing for one member per constraint.
    for members_, ucb in ((N, 0.0), (1, 0.0)):
        plain = _learner(members_, ucb)
        before = copy.deepcopy(plain.cost_target)
        real_forward = plain.cost_target.forward
        monkeypatch.setattr(plain.cost_target, "forward", capture_forward)
        stats = plain.update(_batch())
        values = _members_numpy(before, scored["obs"].numpy(), scored["samples"].numpy())
        expected = values.reshape(M, members_, *values.shape[1:]).mean(axis=1).transpose(0, 2, 1)
        np.testing.assert_allclose(scored["q_c"], expected, rtol=1e-5, atol=1e-5)
        assert ("cost_ensemble_std" in stats) == (members_ > 1)


@pytest.mark.parametrize("continuation", ["mean", "sampled"])
def test_each_cost_member_bootstraps_on_its_own_target(continuation: str) -> None:
    # The mean continuation with the clipped action box: a′ = clip(μ(s′)); sampled: a′ ~ π_θ(·|s′).
    clip = continuation == "mean"
    learner = _learner(ucb=1.0 if clip else 0.0, action_box="clip" if clip else "raw", cost_continuation=continuation)
    assert learner.clip_actions == clip
    b = _batch(64)
    torch.manual_seed(11)
    y_r, y_c = learner.td_targets(b)
    torch.manual_seed(11)
    with torch.no_grad():
        if continuation == "mean":
            next_action = learner.actor.mean_std(b.bootstrap_obs)[0].clamp(-1.0, 1.0)
        else:
            next_action = learner._sample(learner.actor, b.bootstrap_obs)
    q_next = _members_numpy(learner.cost_target, b.bootstrap_obs.numpy(), next_action.numpy())  # (m·N, B)
    alive = 1.0 - b.terminated.numpy()
    cost = np.repeat(b.cost_return.numpy().T, N, axis=0)  # member c·N + i sees constraint c's cost
    expected = cost + b.discount.numpy() * alive * q_next
    assert y_r.shape == (64,) and y_c.shape == (M * N, 64)
    np.testing.assert_allclose(y_c.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(np.diff(y_c.numpy()[:N], axis=0)).max() > 1e-3, "members of one constraint must differ"

    # One critic step moves every member towards its own target.
    before = [w.detach().clone() for w in learner.cost_critic.weights]
    stats = learner.critic_step(b)
    for w_new, w_old in zip(learner.cost_critic.weights, before, strict=True):
        assert all(not torch.equal(w_new[j], w_old[j]) for j in range(M * N))
    assert np.isfinite(stats["critic_loss_cost"])


def _session(model: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def test_artefact_serves_each_constraints_ensemble_mean(tmp_path: Path) -> None:
    learner = _learner()
    with torch.no_grad():  # random biases: no member is zero at the origin
        g = torch.Generator().manual_seed(3)
        for bias in learner.cost_critic.biases:
            bias.copy_(torch.randn(bias.shape, generator=g) * 0.5)
    env = SimpleNamespace(obs_dim=OBS, act_dim=ACT, act_low=-np.ones(ACT), act_high=np.ones(ACT))
    path = write_policy_artefact(
        tmp_path / "p", learner.actor, None, env, learner.config, {}, cost_critic=learner.cost_critic, horizon=500
    )
    meta = json.loads((path / "policy.json").read_text())["cost_critic"]
    assert meta["members"] == M and meta["ensemble"] == {"members_per_constraint": N, "exported": "mean"}
    assert meta["cost_signals"] == ["cost", "cost"] and len(meta["per_step_thresholds"]) == M
    policy = load_policy(path)
    assert policy.critic_members == M
    rng = np.random.default_rng(1)
    obs = rng.normal(0, 2, (65, OBS)).astype(np.float32).astype(np.float64)  # what ONNX sees too
    action = rng.normal(0, 1.5, (65, ACT))
    got = policy.cost_to_go(obs, action)  # (B, m)
    with torch.no_grad():
        x, a = torch.as_tensor(obs, dtype=torch.float32), torch.as_tensor(action, dtype=torch.float32)
        mean = learner.cost_value(x, a).T.numpy()
        member0 = learner.cost_critic(x, a)[::N].T.numpy()
    np.testing.assert_allclose(got, mean, rtol=1e-5, atol=1e-5)
    assert np.abs(got - member0).max() > 1e-2, "the mean must differ from member 0, or the test proves nothing"
    q = _session(export_onnx(path, cost_head=True)).run(["cost_to_go"], {"observations": obs.astype(np.float32)})[0]
    np.testing.assert_allclose(q, policy.cost_to_go(obs, policy.raw_action(obs)), rtol=1e-6, atol=1e-5)

    # One critic per constraint: the cost_critic section is the one it always was (no "ensemble").
    single = json.loads((write_random_artefact(tmp_path / "one", cost_critic=2) / "policy.json").read_text())
    assert "ensemble" not in single["cost_critic"] and single["cost_critic"]["members"] == 2


def test_disk_footprint_bounds_an_ensemble_artefact(tmp_path: Path) -> None:
    """core/footprint.py's upper bound counts the served critic N times as wide (N² hidden weights)."""
    from core.footprint import estimate
    from cvpo.envs import ObservationNormalizer
    from cvpo.envs.catalogue import get_task

    task = get_task("SafetyPointCircle1-v0")
    overrides = {
        "env_id": "SafetyPointCircle1-v0",
        "constraints": {"cost_limits": [25.0, 10.0], "cost_ucb": 1.0},
        "network": {"actor_hidden": [16], "critic_hidden": [64, 64], "cost_critics": N},
    }
    config = resolve_config(overrides, preset="none")
    learner = Learner(config, task.obs_dim, task.act_dim, np.array([1.0, 0.5]), torch.device("cpu"))
    env = SimpleNamespace(
        obs_dim=task.obs_dim, act_dim=task.act_dim, act_low=-np.ones(task.act_dim), act_high=np.ones(task.act_dim)
    )
    normalizer = ObservationNormalizer(task.obs_dim)
    path = write_policy_artefact(
        tmp_path / "p", learner.actor, normalizer, env, config, {}, cost_critic=learner.cost_critic, horizon=500
    )
    size = sum(f.stat().st_size for f in path.iterdir())
    assert estimate(config.to_dict(), keep=1)["artefact_bytes"] >= size
    single = resolve_config(
        {
            **overrides,
            "constraints": {"cost_limits": [25.0, 10.0]},
            "network": {**overrides["network"], "cost_critics": 1},
        },
        preset="none",
    )
    assert estimate(single.to_dict(), keep=1)["artefact_bytes"] < size, "one critic's estimate must not bound it"
