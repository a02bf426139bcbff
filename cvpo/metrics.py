"""One vocabulary for a run's metrics: each key named once, and the one summary view everyone uses.

The trainer writes one dict per epoch (``Trainer.epoch_metrics``; metrics.jsonl, TensorBoard, the
store's metric points). Readers that want a short, stable view of it — the job resource's ``latest``
block and its ``metrics`` events, a policy's ``source``, the benchmark grid's ``runs.jsonl`` rows —
all take :func:`summary` instead of picking and renaming keys each in its own way.

**Return, not reward.** An episode's summed reward is its *return* (Sutton & Barto §3.3); "reward"
is the per-step signal. Every key that holds an episode sum ends in ``_return``, in the engine, the
REST API, the dashboard and the benchmark files alike.

Costs and Lagrange multipliers come per constraint (lists); the summary also carries the first
constraint's value under the singular name (``cost_limit``, ``lagrange_multiplier``), which is what
single-constraint tasks — all of safety-gymnasium's — show.
"""

from __future__ import annotations

from typing import Any

# Summary key → engine key (Trainer.epoch_metrics), for the values copied as they are.
_COPIED = {
    "epoch": "epoch",
    "env_steps": "env_steps",
    "train_return": "train_return",
    "train_cost": "train_cost",
    "eval_return": "eval_return",
    "eval_cost": "eval_cost",
    "eval_return_std": "eval_return_std",
    "eval_cost_std": "eval_cost_std",
    "feasible": "feasible",
    "temperature": "temperature_last",
    # Trust signals (docs/safety-margin.md): the constraint binds the sampled policy, the service serves
    # the mean one; these say how far apart they are and how well the cost critic predicts.
    "eval_return_stochastic": "eval_return_stochastic",
    "eval_cost_stochastic": "eval_cost_stochastic",
    "policy_std": "policy_std",
    "margin": "margin",
    "probe_cost": "probe_cost",
    "critic_cost_predicted": "critic_cost_predicted",
    "critic_cost_realised": "critic_cost_realised",
    "lambda_at_floor_share": "lambda_at_floor_0",
    "lambda_at_cap_share": "lambda_at_cap_0",
    "estep_kl_max": "estep_kl_max",
    # loop.select = "validated": this epoch's validation numbers; on the last epoch, the chosen policy's
    # evaluation-layout numbers.
    "validation_return": "validation_return",
    "validation_cost": "validation_cost",
    "validation_cost_bound": "validation_cost_bound",
    "served_epoch": "served_epoch",
    "served_eval_return": "served_eval_return",
    "served_eval_cost": "served_eval_cost",
}

# The keys of policy.json's ``summary`` (the artefact's own record of where it came from).
POLICY_KEYS = ("epoch", "env_steps", "eval_return", "eval_cost", "feasible", "train_return", "train_cost")


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The short view of one epoch's metrics; a key the engine did not report is None (or [])."""
    limits = list(metrics.get("cost_limits") or [])
    lams = list(metrics.get("cost_multipliers") or [])
    # cost_multiplier_i: constraint i's λ averaged over the epoch's updates (the trainer's update sums).
    means = [metrics[f"cost_multiplier_{i}"] for i in range(len(lams)) if f"cost_multiplier_{i}" in metrics]
    view = {key: metrics.get(source) for key, source in _COPIED.items()}
    view.update(
        {
            "cost_limit": limits[0] if limits else None,
            "cost_limits": limits,
            "lagrange_multiplier": lams[0] if lams else None,
            "lagrange_multipliers": lams,
            # The E-step solves λ per minibatch, so its last value often sits at a dual bound; the mean
            # over the epoch's updates is the one to watch.
            "lagrange_multiplier_mean": means[0] if means else None,
            "lagrange_multipliers_mean": means,
            "effective_cost_limits": list(metrics.get("effective_cost_limits") or []),
            "selected_epoch": (metrics.get("selected") or {}).get("epoch"),
        }
    )
    return view


def policy_summary(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """policy.json's summary from the metrics of the epoch whose policy is written."""
    return {k: metrics.get(k) for k in POLICY_KEYS} if metrics else {}
