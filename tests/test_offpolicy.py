"""rl4llm.offpolicy against references written from the definitions, and exact expectations by enumeration."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl4llm import mdp as M
from rl4llm import offpolicy as O
from rl4llm.returns import reward_to_go


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _batch(seed, shape=(5, 6)):
    g = torch.Generator().manual_seed(seed)
    ratios = torch.rand(shape, generator=g) * 2.5
    rewards = torch.randn(shape, generator=g)
    return ratios, rewards


# ---------------------------------------------------------------------------------------------- references
def ref_per_decision(ratios, rewards, gamma):
    *_, T = rewards.shape
    out = torch.zeros_like(rewards)
    for t in range(T):
        for tp in range(t, T):
            w = torch.ones_like(rewards[..., 0])
            for k in range(tp + 1):
                w = w * ratios[..., k]
            out[..., t] += gamma**tp * rewards[..., tp] * w
    return out


def ref_vtrace(rewards, values, boot, ratios, gamma, rho_bar, c_bar, lam):
    T = rewards.shape[-1]
    nxt = torch.cat([values[..., 1:], boot[..., None]], -1)
    rho, c = ratios.clamp(max=rho_bar), lam * ratios.clamp(max=c_bar)
    delta = rho * (rewards + gamma * nxt - values)
    vs = values.clone()
    for s in range(T):
        for t in range(s, T):
            prod = torch.ones_like(boot)
            for i in range(s, t):
                prod = prod * c[..., i]
            vs[..., s] += gamma ** (t - s) * prod * delta[..., t]
    return vs


def ref_retrace(rewards, q, eq, ratios, gamma, lam, c_bar):
    T = rewards.shape[-1]
    c = lam * ratios.clamp(max=c_bar)
    delta = rewards + gamma * eq - q
    G = q.clone()
    for s in range(T):
        for t in range(s, T):
            prod = torch.ones_like(q[..., 0])
            for i in range(s + 1, t + 1):
                prod = prod * c[..., i]
            G[..., s] += gamma ** (t - s) * prod * delta[..., t]
    return G


# ---------------------------------------------------------------------------------------------- ratios
def test_importance_ratios_mask_and_zero_probability():
    lp_t = torch.tensor([[-1.0, -float("inf"), -0.5]])
    lp_b = torch.tensor([[-2.0, -1.0, -0.5]])
    r = O.importance_ratios(lp_t, lp_b, mask=torch.tensor([[1, 1, 0]]))
    assert torch.allclose(r, torch.tensor([[math.e, 0.0, 1.0]]))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 50), min_size=1, max_size=8), st.floats(0, 10))
def test_truncation_is_below_both(rs, clip):
    r = torch.tensor(rs)
    tr = O.truncated_ratios(r, clip)
    assert (tr <= r).all() and (tr <= clip).all()
    assert torch.equal(tr, r) or (tr == clip).any()


def test_cumulative_ratios_pads_with_one():
    r = torch.tensor([[2.0, 3.0, 5.0]])
    assert torch.equal(O.cumulative_ratios(r, mask=torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 6.0, 6.0]]))


# ---------------------------------------------------------------------------------------------- gradient weights
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_per_decision_weights_match_definition(gamma):
    ratios, rewards = _batch(0)
    got = O.per_decision_weights(ratios, rewards, gamma=gamma)
    assert torch.allclose(got, ref_per_decision(ratios, rewards, gamma))


def test_on_policy_per_decision_is_reward_to_go():
    _, rewards = _batch(1)
    ones = torch.ones_like(rewards)
    assert torch.allclose(O.per_decision_weights(ones, rewards, gamma=0.8), reward_to_go(rewards, 0.8))


def test_full_is_weights_and_masks():
    ratios, rewards = _batch(2, (3, 4))
    full = O.full_is_weights(ratios, rewards, gamma=0.9)
    G0 = (rewards * 0.9 ** torch.arange(4.0)).sum(-1)
    assert torch.allclose(full, (ratios.prod(-1) * G0)[:, None].expand(3, 4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    got = O.full_is_weights(ratios, rewards, gamma=0.9, mask=mask)
    short = O.full_is_weights(ratios[1:2, :2], rewards[1:2, :2], gamma=0.9)
    assert torch.allclose(got[1, :2], short[0]) and (got[1, 2:] == 0).all()
    got = O.per_decision_weights(ratios, rewards, mask=mask)
    assert torch.allclose(got[2, 0], ratios[2, 0] * rewards[2, 0]) and (got[2, 1:] == 0).all()


@pytest.mark.parametrize("which", ["full", "per_decision"])
def test_gradient_weights_are_unbiased_by_enumeration(which):
    """E_mu[sum_t c_t grad log pi(a_t|s_t)] = grad J(pi) exactly, over every trajectory of a small MDP."""
    mdp = M.random_mdp(3, 2, gamma=0.9, horizon=4, seed=3)
    g = torch.Generator().manual_seed(4)
    th_b = torch.randn(3, 2, generator=g)
    th = (th_b + torch.randn(3, 2, generator=g)).requires_grad_()
    pi, mu = M.softmax_policy(th.detach()), M.softmax_policy(th_b)
    traj = M.enumerate_trajectories(mdp, mu)
    rho = pi[traj.states, traj.actions] / mu[traj.states, traj.actions]
    fn = O.full_is_weights if which == "full" else O.per_decision_weights
    c = fn(rho, traj.rewards, gamma=0.9)
    est = torch.einsum("n,nt,ntsa->sa", traj.prob, c, M.tabular_score(pi, traj.states, traj.actions))
    (grad,) = torch.autograd.grad(M.objective(mdp, th), th)
    assert torch.allclose(est, grad, atol=1e-12)
    # the check can fail: weighting every reward by its own ratio only (a dropped past) is biased
    bad = torch.einsum("n,nt,ntsa->sa", traj.prob, reward_to_go(traj.rewards * rho, 0.9),
                       M.tabular_score(pi, traj.states, traj.actions))
    assert not torch.allclose(bad, grad, atol=1e-3)


# ---------------------------------------------------------------------------------------------- evaluation
def test_ope_estimators_exact_expectation():
    mdp = M.random_mdp(3, 2, gamma=0.9, horizon=4, seed=5)
    g = torch.Generator().manual_seed(6)
    mu, pi = M.softmax_policy(torch.randn(3, 2, generator=g)), M.softmax_policy(torch.randn(3, 2, generator=g))
    traj = M.enumerate_trajectories(mdp, mu)
    rho = pi[traj.states, traj.actions] / mu[traj.states, traj.actions]
    J = M.expected_return(mdp, pi)
    N = traj.n
    # each estimator on one episode (N = 1 batches), averaged with the exact probabilities
    for fn in (O.ordinary_is, O.per_decision_is):
        per_episode = fn(rho[:, None, :], traj.rewards[:, None, :], gamma=0.9)
        assert per_episode.shape == (N,)
        assert torch.allclose(traj.prob @ per_episode, J, atol=1e-12)
    # weighted IS of one episode is its return wherever the weight is positive: the behaviour's value
    w1 = O.weighted_is(rho[:, None, :], traj.rewards[:, None, :], gamma=0.9)
    assert torch.allclose(traj.prob @ w1, M.expected_return(mdp, mu), atol=1e-12)


def test_weighted_is_all_zero_weights_and_identity():
    rewards = torch.ones(2, 3, 4)
    assert torch.equal(O.weighted_is(torch.zeros(2, 3, 4), rewards), torch.zeros(2))
    ratios, rewards = _batch(7, (4, 3))
    W, G = ratios.prod(-1), rewards.sum(-1)
    assert torch.allclose(O.weighted_is(ratios, rewards), (W * G).sum() / W.sum())


def test_per_decision_equals_ordinary_with_a_final_reward_only():
    ratios, _ = _batch(8, (6, 5))
    rewards = torch.zeros(6, 5)
    rewards[:, -1] = torch.arange(6.0)
    assert torch.allclose(O.per_decision_is(ratios, rewards), O.ordinary_is(ratios, rewards))


# ---------------------------------------------------------------------------------------------- V-trace, Retrace
@pytest.mark.parametrize("rho_bar,c_bar,lam", [(1.0, 1.0, 1.0), (0.5, 2.0, 0.7), (math.inf, math.inf, 1.0)])
def test_vtrace_matches_definition(rho_bar, c_bar, lam):
    ratios, rewards = _batch(9, (3, 5))
    g = torch.Generator().manual_seed(10)
    values, boot = torch.randn(3, 5, generator=g), torch.randn(3, generator=g)
    vs, adv = O.vtrace_targets(rewards, values, boot, ratios, gamma=0.9, rho_bar=rho_bar, c_bar=c_bar, lam=lam)
    assert torch.allclose(vs, ref_vtrace(rewards, values, boot, ratios, 0.9, rho_bar, c_bar, lam))
    nxt = torch.cat([vs[:, 1:], boot[:, None]], -1)
    assert torch.allclose(adv, ratios.clamp(max=rho_bar) * (rewards + 0.9 * nxt - values))


def test_vtrace_on_policy_is_the_n_step_return():
    _, rewards = _batch(11, (2, 4))
    values, boot = torch.randn(2, 4), torch.randn(2)
    vs, _ = O.vtrace_targets(rewards, values, boot, torch.ones(2, 4), gamma=0.9)
    disc = 0.9 ** torch.arange(4.0)
    assert torch.allclose(vs[:, 0], (rewards * disc).sum(-1) + 0.9**4 * boot)


def test_vtrace_and_retrace_terminated_split_episodes():
    ratios, rewards = _batch(12, (1, 6))
    values, boot = torch.randn(1, 6), torch.randn(1)
    term = torch.tensor([[False, False, True, False, False, False]])
    vs, _ = O.vtrace_targets(rewards, values, boot, ratios, gamma=0.9, terminated=term)
    first, _ = O.vtrace_targets(rewards[:, :3], values[:, :3], torch.zeros(1), ratios[:, :3], gamma=0.9,
                                terminated=term[:, :3])
    second, _ = O.vtrace_targets(rewards[:, 3:], values[:, 3:], boot, ratios[:, 3:], gamma=0.9)
    assert torch.allclose(vs, torch.cat([first, second], -1))
    q, eq = torch.randn(1, 6), torch.randn(1, 6)
    G = O.retrace_targets(rewards, q, eq, ratios, gamma=0.9, terminated=term)
    G1 = O.retrace_targets(rewards[:, :3], q[:, :3], eq[:, :3], ratios[:, :3], gamma=0.9,
                           terminated=term[:, :3])
    G2 = O.retrace_targets(rewards[:, 3:], q[:, 3:], eq[:, 3:], ratios[:, 3:], gamma=0.9)
    assert torch.allclose(G, torch.cat([G1, G2], -1))


@pytest.mark.parametrize("lam,c_bar", [(1.0, 1.0), (0.5, 1.0), (1.0, math.inf), (0.0, 1.0)])
def test_retrace_matches_definition(lam, c_bar):
    ratios, rewards = _batch(13, (3, 5))
    g = torch.Generator().manual_seed(14)
    q, eq = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    got = O.retrace_targets(rewards, q, eq, ratios, gamma=0.95, lam=lam, c_bar=c_bar)
    assert torch.allclose(got, ref_retrace(rewards, q, eq, ratios, 0.95, lam, c_bar))


def test_vtrace_fixed_point_policy():
    mu = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    pi = torch.tensor([[0.2, 0.8], [0.3, 0.7]])
    assert torch.allclose(O.vtrace_fixed_point_policy(mu, pi, 100.0), pi)
    got = O.vtrace_fixed_point_policy(mu, pi, 1.0)
    assert torch.allclose(got, torch.tensor([[0.2 / 0.7, 0.5 / 0.7], [0.3 / 0.4, 0.1 / 0.4]]))


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_raises():
    ratios, rewards = _batch(15, (2, 3))
    with pytest.raises(ValueError, match="ratios must be >= 0"):
        O.per_decision_weights(-ratios, rewards)
    with pytest.raises(ValueError, match="NaN"):
        O.full_is_weights(ratios, rewards * float("nan"))
    with pytest.raises(ValueError, match="shape"):
        O.per_decision_weights(ratios[:, :2], rewards)
    with pytest.raises(ValueError, match="clip"):
        O.truncated_ratios(ratios, -1.0)
    with pytest.raises(TypeError, match="clip"):
        O.truncated_ratios(ratios, "1")
    with pytest.raises(ValueError, match="all zero"):
        O.full_is_weights(ratios, rewards, mask=torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="gamma"):
        O.per_decision_weights(ratios, rewards, gamma=1.5)
    with pytest.raises(ValueError, match=r"\[\.\.\., N, T\]"):
        O.ordinary_is(ratios[0], rewards[0])
    with pytest.raises(ValueError, match="lam"):
        O.retrace_targets(rewards, rewards, rewards, ratios, gamma=0.9, lam=1.5)
    with pytest.raises(ValueError, match="bootstrap_value"):
        O.vtrace_targets(rewards, rewards, torch.zeros(3), ratios, gamma=0.9)
    with pytest.raises(ValueError, match="inf"):
        O.cumulative_ratios(torch.tensor([1.0, math.inf]))
    with pytest.raises(ValueError, match="logp_behavior"):
        O.importance_ratios(torch.zeros(3), torch.tensor([0.0, -math.inf, 0.0]))
    with pytest.raises(TypeError, match="rewards"):
        O.full_is_weights(ratios, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="rho_bar"):
        O.vtrace_fixed_point_policy(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]), 0.0)
