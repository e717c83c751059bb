"""Tests for rl4llm.mdp: exact evaluation, the policy gradient theorem, enumeration and sampling."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl4llm.mdp import (
    TabularMDP,
    Trajectories,
    advantage,
    discounted_state_visitation,
    enumerate_trajectories,
    evaluate_policy,
    expected_return,
    induced_chain,
    objective,
    random_mdp,
    sample_trajectories,
    softmax_policy,
    tabular_score,
    trajectory_logprob_actions,
)

F64 = torch.float64
PROPERTY = settings(max_examples=20, deadline=None)


def logits_for(mdp: TabularMDP, seed: int = 0, scale: float = 1.0, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    theta = scale * torch.randn(mdp.n_states, mdp.n_actions, dtype=F64, generator=g)
    return theta.requires_grad_(requires_grad)


def small_mdp(**kw) -> TabularMDP:
    """A hand-written 2-state, 2-action MDP."""
    P = torch.tensor([[[0.9, 0.1], [0.2, 0.8]], [[0.5, 0.5], [0.0, 1.0]]], dtype=F64)
    R = torch.tensor([[1.0, 0.0], [-1.0, 2.0]], dtype=F64)
    p0 = torch.tensor([0.3, 0.7], dtype=F64)
    return TabularMDP(P, R, p0, **({"gamma": 0.9, "horizon": None} | kw))


# ----------------------------------------------------------------------------------------------------
# TabularMDP and random_mdp
# ----------------------------------------------------------------------------------------------------


def test_tabular_mdp_properties_and_coercion():
    mdp = small_mdp(gamma=1, horizon=3)
    assert (mdp.n_states, mdp.n_actions) == (2, 2)
    assert isinstance(mdp.gamma, float) and mdp.gamma == 1.0 and mdp.horizon == 3
    assert mdp.dtype == F64 and mdp.device == torch.device("cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        mdp.gamma = 0.5
    assert dataclasses.replace(mdp, horizon=5).horizon == 5
    with pytest.raises(ValueError, match="gamma must be < 1 when horizon is None"):
        dataclasses.replace(mdp, horizon=None)  # replace re-validates
    m32 = mdp.to(dtype=torch.float32)
    assert m32.P.dtype == m32.R.dtype == m32.p0.dtype == torch.float32
    back = m32.to(device="cpu", dtype=F64)  # rows re-normalised after the cast
    assert back.P.dtype == F64
    torch.testing.assert_close(back.P, mdp.P, rtol=0, atol=1e-7)


def _parts():
    m = small_mdp()
    return m.P.clone(), m.R.clone(), m.p0.clone()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda P, R, p0: (P[:, :, :1], R, p0), r"P must have shape \[S, A, S\]"),
        (lambda P, R, p0: (P[0], R, p0), r"P must have shape \[S, A, S\]"),
        (lambda P, R, p0: (P, R[:, :1], p0), r"R must have shape \[S, A\]"),
        (lambda P, R, p0: (P, R, p0[:1]), r"p0 must have shape \[S\]"),
        (lambda P, R, p0: (P * 1.01, R, p0), "rows of P .* must sum to 1"),
        (lambda P, R, p0: (P, R, p0 * 0.5), "p0 must sum to 1"),
        (lambda P, R, p0: (torch.where(P == 0.0, -0.1, P + 0.05), R, p0), "P must be nonnegative"),
        (lambda P, R, p0: (P, R, torch.tensor([1.5, -0.5], dtype=F64)), "p0 must be nonnegative"),
        (lambda P, R, p0: (P.clone().fill_(float("nan")), R, p0), "P must be finite"),
        (lambda P, R, p0: (P, R.clone().fill_(float("inf")), p0), "R must be finite"),
        (lambda P, R, p0: (P, R.float(), p0), "R must have the same dtype as P"),
        (lambda P, R, p0: (P.long(), R, p0), "P must have dtype float32 or float64"),
        (lambda P, R, p0: (P.tolist(), R, p0), "P must be a torch.Tensor"),
    ],
)
def test_tabular_mdp_rejects_bad_tensors(change, match):
    P, R, p0 = change(*_parts())
    with pytest.raises(ValueError, match=match):
        TabularMDP(P, R, p0, 0.9, None)


@pytest.mark.parametrize("gamma", [0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.9"])
def test_tabular_mdp_rejects_gamma_outside_unit_interval(gamma):
    with pytest.raises(ValueError, match=r"gamma must be"):
        small_mdp(gamma=gamma, horizon=3)


def test_tabular_mdp_requires_gamma_below_one_for_infinite_horizon():
    with pytest.raises(ValueError, match="gamma must be < 1 when horizon is None"):
        small_mdp(gamma=1.0, horizon=None)
    small_mdp(gamma=1.0, horizon=4)  # fine with a finite horizon


@pytest.mark.parametrize("horizon", [0, -2, 2.5, True])
def test_tabular_mdp_rejects_bad_horizon(horizon):
    with pytest.raises(ValueError, match="horizon must be None or an int >= 1"):
        small_mdp(horizon=horizon)


def test_row_tolerance_is_tight_in_float64_and_looser_in_float32():
    P, R, p0 = _parts()
    P[0, 0] += torch.tensor([1e-8, 0.0], dtype=F64)
    with pytest.raises(ValueError, match="rows of P"):
        TabularMDP(P, R, p0, 0.9)
    TabularMDP(P.float(), R.float(), p0.float(), 0.9)  # 1e-8 is below float32 resolution of the sum


def test_random_mdp_is_valid_and_reproducible():
    a = random_mdp(5, 3, gamma=0.8, seed=7, reward_scale=2.0)
    b = random_mdp(5, 3, gamma=0.8, seed=7, reward_scale=2.0)
    c = random_mdp(5, 3, gamma=0.8, seed=8, reward_scale=2.0)
    assert a.P.shape == (5, 3, 5) and a.R.shape == (5, 3) and a.p0.shape == (5,)
    assert torch.equal(a.P, b.P) and torch.equal(a.R, b.R) and torch.equal(a.p0, b.p0)
    assert not torch.equal(a.P, c.P)
    assert a.gamma == 0.8 and a.horizon is None and a.dtype == F64
    torch.testing.assert_close(a.P.sum(-1), torch.ones(5, 3, dtype=F64), rtol=0, atol=1e-12)
    assert random_mdp(5, 3, seed=7, reward_scale=0.0).R.abs().max() == 0
    f = random_mdp(5, 3, seed=7, dtype=torch.float32, device="cpu", horizon=4)
    assert f.dtype == torch.float32 and f.horizon == 4
    torch.testing.assert_close(f.P.double(), a.P, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_states": 0}, "n_states must be an int >= 1"),
        ({"n_actions": -1}, "n_actions must be an int >= 1"),
        ({"seed": -1}, "seed must be a non-negative int"),
        ({"reward_scale": -1.0}, "reward_scale must be"),
        ({"dtype": torch.float16}, "dtype must be torch.float32 or torch.float64"),
        ({"gamma": 1.0}, "gamma must be < 1 when horizon is None"),
        ({"gamma": 1.2, "horizon": 3}, r"gamma must be in \(0, 1\]"),
    ],
)
def test_random_mdp_rejects_bad_arguments(kwargs, match):
    args = {"n_states": 3, "n_actions": 2} | kwargs
    n_states, n_actions = args.pop("n_states"), args.pop("n_actions")
    with pytest.raises(ValueError, match=match):
        random_mdp(n_states, n_actions, **args)


# ----------------------------------------------------------------------------------------------------
# policies
# ----------------------------------------------------------------------------------------------------


def test_softmax_policy_is_a_stable_differentiable_distribution():
    logits = torch.tensor([[0.0, math.log(3.0)], [1000.0, 999.0], [0.0, float("-inf")]], dtype=F64,
                          requires_grad=True)
    pi = softmax_policy(logits)
    expected = torch.tensor([[0.25, 0.75], [1 / (1 + math.e**-1), 1 / (1 + math.e)], [1.0, 0.0]], dtype=F64)
    torch.testing.assert_close(pi, expected, rtol=0, atol=1e-15)
    pi[0, 1].backward()
    torch.testing.assert_close(logits.grad[0], torch.tensor([-0.1875, 0.1875], dtype=F64))


@pytest.mark.parametrize(
    ("logits", "match"),
    [
        (torch.zeros(3, dtype=F64), r"logits must have shape \[S, A\]"),
        (torch.zeros(2, 2, 2, dtype=F64), r"logits must have shape \[S, A\]"),
        (torch.zeros(2, 0, dtype=F64), r"logits must have shape \[S, A\]"),
        (torch.zeros(2, 2, dtype=torch.long), "logits must be a floating-point tensor"),
        (torch.tensor([[0.0, float("nan")]], dtype=F64), "logits must not contain NaN"),
        (torch.tensor([[float("-inf"), float("-inf")]], dtype=F64), "at least one finite entry"),
        ([[0.0, 1.0]], "logits must be a torch.Tensor"),
    ],
)
def test_softmax_policy_rejects_bad_logits(logits, match):
    with pytest.raises(ValueError, match=match):
        softmax_policy(logits)


def test_induced_chain_by_hand():
    mdp = small_mdp()
    pi = torch.tensor([[0.5, 0.5], [0.25, 0.75]], dtype=F64)
    P_pi, r_pi = induced_chain(mdp, pi)
    torch.testing.assert_close(P_pi, torch.tensor([[0.55, 0.45], [0.125, 0.875]], dtype=F64))
    torch.testing.assert_close(r_pi, torch.tensor([0.5, 1.25], dtype=F64))


@pytest.mark.parametrize(
    ("pi", "match"),
    [
        (torch.full((3, 2), 0.5, dtype=F64), r"pi must have shape \[S, A\] = \[2, 2\]"),
        (torch.full((2,), 0.5, dtype=F64), r"pi must have shape \[S, A\] = \[2, 2\]"),
        (torch.full((2, 2), 0.4, dtype=F64), "rows of pi .* must sum to 1"),
        (torch.tensor([[1.5, -0.5], [0.5, 0.5]], dtype=F64), "pi must be nonnegative"),
        (torch.ones(2, 2, dtype=torch.long), "pi must be a floating-point tensor"),
        (torch.full((2, 2), 0.5, dtype=F64, device="meta"), "pi is on meta but the MDP is on cpu"),
        ([[0.5, 0.5], [0.5, 0.5]], "pi must be a torch.Tensor"),
    ],
)
@pytest.mark.parametrize(
    "call",
    [induced_chain, evaluate_policy, advantage, expected_return, discounted_state_visitation,
     lambda m, p: enumerate_trajectories(m, p, 2), lambda m, p: sample_trajectories(m, p, 4, horizon=2)],
    ids=["induced_chain", "evaluate_policy", "advantage", "expected_return", "visitation", "enumerate",
         "sample"],
)
def test_policy_consumers_reject_bad_pi(call, pi, match):
    with pytest.raises(ValueError, match=match):
        call(small_mdp(), pi)


def test_functions_reject_a_non_mdp():
    pi = torch.full((2, 2), 0.5, dtype=F64)
    with pytest.raises(ValueError, match="mdp must be a TabularMDP"):
        evaluate_policy("not an mdp", pi)
    with pytest.raises(ValueError, match="mdp must be a TabularMDP"):
        objective(None, pi)


def test_float32_policy_is_evaluated_in_the_mdp_dtype_and_gradients_keep_their_dtype():
    mdp = random_mdp(3, 2, seed=3)
    theta = logits_for(mdp).float().requires_grad_()
    J = objective(mdp, theta)
    assert J.dtype == F64
    J.backward()
    assert theta.grad.dtype == torch.float32
    torch.testing.assert_close(J, objective(mdp, theta.detach().double()), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# exact evaluation (fact 2) and the objective
# ----------------------------------------------------------------------------------------------------


def test_infinite_horizon_values_satisfy_the_bellman_equations():
    mdp = random_mdp(6, 3, gamma=0.95, seed=11)
    pi = softmax_policy(logits_for(mdp, seed=1))
    V, Q = evaluate_policy(mdp, pi)
    assert V.shape == (6,) and Q.shape == (6, 3)
    P_pi, r_pi = induced_chain(mdp, pi)
    torch.testing.assert_close(V, r_pi + mdp.gamma * P_pi @ V, rtol=0, atol=1e-12)
    torch.testing.assert_close(Q, mdp.R + mdp.gamma * torch.einsum("sat,t->sa", mdp.P, V), rtol=0, atol=1e-12)
    torch.testing.assert_close((pi * Q).sum(-1), V, rtol=0, atol=1e-12)


def test_infinite_horizon_value_is_the_limit_of_long_finite_horizons():
    mdp = random_mdp(4, 2, gamma=0.9, seed=5)
    pi = softmax_policy(logits_for(mdp))
    V_inf, Q_inf = evaluate_policy(mdp, pi)
    T = 400
    V_T, Q_T = evaluate_policy(dataclasses.replace(mdp, horizon=T), pi)
    bound = mdp.gamma**T * mdp.R.abs().max() / (1 - mdp.gamma)
    assert (V_T[0] - V_inf).abs().max() <= bound + 1e-12
    assert (Q_T[0] - Q_inf).abs().max() <= bound + 1e-12


def test_finite_horizon_backward_induction_by_hand():
    mdp = small_mdp(gamma=0.5, horizon=2)
    pi = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)  # deterministic: a=0 in s=0, a=1 in s=1
    V, Q = evaluate_policy(mdp, pi)
    assert V.shape == (3, 2) and Q.shape == (2, 2, 2)
    torch.testing.assert_close(V[2], torch.zeros(2, dtype=F64))
    torch.testing.assert_close(Q[1], mdp.R)
    torch.testing.assert_close(V[1], torch.tensor([1.0, 2.0], dtype=F64))
    # Q[0][s, a] = R[s, a] + 0.5 * sum_s' P[s, a, s'] V[1][s']
    expected_Q0 = mdp.R + 0.5 * torch.tensor([[1.1, 1.8], [1.5, 2.0]], dtype=F64)
    torch.testing.assert_close(Q[0], expected_Q0)
    torch.testing.assert_close(V[0], torch.tensor([expected_Q0[0, 0], expected_Q0[1, 1]], dtype=F64))
    torch.testing.assert_close(expected_return(mdp, pi), mdp.p0 @ V[0])


def test_evaluate_policy_is_differentiable_in_pi():
    for horizon in (None, 3):
        mdp = random_mdp(3, 2, seed=2, horizon=horizon)
        theta = logits_for(mdp, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t, m=mdp: evaluate_policy(m, softmax_policy(t)), (theta,))
        assert torch.autograd.gradcheck(lambda t, m=mdp: objective(m, t), (theta,))


def test_objective_matches_expected_return_and_checks_its_logits():
    mdp = random_mdp(3, 4, seed=9)
    theta = logits_for(mdp)
    torch.testing.assert_close(objective(mdp, theta), expected_return(mdp, softmax_policy(theta)))
    assert objective(mdp, theta).shape == ()
    with pytest.raises(ValueError, match=r"logits must have shape \[S, A\] = \[3, 4\]"):
        objective(mdp, theta.T.contiguous())
    with pytest.raises(ValueError, match=r"logits must have shape \[S, A\]"):
        objective(mdp, theta[0])


def test_advantage_averages_to_zero_under_the_policy():
    for horizon, shape in ((None, (4, 3)), (5, (5, 4, 3))):
        mdp = random_mdp(4, 3, seed=4, horizon=horizon)
        pi = softmax_policy(logits_for(mdp, seed=4))
        A = advantage(mdp, pi)
        assert A.shape == shape
        torch.testing.assert_close((pi * A).sum(-1), torch.zeros(shape[:-1], dtype=F64), rtol=0, atol=1e-12)
        V, Q = evaluate_policy(mdp, pi)
        torch.testing.assert_close(A, Q - (V[:, None] if horizon is None else V[:-1, :, None]))


# ----------------------------------------------------------------------------------------------------
# state visitation
# ----------------------------------------------------------------------------------------------------


def test_discounted_visitation_infinite_horizon_matches_its_series():
    mdp = random_mdp(5, 2, gamma=0.8, seed=6)
    pi = softmax_policy(logits_for(mdp))
    d = discounted_state_visitation(mdp, pi)
    assert d.shape == (5,)
    torch.testing.assert_close(d.sum(), torch.tensor(1.0, dtype=F64), rtol=0, atol=1e-12)
    P_pi, r_pi = induced_chain(mdp, pi)
    series, mu = torch.zeros(5, dtype=F64), mdp.p0.clone()
    for t in range(300):
        series += (1 - mdp.gamma) * mdp.gamma**t * mu
        mu = mu @ P_pi
    torch.testing.assert_close(d, series, rtol=0, atol=1e-12)
    # J = E_{s ~ d}[r_pi(s)] / (1 - gamma)
    torch.testing.assert_close(expected_return(mdp, pi), d @ r_pi / (1 - mdp.gamma), rtol=0, atol=1e-12)


def test_state_marginals_finite_horizon_match_enumeration():
    mdp = random_mdp(3, 2, horizon=4, seed=8)
    pi = softmax_policy(logits_for(mdp))
    mu = discounted_state_visitation(mdp, pi)
    assert mu.shape == (4, 3)
    traj = enumerate_trajectories(mdp, pi)
    for t in range(4):
        marg = torch.zeros(3, dtype=F64).index_add_(0, traj.states[:, t], traj.prob)
        torch.testing.assert_close(mu[t], marg, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# the policy gradient theorem (fact 3)
# ----------------------------------------------------------------------------------------------------


def test_policy_gradient_theorem_infinite_horizon():
    mdp = random_mdp(5, 3, gamma=0.9, seed=12)
    theta = logits_for(mdp, seed=3, requires_grad=True)
    (grad_J,) = torch.autograd.grad(objective(mdp, theta), theta)

    pi = softmax_policy(theta)
    d = discounted_state_visitation(mdp, pi.detach())
    _, Q = evaluate_policy(mdp, pi.detach())
    # 1/(1-gamma) sum_s d(s) sum_a pi(a|s) grad log pi(a|s) Q(s, a), with the gradient taken by autograd
    surrogate = (d[:, None] * pi.detach() * torch.log_softmax(theta, -1) * Q).sum() / (1 - mdp.gamma)
    (grad_thm,) = torch.autograd.grad(surrogate, theta)
    torch.testing.assert_close(grad_J, grad_thm, rtol=0, atol=1e-12)
    # and for the tabular softmax the same in closed form: d(s) pi(a|s) A(s, a) / (1 - gamma)
    closed = d[:, None] * pi.detach() * advantage(mdp, pi.detach()) / (1 - mdp.gamma)
    torch.testing.assert_close(grad_J, closed, rtol=0, atol=1e-12)


def test_policy_gradient_theorem_finite_horizon():
    mdp = random_mdp(4, 3, gamma=0.7, horizon=6, seed=13)
    theta = logits_for(mdp, seed=5, requires_grad=True)
    (grad_J,) = torch.autograd.grad(objective(mdp, theta), theta)

    pi = softmax_policy(theta)
    mu = discounted_state_visitation(mdp, pi.detach())  # [T, S]
    _, Q = evaluate_policy(mdp, pi.detach())  # [T, S, A]
    disc = mdp.gamma ** torch.arange(6, dtype=F64)
    weight = disc[:, None, None] * mu[:, :, None] * pi.detach() * Q
    surrogate = (weight * torch.log_softmax(theta, -1)).sum()
    (grad_thm,) = torch.autograd.grad(surrogate, theta)
    torch.testing.assert_close(grad_J, grad_thm, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# enumeration (fact 1)
# ----------------------------------------------------------------------------------------------------


def test_enumeration_lists_every_trajectory_once_with_probabilities_summing_to_one():
    mdp = random_mdp(3, 2, horizon=3, seed=1)
    traj = enumerate_trajectories(mdp, softmax_policy(logits_for(mdp)))
    assert traj.n == 6**3 and traj.horizon == 3
    assert traj.states.dtype == traj.actions.dtype == torch.long and traj.rewards.dtype == F64
    codes = (traj.states * 2 + traj.actions) @ torch.tensor([36, 6, 1])
    assert torch.equal(codes, torch.arange(216))  # lexicographic, no repeats, none missing
    torch.testing.assert_close(traj.rewards, mdp.R[traj.states, traj.actions])
    torch.testing.assert_close(traj.prob.sum(), torch.tensor(1.0, dtype=F64), rtol=0, atol=1e-12)
    assert (traj.prob >= 0).all()


def test_enumeration_probability_of_one_trajectory_by_hand():
    mdp = small_mdp(horizon=2)
    pi = torch.tensor([[0.5, 0.5], [0.25, 0.75]], dtype=F64)
    traj = enumerate_trajectories(mdp, pi)
    # (s0=1, a0=0, s1=0, a1=1): p0(1) pi(0|1) P(0|1,0) pi(1|0)
    k = 1 * 8 + 0 * 4 + 0 * 2 + 1
    assert traj.states[k].tolist() == [1, 0] and traj.actions[k].tolist() == [0, 1]
    torch.testing.assert_close(traj.prob[k], torch.tensor(0.7 * 0.25 * 0.5 * 0.5, dtype=F64))
    # zero-probability trajectories are kept: P(0 | s=1, a=1) = 0
    k0 = 1 * 8 + 1 * 4 + 0 * 2 + 0
    assert traj.prob[k0] == 0


def test_finite_horizon_objective_equals_the_enumerated_expectation():
    mdp = random_mdp(3, 3, gamma=0.85, horizon=4, seed=21, reward_scale=3.0)
    theta = logits_for(mdp, seed=2, requires_grad=True)
    traj = enumerate_trajectories(mdp, softmax_policy(theta))
    J_enum = (traj.prob * traj.discounted_return(mdp.gamma)).sum()
    J = objective(mdp, theta)
    torch.testing.assert_close(J_enum, J, rtol=0, atol=1e-12)
    # autograd through the enumerated probabilities gives the exact gradient too ...
    (g_enum,) = torch.autograd.grad(J_enum, theta)
    (g,) = torch.autograd.grad(J, theta)
    torch.testing.assert_close(g_enum, g, rtol=0, atol=1e-12)
    # ... and so does the score-function identity grad J = E[G * sum_t grad log pi(a_t|s_t)]
    logp = trajectory_logprob_actions(theta, traj).sum(-1)
    surrogate = (traj.prob.detach() * traj.discounted_return(mdp.gamma) * logp).sum()
    (g_sf,) = torch.autograd.grad(surrogate, theta)
    torch.testing.assert_close(g_sf, g, rtol=0, atol=1e-12)


def test_enumeration_horizon_override_and_infinite_horizon_mdp():
    mdp = random_mdp(2, 2, gamma=0.9, seed=4)
    pi = softmax_policy(logits_for(mdp))
    with pytest.raises(ValueError, match="horizon is required"):
        enumerate_trajectories(mdp, pi)
    traj = enumerate_trajectories(mdp, pi, horizon=5)
    assert traj.states.shape == (4**5, 5)
    truncated = expected_return(dataclasses.replace(mdp, horizon=5), pi)
    torch.testing.assert_close((traj.prob * traj.discounted_return(mdp.gamma)).sum(), truncated,
                               rtol=0, atol=1e-12)
    assert enumerate_trajectories(dataclasses.replace(mdp, horizon=9), pi, 2).horizon == 2


def test_enumeration_refuses_too_many_trajectories():
    mdp = random_mdp(4, 4, horizon=6, seed=0)  # 16**6 = 16.7M
    pi = softmax_policy(logits_for(mdp))
    with pytest.raises(ValueError, match="exceeds max_trajectories=2000000"):
        enumerate_trajectories(mdp, pi)
    with pytest.raises(ValueError, match="exceeds max_trajectories=255"):
        enumerate_trajectories(mdp, pi, horizon=2, max_trajectories=255)
    assert enumerate_trajectories(mdp, pi, horizon=2, max_trajectories=256).n == 256
    with pytest.raises(ValueError, match="max_trajectories must be an int >= 1"):
        enumerate_trajectories(mdp, pi, horizon=2, max_trajectories=0)
    with pytest.raises(ValueError, match="horizon must be None or an int >= 1"):
        enumerate_trajectories(mdp, pi, horizon=0)


# ----------------------------------------------------------------------------------------------------
# sampling (fact 4)
# ----------------------------------------------------------------------------------------------------


def test_monte_carlo_return_converges_to_the_objective():
    mdp = random_mdp(4, 3, gamma=0.9, horizon=5, seed=31)
    theta = logits_for(mdp, seed=6)
    pi = softmax_policy(theta)
    gen = torch.Generator().manual_seed(1234)
    traj = sample_trajectories(mdp, pi, 200_000, generator=gen)
    G = traj.discounted_return(mdp.gamma)
    se = G.std() / math.sqrt(G.numel())
    assert abs(G.mean() - objective(mdp, theta)) < 5 * se


def test_sampled_trajectories_have_the_right_layout_and_are_reproducible():
    mdp = random_mdp(3, 2, horizon=4, seed=3)
    pi = softmax_policy(logits_for(mdp))
    a = sample_trajectories(mdp, pi, 50, generator=torch.Generator().manual_seed(0))
    b = sample_trajectories(mdp, pi, 50, generator=torch.Generator().manual_seed(0), device="cpu")
    assert a.prob is None and a.states.shape == a.actions.shape == a.rewards.shape == (50, 4)
    assert a.states.dtype == torch.long and a.rewards.dtype == F64
    assert torch.equal(a.states, b.states) and torch.equal(a.actions, b.actions)
    torch.testing.assert_close(a.rewards, mdp.R[a.states, a.actions])
    assert sample_trajectories(mdp, pi, 7, horizon=2).states.shape == (7, 2)  # global generator, override


def test_sampling_follows_the_dynamics_and_the_policy():
    # deterministic cycle 0 -> 1 -> 2 -> 0 under action 0, action 1 stays; the policy never takes action 1
    S = 3
    P = torch.zeros(S, 2, S, dtype=F64)
    P[torch.arange(S), 0, (torch.arange(S) + 1) % S] = 1.0
    P[torch.arange(S), 1, torch.arange(S)] = 1.0
    mdp = TabularMDP(P, torch.zeros(S, 2, dtype=F64), torch.tensor([0.2, 0.3, 0.5], dtype=F64), 0.9, 5)
    pi = torch.tensor([[1.0, 0.0]] * S, dtype=F64)
    traj = sample_trajectories(mdp, pi, 20_000, generator=torch.Generator().manual_seed(5))
    assert (traj.actions == 0).all()
    assert torch.equal(traj.states[:, 1:], (traj.states[:, :-1] + 1) % S)
    freq = torch.bincount(traj.states[:, 0], minlength=S).double() / traj.n
    torch.testing.assert_close(freq, mdp.p0, rtol=0, atol=0.02)


def test_sample_trajectories_rejects_bad_arguments():
    mdp = random_mdp(3, 2, seed=3)
    pi = softmax_policy(logits_for(mdp))
    for n in (0, -5, 2.0, True):
        with pytest.raises(ValueError, match="n must be an int >= 1"):
            sample_trajectories(mdp, pi, n, horizon=3)
    with pytest.raises(ValueError, match="horizon is required"):
        sample_trajectories(mdp, pi, 10)
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        sample_trajectories(mdp, pi, 10, horizon=3, generator=0)


# ----------------------------------------------------------------------------------------------------
# Trajectories and action log-probabilities
# ----------------------------------------------------------------------------------------------------


def test_trajectory_logprob_actions_matches_log_softmax_and_is_differentiable():
    mdp = random_mdp(3, 4, horizon=3, seed=2)
    theta = logits_for(mdp, scale=50.0, requires_grad=True)  # large logits: must stay finite
    gen = torch.Generator().manual_seed(1)
    traj = sample_trajectories(mdp, softmax_policy(theta.detach()), 64, generator=gen)
    lp = trajectory_logprob_actions(theta, traj)
    assert lp.shape == (64, 3) and torch.isfinite(lp).all()
    ref = torch.log_softmax(theta.detach(), -1)
    for n in range(3):
        for t in range(3):
            assert lp[n, t] == ref[traj.states[n, t], traj.actions[n, t]]
    lp.sum().backward()
    assert theta.grad is not None and torch.isfinite(theta.grad).all()


def test_trajectory_logprob_actions_rejects_bad_inputs():
    traj = Trajectories(torch.tensor([[0, 2]]), torch.tensor([[1, 0]]), torch.zeros(1, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"traj.states must lie in \[0, S\)"):
        trajectory_logprob_actions(torch.zeros(2, 2, dtype=F64), traj)
    with pytest.raises(ValueError, match=r"traj.actions must lie in \[0, A\)"):
        trajectory_logprob_actions(torch.zeros(3, 1, dtype=F64), traj)
    with pytest.raises(ValueError, match=r"logits must have shape \[S, A\]"):
        trajectory_logprob_actions(torch.zeros(3, dtype=F64), traj)
    with pytest.raises(ValueError, match="traj must be a Trajectories"):
        trajectory_logprob_actions(torch.zeros(3, 2, dtype=F64), (traj.states, traj.actions))


def test_trajectories_validation_and_discounted_return():
    s, a = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)
    r = torch.ones(2, 3, dtype=F64)
    traj = Trajectories(s, a, r)
    torch.testing.assert_close(traj.discounted_return(0.5), torch.full((2,), 1.75, dtype=F64))
    with pytest.raises(ValueError, match=r"gamma must be in \(0, 1\]"):
        traj.discounted_return(0.0)
    with pytest.raises(ValueError, match=r"states must have shape \[N, T\]"):
        Trajectories(s[0], a, r)
    with pytest.raises(ValueError, match=r"actions must have shape \[N, T\]"):
        Trajectories(s, a[:, :2], r)
    with pytest.raises(ValueError, match="states must have dtype torch.long"):
        Trajectories(s.int(), a, r)
    with pytest.raises(ValueError, match="rewards must be a floating-point tensor"):
        Trajectories(s, a, r.long())
    with pytest.raises(ValueError, match=r"prob must be None or a tensor of shape \[N\]"):
        Trajectories(s, a, r, torch.ones(3, dtype=F64))


# ----------------------------------------------------------------------------------------------------
# properties over random small MDPs
# ----------------------------------------------------------------------------------------------------

sizes = st.integers(1, 3)
seeds = st.integers(0, 2**31 - 1)
gammas = st.floats(0.05, 1.0)


@PROPERTY
@given(S=sizes, A=sizes, T=st.integers(1, 3), seed=seeds, gamma=gammas)
def test_property_enumeration_sums_to_one_and_reproduces_the_objective(S, A, T, seed, gamma):
    mdp = random_mdp(S, A, gamma=gamma, horizon=T, seed=seed)
    theta = logits_for(mdp, seed=seed, scale=2.0)
    traj = enumerate_trajectories(mdp, softmax_policy(theta))
    assert traj.n == (S * A) ** T
    torch.testing.assert_close(traj.prob.sum(), torch.tensor(1.0, dtype=F64), rtol=0, atol=1e-12)
    J_enum = (traj.prob * traj.discounted_return(gamma)).sum()
    torch.testing.assert_close(J_enum, objective(mdp, theta), rtol=0, atol=1e-12)


@PROPERTY
@given(S=st.integers(1, 6), A=sizes, seed=seeds, gamma=st.floats(0.05, 0.99))
def test_property_bellman_residual_vanishes_and_visitation_is_a_distribution(S, A, seed, gamma):
    mdp = random_mdp(S, A, gamma=gamma, seed=seed)
    pi = softmax_policy(logits_for(mdp, seed=seed, scale=3.0))
    V, Q = evaluate_policy(mdp, pi)
    P_pi, r_pi = induced_chain(mdp, pi)
    scale = 1 + r_pi.abs().max() / (1 - gamma)
    assert (V - r_pi - gamma * P_pi @ V).abs().max() <= 1e-11 * scale
    assert ((pi * Q).sum(-1) - V).abs().max() <= 1e-11 * scale
    d = discounted_state_visitation(mdp, pi)
    assert (d >= -1e-12).all() and abs(d.sum().item() - 1) < 1e-11


@PROPERTY
@given(S=sizes, A=sizes, T=st.integers(1, 4), seed=seeds, gamma=gammas)
def test_property_finite_horizon_policy_gradient_theorem(S, A, T, seed, gamma):
    mdp = random_mdp(S, A, gamma=gamma, horizon=T, seed=seed)
    theta = logits_for(mdp, seed=seed, requires_grad=True)
    (grad_J,) = torch.autograd.grad(objective(mdp, theta), theta)
    pi = softmax_policy(theta).detach()
    mu = discounted_state_visitation(mdp, pi)
    disc = gamma ** torch.arange(T, dtype=F64)
    closed = (disc[:, None, None] * mu[:, :, None] * pi * advantage(mdp, pi)).sum(0)
    torch.testing.assert_close(grad_J, closed, rtol=0, atol=1e-11)


# ----------------------------------------------------------------------------------------------------
# any device
# ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu():
    cpu = random_mdp(3, 2, horizon=3, seed=1)
    gpu = random_mdp(3, 2, horizon=3, seed=1, device="cuda")
    assert gpu.device.type == "cuda"
    theta = logits_for(cpu)
    torch.testing.assert_close(objective(gpu, theta.cuda()).cpu(), objective(cpu, theta), rtol=0, atol=1e-12)
    traj = enumerate_trajectories(gpu, softmax_policy(theta.cuda()))
    assert traj.prob.device.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    a = sample_trajectories(gpu, softmax_policy(theta.cuda()), 100, generator=gen)
    b = sample_trajectories(cpu, softmax_policy(theta), 100, generator=torch.Generator().manual_seed(0))
    assert a.states.device.type == "cuda" and torch.equal(a.states.cpu(), b.states)
    inf = random_mdp(3, 2, seed=1, device="cuda")
    V, _ = evaluate_policy(inf, softmax_policy(theta.cuda()))
    torch.testing.assert_close(V.cpu(), evaluate_policy(inf.to("cpu"), softmax_policy(theta))[0])


def test_tabular_score_matches_autograd_and_rejects_bad_input():
    mdp = random_mdp(3, 4, gamma=0.9, horizon=3, seed=5)
    logits = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    pi = softmax_policy(logits)
    traj = sample_trajectories(mdp, pi.detach(), 7, generator=torch.Generator().manual_seed(2))
    score = tabular_score(pi.detach(), traj.states, traj.actions)          # [7, 3, S, A]
    assert score.shape == (7, 3, 3, 4)
    logp = trajectory_logprob_actions(logits, traj)
    for n in range(7):
        for t in range(3):
            (g,) = torch.autograd.grad(logp[n, t], logits, retain_graph=True)
            torch.testing.assert_close(score[n, t], g, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="same shape"):
        tabular_score(pi.detach(), traj.states, traj.actions[:, :2])
    with pytest.raises(ValueError, match="actions must lie"):
        tabular_score(pi.detach(), traj.states, traj.actions + 4)
    with pytest.raises(ValueError, match="pi"):
        tabular_score(pi.detach()[0], traj.states, traj.actions)
