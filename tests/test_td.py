"""Tests for rl4llm.td: targets against references written from the definitions, the tabular estimators against
exact answers, the linear fixed points against their defining equations, and input validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl4llm import mdp as M
from rl4llm import td
from rl4llm.returns import discounted_returns

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(rtol=1e-10, atol=1e-10)


def random_mrp(S, seed, *, deterministic=False):
    g = torch.Generator().manual_seed(seed)
    if deterministic:
        P = torch.zeros(S, S, dtype=torch.float64)
        P[torch.arange(S), torch.randint(S, (S,), generator=g)] = 1.0
    else:
        P = torch.rand(S, S, generator=g, dtype=torch.float64) + 0.05
        P = P / P.sum(-1, keepdim=True)
    r = torch.randn(S, generator=g, dtype=torch.float64)
    return P, r, g


def stationary(P):
    evals, evecs = torch.linalg.eig(P.T)
    d = evecs[:, torch.argmin((evals - 1).abs())].real
    return d / d.sum()


def exact_v(P, r, gamma):
    return torch.linalg.solve(torch.eye(P.shape[0], dtype=P.dtype) - gamma * P, r)


# ----------------------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------------------


def test_td_targets_definition_and_stop_gradient():
    r = torch.tensor([1.0, 0.5, -1.0])
    nv = torch.tensor([2.0, 3.0, 4.0], requires_grad=True)
    term = torch.tensor([False, True, False])
    y = td.td_targets(r, nv, gamma=0.9, terminated=term)
    assert torch.allclose(y, torch.tensor([1 + 0.9 * 2, 0.5, -1 + 0.9 * 4]))
    assert not y.requires_grad


def test_td_targets_refuse_broadcast_and_nan():
    with pytest.raises(ValueError, match="next_values must have shape"):
        td.td_targets(torch.zeros(4), torch.zeros(4, 1), gamma=0.9)
    with pytest.raises(ValueError, match="finite"):
        td.td_targets(torch.tensor([float("nan")]), torch.zeros(1), gamma=0.9)
    with pytest.raises(ValueError, match="gamma"):
        td.td_targets(torch.zeros(1), torch.zeros(1), gamma=1.5)


def test_td_loss_semi_and_full_gradient():
    """Linear V(s) = w . phi(s): semi-gradient -delta phi(s); full gradient -delta (phi(s) - gamma phi(s'))."""
    g = torch.Generator().manual_seed(0)
    phi, phi2 = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    r = torch.randn(5, generator=g, dtype=torch.float64)
    w = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    gamma = 0.8
    delta = (r + gamma * phi2 @ w - phi @ w).detach()
    for semi, expected in ((True, -(delta[:, None] * phi).mean(0)),
                           (False, -(delta[:, None] * (phi - gamma * phi2)).mean(0))):
        (grad,) = torch.autograd.grad(td.td_loss(phi @ w, r, phi2 @ w, gamma=gamma, semi_gradient=semi), w)
        torch.testing.assert_close(grad, expected, **TOL)
    with pytest.raises(ValueError, match="mask selects no step"):
        td.td_loss(phi @ w, r, phi2 @ w, gamma=gamma, mask=torch.zeros(5, dtype=torch.bool))


def ref_n_step(r, v, nv, term, trunc, n, gamma):
    """One row from the definition: sum rewards until n steps or the episode's end, then bootstrap."""
    T = len(r)
    out = []
    for t in range(T):
        G, k = 0.0, 0
        u = t
        while True:
            G += gamma ** k * r[u]
            k += 1
            if term[u]:
                break
            if trunc[u] or k == n or u == T - 1:
                G += gamma ** k * nv[u]
                break
            u += 1
        out.append(G)
    return torch.tensor(out, dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 9), n=st.integers(1, 10), seed=st.integers(0, 10_000), gamma=st.floats(0.1, 1.0))
def test_n_step_targets_match_definition(T, n, seed, gamma):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(2, T, generator=g, dtype=torch.float64)
    v = torch.randn(2, T, generator=g, dtype=torch.float64)
    nv = torch.randn(2, T, generator=g, dtype=torch.float64)
    u = torch.rand(2, T, generator=g)
    term, trunc = u < 0.2, (u >= 0.2) & (u < 0.35)
    # inside an episode the next observation is the next step's: next_values[t] = values[t + 1]
    inside = ~(term | trunc)[:, :-1]
    nv[:, :-1] = torch.where(inside, v[:, 1:], nv[:, :-1])
    y = td.n_step_targets(r, v, nv, n=n, gamma=gamma, terminated=term, truncated=trunc)
    for b in range(2):
        torch.testing.assert_close(y[b], ref_n_step(r[b], v[b], nv[b], term[b], trunc[b], n, gamma), **TOL)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 8), seed=st.integers(0, 10_000), lam=st.floats(0.0, 1.0), gamma=st.floats(0.1, 1.0))
def test_lambda_targets_are_the_weighted_mixture_of_n_step_targets(T, seed, lam, gamma):
    """G^lambda = (1 - lam) sum_{n<m} lam^(n-1) G^(n) + lam^(m-1) G^(m) for an episode with m steps left."""
    g = torch.Generator().manual_seed(seed)
    r, v = torch.randn(T, generator=g, dtype=torch.float64), torch.randn(T, generator=g, dtype=torch.float64)
    term = torch.zeros(T, dtype=torch.bool)
    term[-1] = True
    y = td.lambda_targets(r, v, gamma=gamma, lam=lam, terminated=term)
    G = torch.stack([td.n_step_targets(r, v, n=n, gamma=gamma, terminated=term) for n in range(1, T + 1)])
    for t in range(T):
        m = T - t
        ref = sum((1 - lam) * lam ** (n - 1) * G[n - 1, t] for n in range(1, m)) + lam ** (m - 1) * G[m - 1, t]
        torch.testing.assert_close(y[t], torch.as_tensor(ref, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_limits_of_targets():
    g = torch.Generator().manual_seed(3)
    r, v = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    term = torch.zeros(3, 7, dtype=torch.bool)
    term[:, -1] = True
    nv = torch.cat([v[:, 1:], torch.zeros(3, 1, dtype=torch.float64)], -1)
    one = td.td_targets(r, nv, gamma=0.9, terminated=term)
    torch.testing.assert_close(td.n_step_targets(r, v, n=1, gamma=0.9, terminated=term), one, **TOL)
    torch.testing.assert_close(td.lambda_targets(r, v, gamma=0.9, lam=0.0, terminated=term), one, **TOL)
    mc = discounted_returns(r, 0.9)
    torch.testing.assert_close(td.n_step_targets(r, v, n=50, gamma=0.9, terminated=term), mc, **TOL)
    torch.testing.assert_close(td.lambda_targets(r, v, gamma=0.9, lam=1.0, terminated=term), mc, **TOL)


def test_target_validation():
    with pytest.raises(ValueError, match="lam"):
        td.lambda_targets(torch.zeros(3), torch.zeros(3), gamma=0.9, lam=1.2)
    with pytest.raises(ValueError, match="n must be"):
        td.n_step_targets(torch.zeros(3), torch.zeros(3), n=0, gamma=0.9)
    with pytest.raises(ValueError, match="both terminated and truncated"):
        td.n_step_targets(torch.zeros(3), torch.zeros(3), torch.zeros(3), n=2, gamma=0.9,
                          terminated=torch.tensor([1, 0, 0]), truncated=torch.tensor([1, 0, 0]))
    with pytest.raises(ValueError, match="bootstrap"):
        td.lambda_targets(torch.zeros(3), torch.zeros(3), gamma=0.9, lam=0.5, truncated=torch.tensor([0, 0, 1]))


# ----------------------------------------------------------------------------------------------------------
# tabular estimators
# ----------------------------------------------------------------------------------------------------------


def test_tabular_evaluate_one_episode_by_hand():
    """Two steps 0 -> 1 -> terminal, rewards 1, 2; TD(0) and MC updates computed by hand."""
    V0 = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
    s = torch.tensor([[[0, 1]]])
    s2 = torch.tensor([[[1, 2]]])
    r = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64)
    term = torch.tensor([[[False, True]]])
    a, gamma = 0.5, 0.9
    td0 = td.tabular_evaluate(V0, s, r, s2, gamma=gamma, alpha=a, lam=0.0, terminated=term)[-1, 0]
    exp = V0.clone()
    exp[0] += a * (1 + gamma * V0[1] - V0[0])
    exp[1] += a * (2 - V0[1])
    torch.testing.assert_close(td0, exp, **TOL)
    mc = td.tabular_evaluate(V0, s, r, s2, gamma=gamma, alpha=a, lam=1.0, terminated=term)[-1, 0]
    exp = V0.clone()
    exp[0] += a * (1 + gamma * 2 - V0[0])
    exp[1] += a * (2 - V0[1])
    torch.testing.assert_close(mc, exp, **TOL)
    n1 = td.tabular_evaluate(V0, s, r, s2, gamma=gamma, alpha=a, n=1, terminated=term)[-1, 0]
    torch.testing.assert_close(n1, td0, **TOL)


def _episodes(mdp, pi, R, E, T, seed, term_state):
    g = torch.Generator().manual_seed(seed)
    tr = M.sample_trajectories(mdp, pi, R * E, horizon=T + 1, generator=g)
    s = tr.states.view(R, E, T + 1)
    rew = tr.rewards.view(R, E, T + 1)[..., :T]
    return s[..., :T], rew, s[..., 1:], s[..., 1:] == term_state


def test_tabular_td_converges_to_exact_values_on_an_absorbing_chain():
    """An episodic MDP (state 3 absorbing, reward 0): TD(0) and MC with small steps end near the exact V."""
    mdp = M.random_mdp(4, 2, gamma=0.9, seed=1)
    P, Rw = mdp.P.clone(), mdp.R.clone()
    P[:, :, 3] += 0.3
    P = P / P.sum(-1, keepdim=True)
    P[3] = 0.0
    P[3, :, 3] = 1.0
    Rw[3] = 0.0
    mdp = M.TabularMDP(P, Rw, torch.tensor([1.0, 0, 0, 0], dtype=torch.float64), 0.9)
    pi = torch.full((4, 2), 0.5, dtype=torch.float64)
    mdp = M.TabularMDP(P, Rw, torch.full((4,), 0.25, dtype=torch.float64), 0.9)
    V, _ = M.evaluate_policy(mdp, pi)
    s, r, s2, _ = _episodes(mdp, pi, 64, 1000, 30, 0, 3)
    alive = s != 3
    term = (s2 == 3) & alive
    trunc = torch.zeros_like(term)
    trunc[..., -1] = alive[..., -1] & ~term[..., -1]  # the rare episode still running is cut: bootstrap
    for kw in (dict(lam=0.0), dict(lam=1.0), dict(n=3), dict(lam=0.7)):
        out = td.tabular_evaluate(torch.zeros(4, dtype=torch.float64), s, r, s2, gamma=0.9, alpha=0.05,
                                  terminated=term, truncated=trunc, mask=alive, **kw)
        err = (out[-50:].mean(0).mean(0) - V).abs().max()
        assert err < 0.05, (kw, err)


def test_tabular_evaluate_validation():
    V0 = torch.zeros(3)
    s = torch.zeros(1, 1, 2, dtype=torch.long)
    r = torch.zeros(1, 1, 2)
    with pytest.raises(ValueError, match="exactly one"):
        td.tabular_evaluate(V0, s, r, s, gamma=0.9, alpha=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        td.tabular_evaluate(V0, s, r, s, gamma=0.9, alpha=0.1, lam=0.5, n=2)
    with pytest.raises(ValueError, match="state indices in"):
        td.tabular_evaluate(V0, s + 5, r, s, gamma=0.9, alpha=0.1, lam=0.5)
    with pytest.raises(ValueError, match="alpha"):
        td.tabular_evaluate(V0, s, r, s, gamma=0.9, alpha=-1.0, lam=0.5)
    with pytest.raises(ValueError, match="lam"):
        td.tabular_evaluate(V0, s, r, s, gamma=0.9, alpha=0.1, lam=-0.1)


def batch_data(seed):
    """A small batch of episodes on states 0..3 that end by termination."""
    g = torch.Generator().manual_seed(seed)
    S, states, rewards, nexts, terms, rets = 4, [], [], [], [], []
    for _ in range(12):
        s, ep = int(torch.randint(2, (1,), generator=g)), []
        while True:
            rew = float(torch.randn(1, generator=g))
            if float(torch.rand(1, generator=g)) < 0.3:
                ep.append((s, rew, 0, True))
                break
            s2 = int(torch.randint(S, (1,), generator=g))
            ep.append((s, rew, s2, False))
            s = s2
        G = 0.0
        for s_, rew, s2, t in reversed(ep):
            G = rew + 0.9 * G
            rets.append(G)
            states.append(s_)
            rewards.append(rew)
            nexts.append(s2)
            terms.append(t)
    return (torch.tensor(states), torch.tensor(rewards, dtype=torch.float64), torch.tensor(nexts),
            torch.tensor(terms), torch.tensor(rets, dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_td0_is_certainty_equivalence_and_batch_mc_the_sample_means(seed):
    s, r, s2, term, G = batch_data(seed)
    ce = td.certainty_equivalence(s, r, s2, n_states=4, gamma=0.9, terminated=term)
    bt = td.batch_td0(s, r, s2, n_states=4, gamma=0.9, terminated=term)
    torch.testing.assert_close(bt, ce, rtol=1e-9, atol=1e-9, equal_nan=True)
    mc = td.batch_mc(s, G, n_states=4)
    for k in range(4):
        sel = s == k
        if sel.any():
            torch.testing.assert_close(mc[k], G[sel].mean(), **TOL)
    assert (mc - ce).abs().nan_to_num(0).max() > 1e-3


def test_certainty_equivalence_by_hand():
    # 0 -> 1 (r=1), 0 -> end (r=3), 1 -> end (r=2): V(1) = 2, V(0) = (1 + g*2 + 3) / 2
    s, s2 = torch.tensor([0, 0, 1]), torch.tensor([1, 0, 0])
    r, term = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64), torch.tensor([False, True, True])
    ce = td.certainty_equivalence(s, r, s2, n_states=3, gamma=0.5, terminated=term)
    torch.testing.assert_close(ce[:2], torch.tensor([(1 + 0.5 * 2 + 3) / 2, 2.0], dtype=torch.float64), **TOL)
    assert torch.isnan(ce[2])
    with pytest.raises(ValueError, match="never visited"):
        td.certainty_equivalence(torch.tensor([0]), r[:1], torch.tensor([2]), n_states=3, gamma=0.5)
    with pytest.raises(ValueError, match="singular"):
        td.certainty_equivalence(torch.tensor([0]), r[:1], torch.tensor([0]), n_states=1, gamma=1.0)


# ----------------------------------------------------------------------------------------------------------
# linear TD
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_td_fixed_point_is_the_projected_bellman_fixed_point_and_obeys_the_bound(seed):
    P, r, g = random_mrp(8, seed)
    Phi = torch.randn(8, 3, generator=g, dtype=torch.float64)
    d, gamma = stationary(P), 0.9
    theta = td.td_fixed_point(P, r, Phi, d, gamma=gamma)
    v = Phi @ theta
    Pi = td.projection(Phi, d)
    torch.testing.assert_close(Pi @ (r + gamma * P @ v), v, **TOL)
    assert float(td.mspbe(theta, P, r, Phi, d, gamma=gamma)) < 1e-20
    V = exact_v(P, r, gamma)
    err, best = td.msve(v, V, d).sqrt(), td.msve(Pi @ V, V, d).sqrt()
    assert best <= err <= best / (1 - gamma ** 2) ** 0.5 + 1e-12
    # lambda = 1: the projection of V^pi
    torch.testing.assert_close(Phi @ td.td_fixed_point(P, r, Phi, d, gamma=gamma, lam=1.0), Pi @ V, **TOL)
    # tabular features: V^pi itself
    torch.testing.assert_close(td.td_fixed_point(P, r, torch.eye(8, dtype=torch.float64), d, gamma=gamma), V, **TOL)


def test_semi_gradient_matrix_is_not_symmetric():
    P, r, g = random_mrp(5, 7)
    A, _ = td.td_matrices(P, r, torch.randn(5, 2, generator=g, dtype=torch.float64), stationary(P), gamma=0.9)
    assert (A - A.T).abs().max() > 1e-3


@pytest.mark.parametrize("seed", range(3))
def test_residual_gradient_fixed_point(seed):
    """Tabular features: single sampling misses V^pi on stochastic chains; double sampling and deterministic hit."""
    eye = torch.eye(6, dtype=torch.float64)
    P, r, _ = random_mrp(6, seed)
    d = torch.full((6,), 1 / 6, dtype=torch.float64)
    V = exact_v(P, r, 0.9)
    single = td.residual_gradient_fixed_point(P, r, eye, d, gamma=0.9)
    double = td.residual_gradient_fixed_point(P, r, eye, d, gamma=0.9, double_sampling=True)
    assert (single - V).abs().max() > 1e-3
    torch.testing.assert_close(double, V, **TOL)
    Pd, rd, _ = random_mrp(6, seed, deterministic=True)
    torch.testing.assert_close(td.residual_gradient_fixed_point(Pd, rd, eye, d, gamma=0.9), exact_v(Pd, rd, 0.9),
                               **TOL)


def test_baird_diverges_off_policy_and_not_on_policy():
    P, r, Phi, d = td.baird_counterexample(0.99)
    A, b = td.td_matrices(P, r, Phi, d, gamma=0.99)
    assert torch.linalg.eigvals(-A).real.max() > 0.2
    d_on = torch.zeros(7, dtype=torch.float64)
    d_on[6] = 1.0
    A_on, _ = td.td_matrices(P, r, Phi, d_on, gamma=0.99)
    assert torch.linalg.eigvals(-A_on).real.max() <= 1e-12


def test_sampled_linear_td_within_a_clt_band():
    P, r, g = random_mrp(5, 11)
    Phi = torch.randn(5, 2, generator=g, dtype=torch.float64)
    theta = td.td_fixed_point(P, r, Phi, stationary(P), gamma=0.8)
    _, avg = td.sample_linear_td(P, r, Phi, gamma=0.8, n_chains=256, n_steps=3000, generator=g)
    se = avg.std(0) / 256 ** 0.5
    assert ((avg.mean(0) - theta).abs() < 4 * se).all(), ((avg.mean(0) - theta), se)


def test_linear_validation():
    P, r, g = random_mrp(4, 0)
    Phi = torch.randn(4, 2, generator=g, dtype=torch.float64)
    d = torch.full((4,), 0.25, dtype=torch.float64)
    with pytest.raises(ValueError, match="stochastic"):
        td.td_matrices(2 * P, r, Phi, d, gamma=0.9)
    with pytest.raises(ValueError, match="distribution"):
        td.td_matrices(P, r, Phi, 2 * d, gamma=0.9)
    with pytest.raises(ValueError, match="lam"):
        td.td_matrices(P, r, Phi, d, gamma=0.9, lam=2.0)
    with pytest.raises(ValueError, match="Phi must have shape"):
        td.td_matrices(P, r, Phi[:3], d, gamma=0.9)
    with pytest.raises(ValueError, match="singular"):
        td.projection(torch.cat([Phi, Phi[:, :1]], 1), d)
    with pytest.raises(TypeError, match="double_sampling"):
        td.residual_gradient_fixed_point(P, r, Phi, d, gamma=0.9, double_sampling=1)
