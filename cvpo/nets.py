"""Actor and critic networks (cvpo-algorithm.md §4.3, §5.3).

- :class:`GaussianActor`: state-conditioned Gaussian, diagonal by default, full Cholesky optional (§5.3).
  Both modes return the lower-triangular Cholesky factor L (Σ = LLᵀ), so the M-step (§3) and the E-step
  sampler handle one representation and take log-dets from diag L (§8.1 P6).
- :class:`EnsembleCritic`: n independent Q(s, a) MLPs evaluated in one batched matmul. The reward pair is
  one 2-member ensemble combined with a min; the cost critics are a separate m-member ensemble, one member
  per constraint, never min-combined (§4.3, §8.1 P7).
- :func:`polyak_update`: target ← (1 − τ)·target + τ·source (§4.3, §3.4).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import MultivariateNormal

__all__ = ["EnsembleCritic", "GaussianActor", "mlp", "polyak_update"]

_HIDDEN_GAIN = math.sqrt(2.0)  # orthogonal gain for ReLU layers
_HEAD_GAIN = 0.01  # small output heads: initial mean ≈ 0 (or 0 after tanh), initial σ ≈ 1
_OFFDIAG_BOUND = 5.0  # clamp of the raw off-diagonal Cholesky entries (§5.1 clamps the raw head output)


def _init_linear(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain=gain)
    nn.init.zeros_(layer.bias)
    return layer


def _hidden_layers(
    in_dim: int, hidden: Sequence[int], activation: Callable[[], nn.Module]
) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [_init_linear(nn.Linear(in_dim, int(width)), _HIDDEN_GAIN), activation()]
        in_dim = int(width)
    return layers


def mlp(
    in_dim: int,
    hidden: Sequence[int],
    out_dim: int,
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """Linear → activation per hidden width, then a linear output layer (orthogonal init, zero bias)."""
    last = int(hidden[-1]) if len(hidden) else in_dim
    out = _init_linear(nn.Linear(last, out_dim), 1.0)
    return nn.Sequential(*_hidden_layers(in_dim, hidden, activation), out)


class GaussianActor(nn.Module):
    """π_θ(a|s) = N(μ(s), L(s)L(s)ᵀ) with a shared trunk, a mean head and a covariance head (§5.3).

    ``covariance="diag"``: the head gives d log-stds, clamped to ``log_std_bounds`` and exponentiated
    (FSRL, §5.2); L = diag(σ). ``covariance="cholesky"``: the head gives d diagonal log-stds (clamped,
    exponentiated) and d(d−1)/2 raw off-diagonal entries clamped to ±5 (§5.1), filling a lower-triangular L.
    ``mean_bound=None`` leaves the mean unbounded (FSRL's safety-gymnasium setting); otherwise
    μ = mean_bound·tanh(·). Samples are never squashed or clipped: actions live in the policy's raw
    [−1, 1] convention and are clipped/mapped to the box elsewhere (§8.1 P10).
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: Sequence[int] = (256, 256),
        covariance: str = "diag",
        log_std_bounds: tuple[float, float] = (-20.0, 2.0),
        mean_bound: float | None = None,
    ) -> None:
        super().__init__()
        if covariance not in ("diag", "cholesky"):
            raise ValueError(f"covariance must be 'diag' or 'cholesky', got {covariance!r}")
        if obs_dim < 1 or act_dim < 1:
            raise ValueError(f"obs_dim and act_dim must be >= 1, got {obs_dim}, {act_dim}")
        lo, hi = (float(b) for b in log_std_bounds)
        if not lo < hi:
            raise ValueError(f"log_std_bounds must be (low, high) with low < high, got {log_std_bounds}")
        if mean_bound is not None and not mean_bound > 0:
            raise ValueError(f"mean_bound must be > 0 or None, got {mean_bound}")
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.covariance = covariance
        self.log_std_bounds = (lo, hi)
        self.mean_bound = None if mean_bound is None else float(mean_bound)

        self.trunk = nn.Sequential(*_hidden_layers(self.obs_dim, hidden, nn.ReLU))
        feat = int(hidden[-1]) if len(hidden) else self.obs_dim
        n_cov = self.act_dim if covariance == "diag" else self.act_dim * (self.act_dim + 1) // 2
        self.mean_head = _init_linear(nn.Linear(feat, self.act_dim), _HEAD_GAIN)
        self.cov_head = _init_linear(nn.Linear(feat, n_cov), _HEAD_GAIN)
        rows, cols = torch.tril_indices(self.act_dim, self.act_dim, offset=-1)
        self.register_buffer("_offdiag_rows", rows, persistent=False)
        self.register_buffer("_offdiag_cols", cols, persistent=False)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """obs (*S, o) → (mean (*S, d), scale_tril (*S, d, d)), L lower-triangular with diag L > 0."""
        h = self.trunk(obs)
        mean = self.mean_head(h)
        if self.mean_bound is not None:
            mean = self.mean_bound * torch.tanh(mean)
        raw = self.cov_head(h)
        d = self.act_dim
        std = raw[..., :d].clamp(*self.log_std_bounds).exp()
        tril = torch.diag_embed(std)
        if self.covariance == "cholesky" and d > 1:
            off = raw[..., d:].clamp(-_OFFDIAG_BOUND, _OFFDIAG_BOUND)
            lower = torch.zeros_like(tril)
            lower[..., self._offdiag_rows, self._offdiag_cols] = off
            tril = tril + lower
        return mean, tril

    def distribution(self, obs: Tensor) -> MultivariateNormal:
        mean, tril = self(obs)
        return MultivariateNormal(mean, scale_tril=tril)

    @torch.no_grad()
    def act(self, obs: Tensor, deterministic: bool, generator: torch.Generator | None = None) -> Tensor:
        """The mean if ``deterministic`` (evaluation, §5.3), else a raw unclipped sample μ + L·z.

        z ~ N(0, I) is drawn from ``generator`` on its own device (the global RNG if None), so a seeded
        generator reproduces the sample. Score it with ``distribution(obs).log_prob`` on exactly this
        tensor (§8.1 P10).
        """
        mean, tril = self(obs)
        if deterministic:
            return mean
        device = mean.device if generator is None else generator.device
        z = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=device).to(mean.device)
        return mean + (tril @ z.unsqueeze(-1)).squeeze(-1)


class EnsembleCritic(nn.Module):
    """n_members independent Q(s, a) MLPs (ReLU, orthogonal init, zero bias) in one batched forward.

    Layer l of member i is ``weights[l][i]`` (in, out) and ``biases[l][i]`` (1, out):
    h ← relu(h @ W + b), with a linear output layer of width 1.
    """

    def __init__(
        self, obs_dim: int, act_dim: int, n_members: int, hidden: Sequence[int] = (256, 256)
    ) -> None:
        super().__init__()
        if n_members < 0:
            raise ValueError(f"n_members must be >= 0, got {n_members}")
        self.obs_dim, self.act_dim, self.n_members = int(obs_dim), int(act_dim), int(n_members)
        dims = [self.obs_dim + self.act_dim, *(int(h) for h in hidden), 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for layer, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
            gain = 1.0 if layer == len(dims) - 2 else _HIDDEN_GAIN
            w = torch.empty(self.n_members, d_in, d_out)
            for i in range(self.n_members):  # each member its own orthogonal draw
                nn.init.orthogonal_(w[i].T, gain=gain)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(self.n_members, 1, d_out)))

    def forward(self, obs: Tensor, act: Tensor) -> Tensor:
        """obs (*S, o), act (*S, a) (leading shapes broadcast) → Q values (n_members, *S)."""
        lead = torch.broadcast_shapes(obs.shape[:-1], act.shape[:-1])
        x = torch.cat([obs.expand(*lead, obs.shape[-1]), act.expand(*lead, act.shape[-1])], dim=-1)
        h = x.reshape(1, -1, x.shape[-1]).expand(self.n_members, -1, -1)
        last = len(self.weights) - 1
        for layer, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(b, h, w)
            if layer < last:
                h = torch.relu(h)
        return h.reshape(self.n_members, *lead)


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """In place: target ← (1 − τ)·target + τ·source for every parameter and floating buffer.

    Integer buffers are copied. Both modules must have the same structure.
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    t_params, s_params = list(target.parameters()), list(source.parameters())
    t_bufs, s_bufs = list(target.buffers()), list(source.buffers())
    if len(t_params) != len(s_params) or len(t_bufs) != len(s_bufs):
        raise ValueError("target and source modules have different structures")
    for t, s in zip([*t_params, *t_bufs], [*s_params, *s_bufs], strict=True):
        if t.shape != s.shape:
            raise ValueError(f"shape mismatch in polyak_update: {tuple(t.shape)} vs {tuple(s.shape)}")
        if t.is_floating_point():
            t.lerp_(s, tau)
        else:
            t.copy_(s)
