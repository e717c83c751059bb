"""Tests for rl4llm.trpo: conjugate gradient, Fisher-vector products, the natural step, the line search."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rl4llm.kl import categorical_kl as kl_categorical
from rl4llm.nets import PolicyNet
from rl4llm.trpo import (
    backtracking_line_search,
    conjugate_gradient,
    fisher_vector_product,
    flat_grad,
    natural_step,
    trpo,
    trpo_update,
)


def categorical_kl(logits_p, logits_q):
    """KL(p || q) of categoricals given by logits, through the package's one exact KL."""
    return kl_categorical(torch.log_softmax(logits_p, -1), torch.log_softmax(logits_q, -1))



def random_spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    eig = torch.logspace(-2, 1, n, dtype=torch.float64)            # condition number 1000
    return q @ torch.diag(eig) @ q.T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conjugate_gradient_matches_direct_solve(seed):
    n = 12
    a = random_spd(n, seed)
    b = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 100))
    x = conjugate_gradient(lambda v: a @ v, b, iters=3 * n, tol=1e-28)
    exact = torch.linalg.solve(a, b)
    assert torch.allclose(x, exact, rtol=1e-9, atol=1e-10)
    # in exact arithmetic n iterations suffice; fewer give an approximation, not the solution
    x_few = conjugate_gradient(lambda v: a @ v, b, iters=2)
    assert (x_few - exact).norm() > 1e-3 * exact.norm()


def test_conjugate_gradient_rejects_indefinite_and_bad_input():
    a = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="positive definite"):
        conjugate_gradient(lambda v: a @ v, torch.tensor([0.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="1-D"):
        conjugate_gradient(lambda v: v, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="NaN"):
        conjugate_gradient(lambda v: v, torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="iters"):
        conjugate_gradient(lambda v: v, torch.ones(2), iters=0)


def tiny_policy_and_kl():
    torch.manual_seed(0)
    policy = PolicyNet(3, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        policy.net[-1].weight.mul_(100)                  # a policy far from uniform
    obs = torch.randn(7, 3, dtype=torch.float64)
    params = list(policy.parameters())
    names = [n for n, _ in policy.named_parameters()]
    shapes = [p.shape for p in params]
    x0 = torch.cat([p.detach().reshape(-1) for p in params])
    logits_old = policy(obs).detach()

    def mean_kl(x):
        out, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = math.prod(s)
            out[n] = x[i:i + k].view(s)
            i += k
        return categorical_kl(logits_old, torch.func.functional_call(policy, out, (obs,))).mean()

    return policy, obs, params, x0, logits_old, mean_kl


def test_fisher_vector_product_is_hessian_of_kl_and_fisher_matrix():
    policy, obs, params, x0, logits_old, mean_kl = tiny_policy_and_kl()
    hessian = torch.autograd.functional.hessian(mean_kl, x0)
    # the Fisher matrix E_s E_{a ~ pi} [score score^T], from per-action scores
    probs = logits_old.softmax(-1)
    fisher = torch.zeros_like(hessian)
    for s in range(obs.shape[0]):
        for a in range(probs.shape[1]):
            logp = torch.log_softmax(policy(obs[s:s + 1]), -1)[0, a]
            score = flat_grad(logp, params)
            fisher += probs[s, a] * torch.outer(score, score) / obs.shape[0]
    assert torch.allclose(hessian, fisher, rtol=1e-9, atol=1e-12)
    fvp = fisher_vector_product(categorical_kl(logits_old, policy(obs)).mean(), params, damping=0.1)
    for seed in range(3):
        v = torch.randn(x0.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        assert torch.allclose(fvp(v), hessian @ v + 0.1 * v, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        fvp(torch.zeros(3, dtype=torch.float64))


def test_natural_step_satisfies_quadratic_constraint_and_solves_system():
    policy, obs, params, x0, logits_old, mean_kl = tiny_policy_and_kl()
    hessian = torch.autograd.functional.hessian(mean_kl, x0) + 0.1 * torch.eye(x0.numel(), dtype=torch.float64)
    g = torch.randn(x0.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    fvp = fisher_vector_product(categorical_kl(logits_old, policy(obs)).mean(), params, damping=0.1)
    step, predicted = natural_step(g, fvp, max_kl=0.02, cg_iters=200, cg_tol=1e-26)
    direct = torch.linalg.solve(hessian, g)
    expected = math.sqrt(2 * 0.02 / float(g @ direct)) * direct
    assert torch.allclose(step, expected, rtol=1e-6, atol=1e-9)
    assert 0.5 * float(step @ hessian @ step) == pytest.approx(0.02, rel=1e-9)
    assert predicted == pytest.approx(math.sqrt(2 * 0.02 * float(g @ direct)), rel=1e-6)
    zero_step, zero_pred = natural_step(torch.zeros_like(g), fvp, max_kl=0.02)
    assert not zero_step.any() and zero_pred == 0.0


def test_line_search_starts_at_full_step_and_requires_both_conditions():
    x0 = torch.zeros(1, dtype=torch.float64)
    step = torch.ones(1, dtype=torch.float64)
    # surrogate rises then falls; kl grows quadratically
    def surrogate(x):
        return float(x[0] * (1.5 - x[0]))

    def kl(x):
        return float(0.5 * x[0] ** 2)

    x, res = backtracking_line_search(surrogate, kl, x0, step, max_kl=1.0)
    assert res.accepted and res.index == 0 and x.item() == 1.0          # the full step is tried first
    # a step of 2: KL = 2 > 1 at j = 0, fine at j = 1 (x = 1)
    x, res = backtracking_line_search(surrogate, kl, x0, 2 * step, max_kl=1.0)
    assert res.index == 1 and x.item() == 1.0
    # a step of 1.8 with a large bound: j = 0 satisfies the KL but the surrogate fell (1.8 * -0.3 < 0)
    x, res = backtracking_line_search(surrogate, kl, x0, 1.8 * step, max_kl=5.0)
    assert res.index == 1 and res.improvement > 0 and x.item() == pytest.approx(0.9)
    x_kl_only, res_kl_only = backtracking_line_search(surrogate, kl, x0, 1.8 * step, max_kl=5.0,
                                                      require_improvement=False)
    assert res_kl_only.index == 0 and res_kl_only.improvement < 0        # the KL-only rule accepts a worse step
    # nothing acceptable: stay put
    x, res = backtracking_line_search(surrogate, kl, x0, -step, max_kl=5.0, max_backtracks=4)
    assert not res.accepted and res.index == -1 and x.item() == 0.0 and len(res.tried) == 4
    with pytest.raises(ValueError, match="backtrack"):
        backtracking_line_search(surrogate, kl, x0, step, max_kl=1.0, backtrack=1.0)
    with pytest.raises(ValueError, match="max_kl"):
        backtracking_line_search(surrogate, kl, x0, step, max_kl=0.0)
    with pytest.raises(ValueError, match="shape"):
        backtracking_line_search(surrogate, kl, x0, torch.ones(2, dtype=torch.float64), max_kl=1.0)


def test_trpo_update_respects_kl_and_improves():
    torch.manual_seed(1)
    policy = PolicyNet(4, 2, 16)
    obs = torch.randn(256, 4)
    with torch.no_grad():
        actions = policy.dist(obs).sample()
    adv = torch.randn(256)
    before = [p.detach().clone() for p in policy.parameters()]
    stats = trpo_update(policy, obs, actions, adv, max_kl=0.01)
    assert stats.line_search.accepted
    assert 0 < stats.kl_exact <= 0.01 + 1e-7
    assert stats.line_search.improvement > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, policy.parameters(), strict=True))
    with pytest.raises(ValueError, match="actions"):
        trpo_update(policy, obs, actions[:3], adv)


def test_short_trpo_run_improves(one_thread):
    hist = trpo(num_envs=8, num_steps=128, total_steps=8 * 128 * 4, seed=0, device="cpu")
    returns = np.array(hist["mean_return"])
    assert np.nanmean(returns[-2:]) > 1.5 * np.nanmean(returns[:2])
    assert all(k <= 0.01 + 1e-6 for k in hist["kl_exact"])
