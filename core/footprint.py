"""A job's projected disk footprint from its resolved config, checked at submission (issue #23 item 11).

What a run directory grows to: full checkpoints (``cvpo/checkpoint.py``: the replay buffer's filled
part in ``arrays.npz``, every network and optimiser in ``state.pt``) of which retention keeps the
newest ``keep`` plus the best one, with one more being written before the oldest goes; one small
policy artefact per checkpoint (kept: certification and promotion use them) plus the run's own
(``best_policy``, ``policy``, ``final_policy``); and the metrics log. The estimate is an upper bound
of the peak, from numbers alone (no torch, no simulator), so the API can refuse a spec that would
fill the disk before a worker starts writing it.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from cvpo.envs.catalogue import get_task

FLOAT = 4  # the buffer, the networks and the artefacts are float32
# Per transition the buffer stores obs, next_obs, the raw action, the reward, one cost per
# constraint (float32) and terminated/truncated flags (bool): cvpo/buffer.py _FLOAT_FIELDS/_BOOL_FIELDS.
FLAGS_BYTES = 2
ZIP_OVERHEAD = 64 * 1024  # npz member headers, meta.json, manifest.json, torch's zip records
METRICS_BYTES_PER_EPOCH = 8 * 1024  # one metrics.jsonl line (~3 KB today) with room to grow
RUN_ARTEFACTS = 3  # best_policy, policy and (loop.select = "validated") final_policy


def _mlp_params(sizes: list[int]) -> int:
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def estimate(config: dict[str, Any], keep: int) -> dict[str, Any]:
    """Bytes a job with this resolved config (``TrainConfig.to_dict()``) may hold at its peak.

    ``keep``: full checkpoints retention keeps besides the best (CVPO_KEEP_CHECKPOINTS). Returns
    the per-item numbers with their ``total_bytes``; every number is an upper bound of the real one.
    """
    task = get_task(str(config["env_id"]))
    loop, net = _section(config, "loop"), _section(config, "network")
    constraints = _section(config, "constraints")
    total_steps = int(config["total_env_steps"])
    obs, act = task.obs_dim, task.act_dim
    m = max(1, len(constraints.get("cost_limits") or [None]))
    transitions = min(int(loop.get("buffer_size", total_steps)), total_steps)
    per_transition = FLOAT * (2 * obs + act + 1 + m) + FLAGS_BYTES
    buffer_bytes = transitions * per_transition

    actor_hidden = [int(h) for h in net.get("actor_hidden") or [256, 256]]
    critic_hidden = [int(h) for h in net.get("critic_hidden") or [256, 256]]
    n_cov = act if net.get("covariance", "diag") == "diag" else act * (act + 1) // 2
    trunk = _mlp_params([obs, *actor_hidden])
    actor = trunk + _mlp_params([actor_hidden[-1], act]) + _mlp_params([actor_hidden[-1], n_cov])
    critic = _mlp_params([obs + act, *critic_hidden, 1])
    ensemble = max(1, int(net.get("cost_critics", 1)))  # cost critics per constraint
    critics = critic * (int(net.get("reward_critics", 2)) + m * ensemble)
    # The artefact holds one cost critic per constraint: with an ensemble, its members' mean as one MLP
    # N times as wide (cvpo/artefact.py), so N² times the hidden-to-hidden weights.
    served_critic = _mlp_params([obs + act, *(ensemble * h for h in critic_hidden), 1])
    # state.pt: actor, π_old and the M-step's target copy; critics and their targets; Adam's two
    # moments of the actor and the critics (a generous count: 3 actor copies + 2 moments, 2 + 2).
    state_bytes = FLOAT * (actor * 5 + critics * 4) + FLOAT * 4 * obs + ZIP_OVERHEAD
    checkpoint_bytes = buffer_bytes + state_bytes + ZIP_OVERHEAD

    steps_per_epoch = max(1, int(loop.get("steps_per_epoch", 5000)))
    # An epoch ends at the first episode end after steps_per_epoch steps: at most one episode more.
    epochs = math.ceil(total_steps / steps_per_epoch) + 1
    every = max(1, int(loop.get("checkpoint_every_epochs", 1)))
    checkpoints_written = math.ceil(epochs / every) + 1  # + the mid-epoch one a stop writes
    artefact_bytes = FLOAT * (actor + served_critic * m) + 8 * 2 * obs + 16 * 1024  # + normaliser, policy.json
    kept = min(checkpoints_written, keep + 2)  # newest ``keep``, the best, and the one being written
    artefacts = checkpoints_written + RUN_ARTEFACTS
    total = kept * checkpoint_bytes + artefacts * artefact_bytes + epochs * METRICS_BYTES_PER_EPOCH
    return {
        "total_bytes": int(total),
        "checkpoint_bytes": int(checkpoint_bytes),
        "replay_buffer_bytes": int(buffer_bytes),
        "buffer_transitions": transitions,
        "bytes_per_transition": per_transition,
        "checkpoints_kept_at_peak": kept,
        "checkpoints_written": checkpoints_written,
        "artefact_bytes": int(artefact_bytes),
        "artefacts": artefacts,
        "keep_checkpoints": keep,
    }


def human(n: float) -> str:
    """1234567 → '1.18 MiB' (for messages)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
