"""Tiny random policy artefacts written by the real exporter, for API tests and the /act benchmark."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np


def write_random_artefact(
    path: Path,
    *,
    obs_dim: int = 6,
    act_dim: int = 2,
    hidden: Sequence[int] = (16, 16),
    act_low: Sequence[float] | None = None,
    act_high: Sequence[float] | None = None,
    normalizer: bool = True,
    mean_bound: float | None = None,
    covariance: str = "diag",
    head_scale: float = 40.0,
    env_id: str = "SafetyPointGoal1-v0",
    seed: int = 0,
    cost_critic: bool | int = False,
    critic_hidden: Sequence[int] = (16, 16),
    horizon: int | None = 1000,
) -> Path:
    """A GaussianActor with random weights (mean head scaled by ``head_scale`` so some actions clip)
    and, optionally, a normaliser with non-trivial statistics, exported by ``write_policy_artefact``.

    ``cost_critic``: True (one constraint) or a number of constraints m exports a random m-member
    ``EnsembleCritic`` with the actor (random biases too, so no member is identically zero)."""
    import torch

    from cvpo.artefact import write_policy_artefact
    from cvpo.config import resolve_config
    from cvpo.envs.wrappers import ObservationNormalizer
    from cvpo.nets import EnsembleCritic, GaussianActor

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    actor = GaussianActor(obs_dim, act_dim, hidden, covariance=covariance, mean_bound=mean_bound)
    with torch.no_grad():
        actor.mean_head.weight.mul_(head_scale)
        actor.mean_head.bias.copy_(torch.as_tensor(rng.normal(0, 0.3, act_dim), dtype=torch.float32))
    norm = None
    if normalizer:
        norm = ObservationNormalizer(obs_dim)
        centre, spread = rng.normal(0, 3, obs_dim), rng.uniform(0.2, 4.0, obs_dim)
        norm.update(rng.normal(centre, spread, size=(200, obs_dim)))
    low = np.asarray(act_low if act_low is not None else [-1.0] * act_dim, dtype=np.float64)
    high = np.asarray(act_high if act_high is not None else [1.0] * act_dim, dtype=np.float64)
    env = SimpleNamespace(obs_dim=obs_dim, act_dim=act_dim, act_low=low, act_high=high)
    m = int(cost_critic)
    critic = None
    overrides: dict = {"env_id": env_id}
    if m:
        critic = EnsembleCritic(obs_dim, act_dim, m, critic_hidden)
        with torch.no_grad():
            for b in critic.biases:
                b.copy_(torch.as_tensor(rng.normal(0, 0.5, tuple(b.shape)), dtype=torch.float32))
        overrides["constraints"] = {"cost_limits": [25.0 + 5 * j for j in range(m)]}
    config = resolve_config(overrides)
    return write_policy_artefact(
        Path(path), actor, norm, env, config, {"synthetic": True, "seed": seed}, cost_critic=critic, horizon=horizon
    )
