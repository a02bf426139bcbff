"""The actor described once: its weights and the constants of its forward pass (NumPy, no torch).

π(a|s) = N(μ(s), L(s)L(s)ᵀ): a ReLU trunk, then a mean head (optionally ``mean_bound·tanh``) and a
covariance head whose first d outputs are log σ clamped to ``log_std_bounds`` and, for a Cholesky
actor, d(d−1)/2 raw off-diagonal entries clamped to ±``offdiag_bound`` (cvpo-algorithm.md §5.1–5.3).
The torch actor (cvpo.nets.GaussianActor) trains it and produces this description
(``GaussianActor.describe``); the trainer's one-state NumPy copy (``ActorSnapshot``), the artefact
(``cvpo.artefact``: policy.json's ``architecture`` and the safetensors names) and the ONNX builder
all read it, so the constants live here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

HEAD_GAIN = 0.01  # small output heads at init: mean ≈ 0 (or 0 after tanh), σ ≈ 1
OFFDIAG_BOUND = 5.0  # clamp of the raw off-diagonal Cholesky entries (§5.1 clamps the raw head output)
DEFAULT_LOG_STD_BOUNDS = (-20.0, 2.0)  # FSRL's (§5.2)

Layer = tuple[np.ndarray, np.ndarray]  # (W (in, out), b (out,))


@dataclass(frozen=True)
class ActorSpec:
    trunk: list[Layer]  # hidden layers, each followed by ReLU
    mean_w: np.ndarray  # (feat, d)
    mean_b: np.ndarray
    cov_w: np.ndarray  # (feat, d) diagonal, (feat, d(d+1)/2) Cholesky
    cov_b: np.ndarray
    covariance: str  # "diag" or "cholesky"
    log_std_bounds: tuple[float, float] = DEFAULT_LOG_STD_BOUNDS
    mean_bound: float | None = None
    offdiag_bound: float = OFFDIAG_BOUND

    @property
    def obs_dim(self) -> int:
        return int(self.trunk[0][0].shape[0] if self.trunk else self.mean_w.shape[0])

    @property
    def act_dim(self) -> int:
        return int(self.mean_w.shape[1])

    def astype(self, dtype: type) -> ActorSpec:
        """The same description with every weight converted (float64 for serving, float32 for acting)."""
        return replace(
            self,
            trunk=[(w.astype(dtype), b.astype(dtype)) for w, b in self.trunk],
            mean_w=self.mean_w.astype(dtype),
            mean_b=self.mean_b.astype(dtype),
            cov_w=self.cov_w.astype(dtype),
            cov_b=self.cov_b.astype(dtype),
        )

    # ------------------------------------------------------------------ the forward pass's pieces

    def bound_mean(self, mean: np.ndarray) -> np.ndarray:
        """The mean head's output → μ (``mean_bound·tanh`` when bounded)."""
        return mean if self.mean_bound is None else self.mean_bound * np.tanh(mean)

    def std(self, raw: np.ndarray) -> np.ndarray:
        """The covariance head's output (…, n_cov) → σ (…, d)."""
        return np.exp(np.clip(raw[..., : self.act_dim], *self.log_std_bounds))

    def scale_tril(self, raw: np.ndarray) -> np.ndarray:
        """The covariance head's output (B, n_cov) → L (B, d, d), lower-triangular with diag L = σ."""
        d = self.act_dim
        tril = np.zeros((raw.shape[0], d, d), dtype=raw.dtype)
        idx = np.arange(d)
        tril[:, idx, idx] = self.std(raw)
        if self.covariance == "cholesky" and d > 1:
            rows, cols = np.tril_indices(d, -1)
            tril[:, rows, cols] = np.clip(raw[:, d:], -self.offdiag_bound, self.offdiag_bound)
        return tril

    # ------------------------------------------------------------------ the artefact's form

    def architecture(self) -> dict[str, Any]:
        """policy.json's ``architecture`` section."""
        return {
            "trunk_layers": len(self.trunk),
            "activation": "relu",
            "covariance": self.covariance,
            "log_std_bounds": list(self.log_std_bounds),
            "mean_bound": self.mean_bound,
            "offdiag_bound": self.offdiag_bound,
        }

    def tensors(self) -> dict[str, np.ndarray]:
        """Safetensors entries, weights stored (out, in) as torch's Linear holds them, float32."""
        out: dict[str, np.ndarray] = {}
        for i, (w, b) in enumerate(self.trunk):
            out[f"trunk.{i}.weight"], out[f"trunk.{i}.bias"] = _stored(w), b.astype(np.float32)
        out["mean_head.weight"], out["mean_head.bias"] = _stored(self.mean_w), self.mean_b.astype(np.float32)
        out["cov_head.weight"], out["cov_head.bias"] = _stored(self.cov_w), self.cov_b.astype(np.float32)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], arch: dict[str, Any]) -> ActorSpec:
        """The inverse of :meth:`tensors` and :meth:`architecture` (weights as stored, transposed back)."""

        def layer(name: str) -> Layer:
            return np.ascontiguousarray(tensors[f"{name}.weight"].T), tensors[f"{name}.bias"]

        mean_w, mean_b = layer("mean_head")
        cov_w, cov_b = layer("cov_head")
        return cls(
            trunk=[layer(f"trunk.{i}") for i in range(int(arch["trunk_layers"]))],
            mean_w=mean_w,
            mean_b=mean_b,
            cov_w=cov_w,
            cov_b=cov_b,
            covariance=arch["covariance"],
            log_std_bounds=(float(arch["log_std_bounds"][0]), float(arch["log_std_bounds"][1])),
            mean_bound=None if arch["mean_bound"] is None else float(arch["mean_bound"]),
            offdiag_bound=float(arch.get("offdiag_bound", OFFDIAG_BOUND)),
        )


def _stored(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T, dtype=np.float32)
