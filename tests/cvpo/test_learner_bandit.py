"""I17: the learner on a toy constrained bandit, and CVPO → MPO when unconstrained.

One-step episodes (terminated), obs fixed, action a ∈ R clipped to [-1, 1]: reward r = a (the
rewarded action is a = 1), cost c = (a + 1) / 2 (so the rewarded action costs 1). With the
per-step threshold c̄ = 0.3 the best feasible deterministic action is a = -0.4.
"""

from __future__ import annotations

import numpy as np
import torch

from cvpo.config import resolve_config
from cvpo.learner import Learner, MinibatchTensors


def run_bandit(
    threshold: float, updates: int = 400, seed: int = 0, reward_critics: int = 2, action_box: str = "raw"
) -> tuple[Learner, list[dict]]:
    torch.manual_seed(seed)
    config = resolve_config(
        {
            "env_id": "SafetyPointCircle1-v0",
            "constraints": {"cost_limits": [threshold]},
            "network": {"actor_hidden": [32], "critic_hidden": [32], "reward_critics": reward_critics},
            "algo": {
                "num_samples": 32,
                "batch_size": 128,
                "mean_kl_bound": 0.01,
                "cov_kl_bound": 0.001,
                "actor_lr": 3e-3,
                "critic_lr": 3e-3,
                "tau": 0.05,
                "action_box": action_box,
            },
        },
        preset="none",
    )
    learner = Learner(
        config, obs_dim=1, act_dim=1, per_step_thresholds=np.array([threshold]), device=torch.device("cpu")
    )
    history = []
    obs = torch.zeros(config.algo.batch_size, 1)
    for _ in range(updates):
        with torch.no_grad():
            mean, tril = learner.actor(obs)
            action = mean + tril[..., 0] * torch.randn_like(mean)
        a = action.clamp(-1, 1)[:, 0]
        batch = MinibatchTensors(
            obs=obs,
            action=action if action_box == "raw" else action.clamp(-1, 1),  # as the trainer stores it
            reward_return=a,
            cost_return=((a + 1) / 2)[:, None],
            bootstrap_obs=obs,
            discount=torch.full_like(a, 0.99),
            terminated=torch.ones_like(a),
        )
        history.append(learner.update(batch))
    return learner, history


def test_constrained_bandit_moves_to_the_cheaper_action() -> None:
    learner, history = run_bandit(threshold=0.3)
    with torch.no_grad():
        mean = learner.actor(torch.zeros(1, 1))[0].item()
    lambdas = [h["cost_multiplier_0"] for h in history]
    assert max(lambdas[-50:]) > 1e-2 > lambdas[0]  # λ rose from its floor
    assert -0.6 < mean < -0.2, mean  # near the feasible optimum a = -0.4, far from the rewarded a = 1
    weighted = np.mean([h["estep_weighted_cost_0"] for h in history[-50:]])
    assert abs(weighted - 0.3) <= 0.05 * 0.3, weighted  # E_q[Q_c] within 5 % of c̄


def test_unconstrained_bandit_is_mpo_and_takes_the_rewarded_action() -> None:
    learner, history = run_bandit(threshold=float("inf"))
    with torch.no_grad():
        mean = learner.actor(torch.zeros(1, 1))[0].item()
    assert mean > 0.8, mean
    assert all(h["cost_multiplier_0"] == 1e-6 for h in history)  # λ pinned at its floor


def test_a_single_reward_critic_learns_the_same_constrained_answer() -> None:
    """network.reward_critics = 1 (FSRL's default) trains one reward member and still meets c̄."""
    learner, history = run_bandit(threshold=0.3, reward_critics=1)
    assert learner.reward_critic.n_members == 1 and learner.reward_target.n_members == 1
    with torch.no_grad():
        mean = learner.actor(torch.zeros(1, 1))[0].item()
    assert -0.6 < mean < -0.2, mean
    weighted = np.mean([h["estep_weighted_cost_0"] for h in history[-50:]])
    assert abs(weighted - 0.3) <= 0.05 * 0.3, weighted


def _targets(continuation: str, covariance: str) -> tuple[Learner, MinibatchTensors, torch.Tensor, torch.Tensor]:
    config = resolve_config(
        {
            "env_id": "SafetyPointCircle1-v0",
            "constraints": {"cost_limits": [25.0, 10.0], "cost_continuation": continuation},
            "network": {"actor_hidden": [16], "critic_hidden": [16], "covariance": covariance},
        },
        preset="none",
    )
    torch.manual_seed(5)
    learner = Learner(
        config, obs_dim=3, act_dim=2, per_step_thresholds=np.array([1.0, 0.5]), device=torch.device("cpu")
    )
    g = torch.Generator().manual_seed(9)
    b = MinibatchTensors(
        obs=torch.randn(64, 3, generator=g),
        action=torch.randn(64, 2, generator=g),
        reward_return=torch.randn(64, generator=g),
        cost_return=torch.rand(64, 2, generator=g),
        bootstrap_obs=torch.randn(64, 3, generator=g),
        discount=torch.full((64,), 0.97),
        terminated=(torch.rand(64, generator=g) < 0.2).float(),
    )
    torch.manual_seed(11)
    y_r, y_c = learner.td_targets(b)
    return learner, b, y_r, y_c


def test_mean_continuation_bootstraps_the_cost_critics_on_the_mean_action() -> None:
    for covariance in ("diag", "cholesky"):
        learner, b, y_r, y_c = _targets("mean", covariance)
        with torch.no_grad():
            mean_next = learner.actor(b.bootstrap_obs)[0]
            q_c_next = learner.cost_target(b.bootstrap_obs, mean_next)
        alive = 1.0 - b.terminated
        torch.testing.assert_close(y_c, b.cost_return.T + b.discount * alive * q_c_next)
        # The reward side is unchanged: same sample draw, same targets as the default mode.
        _, _, y_r_sampled, y_c_sampled = _targets("sampled", covariance)
        torch.testing.assert_close(y_r, y_r_sampled)
        assert not torch.allclose(y_c, y_c_sampled)  # the sampled a′ gives other cost targets


def test_fitting_executed_actions_keeps_the_mean_in_the_box_and_sigma_small() -> None:
    """Reward flat beyond the box: raw samples past a = 1 all score the same, so the raw fit keeps σ wide
    (600 updates: μ 1.52, outside the box, σ 0.76); with algo.action_box = "clip" the E-step fits the
    clipped samples, the mean stays inside the box and σ shrinks (docs/safety-margin.md)."""
    got = {}
    for box in ("raw", "clip"):
        learner, _ = run_bandit(threshold=float("inf"), updates=400, action_box=box)
        with torch.no_grad():
            mean, tril = learner.actor(torch.zeros(1, 1))
        got[box] = (mean.item(), tril[0, 0, 0].item())
    assert 0.5 < got["clip"][0] <= 1.0 < got["clip"][0] + 2 * got["clip"][1], got  # inside, still exploring
    assert got["clip"][1] < 0.75 * got["raw"][1], got
