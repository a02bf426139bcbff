"""CVPO M-step: decoupled weighted MLE inside exact KL trust regions (cvpo-algorithm.md §3).

Gaussians are given by a mean (*S, d) and the lower-triangular Cholesky factor L (*S, d, d) of Σ = LLᵀ,
the representation :class:`cvpo.nets.GaussianActor` returns in both covariance modes. Every inverse is a
triangular solve and every log-det is 2Σ log diag L, with no determinant clamp (§3.2, §8.1 P6).

π_old's statistics, the sampled actions and the E-step weights are constants of the M-step (§3.1): they
are detached here, and no function writes into any input (§9 I14).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "gaussian_kl_terms",
    "gaussian_kl_terms_diag",
    "mstep_loss",
    "project_multiplier",
    "weighted_mle",
    "weighted_mle_diag",
    "weighted_mle_terms",
]


def _check_gaussian(mean: Tensor, tril: Tensor, name: str) -> None:
    if mean.ndim < 1 or tril.shape != (*mean.shape, mean.shape[-1]):
        raise ValueError(
            f"{name}: expected mean (*S, d) and tril (*S, d, d), got {tuple(mean.shape)}, {tuple(tril.shape)}"
        )


def _log_diag_sum(tril: Tensor) -> Tensor:
    """Σ_d log L_dd = ½ log det Σ, shape (*S,)."""
    return tril.diagonal(dim1=-2, dim2=-1).log().sum(dim=-1)


def gaussian_kl_terms(mean_old: Tensor, tril_old: Tensor, mean_new: Tensor, tril_new: Tensor) -> tuple[Tensor, Tensor]:
    """Decoupled KL(π_old‖π_θ) terms, batch means over the leading shape (§3.2, full recommended form).

    C_μ = mean_s ½‖L_o⁻¹(μ_θ − μ_o)‖²  (= KL(N(μ_o, Σ_o)‖N(μ_θ, Σ_o)))
    C_Σ = mean_s ½[‖L_θ⁻¹L_o‖_F² − d + 2Σ log diag L_θ − 2Σ log diag L_o]  (= KL(N(μ_o, Σ_o)‖N(μ_o, Σ_θ)))

    Gradients flow into ``mean_new`` (C_μ) and ``tril_new`` (C_Σ) only; the old statistics are detached.
    """
    _check_gaussian(mean_old, tril_old, "old")
    _check_gaussian(mean_new, tril_new, "new")
    mean_old, tril_old = mean_old.detach(), tril_old.detach()
    d = mean_old.shape[-1]
    diff = (mean_new - mean_old).unsqueeze(-1)  # (*S, d, 1)
    y = torch.linalg.solve_triangular(tril_old, diff, upper=False)
    c_mu = 0.5 * y.square().sum(dim=(-2, -1)).mean()
    M = torch.linalg.solve_triangular(tril_new, tril_old, upper=False)  # L_θ⁻¹ L_o
    log_det_ratio = 2.0 * (_log_diag_sum(tril_new) - _log_diag_sum(tril_old))  # ln det Σ_θ − ln det Σ_o
    c_sigma = 0.5 * (M.square().sum(dim=(-2, -1)) - d + log_det_ratio).mean()
    return c_mu, c_sigma


def gaussian_kl_terms_diag(
    mean_old: Tensor, std_old: Tensor, mean_new: Tensor, std_new: Tensor
) -> tuple[Tensor, Tensor]:
    """Diagonal fast path of :func:`gaussian_kl_terms` for std tensors (*S, d), no variance clamp (§3.2).

    C_μ = mean_s Σ_d (μ_θ − μ_o)²/(2σ_o²);  C_Σ = mean_s Σ_d [½(r² − 1) − log r],  r = σ_o/σ_θ.
    """
    if not (mean_old.shape == std_old.shape == mean_new.shape == std_new.shape) or mean_old.ndim < 1:
        raise ValueError("mean_old, std_old, mean_new and std_new must share one shape (*S, d)")
    mean_old, std_old = mean_old.detach(), std_old.detach()
    c_mu = (0.5 * ((mean_new - mean_old) / std_old).square()).sum(dim=-1).mean()
    r = std_old / std_new
    c_sigma = (0.5 * (r.square() - 1.0) - r.log()).sum(dim=-1).mean()
    return c_mu, c_sigma


def _gaussian_log_prob(actions: Tensor, mean: Tensor, tril: Tensor) -> Tensor:
    """log N(a_sj | mean_s, L_s L_sᵀ) for actions (B, K, d), mean (B, d), tril (B, d, d) → (B, K)."""
    d = actions.shape[-1]
    centred = (actions - mean.unsqueeze(-2)).transpose(-2, -1)  # (B, d, K): K right-hand sides per state
    z = torch.linalg.solve_triangular(tril, centred, upper=False)
    log_norm = _log_diag_sum(tril).unsqueeze(-1) + 0.5 * d * math.log(2.0 * math.pi)
    return -0.5 * z.square().sum(dim=-2) - log_norm


def weighted_mle_terms(
    actions: Tensor,
    weights: Tensor,
    mean_old: Tensor,
    tril_old: Tensor,
    mean_new: Tensor,
    tril_new: Tensor,
) -> tuple[Tensor, Tensor]:
    """The two decoupled halves of L_MLE (§3.1), each (1/(KB)) Σ_s Σ_j q_sj log N(a_sj | ·):

    mean term: log N(a | μ_θ, Σ_o) (gradient reaches the mean only);
    covariance term: log N(a | μ_o, Σ_θ) (gradient reaches the covariance only) — §9 I11.

    actions (B, K, d) raw samples from π_old, weights (B, K) from the E-step, old/new Gaussians as
    mean (B, d) and tril (B, d, d). Actions, weights and old statistics are detached.
    """
    if actions.ndim != 3 or weights.shape != actions.shape[:2]:
        raise ValueError(
            f"expected actions (B, K, d) and weights (B, K), got {tuple(actions.shape)}, {tuple(weights.shape)}"
        )
    B, _, d = actions.shape
    for name, mean, tril in (("old", mean_old, tril_old), ("new", mean_new, tril_new)):
        _check_gaussian(mean, tril, name)
        if mean.shape != (B, d):
            raise ValueError(f"{name} mean must have shape {(B, d)}, got {tuple(mean.shape)}")
    actions, weights = actions.detach(), weights.detach()
    mean_old, tril_old = mean_old.detach(), tril_old.detach()
    mean_term = (weights * _gaussian_log_prob(actions, mean_new, tril_old)).mean()
    cov_term = (weights * _gaussian_log_prob(actions, mean_old, tril_new)).mean()
    return mean_term, cov_term


def weighted_mle(
    actions: Tensor,
    weights: Tensor,
    mean_old: Tensor,
    tril_old: Tensor,
    mean_new: Tensor,
    tril_new: Tensor,
) -> Tensor:
    """L_MLE = (1/(KB)) Σ_s Σ_j q_sj [log N(a_sj|μ_θ, Σ_o) + log N(a_sj|μ_o, Σ_θ)], to maximise (§3.1).

    Shapes as in :func:`weighted_mle_terms`. With Σ_j q_sj = 1 this is 1/K times the per-state expected
    log-likelihood, so K rescales it against α and the learning rate (§8.1 P11).
    """
    mean_term, cov_term = weighted_mle_terms(actions, weights, mean_old, tril_old, mean_new, tril_new)
    return mean_term + cov_term


def _diag_log_prob(actions: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(a_sj | mean_s, diag σ_s²) for actions (B, K, d), mean and std (B, d) → (B, K)."""
    d = actions.shape[-1]
    z = (actions - mean.unsqueeze(-2)) / std.unsqueeze(-2)
    log_norm = std.log().sum(dim=-1, keepdim=True) + 0.5 * d * math.log(2.0 * math.pi)
    return -0.5 * z.square().sum(dim=-1) - log_norm


def weighted_mle_diag(
    actions: Tensor,
    weights: Tensor,
    mean_old: Tensor,
    std_old: Tensor,
    mean_new: Tensor,
    std_new: Tensor,
) -> Tensor:
    """Diagonal fast path of :func:`weighted_mle` for std tensors (B, d): the same L_MLE (§3.1).

    With L = diag(σ) the triangular solves reduce to element-wise divisions; the decoupling (§9 I11)
    and the detaching of actions, weights and old statistics are the same.
    """
    if actions.ndim != 3 or weights.shape != actions.shape[:2]:
        raise ValueError(
            f"expected actions (B, K, d) and weights (B, K), got {tuple(actions.shape)}, {tuple(weights.shape)}"
        )
    shape = (actions.shape[0], actions.shape[2])
    if not (mean_old.shape == std_old.shape == mean_new.shape == std_new.shape == shape):
        raise ValueError(f"means and stds must have shape {shape}")
    actions, weights = actions.detach(), weights.detach()
    mean_old, std_old = mean_old.detach(), std_old.detach()
    mean_term = (weights * _diag_log_prob(actions, mean_new, std_old)).mean()
    cov_term = (weights * _diag_log_prob(actions, mean_old, std_new)).mean()
    return mean_term + cov_term


def project_multiplier(alpha: float, kl: float, kl_bound: float, step_size: float, alpha_max: float) -> float:
    """Projected dual step α ← clip(α + step·(KL − ε), 0, α_max) (§3.3 recommended, §8.1 P12).

    α rises only while KL > ε and the stored value always lies in [0, α_max]. A NaN KL raises.
    """
    if step_size < 0 or alpha_max < 0:
        raise ValueError(f"step_size and alpha_max must be >= 0, got {step_size}, {alpha_max}")
    if math.isnan(kl):
        raise ValueError("M-step KL is NaN")
    step = step_size * (kl - kl_bound) if step_size > 0 else 0.0
    return float(min(max(alpha + step, 0.0), alpha_max))


def mstep_loss(
    mle: Tensor,
    c_mu: Tensor,
    c_sigma: Tensor,
    alpha_mu: float,
    alpha_sigma: float,
    eps_mu: float,
    eps_sigma: float,
) -> Tensor:
    """Actor loss −L_MLE + α_μ(C_μ − ε_μ) + α_Σ(C_Σ − ε_Σ), α held constant (§3.3)."""
    return -mle + alpha_mu * (c_mu - eps_mu) + alpha_sigma * (c_sigma - eps_sigma)
