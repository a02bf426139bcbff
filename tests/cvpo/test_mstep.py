"""M-step: weighted MLE, exact KL terms, projected multipliers (cvpo-algorithm.md §3, §8.1 P6/P11/P12,
§9 I10-I14).

Reference values come from ``torch.distributions`` (MultivariateNormal, Independent Normal) or closed forms
written out in the tests; the M-step loops use a real :class:`cvpo.nets.GaussianActor`.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from cvpo.mstep import (
    gaussian_kl_terms,
    gaussian_kl_terms_diag,
    mstep_loss,
    project_multiplier,
    weighted_mle,
    weighted_mle_diag,
    weighted_mle_terms,
)
from cvpo.nets import GaussianActor

F64 = torch.float64
EPS_MU, EPS_SIGMA = 5e-3, 5e-4  # §7.2


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def random_tril(g: torch.Generator, n: int, d: int, scale: float = 1.0, offdiag: float = 0.5) -> torch.Tensor:
    """Random lower-triangular Cholesky factors (n, d, d) with positive diagonal, in float64."""
    diag = torch.exp(0.4 * torch.randn(n, d, generator=g, dtype=F64))
    lower = torch.tril(torch.randn(n, d, d, generator=g, dtype=F64), diagonal=-1) * offdiag
    return scale * (torch.diag_embed(diag) + lower)


def random_pair(g: torch.Generator, n: int, d: int, scale: float = 1.0, offdiag: float = 0.5):
    """(mean_old, tril_old, mean_new, tril_new), the new Gaussian a moderate perturbation of the old."""
    mean_old = torch.randn(n, d, generator=g, dtype=F64)
    tril_old = random_tril(g, n, d, scale, offdiag)
    mean_new = mean_old + scale * 0.5 * torch.randn(n, d, generator=g, dtype=F64)
    tril_new = random_tril(g, n, d, scale, offdiag)
    return mean_old, tril_old, mean_new, tril_new


def mvn(mean: torch.Tensor, tril: torch.Tensor) -> MultivariateNormal:
    return MultivariateNormal(mean, scale_tril=tril)


def make_batch(
    actor: GaussianActor, B: int, K: int, seed: int, tilt: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A synthetic E-step on π_old = ``actor``: obs, K raw samples per state, weights and π_old's stats.

    tilt = 0: uniform weights. Otherwise q_sj ∝ exp(tilt · (a_sj,0 − μ_s,0)/σ_s,0): the weights favour
    a push of the mean along the first action dimension (a peaked E-step for large tilt).
    """
    g = torch.Generator().manual_seed(seed)
    dtype = next(actor.parameters()).dtype
    obs = torch.randn(B, actor.obs_dim, generator=g, dtype=dtype)
    with torch.no_grad():
        mean_old, tril_old = actor(obs)
        actions = actor.act(obs.expand(K, B, actor.obs_dim), deterministic=False, generator=g).transpose(0, 1)
        z0 = (actions[..., 0] - mean_old[:, None, 0]) / tril_old[:, None, 0, 0]
        weights = torch.softmax(tilt * z0, dim=1)
    return obs, actions.contiguous(), weights, mean_old, tril_old


def small_actor(covariance: str, seed: int = 0, obs_dim: int = 8, act_dim: int = 2) -> GaussianActor:
    torch.manual_seed(seed)
    return GaussianActor(obs_dim, act_dim, hidden=(64, 64), covariance=covariance)


def run_mstep(
    actor: GaussianActor,
    batch: tuple[torch.Tensor, ...],
    iters: int,
    lr: float,
    alpha: tuple[float, float] = (0.0, 0.0),
    project: tuple[float, float, float] | None = None,
) -> list[tuple[float, float, float, float]]:
    """``iters`` M-step iterations on one batch, as the learner runs them (§6.1 step 3).

    project = (step_mu, step_sigma, alpha_max) turns on the projected α update; otherwise α is fixed.
    Returns (post-step C_μ, post-step C_Σ, α_μ, α_Σ) per iteration.
    """
    obs, actions, weights, mean_old, tril_old = batch
    alpha_mu, alpha_sigma = alpha
    opt = torch.optim.Adam(actor.parameters(), lr=lr)
    history = []
    for _ in range(iters):
        mean_new, tril_new = actor(obs)
        mle = weighted_mle(actions, weights, mean_old, tril_old, mean_new, tril_new)
        c_mu, c_sigma = gaussian_kl_terms(mean_old, tril_old, mean_new, tril_new)
        if project is not None:
            step_mu, step_sigma, alpha_max = project
            alpha_mu = project_multiplier(alpha_mu, float(c_mu.detach()), EPS_MU, step_mu, alpha_max)
            alpha_sigma = project_multiplier(alpha_sigma, float(c_sigma.detach()), EPS_SIGMA, step_sigma, alpha_max)
        loss = mstep_loss(mle, c_mu, c_sigma, alpha_mu, alpha_sigma, EPS_MU, EPS_SIGMA)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            post_mu, post_sigma = gaussian_kl_terms(mean_old, tril_old, *actor(obs))
        history.append((float(post_mu), float(post_sigma), alpha_mu, alpha_sigma))
    return history


# --------------------------------------------------------------------------------------------------
# I10: KL terms
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 6])
def test_kl_terms_match_torch_full_covariance(d: int) -> None:
    g = torch.Generator().manual_seed(d)
    mean_old, tril_old, mean_new, tril_new = random_pair(g, 32, d)
    c_mu, c_sigma = gaussian_kl_terms(mean_old, tril_old, mean_new, tril_new)
    ref_mu = kl_divergence(mvn(mean_old, tril_old), mvn(mean_new, tril_old)).mean()
    ref_sigma = kl_divergence(mvn(mean_old, tril_old), mvn(mean_old, tril_new)).mean()
    torch.testing.assert_close(c_mu, ref_mu, rtol=1e-10, atol=0.0)
    torch.testing.assert_close(c_sigma, ref_sigma, rtol=1e-10, atol=0.0)
    assert c_mu.shape == c_sigma.shape == ()


def test_kl_terms_accept_leading_shape() -> None:
    g = torch.Generator().manual_seed(3)
    mean_old, tril_old, mean_new, tril_new = random_pair(g, 24, 3)
    flat = gaussian_kl_terms(mean_old, tril_old, mean_new, tril_new)
    shaped = gaussian_kl_terms(*(t.reshape(4, 6, *t.shape[1:]) for t in (mean_old, tril_old, mean_new, tril_new)))
    torch.testing.assert_close(shaped, flat, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("d", [1, 2, 6])
def test_kl_terms_diag_match_torch_and_full_path(d: int) -> None:
    g = torch.Generator().manual_seed(10 + d)
    mean_old, mean_new = torch.randn(2, 32, d, generator=g, dtype=F64)
    std_old, std_new = torch.exp(0.5 * torch.randn(2, 32, d, generator=g, dtype=F64))
    c_mu, c_sigma = gaussian_kl_terms_diag(mean_old, std_old, mean_new, std_new)

    def normal(mu: torch.Tensor, std: torch.Tensor) -> Independent:
        return Independent(Normal(mu, std), 1)

    ref_mu = kl_divergence(normal(mean_old, std_old), normal(mean_new, std_old)).mean()
    ref_sigma = kl_divergence(normal(mean_old, std_old), normal(mean_old, std_new)).mean()
    torch.testing.assert_close(c_mu, ref_mu, rtol=1e-10, atol=0.0)
    torch.testing.assert_close(c_sigma, ref_sigma, rtol=1e-10, atol=0.0)
    full = gaussian_kl_terms(mean_old, torch.diag_embed(std_old), mean_new, torch.diag_embed(std_new))
    torch.testing.assert_close((c_mu, c_sigma), full, rtol=1e-10, atol=0.0)


def test_kl_terms_nonnegative_and_zero_when_equal() -> None:
    g = torch.Generator().manual_seed(7)
    for trial in range(50):
        d = 1 + trial % 6
        scale = 10.0 ** (trial % 5 - 3)  # 1e-3 … 10
        mean_old, tril_old, mean_new, tril_new = random_pair(g, 16, d, scale)
        c_mu, c_sigma = gaussian_kl_terms(mean_old, tril_old, mean_new, tril_new)
        assert c_mu > 0.0 and c_sigma > 0.0
        same_mu, same_sigma = gaussian_kl_terms(mean_old, tril_old, mean_old.clone(), tril_old.clone())
        assert same_mu == 0.0
        assert abs(float(same_sigma)) < 1e-12
        std_old, std_new = tril_old.diagonal(dim1=-2, dim2=-1), tril_new.diagonal(dim1=-2, dim2=-1)
        d_mu, d_sigma = gaussian_kl_terms_diag(mean_old, std_old, mean_new, std_new)
        assert d_mu > 0.0 and d_sigma > 0.0
        assert gaussian_kl_terms_diag(mean_old, std_old, mean_old, std_old) == (0.0, 0.0)


@pytest.mark.parametrize("d", [2, 6])
def test_kl_terms_accurate_for_sharp_policies(d: int) -> None:
    """σ = 1e-2 in every dimension: det Σ = 1e-4d ≪ 1e-6, where a det-clamped formula breaks (P6)."""
    s_old, s_new, shift = 1e-2, 1.2e-2, 1e-3
    mean_old = torch.zeros(5, d, dtype=F64)
    mean_new = mean_old + shift
    tril_old = s_old * torch.eye(d, dtype=F64).expand(5, d, d)
    tril_new = s_new * torch.eye(d, dtype=F64).expand(5, d, d)
    c_mu, c_sigma = gaussian_kl_terms(mean_old, tril_old, mean_new, tril_new)
    r = s_old / s_new
    assert float(c_mu) == pytest.approx(0.5 * d * (shift / s_old) ** 2, rel=1e-12)
    assert float(c_sigma) == pytest.approx(0.5 * d * (r * r - 1.0 - 2.0 * math.log(r)), rel=1e-10)
    diag = gaussian_kl_terms_diag(
        mean_old, tril_old.diagonal(dim1=-2, dim2=-1), mean_new, tril_new.diagonal(dim1=-2, dim2=-1)
    )
    torch.testing.assert_close(diag, (c_mu, c_sigma), rtol=1e-10, atol=0.0)

    # Correlated sharp covariances against torch.distributions.
    g = torch.Generator().manual_seed(d)
    mean_old, tril_old, mean_new, tril_new = random_pair(g, 16, d, scale=1e-2)
    c_mu, c_sigma = gaussian_kl_terms(mean_old, tril_old, mean_new, tril_new)
    ref_mu = kl_divergence(mvn(mean_old, tril_old), mvn(mean_new, tril_old)).mean()
    ref_sigma = kl_divergence(mvn(mean_old, tril_old), mvn(mean_old, tril_new)).mean()
    torch.testing.assert_close((c_mu, c_sigma), (ref_mu, ref_sigma), rtol=1e-10, atol=0.0)
    # float32 stays accurate at this scale too (no det, no explicit inverse).
    f32 = gaussian_kl_terms(*(t.float() for t in (mean_old, tril_old, mean_new, tril_new)))
    torch.testing.assert_close(tuple(x.double() for x in f32), (c_mu, c_sigma), rtol=1e-4, atol=0.0)


def test_kl_terms_gradients_reach_new_statistics_only() -> None:
    g = torch.Generator().manual_seed(5)
    tensors = [t.requires_grad_() for t in random_pair(g, 8, 3)]
    mean_old, tril_old, mean_new, tril_new = tensors
    c_mu, c_sigma = gaussian_kl_terms(mean_old, tril_old, mean_new, tril_new)
    assert torch.autograd.grad(c_mu, [mean_new], retain_graph=True)[0].abs().sum() > 0
    assert torch.autograd.grad(c_sigma, [tril_new], retain_graph=True)[0].abs().sum() > 0
    (c_mu + c_sigma).backward()
    assert mean_old.grad is None and tril_old.grad is None  # π_old is a constant of the M-step (§3.1)
    assert tril_new.grad is not None and mean_new.grad is not None


def test_kl_terms_reject_bad_shapes() -> None:
    m, L = torch.zeros(4, 2), torch.eye(2).expand(4, 2, 2)
    with pytest.raises(ValueError):
        gaussian_kl_terms(m, L, m, torch.eye(3).expand(4, 3, 3))
    with pytest.raises(ValueError):
        gaussian_kl_terms_diag(m, torch.ones(4, 3), m, torch.ones(4, 2))


# --------------------------------------------------------------------------------------------------
# Weighted MLE (§3.1) and I11 decoupling
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 3])
def test_weighted_mle_matches_reference(d: int) -> None:
    g = torch.Generator().manual_seed(20 + d)
    B, K = 12, 7
    mean_old, tril_old, mean_new, tril_new = random_pair(g, B, d)
    actions = torch.randn(B, K, d, generator=g, dtype=F64)
    weights = torch.softmax(torch.randn(B, K, generator=g, dtype=F64), dim=1)
    # log N(a | μ_θ, Σ_o) and log N(a | μ_o, Σ_θ) from torch.distributions, (K, B) → (B, K)
    lp_mean = mvn(mean_new, tril_old).log_prob(actions.transpose(0, 1)).T
    lp_cov = mvn(mean_old, tril_new).log_prob(actions.transpose(0, 1)).T
    ref_mean = (weights * lp_mean).sum() / (K * B)
    ref_cov = (weights * lp_cov).sum() / (K * B)
    mean_term, cov_term = weighted_mle_terms(actions, weights, mean_old, tril_old, mean_new, tril_new)
    torch.testing.assert_close(mean_term, ref_mean, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(cov_term, ref_cov, rtol=1e-12, atol=0.0)
    total = weighted_mle(actions, weights, mean_old, tril_old, mean_new, tril_new)
    torch.testing.assert_close(total, ref_mean + ref_cov, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("d", [1, 3])
def test_weighted_mle_diag_equals_the_full_path_and_is_decoupled(d: int) -> None:
    """The learner's diagonal fast path gives the §3.1 value of weighted_mle with L = diag(σ), and I11."""
    g = torch.Generator().manual_seed(40 + d)
    B, K = 12, 7
    mean_old, mean_new = torch.randn(B, d, generator=g, dtype=F64), torch.randn(B, d, generator=g, dtype=F64)
    std_old = torch.rand(B, d, generator=g, dtype=F64) + 0.05
    std_new = (torch.rand(B, d, generator=g, dtype=F64) + 0.05).requires_grad_(True)
    mean_new.requires_grad_(True)
    actions = torch.randn(B, K, d, generator=g, dtype=F64)
    weights = torch.softmax(torch.randn(B, K, generator=g, dtype=F64), dim=1)
    full = weighted_mle(actions, weights, mean_old, torch.diag_embed(std_old), mean_new, torch.diag_embed(std_new))
    fast = weighted_mle_diag(actions, weights, mean_old, std_old, mean_new, std_new)
    torch.testing.assert_close(fast, full, rtol=1e-12, atol=0.0)
    g_full = torch.autograd.grad(full, (mean_new, std_new))
    g_fast = torch.autograd.grad(fast, (mean_new, std_new))
    for a, b in zip(g_fast, g_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    mean_term = weighted_mle_diag(actions, weights, mean_old, std_old, mean_new, std_old)
    assert torch.autograd.grad(mean_term, std_new, allow_unused=True)[0] is None
    with pytest.raises(ValueError):
        weighted_mle_diag(actions, weights[:, :3], mean_old, std_old, mean_new, std_new)


def test_weighted_mle_scales_as_one_over_k() -> None:
    """With Σ_j q_sj = 1, L_MLE is 1/K times the per-state expected log-likelihood (§3.1, P11)."""
    g = torch.Generator().manual_seed(4)
    mean_old, tril_old, mean_new, tril_new = random_pair(g, 6, 2)
    one = torch.randn(6, 1, 2, generator=g, dtype=F64)
    for K in (1, 8, 64):
        actions = one.expand(6, K, 2)
        weights = torch.full((6, K), 1.0 / K, dtype=F64)
        value = weighted_mle(actions, weights, mean_old, tril_old, mean_new, tril_new)
        base = weighted_mle(one, torch.ones(6, 1, dtype=F64), mean_old, tril_old, mean_new, tril_new)
        torch.testing.assert_close(value, base / K, rtol=1e-12, atol=0.0)


def test_weighted_mle_rejects_bad_shapes() -> None:
    m, L = torch.zeros(4, 2), torch.eye(2).expand(4, 2, 2)
    with pytest.raises(ValueError):
        weighted_mle(torch.zeros(4, 3, 2), torch.zeros(4, 4), m, L, m, L)
    with pytest.raises(ValueError):
        weighted_mle(torch.zeros(5, 3, 2), torch.zeros(5, 3), m, L, m, L)
    with pytest.raises(ValueError):
        weighted_mle(torch.zeros(4, 3, 2), torch.zeros(4, 3), m, L, m, torch.eye(3).expand(4, 3, 3))


def _grad_norms(actor: GaussianActor) -> dict[str, float]:
    norms = {}
    for name, module in (("mean", actor.mean_head), ("cov", actor.cov_head), ("trunk", actor.trunk)):
        grads = [p.grad for p in module.parameters()]
        norms[name] = sum(0.0 if gr is None else float(gr.abs().sum()) for gr in grads)
    return norms


@pytest.mark.parametrize("covariance", ["diag", "cholesky"])
def test_mle_terms_are_decoupled(covariance: str) -> None:
    """I11: mean term → no gradient on the covariance head; covariance term → none on the mean head."""
    actor = small_actor(covariance, act_dim=3)
    old = copy.deepcopy(actor)
    with torch.no_grad():  # make π_θ ≠ π_old so that both terms have non-zero gradients
        for p in actor.parameters():
            p.add_(0.05 * torch.randn_like(p))
    obs, actions, weights, mean_old, tril_old = make_batch(old, B=16, K=8, seed=1, tilt=1.0)

    mean_term, _ = weighted_mle_terms(actions, weights, mean_old, tril_old, *actor(obs))
    mean_term.backward()
    g_mean = _grad_norms(actor)
    assert g_mean["cov"] == 0.0
    assert g_mean["mean"] > 0.0 and g_mean["trunk"] > 0.0

    actor.zero_grad(set_to_none=True)
    _, cov_term = weighted_mle_terms(actions, weights, mean_old, tril_old, *actor(obs))
    cov_term.backward()
    g_cov = _grad_norms(actor)
    assert g_cov["mean"] == 0.0
    assert g_cov["cov"] > 0.0 and g_cov["trunk"] > 0.0

    # The same decoupling holds for the KL terms: C_μ sees only the mean, C_Σ only the covariance.
    actor.zero_grad(set_to_none=True)
    gaussian_kl_terms(mean_old, tril_old, *actor(obs))[0].backward()
    assert _grad_norms(actor)["cov"] == 0.0 and _grad_norms(actor)["mean"] > 0.0
    actor.zero_grad(set_to_none=True)
    gaussian_kl_terms(mean_old, tril_old, *actor(obs))[1].backward()
    assert _grad_norms(actor)["mean"] == 0.0 and _grad_norms(actor)["cov"] > 0.0


# --------------------------------------------------------------------------------------------------
# I12: multipliers
# --------------------------------------------------------------------------------------------------


def test_project_multiplier_rises_only_above_bound_and_stays_in_range() -> None:
    assert project_multiplier(0.3, 0.02, 0.01, 10.0, 1.0) == pytest.approx(0.4)
    assert project_multiplier(0.3, 0.005, 0.01, 10.0, 1.0) == pytest.approx(0.25)
    assert project_multiplier(0.3, 0.01, 0.01, 10.0, 1.0) == 0.3
    assert project_multiplier(0.0, 0.0, 0.01, 10.0, 1.0) == 0.0  # projected at 0, not negative (P12)
    assert project_multiplier(0.95, 1.0, 0.01, 10.0, 1.0) == 1.0  # projected at α_max
    assert project_multiplier(0.5, math.inf, 0.01, 10.0, 1.0) == 1.0
    assert project_multiplier(0.5, 3.0, 0.01, 0.0, 1.0) == 0.5
    with pytest.raises(ValueError):
        project_multiplier(0.5, math.nan, 0.01, 1.0, 1.0)
    with pytest.raises(ValueError):
        project_multiplier(0.5, 0.1, 0.01, -1.0, 1.0)

    g = torch.Generator().manual_seed(0)
    kls = (torch.rand(2000, generator=g, dtype=F64) * 0.02).tolist()
    alpha, alpha_max, eps = 0.0, 0.05, 0.01
    for kl in kls:
        new = project_multiplier(alpha, kl, eps, 1.0, alpha_max)
        assert 0.0 <= new <= alpha_max
        if new > alpha:
            assert kl > eps
        if new < alpha:
            assert kl < eps
        if 0.0 < alpha + (kl - eps) < alpha_max:
            assert new == pytest.approx(alpha + (kl - eps), abs=1e-15)
        alpha = new


def test_mstep_loss_formula() -> None:
    mle, c_mu, c_sigma = torch.tensor(-1.5), torch.tensor(0.02), torch.tensor(3e-3)
    loss = mstep_loss(mle, c_mu, c_sigma, 0.7, 20.0, 0.01, 1e-3)
    assert float(loss) == pytest.approx(1.5 + 0.7 * (0.02 - 0.01) + 20.0 * (3e-3 - 1e-3), rel=1e-6)


@pytest.mark.parametrize("covariance", ["diag", "cholesky"])
def test_larger_alpha_gives_smaller_post_step_kl(covariance: str) -> None:
    actor = small_actor(covariance)
    batch = make_batch(actor, B=64, K=32, seed=2, tilt=3.0)
    post = []
    for alpha in (0.0, 0.3, 3.0):
        history = run_mstep(copy.deepcopy(actor), batch, iters=10, lr=1e-3, alpha=(alpha, alpha))
        post.append(history[-1][:2])
    c_mu, c_sigma = zip(*post, strict=True)
    assert c_mu[0] > c_mu[1] > c_mu[2]
    assert c_sigma[0] > c_sigma[1] > c_sigma[2]
    assert c_mu[0] > 10 * c_mu[2] and c_sigma[0] > 10 * c_sigma[2]


@pytest.mark.parametrize("covariance", ["diag", "cholesky"])
def test_projected_multipliers_hold_kl_near_bounds(covariance: str) -> None:
    """Large α_max, 30 iterations on one batch: every post-step C_μ, C_Σ within 2× of ε_μ, ε_Σ."""
    actor = small_actor(covariance)
    batch = make_batch(actor, B=64, K=32, seed=2, tilt=3.0)
    free = run_mstep(copy.deepcopy(actor), batch, iters=30, lr=5e-4)
    held = run_mstep(copy.deepcopy(actor), batch, iters=30, lr=5e-4, project=(300.0, 3e4, 1e3))
    # Without multipliers the same M-step leaves both trust regions far behind ...
    assert free[-1][0] > 5 * EPS_MU and free[-1][1] > 50 * EPS_SIGMA
    # ... with them every post-step KL stays within ~2× of its bound.
    assert max(h[0] for h in held) < 2.0 * EPS_MU
    assert max(h[1] for h in held) < 2.0 * EPS_SIGMA
    # α moved off zero, never left [0, α_max], and the M-step still made progress on the mean.
    assert all(0.0 <= h[2] <= 1e3 and 0.0 <= h[3] <= 1e3 for h in held)
    assert max(h[2] for h in held) > 0.0 and max(h[3] for h in held) > 0.0
    assert max(h[0] for h in held) > 0.5 * EPS_MU


# --------------------------------------------------------------------------------------------------
# I13: fixed point
# --------------------------------------------------------------------------------------------------


def _relative_change(
    actor: GaussianActor, obs: torch.Tensor, mean_old: torch.Tensor, tril_old: torch.Tensor
) -> tuple[float, float]:
    """max |L_o⁻¹Δμ| and max |L_o⁻¹ΔL|: mean and scale changes relative to π_old's own scale."""
    with torch.no_grad():
        mean_new, tril_new = actor(obs)
        d_mu = torch.linalg.solve_triangular(tril_old, (mean_new - mean_old).unsqueeze(-1), upper=False)
        d_tril = torch.linalg.solve_triangular(tril_old, tril_new - tril_old, upper=False)
    return float(d_mu.abs().max()), float(d_tril.abs().max())


def _one_mstep_adam_step(actor: GaussianActor, batch: tuple[torch.Tensor, ...], lr: float) -> tuple[float, float]:
    obs, actions, weights, mean_old, tril_old = batch
    opt = torch.optim.Adam(actor.parameters(), lr=lr)
    mean_new, tril_new = actor(obs)
    mle = weighted_mle(actions, weights, mean_old, tril_old, mean_new, tril_new)
    c_mu, c_sigma = gaussian_kl_terms(mean_old, tril_old, mean_new, tril_new)
    mstep_loss(mle, c_mu, c_sigma, 0.0, 0.0, EPS_MU, EPS_SIGMA).backward()  # α = 0: no trust region
    opt.step()
    return _relative_change(actor, obs, mean_old, tril_old)


@pytest.mark.parametrize("covariance", ["diag", "cholesky"])
def test_fixed_point_uniform_weights(covariance: str) -> None:
    """I13: uniform weights on K = 4096 samples from π_old itself make π_old stationary for the M-step.

    A fresh Adam step moves every parameter by ≈ lr·sign(gradient) whatever the gradient's size, so the
    step alone cannot tell a stationary point from a non-stationary one. The samples are therefore made
    moment-exact (antithetic pairs, whitened per state: weighted mean μ_o and covariance Σ_o exactly), in
    float64. Then the gradient vanishes to rounding and one Adam step (lr 1e-3) moves μ and L by < 1e-6
    relative, while the same step with tilted weights moves them by > 1e-3 — any error in the MLE terms
    (a missing log-det, a wrong ½, L_o in place of L_oᵀ) shifts the stationary point and fails this.
    """
    torch.manual_seed(0)
    actor = GaussianActor(8, 3, hidden=(64, 64), covariance=covariance).double()
    with torch.no_grad():  # non-trivial π_old: non-zero mean, σ ≠ 1, sizeable correlations
        actor.mean_head.bias.fill_(0.3)
        actor.cov_head.bias[:3] = -0.5
        actor.cov_head.bias[3:] = 0.5
    B, K = 32, 4096
    g = torch.Generator().manual_seed(1)
    obs = torch.randn(B, 8, generator=g, dtype=F64)
    with torch.no_grad():
        mean_old, tril_old = actor(obs)
        half = torch.randn(B, K // 2, 3, generator=g, dtype=F64)
        z = torch.cat([half, -half], dim=1)  # antithetic: sample mean exactly 0
        chol = torch.linalg.cholesky(z.transpose(1, 2) @ z / K)
        z = torch.linalg.solve_triangular(chol, z.transpose(1, 2), upper=False).transpose(1, 2)  # cov = I
        actions = mean_old.unsqueeze(1) + (tril_old.unsqueeze(1) @ z.unsqueeze(-1)).squeeze(-1)
    uniform = torch.full((B, K), 1.0 / K, dtype=F64)
    tilted = torch.softmax(0.3 * z[..., 0], dim=1)

    # The gradient of L_MLE w.r.t. the policy outputs vanishes at π_old ...
    outputs = [mean_old.clone().requires_grad_(), tril_old.clone().requires_grad_()]
    grads = torch.autograd.grad(weighted_mle(actions, uniform, mean_old, tril_old, *outputs), outputs)
    tilted_grads = torch.autograd.grad(weighted_mle(actions, tilted, mean_old, tril_old, *outputs), outputs)
    for gr, tg in zip(grads, tilted_grads, strict=True):
        assert float(gr.abs().max()) < 1e-12 * float(tg.abs().max())

    # ... so one M-step Adam step leaves μ and σ where they are, unlike a non-stationary batch.
    d_mu, d_tril = _one_mstep_adam_step(copy.deepcopy(actor), (obs, actions, uniform, mean_old, tril_old), 1e-3)
    assert d_mu < 1e-6 and d_tril < 1e-6
    t_mu, t_tril = _one_mstep_adam_step(copy.deepcopy(actor), (obs, actions, tilted, mean_old, tril_old), 1e-3)
    assert t_mu > 1e-3 and t_tril > 1e-3


@pytest.mark.parametrize("covariance", ["diag", "cholesky"])
def test_fixed_point_iid_samples(covariance: str) -> None:
    """I13 as stated: K = 4096 i.i.d. samples from the actor, uniform weights, one M-step Adam step at
    moderate lr changes μ and σ by < 1e-2 relative; the output gradient is at the 1/√K sampling-noise
    level, far below that of a tilted batch.
    """
    actor = small_actor(covariance, obs_dim=8, act_dim=2)
    batch = make_batch(actor, B=64, K=4096, seed=3)
    _, actions, weights, mean_old, tril_old = batch
    tilted = make_batch(actor, B=64, K=4096, seed=3, tilt=1.0)[2]
    outputs = [mean_old.clone().requires_grad_(), tril_old.clone().requires_grad_()]
    grads = torch.autograd.grad(weighted_mle(actions, weights, mean_old, tril_old, *outputs), outputs)
    tilted_grads = torch.autograd.grad(weighted_mle(actions, tilted, mean_old, tril_old, *outputs), outputs)
    for gr, tg in zip(grads, tilted_grads, strict=True):
        assert float(gr.norm()) < 0.1 * float(tg.norm())
    d_mu, d_tril = _one_mstep_adam_step(copy.deepcopy(actor), batch, 5e-4)
    assert d_mu < 1e-2 and d_tril < 1e-2


# --------------------------------------------------------------------------------------------------
# I14: no mutation
# --------------------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().numpy().tobytes()


@pytest.mark.parametrize("covariance", ["diag", "cholesky"])
def test_mstep_never_mutates_inputs(covariance: str) -> None:
    actor = small_actor(covariance)
    old = copy.deepcopy(actor)
    obs, actions, weights, mean_old, tril_old = make_batch(old, B=16, K=8, seed=4, tilt=2.0)
    inputs = {"actions": actions, "weights": weights, "mean_old": mean_old, "tril_old": tril_old}
    std_old = tril_old.diagonal(dim1=-2, dim2=-1)  # a view into tril_old
    before = {k: (_bits(v), v._version) for k, v in inputs.items()}
    run_mstep(actor, (obs, actions, weights, mean_old, tril_old), iters=3, lr=1e-3, project=(1.0, 100.0, 10.0))
    mean_new, tril_new = actor(obs)
    gaussian_kl_terms_diag(mean_old, std_old, mean_new, tril_new.diagonal(dim1=-2, dim2=-1))[1].backward()
    weighted_mle_terms(actions, weights, mean_old, tril_old, *actor(obs))[1].backward()
    for k, v in inputs.items():
        assert (_bits(v), v._version) == before[k], k
    assert _bits(std_old) == _bits(tril_old.diagonal(dim1=-2, dim2=-1))
