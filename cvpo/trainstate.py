"""Packing a trainer's full state into a checkpoint and back (bit-identical resume, service-design.md §3.5).

``pack`` returns the three parts cvpo.checkpoint writes: tensors (networks, optimisers, duals, torch
RNG, the validated choice's networks), arrays (replay buffer, normaliser) and JSON meta (config,
counters, NumPy/Python RNG, the epoch's accumulators, best/selected records). ``unpack`` is its
inverse on a trainer built from the same config.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cvpo.config import config_from_dict
from cvpo.selection import Snapshot

if TYPE_CHECKING:
    from cvpo.trainer import Trainer

# Per-update statistics whose epoch maximum is reported too (as ``<key>_max``), not only the mean.
MAX_KEYS = ("estep_kl",)


@dataclass
class EpochStats:
    """Running accumulators of one epoch (saved in checkpoints so a mid-epoch stop resumes exactly)."""

    start_step: int = 0
    start_time: float = 0.0
    episode_returns: list[float] = field(default_factory=list)
    episode_costs: list[list[float]] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)
    update_sums: dict[str, float] = field(default_factory=dict)
    update_count: int = 0
    update_max: dict[str, float] = field(default_factory=dict)
    probe_returns: list[float] = field(default_factory=list)
    probe_costs: list[list[float]] = field(default_factory=list)

    def add_update(self, stats: dict[str, float]) -> None:
        for k, v in stats.items():
            self.update_sums[k] = self.update_sums.get(k, 0.0) + v
        for k in MAX_KEYS:
            if k in stats:
                self.update_max[k] = max(self.update_max.get(k, -math.inf), stats[k])
        self.update_count += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "start_step": self.start_step,
            "episode_returns": self.episode_returns,
            "episode_costs": self.episode_costs,
            "episode_lengths": self.episode_lengths,
            "update_sums": self.update_sums,
            "update_count": self.update_count,
            "update_max": self.update_max,
            "probe_returns": self.probe_returns,
            "probe_costs": self.probe_costs,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochStats:
        return cls(
            start_step=d["start_step"],
            episode_returns=list(d["episode_returns"]),
            episode_costs=[list(c) for c in d["episode_costs"]],
            episode_lengths=list(d["episode_lengths"]),
            update_sums=dict(d["update_sums"]),
            update_count=d["update_count"],
            update_max=dict(d.get("update_max", {})),
            probe_returns=list(d.get("probe_returns", [])),
            probe_costs=[list(c) for c in d.get("probe_costs", [])],
        )


def pack(t: Trainer) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """The trainer's state as (tensors, arrays, meta) for cvpo.checkpoint.save_checkpoint."""
    state = t.learner.state_dict()
    state["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state["rng.cuda"] = torch.cuda.get_rng_state_all()
    arrays = {f"buffer.{k}": v for k, v in t.buffer.state_dict(copy=False).items()}
    arrays.update({f"normalizer.{k}": v for k, v in t.normalizer.state_dict().items()})
    if t.selected_snapshot is not None:
        state["selected"] = t.selected_snapshot.tensors()
        arrays.update({f"selected.normalizer.{k}": v for k, v in t.selected_snapshot.arrays().items()})
    meta = {
        "config": t.config.to_dict(),
        "config_hash": t.config.config_hash(),
        "counters": {
            "env_steps": t.env_steps,
            "episodes": t.episodes,
            "epoch": t.epoch,
            "update_credit": t.update_credit,
            "steps_since_update": t.steps_since_update,
        },
        "margin_integral": t.margin_integral.tolist(),
        "rng": {"numpy": t.rng.bit_generator.state, "python": random.getstate()},
        "epoch_stats": t.epoch_stats.to_dict(),
        "best": t.best,
        "selected": t.selected,
        "wall_time_s": t.elapsed_before + (time.perf_counter() - t._t0),
    }
    return state, arrays, meta


def unpack(t: Trainer, state: dict[str, Any], arrays: dict[str, np.ndarray], meta: dict[str, Any], path: Path) -> None:
    """Restore ``t`` (built from the same config) from a loaded checkpoint."""
    # The stored config read with today's defaults: knobs added since it was written keep resume working.
    if config_from_dict(meta["config"]).config_hash() != t.config.config_hash():
        raise ValueError(f"{path} was written with another config (hash {meta['config_hash'][:12]})")
    t.learner.load_state_dict(state)
    torch.set_rng_state(state["rng.torch"])
    if "rng.cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng.cuda"])
    t.buffer.load_state_dict({k.removeprefix("buffer."): v for k, v in arrays.items() if k.startswith("buffer.")})
    t.normalizer.load_state_dict(
        {k.removeprefix("normalizer."): v for k, v in arrays.items() if k.startswith("normalizer.")}
    )
    c = meta["counters"]
    t.env_steps, t.episodes, t.epoch = c["env_steps"], c["episodes"], c["epoch"]
    t.update_credit, t.steps_since_update = c["update_credit"], c["steps_since_update"]
    t.rng.bit_generator.state = meta["rng"]["numpy"]
    py = meta["rng"]["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    t.epoch_stats = EpochStats.from_dict(meta["epoch_stats"])
    t.best = meta["best"]
    t.selected = meta.get("selected")
    t.selected_snapshot = None
    if "selected" in state:
        prefix = "selected.normalizer."
        norm = {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}
        t.selected_snapshot = Snapshot.from_parts(state["selected"], norm)
    t.elapsed_before = float(meta["wall_time_s"])
    t.margin_integral = np.asarray(meta.get("margin_integral", np.zeros(t.config.num_constraints)), float)
