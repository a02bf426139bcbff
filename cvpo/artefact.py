"""The policy artefact: what serving needs, nothing the trainer owns (service-design.md §2.3).

An artefact directory holds ``policy.safetensors`` (actor weights, normaliser mean/var) and
``policy.json`` (task, spaces, architecture, normaliser clip, cost limits, config hash, training
summary, the weights' sha256). ``load_policy`` reads it with safetensors' numpy backend and runs
the MLP in numpy: importing this module imports neither torch nor the trainer (a test checks
``sys.modules`` in a fresh interpreter). ``write_policy_artefact`` is the only function that
touches torch, and imports it lazily.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from cvpo.envs.wrappers import scale_action  # numpy only: the one place actions meet the Box

WEIGHTS_FILE = "policy.safetensors"
META_FILE = "policy.json"
FORMAT_VERSION = 1


class ArtefactError(RuntimeError):
    """A missing, malformed or tampered policy artefact."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_policy_artefact(
    path: Path, actor: Any, normalizer: Any, env: Any, config: Any, summary: dict[str, Any]
) -> Path:
    """Export a GaussianActor (+ normaliser) into ``path`` atomically."""
    from torch import nn

    layers = [m for m in actor.trunk if isinstance(m, nn.Linear)]
    if any(not isinstance(m, nn.Linear | nn.ReLU) for m in actor.trunk):
        raise ArtefactError("only Linear/ReLU trunks can be exported")
    tensors: dict[str, np.ndarray] = {}
    for i, layer in enumerate(layers):
        tensors[f"trunk.{i}.weight"] = layer.weight.detach().cpu().float().numpy()
        tensors[f"trunk.{i}.bias"] = layer.bias.detach().cpu().float().numpy()
    for name in ("mean_head", "cov_head"):
        head = getattr(actor, name)
        tensors[f"{name}.weight"] = head.weight.detach().cpu().float().numpy()
        tensors[f"{name}.bias"] = head.bias.detach().cpu().float().numpy()
    normalizer_meta = {"present": normalizer is not None}
    if normalizer is not None:
        tensors["normalizer.mean"] = normalizer.mean.astype(np.float64)
        tensors["normalizer.var"] = normalizer.var.astype(np.float64)
        normalizer_meta.update({"clip": normalizer.clip, "epsilon": normalizer.epsilon, "count": normalizer.count})

    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE))
    meta = {
        "format_version": FORMAT_VERSION,
        "env_id": config.env_id,
        "observation_space": {"shape": [env.obs_dim], "low": None, "high": None},
        "action_space": {"shape": [env.act_dim], "low": env.act_low.tolist(), "high": env.act_high.tolist()},
        "architecture": {
            "trunk_layers": len(layers),
            "activation": "relu",
            "covariance": actor.covariance,
            "log_std_bounds": list(actor.log_std_bounds),
            "mean_bound": actor.mean_bound,
            "offdiag_bound": 5.0,
        },
        "normalizer": normalizer_meta,
        "cost_limits": [float(c) if np.isfinite(c) else None for c in config.constraints.cost_limits],
        "config_hash": config.config_hash(),
        "summary": summary,
        "weights_sha256": _sha256(tmp / WEIGHTS_FILE),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if path.exists():
        old = path.parent / f".old-{path.name}-{os.getpid()}"
        os.rename(path, old)
        os.rename(tmp, path)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        os.rename(tmp, path)
    return path


class PolicyRuntime:
    """A loaded artefact: normalise → MLP → (mean, L) → clip to [-1, 1] → map to the action Box."""

    def __init__(self, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        self.meta = meta
        arch = meta["architecture"]
        # Weights stored transposed and contiguous (x @ W with no per-call transpose), in float64.
        self.trunk = [
            (
                np.ascontiguousarray(tensors[f"trunk.{i}.weight"].astype(np.float64).T),
                tensors[f"trunk.{i}.bias"].astype(np.float64),
            )
            for i in range(arch["trunk_layers"])
        ]
        self.mean_w = np.ascontiguousarray(tensors["mean_head.weight"].astype(np.float64).T)
        self.mean_b = tensors["mean_head.bias"].astype(np.float64)
        self.cov_w = np.ascontiguousarray(tensors["cov_head.weight"].astype(np.float64).T)
        self.cov_b = tensors["cov_head.bias"].astype(np.float64)
        self.covariance = arch["covariance"]
        self.log_std_bounds = tuple(arch["log_std_bounds"])
        self.mean_bound = arch["mean_bound"]
        self.offdiag_bound = arch["offdiag_bound"]
        self.obs_dim = int(meta["observation_space"]["shape"][0])
        self.act_dim = int(meta["action_space"]["shape"][0])
        self.low = np.asarray(meta["action_space"]["low"], dtype=np.float64)
        self.high = np.asarray(meta["action_space"]["high"], dtype=np.float64)
        norm = meta["normalizer"]
        self.norm_mean = tensors.get("normalizer.mean") if norm["present"] else None
        self.norm_std = np.sqrt(tensors["normalizer.var"] + norm["epsilon"]) if norm["present"] else None
        self.norm_clip = norm.get("clip")

    def _features(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Trunk features and the mean head's output: all a deterministic action needs."""
        x = np.asarray(obs, dtype=np.float64)
        if self.norm_mean is not None:
            x = np.clip((x - self.norm_mean) / self.norm_std, -self.norm_clip, self.norm_clip)
        for w, b in self.trunk:
            x = x @ w
            x += b
            np.maximum(x, 0.0, out=x)
        mean = x @ self.mean_w + self.mean_b
        if self.mean_bound is not None:
            mean = self.mean_bound * np.tanh(mean)
        return x, mean

    def distribution_params(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean (B, d) and Cholesky factor L (B, d, d) for raw observations (B, o)."""
        x, mean = self._features(obs)
        raw = x @ self.cov_w + self.cov_b
        d = self.act_dim
        tril = np.zeros((x.shape[0], d, d))
        idx = np.arange(d)
        tril[:, idx, idx] = np.exp(np.clip(raw[:, :d], *self.log_std_bounds))
        if self.covariance == "cholesky" and d > 1:
            rows, cols = np.tril_indices(d, -1)
            tril[:, rows, cols] = np.clip(raw[:, d:], -self.offdiag_bound, self.offdiag_bound)
        return mean, tril

    def raw_action(
        self, obs: np.ndarray, deterministic: bool = True, rng: np.random.Generator | None = None
    ) -> np.ndarray:
        """The policy's output in its [-1, 1] convention, before clipping: the mean or a sample."""
        obs = np.atleast_2d(np.asarray(obs, dtype=np.float64))
        if obs.shape[1] != self.obs_dim:
            raise ValueError(f"expected observations of length {self.obs_dim}, got {obs.shape[1]}")
        if deterministic:
            return self._features(obs)[1]  # the covariance head is not needed for the mean
        mean, tril = self.distribution_params(obs)
        rng = rng or np.random.default_rng()
        return mean + (tril @ rng.standard_normal(mean.shape)[..., None])[..., 0]

    def act(
        self, obs: np.ndarray, deterministic: bool = True, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Env actions inside [low, high] and, per row, whether clipping changed the policy output."""
        return scale_action(self.raw_action(obs, deterministic, rng), self.low, self.high)


def load_policy(path: Path) -> PolicyRuntime:
    """Load an artefact after checking its weights against the sha256 recorded at export."""
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtefactError(f"{path}: unreadable {META_FILE}: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtefactError(f"{path}: artefact format {meta.get('format_version')} != {FORMAT_VERSION}")
    weights = path / WEIGHTS_FILE
    if not weights.is_file() or _sha256(weights) != meta.get("weights_sha256"):
        raise ArtefactError(f"{path}: {WEIGHTS_FILE} is missing or fails its sha256 check")
    return PolicyRuntime(meta, load_file(str(weights)))


def evaluate_policy(policy: PolicyRuntime, episodes: int = 10, seed: int = 0) -> dict[str, Any]:
    """Deterministic episodes of an artefact on its task (imports the simulator, not the trainer)."""
    from cvpo import envs

    if episodes < 1:
        raise ValueError(f"episodes must be ≥ 1, got {episodes}")
    returns, costs = [], []
    with envs.make(policy.meta["env_id"]) as env:
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + i)
            ep_r = ep_c = 0.0
            while True:
                # SafeEnv clips and maps the policy's [-1, 1] output to the Box itself.
                obs, r, c, terminated, truncated, _ = env.step(policy.raw_action(obs)[0])
                ep_r += r
                ep_c += c
                if terminated or truncated:
                    break
            returns.append(ep_r)
            costs.append(ep_c)
    return {
        "episodes": episodes,
        "returns": returns,
        "costs": costs,
        "return_mean": float(np.mean(returns)),
        "return_std": float(np.std(returns)),
        "cost_mean": float(np.mean(costs)),
        "cost_std": float(np.std(costs)),
    }
