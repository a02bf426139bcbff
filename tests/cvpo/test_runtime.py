"""cvpo.runtime: the training process's allocator keeps each update's activations instead of faulting them in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Learner updates at FSRL's sizes (B 256, K 16, 128×128): their (B·K, 128) activations are 2 MB each.
CHILD = """
import json, resource, sys
import numpy as np, torch
from cvpo.config import resolve_config
from cvpo.learner import Learner, MinibatchTensors
from cvpo.runtime import keep_freed_memory

tuned = keep_freed_memory() if sys.argv[1] == "tuned" else None
torch.set_num_threads(1)
torch.manual_seed(0)
cfg = resolve_config({"env_id": "SafetyPointGoal1-v0", "network": {"actor_hidden": [128, 128],
    "critic_hidden": [128, 128], "reward_critics": 1}, "algo": {"num_samples": 16, "batch_size": 256}})
B, o, d = 256, 60, 2
learner = Learner(cfg, o, d, np.array([0.1]), torch.device("cpu"))
b = MinibatchTensors(torch.randn(B, o), torch.randn(B, d), torch.randn(B), torch.rand(B, 1),
                     torch.randn(B, o), torch.full((B,), 0.98), torch.zeros(B))
for _ in range(5):
    learner.update(b)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    learner.update(b)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"tuned": tuned, "faults_per_update": faults / 20}))
"""


def run(mode: str, **env: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, **env},
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_updates_stop_page_faulting_once_freed_memory_is_kept() -> None:
    plain, tuned = run("plain"), run("tuned")
    assert tuned["tuned"] is True
    # Without it glibc returns the activations to the kernel and the next update faults them back
    # (~1 600 faults per update here); with it an update reuses the heap (~30).
    assert plain["faults_per_update"] > 500, plain
    assert tuned["faults_per_update"] < 200, tuned


def test_env_switch_leaves_the_allocator_alone() -> None:
    off = run("tuned", CVPO_MALLOC_TUNING="0")
    assert off["tuned"] is False
    assert off["faults_per_update"] > 500, off
