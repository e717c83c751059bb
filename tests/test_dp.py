"""Tests for rl4llm.dp and rl4llm.token_mdp against references written from the definitions."""

from __future__ import annotations

import itertools
import math

import gymnasium as gym
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl4llm import dp
from rl4llm.mdp import TabularMDP, evaluate_policy, random_mdp, sample_trajectories
from rl4llm.token_mdp import token_tree

F64 = torch.float64
PROPERTY = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 10_000)


def random_policy(S, A, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(S, A, dtype=F64, generator=g), -1)


def random_v(S, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed + 7)
    return scale * torch.randn(S, dtype=F64, generator=g)


def ref_q(mdp, V):
    S, A = mdp.n_states, mdp.n_actions
    return torch.tensor([[float(mdp.R[s, a]) + mdp.gamma * sum(float(mdp.P[s, a, t]) * float(V[t])
                                                                 for t in range(S))
                          for a in range(A)] for s in range(S)], dtype=F64)


# ----------------------------------------------------------------------------------------------------
# operators against the definitions
# ----------------------------------------------------------------------------------------------------


def test_operators_match_the_definitions():
    mdp = random_mdp(4, 3, gamma=0.8, seed=1)
    pi, V = random_policy(4, 3, 2), random_v(4, 3)
    Q = ref_q(mdp, V)
    torch.testing.assert_close(dp.q_from_v(mdp, V), Q, rtol=0, atol=1e-12)
    ref_tpi = torch.tensor([sum(float(pi[s, a]) * float(Q[s, a]) for a in range(3)) for s in range(4)], dtype=F64)
    torch.testing.assert_close(dp.bellman_operator(mdp, pi, V), ref_tpi, rtol=0, atol=1e-12)
    torch.testing.assert_close(dp.bellman_optimality(mdp, V), torch.tensor([max(r) for r in Q.tolist()], dtype=F64),
                               rtol=0, atol=1e-12)
    Qin = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(dp.q_bellman_operator(mdp, pi, Qin), ref_q(mdp, (pi * Qin).sum(-1)), rtol=0, atol=1e-12)
    torch.testing.assert_close(dp.q_bellman_optimality(mdp, Qin), ref_q(mdp, Qin.max(-1).values), rtol=0, atol=1e-12)


def test_v_pi_is_the_fixed_point_of_t_pi():
    mdp = random_mdp(5, 2, gamma=0.9, seed=3)
    pi = random_policy(5, 2, 4)
    V, _ = evaluate_policy(mdp, pi)
    torch.testing.assert_close(dp.bellman_operator(mdp, pi, V), V, rtol=0, atol=1e-12)


@PROPERTY
@given(seed=seeds, gamma=st.floats(0.05, 0.99))
def test_t_star_and_t_pi_are_sup_norm_contractions(seed, gamma):
    mdp = random_mdp(5, 3, gamma=gamma, seed=seed)
    V1, V2, pi = random_v(5, seed), random_v(5, seed + 1), random_policy(5, 3, seed)
    d = float((V1 - V2).abs().max())
    assert float((dp.bellman_optimality(mdp, V1) - dp.bellman_optimality(mdp, V2)).abs().max()) <= gamma * d + 1e-12
    assert float((dp.bellman_operator(mdp, pi, V1) - dp.bellman_operator(mdp, pi, V2)).abs().max()) <= gamma * d + 1e-12


@PROPERTY
@given(f=st.lists(st.floats(-100, 100), min_size=1, max_size=6), seed=seeds)
def test_max_is_one_lipschitz_in_the_sup_norm(f, seed):
    f = torch.tensor(f, dtype=F64)
    g = f + torch.randn(f.shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
    assert abs(float(f.max() - g.max())) <= float((f - g).abs().max()) + 1e-12


@PROPERTY
@given(seed=seeds)
def test_auxiliary_lemma_t_pi_below_t_star_and_monotonicity(seed):
    mdp = random_mdp(4, 3, gamma=0.9, seed=seed)
    V, pi = random_v(4, seed), random_policy(4, 3, seed)
    assert bool((dp.bellman_operator(mdp, pi, V) <= dp.bellman_optimality(mdp, V) + 1e-12).all())
    U = V - torch.rand(4, dtype=F64, generator=torch.Generator().manual_seed(seed))  # U <= V
    assert bool((dp.bellman_optimality(mdp, U) <= dp.bellman_optimality(mdp, V) + 1e-12).all())
    assert bool((dp.bellman_operator(mdp, pi, U) <= dp.bellman_operator(mdp, pi, V) + 1e-12).all())


def test_t_pi_is_not_an_l2_contraction():
    P = torch.tensor([[[0.0, 1.0]], [[0.0, 1.0]]], dtype=F64)
    mdp = TabularMDP(P, torch.zeros(2, 1, dtype=F64), torch.tensor([1.0, 0.0], dtype=F64), 0.9)
    pi = torch.ones(2, 1, dtype=F64)
    x = torch.tensor([0.0, 1.0], dtype=F64)
    ratio = float(torch.linalg.norm(dp.bellman_operator(mdp, pi, x) - dp.bellman_operator(mdp, pi, 0 * x))
                  / torch.linalg.norm(x))
    assert ratio == pytest.approx(0.9 * math.sqrt(2), abs=1e-12) and ratio > 1


# ----------------------------------------------------------------------------------------------------
# greedy, brute force, value and policy iteration
# ----------------------------------------------------------------------------------------------------


def test_greedy_breaks_ties_to_the_lowest_index_and_checks_input():
    mdp = random_mdp(2, 3, gamma=0.5, seed=0)
    Q = torch.tensor([[1.0, 1.0 + 1e-15, 0.0], [0.0, 2.0, 2.0]], dtype=F64)
    assert dp.greedy(mdp, Q=Q).argmax(-1).tolist() == [0, 1]
    with pytest.raises(ValueError, match="exactly one of V"):
        dp.greedy(mdp)
    with pytest.raises(ValueError, match=r"V must have shape \[2\]"):
        dp.greedy(mdp, torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="V must be finite"):
        dp.bellman_optimality(mdp, torch.tensor([0.0, math.nan], dtype=F64))
    with pytest.raises(TypeError, match="mdp must be a TabularMDP"):
        dp.q_from_v("mdp", torch.zeros(2))
    with pytest.raises(ValueError, match="rows of pi"):
        dp.bellman_operator(mdp, torch.ones(2, 3, dtype=F64), torch.zeros(2, dtype=F64))


def ref_brute_force(mdp):
    """Loop over every deterministic policy, each solved on its own."""
    best = None
    for acts in itertools.product(range(mdp.n_actions), repeat=mdp.n_states):
        pi = dp.deterministic_policy(torch.tensor(acts), mdp.n_actions)
        V, _ = evaluate_policy(mdp, pi)
        best = V if best is None else torch.maximum(best, V)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_brute_force_vi_pi_agree_and_a_uniformly_optimal_policy_exists(seed):
    mdp = random_mdp(4, 3, gamma=0.9, seed=seed)
    bf = dp.brute_force(mdp)
    assert bf.actions.shape == (81, 4)
    torch.testing.assert_close(bf.V_max, ref_brute_force(mdp), rtol=0, atol=1e-12)
    assert bf.uniformly_optimal.numel() >= 1
    vi = dp.value_iteration(mdp, tol=1e-11)
    pi = dp.policy_iteration(mdp)
    assert float((vi.V - bf.V_max).abs().max()) <= 1e-11
    torch.testing.assert_close(pi.V, bf.V_max, rtol=0, atol=1e-12)
    assert 1 <= pi.n_iter <= 3**4
    # values along policy iteration never decrease
    assert bool((pi.values[1:] >= pi.values[:-1] - 1e-12).all())


@PROPERTY
@given(seed=seeds, gamma=st.floats(0.3, 0.97))
def test_value_iteration_error_bounds(seed, gamma):
    mdp = random_mdp(5, 3, gamma=gamma, seed=seed)
    V_star = dp.policy_iteration(mdp).V
    V0 = random_v(5, seed)
    vi = dp.value_iteration(mdp, V0=V0, n_iter=30)
    err = (vi.history - V_star).abs().amax(-1)
    k = torch.arange(31, dtype=F64)
    assert bool((err <= gamma**k * err[0] + 1e-10).all())                       # a-priori gamma^k bound
    steps = (vi.history[1:] - vi.history[:-1]).abs().amax(-1)
    assert bool((err[1:] <= gamma / (1 - gamma) * steps + 1e-10).all())          # a-posteriori bound
    assert vi.bound == pytest.approx(float(gamma / (1 - gamma) * steps[-1]))


def test_value_iteration_stops_when_its_bound_is_met():
    mdp = random_mdp(6, 2, gamma=0.95, seed=11)
    vi = dp.value_iteration(mdp, tol=1e-6)
    assert vi.bound <= 1e-6 and vi.history.shape == (vi.n_iter + 1, 6)
    prev = vi.history[-2] - vi.history[-3]
    assert 0.95 / 0.05 * float(prev.abs().max()) > 1e-6  # it did not stop late
    assert float((vi.V - dp.policy_iteration(mdp).V).abs().max()) <= 1e-6


@PROPERTY
@given(seed=seeds, gamma=st.floats(0.3, 0.97), eps=st.floats(1e-3, 2.0))
def test_greedy_loss_bound(seed, gamma, eps):
    mdp = random_mdp(5, 3, gamma=gamma, seed=seed)
    V_star = dp.policy_iteration(mdp).V
    e = torch.rand(5, dtype=F64, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    V = V_star + eps * e / e.abs().max()
    V_g, _ = evaluate_policy(mdp, dp.greedy(mdp, V))
    assert float((V_star - V_g).max()) <= 2 * gamma * eps / (1 - gamma) + 1e-10


def test_infinite_horizon_solvers_refuse_gamma_one_and_finite_horizons():
    mdp = random_mdp(3, 2, gamma=1.0, horizon=4, seed=0)
    for fn in (dp.value_iteration, dp.policy_iteration, dp.brute_force):
        with pytest.raises(ValueError, match="backward_induction"):
            fn(mdp)
    with pytest.raises(ValueError, match="tol must be"):
        dp.value_iteration(random_mdp(3, 2, seed=0), tol=0)
    with pytest.raises(ValueError, match="max_policies"):
        dp.brute_force(random_mdp(12, 4, seed=0))
    with pytest.raises(ValueError, match="deterministic"):
        dp.policy_iteration(random_mdp(3, 2, seed=0), pi0=torch.full((3, 2), 0.5, dtype=F64))


# ----------------------------------------------------------------------------------------------------
# finite horizons
# ----------------------------------------------------------------------------------------------------


def test_backward_induction_equals_the_best_nonstationary_policy_by_enumeration():
    mdp = random_mdp(2, 2, gamma=1.0, horizon=3, seed=4)
    V, pi = dp.backward_induction(mdp)
    assert V.shape == (4, 2) and pi.shape == (3, 2, 2)
    best = torch.full((2,), -math.inf, dtype=F64)
    for table in itertools.product(range(2), repeat=6):  # a[t][s] for t < 3, s < 2
        acts = torch.tensor(table).reshape(3, 2)
        W = torch.zeros(2, dtype=F64)
        for t in reversed(range(3)):
            W = torch.stack([mdp.R[s, acts[t, s]] + mdp.P[s, acts[t, s]] @ W for s in range(2)])
        best = torch.maximum(best, W)
    torch.testing.assert_close(V[0], best, rtol=0, atol=1e-12)
    # the greedy time-dependent policy attains it
    W = torch.zeros(2, dtype=F64)
    for t in reversed(range(3)):
        W = dp.bellman_operator(mdp, pi[t], W)
    torch.testing.assert_close(W, V[0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="horizon is required"):
        dp.backward_induction(random_mdp(2, 2, seed=0))


# ----------------------------------------------------------------------------------------------------
# gymnasium toy-text tables
# ----------------------------------------------------------------------------------------------------


def test_from_toy_text_frozenlake():
    env = gym.make("FrozenLake-v1")
    mdp = dp.from_toy_text(env, gamma=0.99)
    assert (mdp.n_states, mdp.n_actions) == (17, 4)
    table = env.unwrapped.P
    # expected rewards and redirected terminal transitions, from the table
    for s in range(16):
        for a in range(4):
            assert float(mdp.R[s, a]) == pytest.approx(sum(p * r for p, _, r, _ in table[s][a]))
            to_term = sum(p for p, _, _, d in table[s][a] if d)
            assert float(mdp.P[s, a, 16]) == pytest.approx(to_term)
    assert float(mdp.P[16, :, 16].min()) == 1.0 and float(mdp.R[16].abs().max()) == 0.0
    assert float(mdp.p0[0]) == 1.0
    # the value of success within the time limit is a probability
    V, _ = dp.backward_induction(dp.from_toy_text(env, gamma=1.0, horizon=100))
    assert 0.7 < float(V[0, 0]) <= 1.0
    env.close()


def test_from_toy_text_rollouts_match_exact_value():
    # Taxi is deterministic, so following the time-dependent optimal policy returns exactly V[0, s0]
    env = gym.make("Taxi-v4")
    mdp = dp.from_toy_text(env, gamma=1.0, horizon=200)
    V, pi = dp.backward_induction(mdp)
    acts = pi.argmax(-1)  # [T, S]
    for seed in range(10):
        obs, _ = env.reset(seed=seed)
        start, total, done, t = obs, 0.0, False, 0
        while not done:
            obs, r, term, trunc, _ = env.step(int(acts[t, obs]))
            total, done, t = total + r, term or trunc, t + 1
        assert term and total == pytest.approx(float(V[0, start]), abs=1e-9)
    env.close()


def test_from_toy_text_rejects_envs_without_a_table():
    with pytest.raises(ValueError, match="env.unwrapped.P"):
        dp.from_toy_text(gym.make("CartPole-v1"), gamma=0.9)


# ----------------------------------------------------------------------------------------------------
# the token tree
# ----------------------------------------------------------------------------------------------------


def reward_ab(y):
    return float(y == (0, 1, 2)) + 0.5 * float(y[:1] == (1,))


def test_token_tree_exact_value_equals_the_sum_over_responses():
    tree = token_tree(3, 3, eos=2, reward=reward_ab)
    assert len(tree.prefixes) == 1 + 2 + 4 and tree.terminal == 7
    responses = tree.responses()
    assert len(responses) == 1 + 2 + 4 + 8 and len(set(responses)) == len(responses)
    pi = random_policy(tree.mdp.n_states, 3, 0)
    total = sum(float(tree.response_prob(pi, y)) for y in responses)
    assert total == pytest.approx(1.0, abs=1e-12)
    brute = sum(float(tree.response_prob(pi, y)) * reward_ab(y) for y in responses)
    V, _ = evaluate_policy(tree.mdp, pi)
    assert float(V[0, 0]) == pytest.approx(brute, abs=1e-12)
    traj = sample_trajectories(tree.mdp, pi, 20_000, generator=torch.Generator().manual_seed(0))
    G = traj.rewards.sum(-1)
    assert abs(float(G.mean()) - brute) < 5 * float(G.std()) / math.sqrt(20_000)
    # the optimal value is the best response's reward, reached after L sweeps of T* and not before
    Vstar, _ = dp.backward_induction(tree.mdp)
    assert float(Vstar[0, 0]) == pytest.approx(max(reward_ab(y) for y in responses))


def test_token_tree_rejects_bad_input():
    with pytest.raises(ValueError, match="eos must be"):
        token_tree(3, 2, eos=3, reward=reward_ab)
    with pytest.raises(ValueError, match="n_tokens must be"):
        token_tree(1, 2, eos=0, reward=reward_ab)
    with pytest.raises(ValueError, match="not finite"):
        token_tree(2, 1, eos=1, reward=lambda y: math.nan)
    tree = token_tree(3, 2, eos=2, reward=reward_ab)
    pi = random_policy(tree.mdp.n_states, 3, 0)
    with pytest.raises(ValueError, match="not a complete response"):
        tree.response_prob(pi, (0,))
