"""Actor, ensemble critics and Polyak averaging (cvpo-algorithm.md §4.3, §5, §8.1 P10, §9 I16)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal

from cvpo.nets import ActorSnapshot, EnsembleCritic, GaussianActor, joint_forward, mlp, polyak_update

F64 = torch.float64


def make_actor(covariance: str = "diag", seed: int = 0, **kwargs: object) -> GaussianActor:
    torch.manual_seed(seed)
    return GaussianActor(5, 3, hidden=(32, 32), covariance=covariance, **kwargs)


# --------------------------------------------------------------------------------------------------
# mlp
# --------------------------------------------------------------------------------------------------


def test_mlp_structure_and_init() -> None:
    torch.manual_seed(0)
    net = mlp(4, (16, 8), 3)
    kinds = [type(m) for m in net]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in net if isinstance(m, nn.Linear)] == [
        (4, 16),
        (16, 8),
        (8, 3),
    ]
    assert net(torch.randn(7, 4)).shape == (7, 3)
    for m in net:
        if isinstance(m, nn.Linear):
            assert torch.count_nonzero(m.bias) == 0
            w = m.weight  # orthogonal rows or columns
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            torch.testing.assert_close(gram / gram[0, 0], torch.eye(gram.shape[0]), atol=1e-5, rtol=0)
    assert [type(m) for m in mlp(4, (6,), 2, activation=nn.Tanh)] == [nn.Linear, nn.Tanh, nn.Linear]
    assert [type(m) for m in mlp(4, (), 2)] == [nn.Linear]


# --------------------------------------------------------------------------------------------------
# GaussianActor
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("covariance", ["diag", "cholesky"])
def test_actor_shapes_and_cholesky_factor(covariance: str) -> None:
    actor = make_actor(covariance)
    obs = torch.randn(4, 6, 5)
    mean, tril = actor(obs)
    assert mean.shape == (4, 6, 3) and tril.shape == (4, 6, 3, 3)
    assert torch.equal(tril, torch.tril(tril))
    assert bool((tril.diagonal(dim1=-2, dim2=-1) > 0).all())
    strictly_lower = tril[..., 1:, :-1].tril()
    if covariance == "diag":
        assert torch.count_nonzero(strictly_lower) == 0
    else:
        assert bool((tril[..., 1, 0] != 0).all() and (tril[..., 2, 0] != 0).all() and (tril[..., 2, 1] != 0).all())
    # The same numbers for a flat batch (no cross-talk between leading dimensions).
    flat_mean, flat_tril = actor(obs.reshape(24, 5))
    torch.testing.assert_close(flat_mean, mean.reshape(24, 3))
    torch.testing.assert_close(flat_tril, tril.reshape(24, 3, 3))


def test_actor_cholesky_parameterisation() -> None:
    """diag L = exp(clamped log-std head); off-diagonals are the (clamped) raw head outputs (§5.1)."""
    actor = make_actor("cholesky")
    obs = torch.randn(10, 5)
    raw = actor.cov_head(actor.trunk(obs))
    _, tril = actor(obs)
    torch.testing.assert_close(tril.diagonal(dim1=-2, dim2=-1), raw[:, :3].exp())
    rows, cols = torch.tril_indices(3, 3, offset=-1)
    torch.testing.assert_close(tril[:, rows, cols], raw[:, 3:])
    assert actor.cov_head.out_features == 6 and make_actor("diag").cov_head.out_features == 3


@pytest.mark.parametrize("covariance", ["diag", "cholesky"])
def test_actor_bounds(covariance: str) -> None:
    actor = make_actor(covariance, log_std_bounds=(-5.0, 1.0))
    obs = torch.randn(8, 5)
    with torch.no_grad():
        actor.cov_head.bias.fill_(100.0)
        actor.mean_head.bias.fill_(100.0)
        mean, tril = actor(obs)
    torch.testing.assert_close(tril.diagonal(dim1=-2, dim2=-1), torch.full((8, 3), math.e))
    if covariance == "cholesky":
        assert float(tril[:, 1:, :-1].abs().max()) == pytest.approx(5.0)
    assert float(mean.min()) > 90.0  # unbounded mean by default (FSRL safety-gymnasium setting)
    with torch.no_grad():
        actor.cov_head.bias.fill_(-100.0)
    torch.testing.assert_close(actor(obs)[1].diagonal(dim1=-2, dim2=-1), torch.full((8, 3), math.exp(-5.0)))

    bounded = make_actor(covariance, mean_bound=0.5)
    with torch.no_grad():
        bounded.mean_head.bias.fill_(100.0)
        bounded_mean = bounded(obs)[0]
    assert bool((bounded_mean <= 0.5).all()) and float(bounded_mean.min()) == pytest.approx(0.5)
    torch.manual_seed(1)
    x = torch.randn(8, 5)
    b2 = make_actor(covariance, mean_bound=2.0)
    pre = b2.mean_head(b2.trunk(x))
    torch.testing.assert_close(b2(x)[0], 2.0 * torch.tanh(pre))


def test_actor_init_and_validation() -> None:
    actor = make_actor("cholesky")
    for m in actor.modules():
        if isinstance(m, nn.Linear):
            assert torch.count_nonzero(m.bias) == 0
    _, tril = actor(torch.zeros(1, 5))  # zero input → zero head outputs → σ = 1, no correlation
    torch.testing.assert_close(tril[0], torch.eye(3))
    with pytest.raises(ValueError):
        GaussianActor(5, 3, covariance="full")
    with pytest.raises(ValueError):
        GaussianActor(5, 3, log_std_bounds=(2.0, -20.0))
    with pytest.raises(ValueError):
        GaussianActor(5, 3, mean_bound=0.0)


@pytest.mark.parametrize("covariance", ["diag", "cholesky"])
def test_actor_distribution(covariance: str) -> None:
    actor = make_actor(covariance)
    obs = torch.randn(6, 5)
    dist = actor.distribution(obs)
    mean, tril = actor(obs)
    assert isinstance(dist, MultivariateNormal)
    torch.testing.assert_close(dist.mean, mean)
    torch.testing.assert_close(dist.scale_tril, tril)
    torch.testing.assert_close(dist.covariance_matrix, tril @ tril.transpose(-2, -1))


@pytest.mark.parametrize("covariance", ["diag", "cholesky"])
def test_act_deterministic_is_mean_and_sampling_is_reproducible(covariance: str) -> None:
    """I16: evaluation returns the mean; a seeded generator reproduces the stochastic action."""
    actor = make_actor(covariance)
    obs = torch.randn(9, 5)
    assert torch.equal(actor.act(obs, deterministic=True), actor(obs)[0])
    a1 = actor.act(obs, deterministic=False, generator=torch.Generator().manual_seed(42))
    a2 = actor.act(obs, deterministic=False, generator=torch.Generator().manual_seed(42))
    a3 = actor.act(obs, deterministic=False, generator=torch.Generator().manual_seed(43))
    assert a1.shape == (9, 3)
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, a3)
    assert not a1.requires_grad
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(actor.act(obs, False, g), actor.act(obs, False, g))  # the generator advances


@pytest.mark.parametrize("covariance", ["diag", "cholesky"])
def test_act_sample_is_raw_and_its_log_prob_is_consistent(covariance: str) -> None:
    """I16 / P10: samples are unclipped and unsquashed even with a bounded mean, and the log-probability
    of exactly that sample is finite and equals the Gaussian density with the returned L."""
    actor = make_actor(covariance, mean_bound=1.0)
    with torch.no_grad():
        actor.cov_head.bias[:3] = math.log(3.0)  # σ = 3 ≫ the [−1, 1] box
        if covariance == "cholesky":
            actor.cov_head.bias[3:] = 1.0
    obs = torch.randn(200, 5)
    action = actor.act(obs, deterministic=False, generator=torch.Generator().manual_seed(1))
    assert float(action.abs().max()) > 2.0
    mean, tril = actor(obs)
    log_prob = actor.distribution(obs).log_prob(action)
    assert bool(torch.isfinite(log_prob).all())
    z = torch.linalg.solve_triangular(tril, (action - mean).unsqueeze(-1), upper=False).squeeze(-1)
    manual = -0.5 * z.square().sum(-1) - tril.diagonal(dim1=-2, dim2=-1).log().sum(-1) - 1.5 * math.log(2 * math.pi)
    torch.testing.assert_close(log_prob, manual, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("covariance", ["diag", "cholesky"])
def test_act_samples_follow_the_distribution(covariance: str) -> None:
    actor = make_actor(covariance).double()
    with torch.no_grad():
        actor.cov_head.bias[:3] = torch.tensor([-1.0, 0.0, 0.5], dtype=F64)
        if covariance == "cholesky":
            actor.cov_head.bias[3:] = torch.tensor([0.8, -0.5, 0.3], dtype=F64)
        actor.mean_head.bias[:] = torch.tensor([0.2, -0.4, 1.0], dtype=F64)
    obs = torch.randn(1, 5, dtype=F64)
    n = 40_000
    samples = actor.act(obs.expand(n, 5), deterministic=False, generator=torch.Generator().manual_seed(5))
    mean, tril = actor(obs)
    cov = (tril @ tril.transpose(-2, -1))[0]
    emp_mean = samples.mean(0)
    emp_cov = torch.cov(samples.T)
    se = (cov.diagonal() / n).sqrt()
    assert bool(((emp_mean - mean[0]).abs() < 5 * se).all())
    scale = cov.diagonal().sqrt()
    torch.testing.assert_close(emp_cov / torch.outer(scale, scale), cov / torch.outer(scale, scale), atol=0.03, rtol=0)


@pytest.mark.parametrize("mean_bound", [None, 1.0])
def test_actor_snapshot_matches_the_actor_and_refreshes(mean_bound: float | None) -> None:
    """The collection fast path: NumPy float32 forward = torch forward to float32 rounding."""
    actor = make_actor("diag", mean_bound=mean_bound)
    snap = ActorSnapshot(actor)
    obs = torch.randn(20, 5) * 2
    mean, std = actor.mean_std(obs)
    _, tril = actor(obs)
    torch.testing.assert_close(std, tril.diagonal(dim1=-2, dim2=-1), rtol=0, atol=0)
    for i in range(obs.shape[0]):
        m, s = snap.mean_std(obs[i].numpy().astype(np.float64))
        assert m.dtype == np.float64 and s.shape == (3,)
        np.testing.assert_allclose(m, mean[i].detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s, std[i].detach().numpy(), rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(0.1)
    stale, _ = snap.mean_std(obs[0].numpy())
    snap.refresh()
    fresh, _ = snap.mean_std(obs[0].numpy())
    np.testing.assert_allclose(fresh, actor.mean_std(obs[:1])[0][0].detach().numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(stale, fresh)
    with pytest.raises(ValueError):
        ActorSnapshot(make_actor("cholesky"))
    with pytest.raises(ValueError):
        make_actor("cholesky").mean_std(obs)


# --------------------------------------------------------------------------------------------------
# EnsembleCritic
# --------------------------------------------------------------------------------------------------


def member_forward(critic: EnsembleCritic, i: int, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Member i as a plain MLP using its slice of the stacked weights: (N, o), (N, a) → (N,)."""
    h = torch.cat([obs, act], dim=-1)
    n_layers = len(critic.weights)
    for layer in range(n_layers):
        h = h @ critic.weights[layer][i] + critic.biases[layer][i, 0]
        if layer < n_layers - 1:
            h = torch.relu(h)
    return h.squeeze(-1)


def test_ensemble_shapes() -> None:
    torch.manual_seed(0)
    critic = EnsembleCritic(6, 2, 3, hidden=(16, 16))
    obs, act = torch.randn(10, 6), torch.randn(10, 2)
    assert critic(obs, act).shape == (3, 10)
    obs_k, act_k = torch.randn(10, 4, 6), torch.randn(10, 4, 2)
    assert critic(obs_k, act_k).shape == (3, 10, 4)
    # Broadcast leading shapes: one observation per state against K actions.
    broadcast = critic(obs.unsqueeze(1), act_k)
    explicit = critic(obs.unsqueeze(1).expand(10, 4, 6), act_k)
    torch.testing.assert_close(broadcast, explicit)
    # The E-step's call: (B, o) states against (K, B, a) samples, states broadcast over K.
    act_kb = torch.randn(4, 10, 2)
    torch.testing.assert_close(critic(obs, act_kb), critic(obs.expand(4, 10, 6), act_kb), rtol=1e-6, atol=1e-6)
    assert critic(obs, act_kb).shape == (3, 4, 10)
    assert EnsembleCritic(6, 2, 2, hidden=())(obs, act).shape == (2, 10)  # linear critics
    assert EnsembleCritic(6, 2, 1, hidden=(8,))(obs, act).shape == (1, 10)
    assert EnsembleCritic(6, 2, 0, hidden=(8,))(obs, act).shape == (0, 10)  # no constraints
    with pytest.raises(ValueError):
        EnsembleCritic(6, 2, -1)


def test_ensemble_members_match_plain_mlps_and_are_independent() -> None:
    torch.manual_seed(0)
    critic = EnsembleCritic(6, 2, 4, hidden=(32, 16))
    assert [tuple(w.shape) for w in critic.weights] == [(4, 8, 32), (4, 32, 16), (4, 16, 1)]
    assert [tuple(b.shape) for b in critic.biases] == [(4, 1, 32), (4, 1, 16), (4, 1, 1)]
    obs, act = torch.randn(50, 6), torch.randn(50, 2)
    q = critic(obs, act)
    for i in range(4):
        torch.testing.assert_close(q[i], member_forward(critic, i, obs, act), rtol=1e-5, atol=1e-6)
    # Independent initialisation: no two members share weights or outputs.
    for i in range(4):
        for j in range(i):
            assert not torch.allclose(critic.weights[0][i], critic.weights[0][j])
            assert float((q[i] - q[j]).detach().abs().max()) > 1e-3
    for b in critic.biases:
        assert torch.count_nonzero(b) == 0
    # A member's gradient stays in its own slice of the stacked weights.
    q[1].sum().backward()
    for w in critic.weights:
        assert torch.count_nonzero(w.grad[1]) > 0
        assert torch.count_nonzero(w.grad[[0, 2, 3]]) == 0


def test_joint_forward_equals_the_ensembles_and_routes_gradients() -> None:
    """The critic step's stacked forward: same values as each ensemble, gradients to each one's own weights."""
    torch.manual_seed(0)
    reward, cost = EnsembleCritic(6, 2, 2, hidden=(16, 16)), EnsembleCritic(6, 2, 1, hidden=(16, 16))
    obs, act = torch.randn(10, 6), torch.randn(10, 2)
    q = joint_forward((reward, cost), obs, act)
    torch.testing.assert_close(q, torch.cat([reward(obs, act), cost(obs, act)]), rtol=1e-5, atol=1e-6)
    q[2].sum().backward()
    assert all(w.grad is None or torch.count_nonzero(w.grad) == 0 for w in reward.weights)
    assert all(torch.count_nonzero(w.grad) > 0 for w in cost.weights)
    assert joint_forward((EnsembleCritic(6, 2, 0, hidden=(8,)),), obs, act).shape == (0, 10)


# --------------------------------------------------------------------------------------------------
# polyak_update
# --------------------------------------------------------------------------------------------------


def test_polyak_update_math() -> None:
    torch.manual_seed(0)
    source = EnsembleCritic(3, 2, 2, hidden=(8,))
    target = EnsembleCritic(3, 2, 2, hidden=(8,)).requires_grad_(False)
    t0 = [p.detach().clone() for p in target.parameters()]
    s0 = [p.detach().clone() for p in source.parameters()]
    polyak_update(target, source, 0.1)
    for t, a, b in zip(target.parameters(), t0, s0, strict=True):
        torch.testing.assert_close(t, 0.9 * a + 0.1 * b, rtol=1e-6, atol=1e-7)
        assert t.grad_fn is None and t.is_leaf
    for s, b in zip(source.parameters(), s0, strict=True):
        assert torch.equal(s.detach(), b)
    t1 = [p.detach().clone() for p in target.parameters()]
    polyak_update(target, source, 0.0)
    assert all(torch.equal(t, a) for t, a in zip(target.parameters(), t1, strict=True))
    polyak_update(target, source, 1.0)
    assert all(torch.equal(t, b) for t, b in zip(target.parameters(), s0, strict=True))


def test_polyak_update_on_actor_and_under_grad_mode() -> None:
    actor = make_actor("cholesky", seed=1)
    old = copy.deepcopy(actor).requires_grad_(False)
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(1.0)
    trainable = copy.deepcopy(actor)  # a target whose params still require grad
    polyak_update(old, actor, 0.25)
    polyak_update(trainable, old, 0.5)  # in-place on leaves that require grad: must not raise
    for p_old, p_new in zip(old.parameters(), actor.parameters(), strict=True):
        torch.testing.assert_close(p_new - p_old, torch.full_like(p_old, 0.75), rtol=0, atol=1e-5)
    assert all(p.requires_grad and p.is_leaf for p in trainable.parameters())
    with pytest.raises(ValueError):
        polyak_update(old, make_actor("diag"), 0.1)
    with pytest.raises(ValueError):
        polyak_update(old, actor, 1.5)


@pytest.mark.parametrize("covariance", ["diag", "cholesky"])
def test_the_actor_describes_itself_once_for_every_numpy_reader(covariance: str) -> None:
    """describe() → artefact tensors → ActorSpec round-trips, and its forward pieces match torch's."""
    from cvpo.actor_spec import ActorSpec

    torch.manual_seed(1)
    actor = GaussianActor(5, 3, (16, 8), covariance=covariance, log_std_bounds=(-5.0, 0.5), mean_bound=2.0)
    spec = actor.describe()
    back = ActorSpec.from_tensors(spec.tensors(), spec.architecture())
    assert back.architecture() == spec.architecture() and back.obs_dim == 5 and back.act_dim == 3
    for (w, b), (w2, b2) in zip(spec.trunk, back.trunk, strict=True):
        assert np.array_equal(w, w2) and np.array_equal(b, b2)
    obs = torch.randn(7, 5)
    with torch.no_grad():
        mean, tril = actor(obs)
    x = spec.astype(np.float64)
    h = obs.numpy().astype(np.float64)
    for w, b in x.trunk:
        h = np.maximum(h @ w + b, 0.0)
    np.testing.assert_allclose(x.bound_mean(h @ x.mean_w + x.mean_b), mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(x.scale_tril(h @ x.cov_w + x.cov_b), tril.numpy(), atol=1e-5)
