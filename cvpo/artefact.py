"""The policy artefact: what serving needs, nothing the trainer owns (service-design.md §2.3).

An artefact directory holds ``policy.safetensors`` (actor weights, normaliser mean/var and,
optionally, the cost critics) and ``policy.json`` (task, spaces, architecture, normaliser clip,
cost limits, config hash, training summary, the weights' sha256, and a ``cost_critic`` section when
the critics are inside). ``load_policy`` reads it with safetensors' numpy backend and runs the MLPs
in numpy: importing this module imports neither torch nor the trainer (a test checks
``sys.modules`` in a fresh interpreter). ``write_policy_artefact`` is the only function that
touches torch, and imports it lazily.

The cost critics (optional; artefacts written before they existed have none and load as before)
are the learner's m-member ``EnsembleCritic``, one member per constraint: layer l is stored as
``cost_critic.{l}.weight`` (m, in, out) and ``cost_critic.{l}.bias`` (m, out), in the same
safetensors file as the actor, so the one sha256 covers them. Member j maps the *normalised*
observation concatenated with the *raw* action (the policy's [-1, 1] convention, before clipping
and the Box map: what the replay buffer holds and the critics were trained on) through ReLU hidden
layers to Q_c,j(s, a), the predicted discounted cost-to-go of constraint j.

A learner with an N-member cost ensemble per constraint (``network.cost_critics`` = N > 1) is exported
as the same m members, each the exact mean of its constraint's N networks written as one wider MLP
(:func:`_ensemble_mean_layers`: the members' hidden units side by side, block-diagonal between hidden
layers, the output layer's weights and bias divided by N), so the format and every reader stay as they
are; ``cost_critic.ensemble`` in policy.json records N. With N = 1 nothing changes.
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

from cvpo.actor_spec import ActorSpec
from cvpo.envs.wrappers import scale_action  # numpy only: the one place actions meet the Box

WEIGHTS_FILE = "policy.safetensors"
META_FILE = "policy.json"
FORMAT_VERSION = 1


class ArtefactError(RuntimeError):
    """A missing, malformed or tampered policy artefact."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _critic_tensors(critic: Any, obs_dim: int, act_dim: int, ensemble: int = 1) -> dict[str, np.ndarray]:
    """An ``EnsembleCritic``'s stacked layers as ``cost_critic.{l}.weight`` (m, in, out) / ``.bias`` (m, out).

    ``ensemble`` = N > 1: the critic holds m·N members (member c·N + i), exported as m members that
    each compute their N networks' mean (:func:`_ensemble_mean_layers`)."""
    if critic.obs_dim != obs_dim or critic.act_dim != act_dim:
        raise ArtefactError(
            f"the cost critic takes ({critic.obs_dim}, {critic.act_dim}) inputs, the actor ({obs_dim}, {act_dim})"
        )
    if ensemble < 1 or critic.n_members % ensemble:
        raise ArtefactError(f"a {critic.n_members}-member cost critic is not {ensemble} members per constraint")
    weights = [w.detach().cpu().float().numpy() for w in critic.weights]
    biases = [b.detach().cpu().float().numpy().reshape(b.shape[0], b.shape[2]) for b in critic.biases]
    if ensemble > 1:
        weights, biases = _ensemble_mean_layers(weights, biases, ensemble)
    out: dict[str, np.ndarray] = {}
    for layer, (w, b) in enumerate(zip(weights, biases, strict=True)):
        out[f"cost_critic.{layer}.weight"] = w
        out[f"cost_critic.{layer}.bias"] = b
    return out


def _ensemble_mean_layers(
    weights: list[np.ndarray], biases: list[np.ndarray], n: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """m·N member MLPs (W (m·N, in, out), b (m·N, out) per layer) → m MLPs, each its N members' mean.

    Hidden units of the N members sit side by side: the first layer's columns are concatenated, later
    hidden layers are block-diagonal (the zero blocks add exact zeros), and the output layer sums the
    members' last hidden units with weights W_i/N and bias mean_i b_i, i.e. (1/N) Σ_i Q_i. Computed in
    float64, stored in float32 like every other weight.
    """
    last = len(weights) - 1
    out_w: list[np.ndarray] = []
    out_b: list[np.ndarray] = []
    for layer, (w, b) in enumerate(zip(weights, biases, strict=True)):
        d_in, d_out = w.shape[1], w.shape[2]
        w = w.astype(np.float64).reshape(-1, n, d_in, d_out)  # (m, N, in, out)
        b = b.astype(np.float64).reshape(-1, n, d_out)
        m = w.shape[0]
        if layer == last:
            # Inputs: the N members' last hidden units side by side (no hidden layer: the shared input).
            merged = w.reshape(m, n * d_in, d_out) / n if layer else w.mean(axis=1)
            bias = b.mean(axis=1)
        elif layer == 0:  # every member reads the same input: concatenate the output columns
            merged = w.transpose(0, 2, 1, 3).reshape(m, d_in, n * d_out)
            bias = b.reshape(m, n * d_out)
        else:
            merged = np.zeros((m, n * d_in, n * d_out))
            for i in range(n):
                merged[:, i * d_in : (i + 1) * d_in, i * d_out : (i + 1) * d_out] = w[:, i]
            bias = b.reshape(m, n * d_out)
        out_w.append(np.ascontiguousarray(merged, dtype=np.float32))
        out_b.append(np.ascontiguousarray(bias, dtype=np.float32))
    return out_w, out_b


def write_policy_artefact(
    path: Path,
    actor: Any,
    normalizer: Any,
    env: Any,
    config: Any,
    summary: dict[str, Any],
    cost_critic: Any = None,
    horizon: int | None = None,
) -> Path:
    """Export a GaussianActor (+ normaliser, + optionally the cost critics) into ``path`` atomically.

    ``cost_critic``: the learner's cost ``EnsembleCritic`` (``config.network.cost_critics`` members per
    constraint, exported as their mean), or None.
    ``horizon``: the task's episode length T, used to record the per-step thresholds
    c̄ = C·(1 − γ^T)/((1 − γ)·T) that the cost limits mean for Q_c (None: not recorded).
    """
    try:
        spec = actor.describe()
    except ValueError as exc:
        raise ArtefactError(f"this actor cannot be exported: {exc}") from exc
    tensors: dict[str, np.ndarray] = spec.tensors()
    normalizer_meta = {"present": normalizer is not None}
    if normalizer is not None:
        tensors["normalizer.mean"] = normalizer.mean.astype(np.float64)
        tensors["normalizer.var"] = normalizer.var.astype(np.float64)
        normalizer_meta.update({"clip": normalizer.clip, "epsilon": normalizer.epsilon, "count": normalizer.count})
    critic_meta = None
    if cost_critic is not None and cost_critic.n_members > 0:
        ensemble = int(getattr(getattr(config, "network", None), "cost_critics", 1))
        tensors.update(_critic_tensors(cost_critic, env.obs_dim, env.act_dim, ensemble))
        critic_meta = _critic_meta(cost_critic, config, horizon, ensemble)

    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE))
    meta = {
        "format_version": FORMAT_VERSION,
        "env_id": config.env_id,
        "observation_space": {"shape": [env.obs_dim], "low": None, "high": None},
        "action_space": {"shape": [env.act_dim], "low": env.act_low.tolist(), "high": env.act_high.tolist()},
        "architecture": spec.architecture(),
        "normalizer": normalizer_meta,
        "cost_limits": [float(c) if np.isfinite(c) else None for c in config.constraints.cost_limits],
        **({"cost_critic": critic_meta} if critic_meta is not None else {}),
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


def _critic_meta(critic: Any, config: Any, horizon: int | None, ensemble: int = 1) -> dict[str, Any]:
    """policy.json's ``cost_critic`` section: shape, inputs, and what its numbers are measured against."""
    gamma = float(config.algo.gamma)
    members = int(critic.n_members) // ensemble  # one exported member per constraint
    limits = list(config.constraints.cost_limits)
    thresholds: list[float | None] | None = None
    if horizon is not None:
        from cvpo.thresholds import per_step_threshold  # numpy only

        thresholds = [float(c) if np.isfinite(c) else None for c in per_step_threshold(limits, int(horizon), gamma)]
    meta = {
        "members": members,
        "layers": len(critic.weights),
        "activation": "relu",
        "input": "normalised observation ++ raw action (policy [-1, 1] convention, before clipping)",
        "output": "discounted cost-to-go Q_c(s, a) per constraint",
        "gamma": gamma,
        "horizon": None if horizon is None else int(horizon),
        "per_step_thresholds": thresholds,
        "cost_signals": list(config.constraints.cost_signals or ("cost",) * members),
        "cost_continuation": getattr(config.constraints, "cost_continuation", "sampled"),
    }
    if ensemble > 1:  # absent for one critic per constraint: that section is as it always was
        meta["ensemble"] = {"members_per_constraint": ensemble, "exported": "mean"}
    return meta


class PolicyRuntime:
    """A loaded artefact: normalise → MLP → (mean, L) → clip to [-1, 1] → map to the action Box."""

    def __init__(self, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        self.meta = meta
        # The actor's one description (cvpo/actor_spec.py), weights (in, out) in float64; the names
        # below are views of it for the ONNX builder and /act's checks.
        self.spec = ActorSpec.from_tensors(tensors, meta["architecture"]).astype(np.float64)
        self.trunk = self.spec.trunk
        self.mean_w, self.mean_b = self.spec.mean_w, self.spec.mean_b
        self.cov_w, self.cov_b = self.spec.cov_w, self.spec.cov_b
        self.covariance = self.spec.covariance
        self.log_std_bounds = self.spec.log_std_bounds
        self.mean_bound = self.spec.mean_bound
        self.offdiag_bound = self.spec.offdiag_bound
        self.obs_dim = int(meta["observation_space"]["shape"][0])
        self.act_dim = int(meta["action_space"]["shape"][0])
        self.low = np.asarray(meta["action_space"]["low"], dtype=np.float64)
        self.high = np.asarray(meta["action_space"]["high"], dtype=np.float64)
        norm = meta["normalizer"]
        self.norm_mean = tensors.get("normalizer.mean") if norm["present"] else None
        self.norm_std = np.sqrt(tensors["normalizer.var"] + norm["epsilon"]) if norm["present"] else None
        self.norm_clip = norm.get("clip")
        # The cost critics, when the artefact carries them: per layer (W (m, in, out), b (m, 1, out)).
        self.cost_critic: list[tuple[np.ndarray, np.ndarray]] | None = None
        self.critic_members = 0
        critic = meta.get("cost_critic")
        if critic is not None:
            self.cost_critic, self.critic_members = _load_critic(critic, tensors, self.obs_dim + self.act_dim)

    @property
    def has_cost_critic(self) -> bool:
        return self.cost_critic is not None

    def normalise(self, obs: np.ndarray) -> np.ndarray:
        """Raw observations (B, o) → what the networks see: (x − mean)/std clipped to ±clip, or x."""
        x = np.asarray(obs, dtype=np.float64)
        if self.norm_mean is None:
            return x
        return np.clip((x - self.norm_mean) / self.norm_std, -self.norm_clip, self.norm_clip)

    def cost_to_go(self, obs: np.ndarray, raw_action: np.ndarray) -> np.ndarray:
        """Q_c(s, a) per constraint, (B, m), for raw observations (B, o) and raw policy actions (B, d).

        ``raw_action`` is in the policy's own convention, before clipping and the Box map (what
        ``raw_action`` returns), as the critics were trained. Raises ``ValueError`` without critics.
        """
        if self.cost_critic is None:
            raise ValueError("this policy artefact carries no cost critic")
        obs = np.atleast_2d(np.asarray(obs, dtype=np.float64))
        a = np.atleast_2d(np.asarray(raw_action, dtype=np.float64))
        h = np.concatenate([self.normalise(obs), a], axis=1)  # (B, o + d), shared by every member
        last = len(self.cost_critic) - 1
        for layer, (w, b) in enumerate(self.cost_critic):
            h = h @ w  # (B, in) @ (m, in, out) → (m, B, out); then (m, B, in) @ (m, in, out)
            h += b
            if layer < last:
                np.maximum(h, 0.0, out=h)
        return np.ascontiguousarray(h[..., 0].T)  # (m, B) → (B, m)

    def _features(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Trunk features and the mean head's output: all a deterministic action needs."""
        x = np.asarray(obs, dtype=np.float64)
        if self.norm_mean is not None:
            x = np.clip((x - self.norm_mean) / self.norm_std, -self.norm_clip, self.norm_clip)
        for w, b in self.trunk:
            x = x @ w
            x += b
            np.maximum(x, 0.0, out=x)
        return x, self.spec.bound_mean(x @ self.mean_w + self.mean_b)

    def distribution_params(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean (B, d) and Cholesky factor L (B, d, d) for raw observations (B, o)."""
        x, mean = self._features(obs)
        return mean, self.spec.scale_tril(x @ self.cov_w + self.cov_b)

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


def _load_critic(
    critic: dict[str, Any], tensors: dict[str, np.ndarray], in_dim: int
) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """The critic layers named by policy.json's ``cost_critic`` section, shape-checked, in float64."""
    try:
        n_layers, m = int(critic["layers"]), int(critic["members"])
        layers = []
        for layer in range(n_layers):
            w = tensors[f"cost_critic.{layer}.weight"].astype(np.float64)
            b = tensors[f"cost_critic.{layer}.bias"].astype(np.float64)
            expected_in = in_dim if layer == 0 else layers[-1][0].shape[2]
            if w.ndim != 3 or w.shape[:2] != (m, expected_in) or b.shape != (m, w.shape[2]):
                raise ValueError(f"layer {layer} has shapes {w.shape}, {b.shape}")
            layers.append((np.ascontiguousarray(w), b[:, None, :].copy()))
        if not layers or layers[-1][0].shape[2] != 1 or m < 1:
            raise ValueError("the last layer must have one output per member")
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtefactError(f"malformed cost critic: {exc}") from exc
    return layers, m


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
    try:
        return PolicyRuntime(meta, load_file(str(weights)))
    except ArtefactError as exc:
        raise ArtefactError(f"{path}: {exc}") from exc


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
