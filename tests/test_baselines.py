"""Tests for rl4llm.baselines: batch means against loops, the optimal baseline against brute-force
minimisation, exact batch moments against enumeration, closed-form per-step scores against autograd, input
validation, and a short deterministic training run."""

from __future__ import annotations

import itertools

import gymnasium as gym
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl4llm import baselines as BL
from rl4llm import envs as EV
from rl4llm import mdp as M
from rl4llm import nets as NT
from rl4llm import pg
from rl4llm import returns as RT
from rl4llm.returns import discounted_returns

F64 = torch.float64
PROPERTY = settings(max_examples=25, deadline=None)


def randn(*shape, seed=0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------
# Batch means
# ----------------------------------------------------------------------------------------------------------


def test_batch_means_against_loops():
    R = randn(5, 3)
    loo = RT.leave_one_out_baseline(R, 0)
    full = RT.batch_mean_baseline(R, 0)
    for i in range(5):
        others = [R[j] for j in range(5) if j != i]
        assert torch.allclose(loo[i], torch.stack(others).mean(0), rtol=1e-12, atol=1e-12)
        assert torch.allclose(full[i], R.mean(0), rtol=1e-12, atol=1e-12)
    assert torch.allclose(RT.leave_one_out_baseline(R, 1), RT.leave_one_out_baseline(R.T, 0).T)
    assert torch.allclose(RT.leave_one_out_baseline(R, -1), RT.leave_one_out_baseline(R, 1))


@PROPERTY
@given(n=st.integers(2, 9), m=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_property_full_mean_is_a_rescaled_leave_one_out(n, m, seed):
    R = randn(n, m, seed=seed)
    lhs = R - RT.batch_mean_baseline(R, 0)
    rhs = (n - 1) / n * (R - RT.leave_one_out_baseline(R, 0))
    assert torch.allclose(lhs, rhs, rtol=1e-10, atol=1e-10)


@PROPERTY
@given(n=st.integers(2, 8), i=st.integers(0, 7), seed=st.integers(0, 10_000), bump=st.floats(-1e3, 1e3))
def test_property_leave_one_out_does_not_see_its_own_sample(n, i, seed, bump):
    i = i % n
    R = randn(n, 3, seed=seed)
    R2 = R.clone()
    R2[i] += bump
    assert torch.allclose(RT.leave_one_out_baseline(R, 0)[i], RT.leave_one_out_baseline(R2, 0)[i],
                          rtol=1e-9, atol=1e-9)


def test_masked_leave_one_out_and_full_mean():
    rewards = randn(6, 7, seed=1)
    mask = torch.rand(6, 7, generator=torch.Generator().manual_seed(2)) < 0.7
    mask[0, 0] = True
    mask[:, -1] = False
    mask[3, -1] = True                                       # a step only one row reaches: baseline 0 there
    ours = RT.leave_one_out_baseline(rewards, 0, mask=mask)
    assert ours[3, -1] == 0
    full = RT.batch_mean_baseline(rewards, 0, mask=mask.long())
    col = rewards[:, 2][mask[:, 2]]
    assert torch.allclose(full[:, 2], col.mean().expand(6))


def test_batch_mean_baselines_reject_bad_input():
    with pytest.raises(ValueError, match="at least 2 samples"):
        RT.leave_one_out_baseline(torch.ones(1, 4), 0)
    with pytest.raises(ValueError, match="returns contain NaN"):
        RT.leave_one_out_baseline(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="returns contain NaN"):
        RT.batch_mean_baseline(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="returns must be a floating-point"):
        RT.batch_mean_baseline(torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="returns must be a torch.Tensor"):
        RT.batch_mean_baseline([1.0, 2.0])
    with pytest.raises(ValueError, match="dim must be"):
        RT.leave_one_out_baseline(torch.ones(3, 2), 2)
    with pytest.raises(ValueError, match="mask must be a tensor of returns' shape"):
        RT.leave_one_out_baseline(torch.ones(3, 2), 0, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool"):
        RT.leave_one_out_baseline(torch.ones(3, 2), 0, mask=torch.full((3, 2), 2.0))


# ----------------------------------------------------------------------------------------------------------
# The optimal baseline
# ----------------------------------------------------------------------------------------------------------


def test_optimal_baseline_minimises_the_empirical_variance_per_coordinate():
    g = randn(50, 3, seed=3)
    R = 2.0 + randn(50, seed=4) + g[:, 0] ** 2            # R correlated with g_0^2
    b_star = BL.optimal_baseline(g**2, R)
    assert torch.allclose(b_star, ((g**2) * R[:, None]).sum(0) / (g**2).sum(0))
    grid = torch.linspace(-5, 10, 3001, dtype=F64)
    # second moment of g (R - b) per coordinate, minimised over the grid
    second = ((g[None] * (R[None, :, None] - grid[:, None, None])) ** 2).mean(1)   # [grid, 3]
    best = grid[second.argmin(0)]
    assert torch.allclose(best, b_star, atol=1e-2)
    assert not torch.allclose(b_star[0], R.mean(), atol=0.1)   # not the plain mean when g^2 and R correlate


def test_control_variate_coefficient_generalises_the_optimal_baseline():
    g = randn(20, 4, seed=5)
    R = randn(20, seed=6)
    w = torch.rand(20, dtype=F64, generator=torch.Generator().manual_seed(7))
    for weights in (None, w):
        for loo in (False, True):
            a = BL.optimal_baseline(g**2, R, weights=weights, leave_one_out=loo)
            b = BL.control_variate_coefficient(g * R[:, None], g, weights=weights, leave_one_out=loo)
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_leave_one_out_optimal_baseline_against_a_loop():
    g2 = randn(6, 3, seed=8) ** 2
    R = randn(6, seed=9)
    loo = BL.optimal_baseline(g2, R, leave_one_out=True)
    for i in range(6):
        keep = [j for j in range(6) if j != i]
        assert torch.allclose(loo[i], BL.optimal_baseline(g2[keep], R[keep]), rtol=1e-12, atol=1e-12)


def test_optimal_baseline_degenerate_coordinate_falls_back_to_the_mean():
    g2 = torch.tensor([[0.0, 1.0], [0.0, 4.0], [0.0, 0.0]], dtype=F64)
    R = torch.tensor([1.0, 2.0, 6.0], dtype=F64)
    assert torch.allclose(BL.optimal_baseline(g2, R), torch.tensor([3.0, 1.8], dtype=F64))
    cv = BL.control_variate_coefficient(torch.ones(3, 2, dtype=F64), torch.zeros(3, 2, dtype=F64))
    assert torch.equal(cv, torch.zeros(2, dtype=F64))


def test_optimal_baseline_rejects_bad_input():
    with pytest.raises(ValueError, match=r"returns must have shape \[N\] = \[3\]"):
        BL.optimal_baseline(torch.ones(3, 2), torch.ones(4))
    with pytest.raises(ValueError, match="returns contain NaN"):
        BL.optimal_baseline(torch.ones(2, 2), torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="grads_sq must be nonnegative"):
        BL.optimal_baseline(-torch.ones(3, 2), torch.ones(3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        BL.optimal_baseline(torch.ones(1, 2), torch.ones(1), leave_one_out=True)
    with pytest.raises(ValueError, match=r"weights must have shape \[N\]"):
        BL.optimal_baseline(torch.ones(3, 2), torch.ones(3), weights=torch.ones(2))
    with pytest.raises(ValueError, match="weights must be nonnegative"):
        BL.optimal_baseline(torch.ones(3, 2), torch.ones(3), weights=-torch.ones(3))
    with pytest.raises(ValueError, match="control must have target's shape"):
        BL.control_variate_coefficient(torch.ones(3, 2), torch.ones(3, 1))
    with pytest.raises(ValueError, match="at least 2 samples"):
        BL.control_variate_coefficient(torch.ones(1, 2), torch.ones(1, 2), leave_one_out=True)


# ----------------------------------------------------------------------------------------------------------
# Exact moments on enumerated problems
# ----------------------------------------------------------------------------------------------------------


def enumerated_terms(seed, S=2, A=2, T=2, gamma=0.9):
    mdp = M.random_mdp(S, A, gamma=gamma, horizon=T, seed=seed)
    logits = randn(S, A, seed=seed)
    pi = M.softmax_policy(logits)
    traj = M.enumerate_trajectories(mdp, pi)
    scores = M.tabular_score(pi, traj.states, traj.actions).flatten(-2)
    disc = gamma ** torch.arange(T, dtype=F64)
    X = (pg.pg_weights(traj.rewards, gamma)[..., None] * scores).sum(1)
    return mdp, logits, traj, X, disc[:, None] * scores, discounted_returns(traj.rewards, gamma)


def test_weighted_mean_var_by_hand_and_validation():
    x = torch.tensor([[1.0], [3.0]], dtype=F64)
    mean, var = BL.weighted_mean_var(x, torch.tensor([0.25, 0.75], dtype=F64))
    assert torch.allclose(mean, torch.tensor([2.5], dtype=F64))
    assert torch.allclose(var, torch.tensor([0.75], dtype=F64))
    with pytest.raises(ValueError, match="sums to 1"):
        BL.weighted_mean_var(x, torch.tensor([0.5, 0.6], dtype=F64))


@pytest.mark.parametrize("N", [2, 3])
def test_leave_one_out_batch_variance_matches_enumeration_of_all_batches(N):
    mdp, logits, traj, X, Y, G = enumerated_terms(seed=N)
    idx = torch.cartesian_prod(*[torch.arange(traj.n)] * N)
    prob = traj.prob[idx].prod(1)
    base = RT.leave_one_out_baseline(G[idx], 1)
    batch = (X[idx] - (base[..., None] * Y[idx]).sum(2)).mean(1)
    mean, var = BL.weighted_mean_var(batch, prob)
    logits = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(M.objective(mdp, logits), logits)
    assert torch.allclose(mean, grad.flatten(), rtol=1e-10, atol=1e-10)
    assert torch.allclose(var, BL.leave_one_out_batch_variance(traj.prob, X, Y, G, N), rtol=1e-10, atol=1e-12)
    full = RT.batch_mean_baseline(G[idx], 1)
    mean_full, _ = BL.weighted_mean_var((X[idx] - (full[..., None] * Y[idx]).sum(2)).mean(1), prob)
    assert torch.allclose(mean_full, (N - 1) / N * grad.flatten(), rtol=1e-10, atol=1e-10)


@PROPERTY
@given(seed=st.integers(0, 1000), S=st.integers(1, 3), T=st.integers(1, 3))
def test_property_optimal_coefficient_beats_every_constant(seed, S, T):
    _, _, traj, X, Y, _ = enumerated_terms(seed, S=S, A=2, T=T)
    Ysum = Y.sum(1)
    c = BL.control_variate_coefficient(X, Ysum, weights=traj.prob)
    v_star = BL.weighted_mean_var(X - c * Ysum, traj.prob)[1]
    for b in (-2.0, 0.0, 0.5, 3.0):
        v = BL.weighted_mean_var(X - b * Ysum, traj.prob)[1]
        # completed square: Var(b) = Var(b*) + E[Y^2] (b - b*)^2
        EY2 = (traj.prob[:, None] * Ysum**2).sum(0)
        assert torch.allclose(v, v_star + EY2 * (b - c) ** 2, rtol=1e-9, atol=1e-12)
        assert (v_star <= v + 1e-12).all()


def test_leave_one_out_batch_variance_rejects_bad_input():
    _, _, traj, X, Y, G = enumerated_terms(seed=0)
    with pytest.raises(ValueError, match="batch_size must be an int >= 2"):
        BL.leave_one_out_batch_variance(traj.prob, X, Y, G, 1)
    with pytest.raises(ValueError, match="control must have shape"):
        BL.leave_one_out_batch_variance(traj.prob, X, Y[:, :1], G, 2)
    with pytest.raises(ValueError, match="values must have shape"):
        BL.leave_one_out_batch_variance(traj.prob, X, Y, G[:3], 2)
    with pytest.raises(ValueError, match="mean zero"):
        BL.leave_one_out_batch_variance(traj.prob, X, Y + 1, G, 2)


# ----------------------------------------------------------------------------------------------------------
# Value network, per-step scores, training loop
# ----------------------------------------------------------------------------------------------------------


def test_value_net_starts_at_zero_and_fits_a_target():
    torch.manual_seed(0)
    v = NT.ValueNet(3, 16, scale=10.0, dtype=F64)
    obs = randn(40, 3, seed=11)
    assert torch.equal(v(obs), torch.zeros(40, dtype=F64))
    target = 10 * obs[:, 0] + 5
    mask = torch.ones(40, dtype=torch.bool)
    mask[-5:] = False
    opt = torch.optim.Adam(v.parameters(), lr=3e-2)
    first = BL.fit_value(v, opt, obs, target, mask, steps=1)
    last = BL.fit_value(v, opt, obs, target, mask, steps=60)
    assert last < 0.05 * first
    with pytest.raises(ValueError, match="obs must be a tensor of shape"):
        v(torch.ones(2, 4, dtype=F64))
    with pytest.raises(ValueError, match="scale must be"):
        NT.ValueNet(3, scale=0.0)
    with pytest.raises(ValueError, match="obs must have shape"):
        BL.fit_value(v, torch.optim.SGD(v.parameters(), lr=0.1), obs[:3], target, mask)
    with pytest.raises(ValueError, match="targets contain NaN"):
        BL.fit_value(v, torch.optim.SGD(v.parameters(), lr=0.1), obs, target * float("nan"), mask)
    with pytest.raises(ValueError, match="mask has no real step"):
        BL.fit_value(v, torch.optim.SGD(v.parameters(), lr=0.1), obs, target, torch.zeros(40) > 0)


@pytest.mark.parametrize("hidden", [(), 8, (6, 5)])
def test_per_step_scores_match_autograd(hidden):
    torch.manual_seed(1)
    policy = NT.PolicyNet(4, 3, hidden, dtype=F64)
    obs = randn(2, 5, 4, seed=12)
    actions = torch.randint(0, 3, (2, 5), generator=torch.Generator().manual_seed(13))
    scores = BL.per_step_scores(policy, obs, actions)
    params = list(policy.parameters())
    assert scores.shape == (2, 5, sum(p.numel() for p in params))
    for b, t in itertools.product(range(2), range(5)):
        g = torch.autograd.grad(policy.log_prob(obs[b, t], actions[b, t]), params)
        assert torch.allclose(scores[b, t], torch.cat([x.flatten() for x in g]), rtol=1e-10, atol=1e-12)


def test_per_step_scores_reject_bad_input():
    policy = NT.PolicyNet(4, 2, 8)
    with pytest.raises(ValueError, match="obs must be a tensor of shape"):
        BL.per_step_scores(policy, torch.ones(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="actions must be an integer tensor"):
        BL.per_step_scores(policy, torch.ones(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="actions must lie"):
        BL.per_step_scores(policy, torch.ones(3, 4), torch.full((3,), 2))
    with pytest.raises(ValueError, match="policy must be a PolicyNet"):
        BL.per_step_scores(torch.nn.Linear(4, 2), torch.ones(3, 4), torch.zeros(3, dtype=torch.long))


def test_reinforce_with_baseline_is_deterministic_and_records_all_variances():
    torch.set_default_dtype(torch.float32)
    kw = dict(num_envs=4, iterations=3, seed=3, device="cpu", value_steps=2)
    h1 = BL.reinforce_with_baseline("CartPole-v1", baseline="optimal", **kw)
    h2 = BL.reinforce_with_baseline("CartPole-v1", baseline="optimal", **kw)
    assert h1["mean_return"] == h2["mean_return"] and h1["grad_var"] == h2["grad_var"]
    assert set(h1["grad_var"]) == set(BL.BASELINES)
    assert all(len(v) == 3 for v in h1["grad_var"].values())
    assert h1["env_steps"][-1] == sum(4 * r for r in h1["mean_return"])   # CartPole: reward 1 per step
    # the first batch (before any update) is the one pg.reinforce collects with the same seed
    ref = pg.reinforce("CartPole-v1", num_envs=4, iterations=1, seed=3, device="cpu")
    assert h1["mean_return"][0] == ref["mean_return"][0]


def test_gradient_from_scores_equals_the_surrogate_gradient():
    torch.manual_seed(0)
    policy = NT.PolicyNet(4, 2, 16, dtype=F64)
    env = gym.make_vec("CartPole-v1", num_envs=4)
    batch = EV.collect_episodes(env, policy, generator=torch.Generator().manual_seed(0), seed=0)
    env.close()
    psi = pg.pg_weights(batch.rewards, 0.99, dones=batch.dones)
    surrogate = pg.reinforce_surrogate(policy.log_prob(batch.obs, batch.actions), psi, batch.mask)
    ref = torch.cat([g.flatten() for g in torch.autograd.grad(surrogate, list(policy.parameters()))])
    scores = BL.per_step_scores(policy, batch.obs, batch.actions) * batch.mask[..., None]
    ours = torch.einsum("bt,btp->p", psi * batch.mask, scores) / 4
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kwargs, match", [
    ({"baseline": "mean"}, "baseline must be one of"),
    ({"num_envs": 1}, "num_envs must be >= 2"),
    ({"iterations": 0}, "iterations must be a positive int"),
    ({"lr": -1.0}, "lr must be a positive"),
    ({"gamma": 1.5}, "gamma must be in"),
    ({"max_episode_steps": 0}, "max_episode_steps must be a positive int"),
])
def test_reinforce_with_baseline_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BL.reinforce_with_baseline("CartPole-v1", device="cpu", **kwargs)
