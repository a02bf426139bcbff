"""Which epoch's policy a run serves: validated selection (``loop.select = "validated"``).

CVPO's fixed point puts the sampled policy's cost on the limit and the served mean action's cost
scatters around it from epoch to epoch (docs/safety-margin.md), so the last epoch is feasible about
half the time. Validated selection keeps, after every epoch, the policy whose deterministic episodes
on *validation* layouts (reset seeds ``VALIDATION_SEED_BASE + i``: never the evaluation layouts the
reported numbers come from, nor training's or certification's) earned the highest mean return among
the epochs whose one-sided upper confidence bound on every episode cost (cvpo.certify's Hall
skew-corrected t) is within its limit; until one qualifies, the epoch with the lowest bound.
The bound, not the mean, is what guards against picking the luckiest of many noisy evaluations.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from cvpo.certify import cost_upper_bound
from cvpo.envs import ObservationNormalizer

VALIDATION_SEED_BASE = 4_000_037  # validation layouts; eval uses 1_000_003 + i, certificates 2_000_003 + i


def candidate(
    epoch: int,
    env_steps: int,
    returns: list[float],
    costs: np.ndarray,
    limits: list[float],
    confidence: float,
) -> dict[str, Any]:
    """One epoch's validation record: mean return, per-constraint mean cost and upper bound, admissible."""
    costs = np.asarray(costs, dtype=np.float64).reshape(len(returns), -1)
    bounds = [cost_upper_bound(costs[:, i], confidence) for i in range(costs.shape[1])]
    return {
        "epoch": epoch,
        "env_steps": env_steps,
        "return": float(np.mean(returns)),
        "costs": costs.mean(axis=0).tolist(),
        "cost_bounds": bounds,
        "limits": [float(x) for x in limits],
        "admissible": bool(all(b <= lim for b, lim in zip(bounds, limits, strict=True))),
    }


def better(new: dict[str, Any], old: dict[str, Any] | None) -> bool:
    """Admissible beats inadmissible; among admissible the higher return; else the lower worst bound.

    Ties go to the newer epoch (more training, same evidence).
    """
    if old is None:
        return True
    if new["admissible"] != old["admissible"]:
        return bool(new["admissible"])
    if new["admissible"]:
        return bool(new["return"] >= old["return"])
    return bool(_worst_slack(new) <= _worst_slack(old))


def _worst_slack(c: dict[str, Any]) -> float:
    """The largest excess of a bound over its limit (constraints with an infinite limit never bind)."""
    excess = [float(b) - lim for b, lim in zip(c["cost_bounds"], c["limits"], strict=True) if np.isfinite(lim)]
    return max(excess, default=0.0)


class Snapshot:
    """A copy of what serving needs: actor, cost critic and observation normaliser (exact values)."""

    def __init__(self, actor: nn.Module, cost_critic: nn.Module, normalizer: ObservationNormalizer) -> None:
        self.actor = _clone(actor.state_dict())
        self.cost_critic = _clone(cost_critic.state_dict())
        self.normalizer = {k: np.array(v, copy=True) for k, v in normalizer.state_dict().items()}

    def apply(self, actor: nn.Module, cost_critic: nn.Module, normalizer: ObservationNormalizer) -> None:
        """Copy the stored values into live modules in place (optimisers keep their parameter refs)."""
        actor.load_state_dict(self.actor)
        cost_critic.load_state_dict(self.cost_critic)
        normalizer.load_state_dict(self.normalizer)

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """For a checkpoint's state.pt (tensors only, loadable with weights_only)."""
        return {"actor": self.actor, "cost_critic": self.cost_critic}

    def arrays(self) -> dict[str, np.ndarray]:
        """For a checkpoint's arrays.npz."""
        return dict(self.normalizer)

    @classmethod
    def from_parts(cls, tensors: dict[str, dict[str, torch.Tensor]], arrays: dict[str, np.ndarray]) -> Snapshot:
        snap = cls.__new__(cls)
        snap.actor = _clone(tensors["actor"])
        snap.cost_critic = _clone(tensors["cost_critic"])
        snap.normalizer = {k: np.array(v, copy=True) for k, v in arrays.items()}
        return snap


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}
