"""Actor and critic networks (cvpo-algorithm.md §4.3, §5.3).

- :class:`GaussianActor`: state-conditioned Gaussian, diagonal by default, full Cholesky optional (§5.3).
  Both modes return the lower-triangular Cholesky factor L (Σ = LLᵀ), so the M-step (§3) and the E-step
  sampler handle one representation and take log-dets from diag L (§8.1 P6).
- :class:`EnsembleCritic`: n independent Q(s, a) MLPs evaluated in one batched matmul. The reward pair is
  one 2-member ensemble combined with a min; the cost critics are a separate m·N-member ensemble, N members
  per constraint (``network.cost_critics``, member c·N + i), never min-combined: their mean, or an upper
  confidence bound in the E-step (§4.3, §8.1 P7).
- :func:`polyak_update`: target ← (1 − τ)·target + τ·source (§4.3, §3.4).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import MultivariateNormal

from cvpo.actor_spec import DEFAULT_LOG_STD_BOUNDS, HEAD_GAIN, OFFDIAG_BOUND, ActorSpec

__all__ = ["ActorSnapshot", "EnsembleCritic", "GaussianActor", "joint_forward", "mlp", "polyak_update"]

_HIDDEN_GAIN = math.sqrt(2.0)  # orthogonal gain for ReLU layers


def _init_linear(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain=gain)
    nn.init.zeros_(layer.bias)
    return layer


def _hidden_layers(in_dim: int, hidden: Sequence[int], activation: Callable[[], nn.Module]) -> list[nn.Module]:
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
        log_std_bounds: tuple[float, float] = DEFAULT_LOG_STD_BOUNDS,
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
        self.mean_head = _init_linear(nn.Linear(feat, self.act_dim), HEAD_GAIN)
        self.cov_head = _init_linear(nn.Linear(feat, n_cov), HEAD_GAIN)
        rows, cols = torch.tril_indices(self.act_dim, self.act_dim, offset=-1)
        self.register_buffer("_offdiag_rows", rows, persistent=False)
        self.register_buffer("_offdiag_cols", cols, persistent=False)

    def _heads(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, raw covariance-head output) after the shared trunk."""
        h = self.trunk(obs)
        mean = self.mean_head(h)
        if self.mean_bound is not None:
            mean = self.mean_bound * torch.tanh(mean)
        return mean, self.cov_head(h)

    def _std(self, raw: Tensor) -> Tensor:
        return raw[..., : self.act_dim].clamp(*self.log_std_bounds).exp()

    def mean_std(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Diagonal mode only: (mean, σ), both (*S, d), without building the (*S, d, d) factor.

        The learner's hot path: sampling is μ + σ·z and the M-step uses the diagonal formulas, the
        same numbers as ``forward``'s L = diag(σ) without the triangular solves.
        """
        if self.covariance != "diag":
            raise ValueError("mean_std needs covariance='diag'; use forward() for the Cholesky factor")
        mean, raw = self._heads(obs)
        return mean, self._std(raw)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """obs (*S, o) → (mean (*S, d), scale_tril (*S, d, d)), L lower-triangular with diag L > 0."""
        mean, raw = self._heads(obs)
        d = self.act_dim
        tril = torch.diag_embed(self._std(raw))
        if self.covariance == "cholesky" and d > 1:
            off = raw[..., d:].clamp(-OFFDIAG_BOUND, OFFDIAG_BOUND)
            lower = torch.zeros_like(tril)
            lower[..., self._offdiag_rows, self._offdiag_cols] = off
            tril = tril + lower
        return mean, tril

    @torch.no_grad()
    def describe(self) -> ActorSpec:
        """This actor's weights (float32 NumPy copies, (in, out)) and constants: cvpo/actor_spec.py."""
        if any(not isinstance(m, nn.Linear | nn.ReLU) for m in self.trunk):
            raise ValueError("only Linear/ReLU trunks can be described")

        def layer(m: nn.Linear) -> tuple[np.ndarray, np.ndarray]:
            return np.ascontiguousarray(
                m.weight.detach().cpu().float().numpy().T
            ), m.bias.detach().cpu().float().numpy().copy()

        mean_w, mean_b = layer(self.mean_head)
        cov_w, cov_b = layer(self.cov_head)
        return ActorSpec(
            trunk=[layer(m) for m in self.trunk if isinstance(m, nn.Linear)],
            mean_w=mean_w,
            mean_b=mean_b,
            cov_w=cov_w,
            cov_b=cov_b,
            covariance=self.covariance,
            log_std_bounds=self.log_std_bounds,
            mean_bound=self.mean_bound,
            offdiag_bound=OFFDIAG_BOUND,
        )

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

    def __init__(self, obs_dim: int, act_dim: int, n_members: int, hidden: Sequence[int] = (256, 256)) -> None:
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
        """obs (*S, o), act (*S, a) (leading shapes broadcast) → Q values (n_members, *S).

        The first layer is applied to the observation and action blocks separately, each at its own
        leading shape, and the two are added with broadcasting: for the E-step's (B, o) states against
        (K, B, a) sampled actions the observation block runs once per state instead of K times, and no
        (K, B, o + a) concatenation is built. Members run as plain 2-D ``addmm`` calls, which MKL does
        faster here than one batched ``baddbmm`` over an expanded input.
        """
        lead = torch.broadcast_shapes(obs.shape[:-1], act.shape[:-1])
        if self.n_members == 0:
            return obs.new_zeros((0, *lead))
        o = self.obs_dim
        obs2, act2 = obs.reshape(-1, o), act.reshape(-1, self.act_dim)
        w0, b0 = self.weights[0], self.biases[0]
        last = len(self.weights) - 1
        out = []
        for i in range(self.n_members):
            obs_part = torch.addmm(b0[i], obs2, w0[i, :o]).view(*obs.shape[:-1], -1)
            h = obs_part + (act2 @ w0[i, o:]).view(*act.shape[:-1], -1)  # (*S, width)
            h = h.reshape(-1, h.shape[-1])
            for layer in range(1, last + 1):
                h = torch.relu_(h)
                h = torch.addmm(self.biases[layer][i], h, self.weights[layer][i])
            out.append(h.view(lead))
        return torch.stack(out)


def joint_forward(critics: Sequence[EnsembleCritic], obs: Tensor, act: Tensor) -> Tensor:
    """All members of several same-shaped ensembles on one (B, o), (B, a) batch → (Σ members, B).

    The critic step evaluates the reward pair and the cost critics on the same minibatch; stacking
    their weights (``torch.cat``, differentiable, so gradients reach each ensemble's own parameters)
    runs every layer as one batched matmul, about a quarter fewer dispatched ops forward and backward
    than member by member at B = 256. Same numbers as the ensembles' own forwards up to rounding.
    """
    x = torch.cat([obs, act], dim=-1)
    n = sum(c.n_members for c in critics)
    if n == 0:
        return x.new_zeros((0, x.shape[0]))
    h = x.unsqueeze(0).expand(n, -1, -1)
    layers = len(critics[0].weights)
    for layer in range(layers):
        w = torch.cat([c.weights[layer] for c in critics])
        b = torch.cat([c.biases[layer] for c in critics])
        h = torch.baddbmm(b, h, w)
        if layer < layers - 1:
            h = torch.relu(h)
    return h.squeeze(-1)


class ActorSnapshot:
    """A float32 NumPy copy of a diagonal :class:`GaussianActor` for acting one state at a time.

    Collecting calls the actor once per env step on a single observation; through torch that is a
    dozen dispatched ops (~60–110 µs), in NumPy with preallocated buffers ~15 µs. The weights are
    copied by :meth:`refresh`, which the trainer calls whenever the actor may have changed (after an
    update phase, after a restore), so acting never sees stale weights. Results equal the torch
    forward to float32 rounding (the matmul order differs), not bit for bit.
    """

    def __init__(self, actor: GaussianActor) -> None:
        if actor.covariance != "diag":
            raise ValueError("ActorSnapshot supports covariance='diag' only")
        self.actor = actor
        self.d = actor.act_dim
        self._x = np.zeros(actor.obs_dim, dtype=np.float32)
        self.refresh()

    def refresh(self) -> None:
        """Copy the actor's current description (trunk layers; mean and σ heads fused in one matrix)."""
        self.spec = self.actor.describe()
        self.layers = self.spec.trunk
        # Column-major, as the heads' transposed weights always were here: einsum's summation order
        # follows the layout, and float32 sums in another order would change every trajectory.
        self.head_w = np.asfortranarray(np.concatenate([self.spec.mean_w, self.spec.cov_w], axis=1))
        self.head_b = np.concatenate([self.spec.mean_b, self.spec.cov_b])
        self._h = [np.empty(w.shape[1], dtype=np.float32) for w, _ in self.layers]
        self._out = np.empty(self.head_w.shape[1], dtype=np.float32)

    def mean_std(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One observation (o,) → (mean (d,), σ (d,)) as float64 arrays."""
        x = self._x
        x[:] = obs
        # einsum, not matmul: a matrix-vector matmul goes to OpenBLAS, whose worker thread then
        # busy-waits after every call, i.e. one env step at a time it holds a core at 100 % and
        # starves torch's threads during the updates (measured: 2-3× slower updates on 2 cores).
        for (w, b), h in zip(self.layers, self._h, strict=True):
            np.einsum("i,ij->j", x, w, out=h)
            np.add(h, b, out=h)
            np.maximum(h, 0.0, out=h)
            x = h
        out = np.einsum("i,ij->j", x, self.head_w, out=self._out)
        np.add(out, self.head_b, out=out)
        mean = self.spec.bound_mean(out[: self.d].astype(np.float64))
        std = self.spec.std(out[self.d :]).astype(np.float64)
        return mean, std


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
