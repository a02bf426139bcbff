"""One CVPO update on a minibatch: critics → E-step → M-step → targets (cvpo-algorithm.md §6.1).

The learner owns the networks, their optimisers and the dual variables (η, λ, α). It is
environment-agnostic: it sees normalised observation tensors and n-step targets, nothing else.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cvpo.config import TrainConfig
from cvpo.estep import solve_dual
from cvpo.mstep import (
    gaussian_kl_terms,
    gaussian_kl_terms_diag,
    mstep_loss,
    project_multiplier,
    weighted_mle,
    weighted_mle_diag,
)
from cvpo.nets import EnsembleCritic, GaussianActor, joint_forward, polyak_update


@dataclass
class MinibatchTensors:
    """An n-step minibatch on the learner's device; observations already normalised."""

    obs: torch.Tensor  # (B, o)
    action: torch.Tensor  # (B, d) raw policy samples
    reward_return: torch.Tensor  # (B,)
    cost_return: torch.Tensor  # (B, m)
    bootstrap_obs: torch.Tensor  # (B, o)
    discount: torch.Tensor  # (B,)
    terminated: torch.Tensor  # (B,) float 0/1


def sample_actions(mean: torch.Tensor, tril: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Raw Gaussian samples mean + L·z, shape (B, d) or (n, B, d), from the global torch RNG."""
    shape = mean.shape if n is None else (n, *mean.shape)
    z = torch.randn(shape, dtype=mean.dtype, device=mean.device)
    return mean + (tril @ z.unsqueeze(-1)).squeeze(-1)


def sample_actions_diag(mean: torch.Tensor, std: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """:func:`sample_actions` for L = diag(σ): mean + σ·z, the same draw of z and the same numbers."""
    shape = mean.shape if n is None else (n, *mean.shape)
    z = torch.randn(shape, dtype=mean.dtype, device=mean.device)
    return torch.addcmul(mean, std, z)


def combine_cost_members(q: torch.Tensor, members: int, ucb: float = 0.0) -> torch.Tensor:
    """Cost-critic values (m·N, *S) → per constraint (m, *S): mean_i Q_c,i + ucb·std_i Q_c,i.

    Member c·N + i is constraint c's i-th of N ensemble members (``network.cost_critics``); the std is
    the population one (ddof 0). N = 1 returns ``q`` itself, so the one-critic engine's numbers are
    untouched; ``ucb = 0`` is the members' mean.
    """
    if members == 1:
        return q
    q = q.reshape(-1, members, *q.shape[1:])  # (m, N, *S)
    mean = q.mean(dim=1)
    if ucb == 0:
        return mean
    return mean + ucb * q.std(dim=1, correction=0)


# Learner phases timed when ``Learner.timings`` is a dict (benchmarks); keys are seconds summed.
TIMED_PHASES = ("critic", "estep_score", "estep_solve", "mstep", "targets")


class Learner:
    def __init__(
        self,
        config: TrainConfig,
        obs_dim: int,
        act_dim: int,
        per_step_thresholds: np.ndarray,
        device: torch.device,
    ) -> None:
        a, n = config.algo, config.network
        self.config = config
        self.device = device
        self.m = config.num_constraints
        # Cost-critic ensemble members per constraint (member c·N + i) and the E-step's UCB factor k.
        self.cost_members = n.cost_critics
        self.cost_ucb = config.constraints.cost_ucb
        self.thresholds = np.asarray(per_step_thresholds, dtype=np.float64)
        self.actor = GaussianActor(
            obs_dim, act_dim, n.actor_hidden, covariance=n.covariance, mean_bound=n.mean_bound
        ).to(device)
        self.actor_old = copy.deepcopy(self.actor).requires_grad_(False)
        self.reward_critic = EnsembleCritic(obs_dim, act_dim, n.reward_critics, n.critic_hidden).to(device)
        self.cost_critic = EnsembleCritic(obs_dim, act_dim, self.m * self.cost_members, n.critic_hidden).to(device)
        self.reward_target = copy.deepcopy(self.reward_critic).requires_grad_(False)
        self.cost_target = copy.deepcopy(self.cost_critic).requires_grad_(False)
        # Fused Adam: one kernel over all tensors instead of ~10 ops per tensor (3.5× cheaper steps on CPU).
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=a.actor_lr, fused=True)
        self.critic_opt = torch.optim.Adam(
            [*self.reward_critic.parameters(), *self.cost_critic.parameters()], lr=a.critic_lr, fused=True
        )
        self.temperature = 1.0  # η (§2.5 step 4: first solve from η = 1, λ at the floor)
        self.cost_multipliers = np.full(self.m, a.dual_lower)  # λ
        self.alpha_mean = 0.0  # α_μ
        self.alpha_cov = 0.0  # α_Σ
        self.updates = 0
        # Diagonal actors take the (mean, σ) fast path: no (B, d, d) factors, no triangular solves.
        self.diag = n.covariance == "diag"
        self.clip_actions = a.action_box == "clip"  # critics and M-step see executed actions
        # Seconds per phase (TIMED_PHASES) after enable_timing(); None costs nothing.
        self.timings: defaultdict[str, float] | None = None

    # ------------------------------------------------------------------ state

    def modules(self) -> dict[str, nn.Module]:
        return {
            "actor": self.actor,
            "actor_old": self.actor_old,
            "reward_critic": self.reward_critic,
            "cost_critic": self.cost_critic,
            "reward_target": self.reward_target,
            "cost_target": self.cost_target,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **{f"net.{k}": v.state_dict() for k, v in self.modules().items()},
            "opt.actor": self.actor_opt.state_dict(),
            "opt.critic": self.critic_opt.state_dict(),
            "duals": {
                "temperature": self.temperature,
                "cost_multipliers": self.cost_multipliers.tolist(),
                "alpha_mean": self.alpha_mean,
                "alpha_cov": self.alpha_cov,
                "updates": self.updates,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, module in self.modules().items():
            module.load_state_dict(state[f"net.{k}"])
        self.actor_opt.load_state_dict(state["opt.actor"])
        self.critic_opt.load_state_dict(state["opt.critic"])
        d = state["duals"]
        self.temperature = float(d["temperature"])
        self.cost_multipliers = np.asarray(d["cost_multipliers"], dtype=np.float64)
        self.alpha_mean, self.alpha_cov = float(d["alpha_mean"]), float(d["alpha_cov"])
        self.updates = int(d["updates"])

    def set_thresholds(self, thresholds: np.ndarray) -> None:
        """Per-step thresholds c̄ change under a cost-limit curriculum (§1.2)."""
        self.thresholds = np.asarray(thresholds, dtype=np.float64)

    # ------------------------------------------------------------------ phases

    def start_phase(self) -> None:
        """Before the updates that follow a collection: optionally reset α (FSRL resets per phase)."""
        if not self.config.algo.persist_alpha:
            self.alpha_mean = self.alpha_cov = 0.0

    def end_phase(self) -> None:
        """After the updates that follow a collection: π_old ← π_θ in "phase" mode (§3.4)."""
        if self.config.algo.pi_old == "phase":
            self.actor_old.load_state_dict(self.actor.state_dict())

    # ------------------------------------------------------------------ update

    def cost_value(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """The current cost critics' Q_c(s, a) per constraint, (m, *S): the ensemble members' mean."""
        return combine_cost_members(self.cost_critic(obs, action), self.cost_members)

    def td_targets(self, b: MinibatchTensors) -> tuple[torch.Tensor, torch.Tensor]:
        """n-step TD targets (y_r (B,), y_c (m·N, B)): reward min over the pair, cost with no min (§4.3).

        Each cost member bootstraps on its own target network (N members per constraint).
        """
        a = self.config.algo
        with torch.no_grad():
            nr = self.reward_critic.n_members
            if self.config.constraints.cost_continuation == "mean":
                # Q_c of the served policy: after the first action, the mean action (docs/safety-margin.md).
                # The reward side still bootstraps on a sample (the same draw as the "sampled" mode).
                if self.diag:
                    mean_next, std_next = self.actor.mean_std(b.bootstrap_obs)
                    next_action = sample_actions_diag(mean_next, std_next)
                else:
                    mean_next, tril_next = self.actor(b.bootstrap_obs)
                    next_action = sample_actions(mean_next, tril_next)
                if self.clip_actions:
                    next_action, mean_next = next_action.clamp(-1.0, 1.0), mean_next.clamp(-1.0, 1.0)
                q_r_next = self.reward_target(b.bootstrap_obs, next_action).min(dim=0).values
                q_c_next = self.cost_target(b.bootstrap_obs, mean_next)  # (m·N, B)
            else:
                next_action = self._sample(self.actor, b.bootstrap_obs)  # a′ ~ π_θ(·|s′)
                if self.clip_actions:
                    next_action = next_action.clamp(-1.0, 1.0)
                q_next = joint_forward((self.reward_target, self.cost_target), b.bootstrap_obs, next_action)
                q_r_next = q_next[:nr].min(dim=0).values
                q_c_next = q_next[nr:]  # (m·N, B)
            alive = 1.0 - b.terminated
            y_r = b.reward_return + b.discount * alive * q_r_next
            cost_alive = alive if a.cost_mask == "terminated" else torch.ones_like(alive)
            cost_return = b.cost_return.T  # (m, B)
            if self.cost_members > 1:  # every member of constraint c sees constraint c's cost
                cost_return = cost_return.repeat_interleave(self.cost_members, dim=0)
            y_c = cost_return + b.discount * cost_alive * q_c_next
        return y_r, y_c

    def critic_step(self, b: MinibatchTensors) -> dict[str, float]:
        """One TD step for the reward critics (min over the pair) and the cost critics (no min), §4.3."""
        nr = self.reward_critic.n_members
        y_r, y_c = self.td_targets(b)
        q = joint_forward((self.reward_critic, self.cost_critic), b.obs, b.action)
        q_r, q_c = q[:nr], q[nr:]  # (reward_critics, B), (m·N, B)
        loss_r = ((q_r - y_r) ** 2).mean(dim=1).sum()
        loss_c = ((q_c - y_c) ** 2).mean(dim=1).sum()
        self.critic_opt.zero_grad(set_to_none=True)
        (loss_r + loss_c).backward()
        self.critic_opt.step()
        return {
            "critic_loss_reward": loss_r.item(),
            "critic_loss_cost": loss_c.item() / self.cost_members,  # summed over constraints, mean over members
            "q_reward": q_r.mean().item(),
            "q_cost": q_c.mean().item() if self.m else 0.0,
        }

    def _sample(self, actor: GaussianActor, obs: torch.Tensor) -> torch.Tensor:
        """One raw sample per state from ``actor`` (diagonal fast path when possible)."""
        if self.diag:
            return sample_actions_diag(*actor.mean_std(obs))
        return sample_actions(*actor(obs))

    def enable_timing(self) -> defaultdict[str, float]:
        """Start summing wall seconds per phase (TIMED_PHASES) into ``self.timings``; benchmarks only."""
        self.timings = defaultdict(float)
        return self.timings

    def _tick(self, phase: str, start: float) -> float:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[phase] += now - start
        return now

    def update(self, b: MinibatchTensors) -> dict[str, float]:
        a = self.config.algo
        t = time.perf_counter()
        stats = self.critic_step(b)
        t = self._tick("critic", t)

        # E-step (§2.5): K samples from π_old scored by the target critics, solved on CPU float64.
        # The critics take the (B, o) states against the (K, B, d) samples by broadcasting, so the
        # states' share of the first layer is computed once, not K times (EnsembleCritic.forward).
        with torch.no_grad():
            if self.diag:
                mean_old, scale_old = self.actor_old.mean_std(b.obs)  # σ (B, d)
                samples = sample_actions_diag(mean_old, scale_old, a.num_samples)  # (K, B, d)
            else:
                mean_old, scale_old = self.actor_old(b.obs)  # L (B, d, d)
                samples = sample_actions(mean_old, scale_old, a.num_samples)
            if self.clip_actions:  # score and fit what the env would execute (algo.action_box)
                samples = samples.clamp(-1.0, 1.0)
            q_r = self.reward_target(b.obs, samples).min(dim=0).values  # (K, B)
            q_c_members = self.cost_target(b.obs, samples)  # (m·N, K, B)
            # Per constraint: the members' mean + k·std (constraints.cost_ucb); N = 1: the critic itself.
            q_c = combine_cost_members(q_c_members, self.cost_members, self.cost_ucb)  # (m, K, B)
        q_r_np = np.ascontiguousarray(q_r.T.cpu().numpy(), dtype=np.float64)  # (B, K)
        q_c_np = np.ascontiguousarray(q_c.transpose(1, 2).cpu().numpy(), dtype=np.float64)  # (m, B, K)
        t = self._tick("estep_score", t)
        solution = solve_dual(
            q_r_np,
            q_c_np,
            self.thresholds,
            a.kl_bound,
            init_temperature=self.temperature,
            init_multipliers=self.cost_multipliers,
            bounds=(a.dual_lower, a.dual_upper),
            max_iter=a.dual_max_iter,
            reset_on_saturation=a.reset_dual_on_saturation,
            newton_steps=a.dual_newton_steps,
        )
        self.temperature = solution.temperature
        self.cost_multipliers = np.asarray(solution.cost_multipliers, dtype=np.float64)
        # The solver's weights at (η, λ): estep_weights(q_r_np, q_c_np, η, λ) without a second pass.
        weights = torch.as_tensor(solution.weights, dtype=b.obs.dtype, device=self.device)  # (B, K)
        actions = samples.transpose(0, 1)  # (B, K, d)
        t = self._tick("estep_solve", t)

        # M-step (§3): weighted MLE inside KL trust regions, projected multipliers.
        for _ in range(a.mstep_iters):
            if self.diag:
                mean_new, std_new = self.actor.mean_std(b.obs)
                mle = weighted_mle_diag(actions, weights, mean_old, scale_old, mean_new, std_new)
                c_mu, c_sigma = gaussian_kl_terms_diag(mean_old, scale_old, mean_new, std_new)
            else:
                mean_new, tril_new = self.actor(b.obs)
                mle = weighted_mle(actions, weights, mean_old, scale_old, mean_new, tril_new)
                c_mu, c_sigma = gaussian_kl_terms(mean_old, scale_old, mean_new, tril_new)
            self.alpha_mean = project_multiplier(
                self.alpha_mean, c_mu.item(), a.mean_kl_bound, a.alpha_mean_step, a.alpha_mean_max
            )
            self.alpha_cov = project_multiplier(
                self.alpha_cov, c_sigma.item(), a.cov_kl_bound, a.alpha_cov_step, a.alpha_cov_max
            )
            loss = mstep_loss(mle, c_mu, c_sigma, self.alpha_mean, self.alpha_cov, a.mean_kl_bound, a.cov_kl_bound)
            self.actor_opt.zero_grad(set_to_none=True)
            loss.backward()
            if a.actor_grad_clip is not None:
                nn.utils.clip_grad_norm_(self.actor.parameters(), a.actor_grad_clip)
            self.actor_opt.step()
        t = self._tick("mstep", t)

        polyak_update(self.reward_target, self.reward_critic, a.tau)
        polyak_update(self.cost_target, self.cost_critic, a.tau)
        if a.pi_old == "polyak":
            polyak_update(self.actor_old, self.actor, a.tau)
        self.updates += 1
        self._tick("targets", t)

        stats.update(
            {
                "temperature": self.temperature,
                "estep_kl": solution.mean_kl,
                "dual_iterations": float(solution.iterations),
                "dual_success": float(solution.success),
                "dual_fallback": float(solution.fallback),
                "saturation_events": float(np.any(solution.saturated)),
                "mstep_kl_mean": c_mu.item(),
                "mstep_kl_cov": c_sigma.item(),
                "mstep_loss": loss.item(),
                "alpha_mean": self.alpha_mean,
                "alpha_cov": self.alpha_cov,
            }
        )
        # Mean policy σ on the batch: the constraint holds for the sampled actions, the service serves
        # the mean, and the gap between the two grows with σ.
        std = std_new if self.diag else torch.diagonal(tril_new, dim1=-2, dim2=-1)
        stats["policy_std"] = std.mean().item()
        if self.cost_members > 1:  # the members' spread on the scored samples; the bound adds k times it
            spread = q_c_members.reshape(self.m, self.cost_members, *q_c_members.shape[1:]).std(dim=1, correction=0)
            stats["cost_ensemble_std"] = spread.mean().item()
        for i in range(self.m):
            lam = float(self.cost_multipliers[i])
            stats[f"cost_multiplier_{i}"] = lam
            stats[f"estep_weighted_cost_{i}"] = float(solution.weighted_cost[i])
            # Epoch means of these are the shares of updates with λ_i at its floor / cap (λ is bang-bang).
            stats[f"lambda_at_floor_{i}"] = float(lam <= a.dual_lower * (1.0 + 1e-6))
            stats[f"lambda_at_cap_{i}"] = float(bool(solution.saturated[i]))
        return stats
