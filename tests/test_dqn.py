"""Tests of rl4llm.dqn against references written from the definitions (chapter 4)."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from rl4llm import dp
from rl4llm import dqn as D
from rl4llm.mdp import TabularMDP, random_mdp
from rl4llm.nets import QNet


def _batch(B=5, A=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, generator=g, dtype=torch.float64)
    qt = torch.randn(B, A, generator=g, dtype=torch.float64)
    qo = torch.randn(B, A, generator=g, dtype=torch.float64)
    term = torch.tensor([False, True, False, False, True])[:B]
    return r, qt, qo, term


def test_dqn_targets_plain_and_double_match_a_loop():
    r, qt, qo, term = _batch()
    y = D.dqn_targets(r, qt, term, 0.9)
    y2 = D.dqn_targets(r, qt, term, 0.9, next_q_online=qo)
    for i in range(5):
        keep = 0.0 if term[i] else 1.0
        assert y[i].item() == pytest.approx(r[i].item() + 0.9 * keep * max(qt[i].tolist()))
        j = int(np.argmax(qo[i].numpy()))
        assert y2[i].item() == pytest.approx(r[i].item() + 0.9 * keep * qt[i, j].item())
    assert not y.requires_grad


def test_double_target_never_exceeds_plain():
    r, qt, qo, term = _batch()
    assert bool((D.dqn_targets(r, qt, term, 0.99, next_q_online=qo) <= D.dqn_targets(r, qt, term, 0.99)).all())


def test_dqn_targets_refuse_bad_shapes_and_values():
    r, qt, qo, term = _batch()
    with pytest.raises(ValueError, match=r"rewards must have shape \[B\]"):
        D.dqn_targets(r[:, None], qt, term, 0.9)
    with pytest.raises(ValueError, match="terminated"):
        D.dqn_targets(r, qt, term[:, None], 0.9)
    with pytest.raises(ValueError, match="next_q_online"):
        D.dqn_targets(r, qt, term, 0.9, next_q_online=qo[:, :2])
    with pytest.raises(ValueError, match="gamma"):
        D.dqn_targets(r, qt, term, 1.5)
    with pytest.raises(ValueError, match="finite"):
        D.dqn_targets(r.clone().fill_(math.nan), qt, term, 0.9)
    with pytest.raises(ValueError, match="0 and 1"):
        D.dqn_targets(r, qt, term.double() * 2, 0.9)
    with pytest.raises(TypeError, match="rewards"):
        D.dqn_targets([1.0] * 5, qt, term, 0.9)


def test_regression_loss_refuses_the_broadcast_and_matches_definitions():
    q = torch.tensor([1.0, 2.0, -3.0], requires_grad=True)
    y = torch.tensor([1.5, 0.0, -3.2])
    with pytest.raises(ValueError, match=r"\[B, B\]"):
        D.q_regression_loss(q[:, None], y)
    with pytest.raises(ValueError, match="require grad"):
        D.q_regression_loss(q, y.clone().requires_grad_())
    with pytest.raises(ValueError, match="loss"):
        D.q_regression_loss(q, y, loss="l1")
    mse = D.q_regression_loss(q, y, loss="mse")
    assert mse.item() == pytest.approx(0.5 * np.mean([(1 - 1.5) ** 2, 2.0 ** 2, 0.2 ** 2]))
    hub = D.q_regression_loss(q, y)
    ref = np.mean([0.5 * 0.25, 2.0 - 0.5, 0.5 * 0.04])
    assert hub.item() == pytest.approx(ref, rel=1e-6)


def test_the_broadcast_bug_regresses_to_the_batch_mean():
    y = torch.tensor([0.0, 1.0, 5.0])
    q = torch.zeros(3, 1, requires_grad=True)
    opt = torch.optim.SGD([q], lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        ((q - y) ** 2).mean().backward()     # the seed's [B, 1] - [B]: a [B, B] matrix
        opt.step()
    assert torch.allclose(q.detach().squeeze(1), y.mean().expand(3), atol=1e-6)


@pytest.mark.parametrize("how", ["mean", "max"])
def test_dueling_aggregators(how):
    g = torch.Generator().manual_seed(1)
    v, a = torch.randn(4, generator=g), torch.randn(4, 3, generator=g)
    q = D.dueling(v, a, how=how)
    agg = q.mean(-1) if how == "mean" else q.max(-1).values
    assert torch.allclose(agg, v, atol=1e-6)
    assert torch.allclose(q - q[..., :1], a - a[..., :1], atol=1e-6)      # advantages' differences kept
    assert torch.allclose(D.dueling(v + 2.0, a - 2.0, how=how), D.dueling(v, a, how=how) + 2.0, atol=1e-6)


def test_dueling_refuses_bad_input():
    with pytest.raises(ValueError, match="values must have shape"):
        D.dueling(torch.zeros(4, 1), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="how"):
        D.dueling(torch.zeros(4), torch.zeros(4, 3), how="sum")


@pytest.mark.parametrize("how", [None, "mean", "max"])
def test_qnet_shapes_and_dueling_head(how):
    torch.manual_seed(0)
    net = QNet(4, 2, (8, 8), dueling=how)
    x = torch.randn(5, 4)
    q = net(x)
    assert q.shape == (5, 2)
    if how is not None:
        h = net.body(x)
        ref = D.dueling(net.value_head(h).squeeze(-1), net.head(h), how=how)
        assert torch.allclose(q, ref)
    with pytest.raises(ValueError, match="obs"):
        net(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="dueling"):
        QNet(4, 2, dueling="sum")


def test_epsilon_greedy_probs_and_schedule():
    q = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    p = D.epsilon_greedy_probs(q, 0.2)
    assert torch.allclose(p, torch.tensor([[0.05, 0.45, 0.45, 0.05]]))
    assert D.linear_epsilon(0) == 1.0 and D.linear_epsilon(4000) == pytest.approx(0.52)
    assert D.linear_epsilon(10_000) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="epsilon"):
        D.epsilon_greedy_probs(q, 1.5)
    with pytest.raises(ValueError, match="step"):
        D.linear_epsilon(-1)


def _cliff():
    return dp.from_toy_text(gym.make("CliffWalking-v1"), gamma=1.0, horizon=200)


def _q_star(mdp):
    V, _ = dp.backward_induction(mdp, 200)
    return dp.q_from_v(mdp, V[1])


def _greedy_path(mdp, Q, start=36, limit=100):
    s, path = start, [start]
    P = mdp.P
    while s != mdp.n_states - 1 and len(path) <= limit:
        a = int(Q[s].argmax())
        s = int(P[s, a].argmax())
        path.append(s)
    return path


def test_q_learning_on_cliffwalking_ends_on_the_exact_optimal_path():
    mdp = _cliff()
    Qs = _q_star(mdp)
    h = D.tabular_control(mdp, "q_learning", episodes=500, runs=4, alpha=0.5, epsilon=0.1, seed=0)
    ref = _greedy_path(mdp, Qs)
    assert len(ref) - 1 == 13
    for run in range(4):
        assert _greedy_path(mdp, h.q[run]) == ref


def test_tabular_runs_are_independent_and_reproducible():
    mdp = _cliff()
    a = D.tabular_control(mdp, "sarsa", episodes=20, runs=3, seed=5)
    b = D.tabular_control(mdp, "sarsa", episodes=20, runs=3, seed=5)
    assert torch.equal(a.q, b.q) and torch.equal(a.returns, b.returns)
    assert not torch.equal(a.returns[0], a.returns[1])
    assert bool((a.lengths > 0).all())
    steps_cost = -a.lengths.double()
    assert bool((a.returns <= steps_cost).all())                     # every step costs 1, the cliff 100
    assert torch.allclose(torch.remainder(steps_cost - a.returns, 99.0), torch.zeros_like(a.returns))


def _example_67(n_b=10):
    # states: 0 = A, 1 = B, 2 = terminal. A: action 0 = left (to B), action 1 = right (terminal); B: n_b actions
    A = n_b
    P = torch.zeros(3, A, 3, dtype=torch.float64)
    P[0, 0, 1] = 1
    P[0, 1:, 2] = 1
    P[1, :, 2] = 1
    P[2, :, 2] = 1
    R = torch.zeros(3, A, dtype=torch.float64)
    R[1] = -0.1
    std = torch.zeros(3, A, dtype=torch.float64)
    std[1] = 1.0
    p0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    legal = torch.ones(3, A, dtype=torch.bool)
    legal[0, 2:] = False                                    # A has two actions, B has n_b
    return TabularMDP(P, R, p0, 1.0, horizon=2), std, legal


def test_double_q_learning_reduces_the_maximisation_bias():
    mdp, std, legal = _example_67()
    q = D.tabular_control(mdp, "q_learning", episodes=100, runs=500, alpha=0.1, epsilon=0.1, reward_std=std,
                          legal=legal, seed=0)
    d = D.tabular_control(mdp, "double_q_learning", episodes=100, runs=500, alpha=0.1, epsilon=0.1,
                          reward_std=std, legal=legal, seed=0)
    assert bool((q.first_actions < 2).all())
    left_q = (q.first_actions[:, :20] == 0).double().mean().item()
    left_d = (d.first_actions[:, :20] == 0).double().mean().item()
    assert left_q > left_d + 0.1


def test_expected_sarsa_and_sarsa_targets_on_a_one_step_problem():
    # a single non-terminal state with two actions and a self-loop on action 0: after many updates with small
    # alpha, Expected SARSA's value of action 0 approaches the epsilon-greedy fixed point r0 + (1 - 0.5 eps) ...
    P = torch.zeros(2, 2, 2, dtype=torch.float64)
    P[0, 0, 0] = 0.5
    P[0, 0, 1] = 0.5
    P[0, 1, 1] = 1
    P[1, :, 1] = 1
    R = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    mdp = TabularMDP(P, R, torch.tensor([1.0, 0.0], dtype=torch.float64), 1.0, horizon=10)
    eps = 0.2
    h = D.tabular_control(mdp, "expected_sarsa", episodes=3000, runs=8, alpha=0.02, epsilon=eps, seed=1)
    # fixed point: q0 = 1 + 0.5 * ((1 - eps/2) q0 + eps/2 * q1), q1 = 0  =>  q0 = 1 / (1 - 0.5 (1 - eps/2))
    q0 = 1.0 / (1 - 0.5 * (1 - eps / 2))
    assert h.q[:, 0, 0].mean().item() == pytest.approx(q0, abs=0.05)
    assert h.q[:, 0, 1].abs().max().item() == 0.0


def test_tabular_control_refuses_bad_input():
    mdp = _cliff()
    with pytest.raises(ValueError, match="method"):
        D.tabular_control(mdp, "td", episodes=1)
    with pytest.raises(ValueError, match="alpha"):
        D.tabular_control(mdp, "sarsa", episodes=1, alpha=0.0)
    with pytest.raises(ValueError, match="terminal"):
        D.tabular_control(mdp, "sarsa", episodes=1, terminal=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="legal"):
        D.tabular_control(mdp, "sarsa", episodes=1, legal=torch.zeros(mdp.n_states, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="steps"):
        D.tabular_control(mdp, "sarsa", episodes=50, max_steps=10)


def test_synchronous_q_learning_converges_with_robbins_monro_steps():
    mdp = random_mdp(4, 2, gamma=0.7, seed=3)
    Qs = dp.q_from_v(mdp, dp.value_iteration(mdp, tol=1e-12).V)
    it = D.synchronous_q_learning(mdp, 2000, runs=16, step_power=0.8)
    err = (it - Qs).abs().amax(dim=(2, 3)).mean(dim=1)
    assert err[-1] < 0.05 and err[-1] < err[100] < err[10]
    slow = D.synchronous_q_learning(mdp, 2000, runs=16, step_power=1.0)    # 1/k: converges, but slowly
    assert (slow[-1] - Qs).abs().amax(dim=(1, 2)).mean() > 4 * err[-1]
    const = D.synchronous_q_learning(mdp, 2000, runs=16, step_power=None, alpha=0.5)
    assert (const[-1] - Qs).abs().amax(dim=(1, 2)).mean() > err[-1]


def test_dqn_config_validates():
    with pytest.raises(ValueError, match="lr"):
        D.DQNConfig(lr=0.0)
    with pytest.raises(ValueError, match="dueling"):
        D.DQNConfig(dueling="sum")
    with pytest.raises(ValueError, match="batch_size"):
        D.DQNConfig(batch_size=128, learning_starts=100)
    with pytest.raises(ValueError, match="gamma"):
        D.DQNConfig(gamma=-0.1)
    with pytest.raises(TypeError, match="DQNConfig"):
        D.dqn({"seed": 0})


def test_dqn_short_run_records_history():
    cfg = D.DQNConfig(total_steps=1536, learning_starts=512, train_freq=256, gradient_steps=4, eval_every=768,
                      eval_episodes=2, final_episodes=2, hidden=(16,), double=True, dueling="mean")
    h = D.dqn(cfg)
    assert h.loss_steps == [512, 768, 1024, 1280, 1536]
    assert h.eval_steps[0] == 768 and h.stopped is None and h.final_return >= 8
    assert all(math.isfinite(x) for x in h.losses)
    assert sum(h.episode_returns) <= 1536


def test_dqn_stops_at_the_first_non_finite_loss(monkeypatch):
    monkeypatch.setattr(D, "q_regression_loss", lambda q, y, loss="huber": (q * math.nan).mean())
    h = D.dqn(D.DQNConfig(total_steps=2000, learning_starts=512, train_freq=256, gradient_steps=2, hidden=(8,),
                          eval_every=1024))
    assert h.stopped is not None and "non-finite loss" in h.stopped and "512" in h.stopped
    assert h.losses == [] and math.isnan(h.final_return)


def test_make_env_and_evaluate_q():
    from rl4llm.envs import evaluate_q, make_env

    with pytest.raises(ValueError, match="Discrete"):
        make_env("Pendulum-v1")
    torch.manual_seed(0)
    net = QNet(4, 2, (8,))
    ret = evaluate_q(net, "CartPole-v1", episodes=3, seed=1)
    assert ret == evaluate_q(net, "CartPole-v1", episodes=3, seed=1) and 8 <= ret <= 500
    with pytest.raises(ValueError, match="q must be"):
        evaluate_q(lambda x: x, "CartPole-v1")
