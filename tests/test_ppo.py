"""Tests for rl4llm.ppo: the clipped objective piece by piece, masks, normalisation, the value loss, the
adaptive KL rule, validation, and a short PPO run on CartPole."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl4llm.kl import categorical_kl as kl_categorical
from rl4llm.ppo import adaptive_kl_coef, kl_penalty_loss, ppo
from rl4llm.surrogate import clipped_objective, masked_mean, normalize_advantages, policy_loss, value_loss

EPS = 0.2


def categorical_kl(logits_p, logits_q):
    """KL(p || q) of categoricals given by logits, through the package's one exact KL."""
    return kl_categorical(torch.log_softmax(logits_p, -1), torch.log_softmax(logits_q, -1))


def objective_and_grad(r: float, adv: float, **kw) -> tuple[float, float]:
    """Clipped objective and its derivative with respect to the ratio, at ratio r."""
    logp = torch.tensor([math.log(r)], dtype=torch.float64, requires_grad=True)
    obj = clipped_objective(logp, torch.zeros(1, dtype=torch.float64), torch.tensor([adv], dtype=torch.float64),
                            **kw)
    (g,) = torch.autograd.grad(obj.sum(), logp)
    return obj.item(), g.item() / r      # d obj / d log r = r * d obj / d r


@settings(max_examples=60, deadline=None)
@given(r=st.floats(0.01, 5.0), adv=st.floats(-10, 10).filter(lambda a: abs(a) > 1e-6))
def test_clipped_objective_piecewise_and_pessimistic(r, adv):
    value, _ = objective_and_grad(r, adv, clip_eps=EPS)
    expected = adv * min(r, 1 + EPS) if adv > 0 else adv * max(r, 1 - EPS)
    assert value == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert value <= r * adv + 1e-12           # never above the unclipped surrogate


@pytest.mark.parametrize("adv", [2.0, -3.0])
@pytest.mark.parametrize("r, region", [(0.5, "below"), (0.9, "inside"), (1.1, "inside"), (1.6, "above")])
def test_zero_gradient_regions(adv, r, region):
    _, g = objective_and_grad(r, adv, clip_eps=EPS)
    # The gradient vanishes only where the clipped branch is the smaller one:
    # A > 0 above 1 + eps, A < 0 below 1 - eps. Everywhere else it is the unclipped A.
    zero = (adv > 0 and region == "above") or (adv < 0 and region == "below")
    if zero:
        assert g == 0.0
    else:
        assert g == pytest.approx(adv, rel=1e-12)


def test_value_and_gradient_match_surrogate_at_ratio_one():
    for adv in (1.5, -0.7):
        value, g = objective_and_grad(1.0, adv, clip_eps=EPS)
        assert value == pytest.approx(adv, rel=1e-15) and g == pytest.approx(adv, rel=1e-15)


def test_asymmetric_clip():
    assert objective_and_grad(1.25, 1.0, clip_eps=0.2, clip_eps_high=0.28)[0] == pytest.approx(1.25)
    assert objective_and_grad(1.35, 1.0, clip_eps=0.2, clip_eps_high=0.28)[0] == pytest.approx(1.28)
    assert objective_and_grad(0.7, -1.0, clip_eps=0.2, clip_eps_high=0.28)[0] == pytest.approx(-0.8)


def test_clip_fraction_counts_zero_gradient_samples():
    r = torch.tensor([0.5, 0.9, 1.5, 0.5, 1.1, 1.5], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    _, stats = policy_loss(r.log(), torch.zeros_like(r), adv, clip_eps=EPS)
    assert stats.clip_fraction == pytest.approx(2 / 6)   # (A>0, r=1.5) and (A<0, r=0.5)
    assert stats.ratio_mean == pytest.approx(r.mean().item())
    assert stats.approx_kl_k1 == pytest.approx((-r.log()).mean().item())
    assert stats.approx_kl_k3 == pytest.approx((r - 1 - r.log()).mean().item())


def test_padding_contributes_nothing():
    torch.manual_seed(0)
    logp = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    logp_old, adv = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    loss, stats = policy_loss(logp, logp_old, adv, mask=mask)
    ref, _ = policy_loss(logp[mask], logp_old[mask], adv[mask])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-14)
    # garbage in the padding (inf, NaN) changes neither the loss nor the gradient
    bad_old = logp_old.clone()
    bad_old[~mask] = -math.inf
    bad_adv = adv.clone()
    bad_adv[~mask] = math.nan
    logp2 = logp.detach().clone()
    logp2[~mask] = math.nan
    logp2.requires_grad_(True)
    loss2, stats2 = policy_loss(logp2, bad_old, bad_adv, mask=mask)
    loss2.backward()
    loss.backward()
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-14)
    assert torch.equal(logp2.grad, logp.grad)
    assert (logp.grad[~mask] == 0).all()
    assert stats2 == stats
    values = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randn(2, 5, dtype=torch.float64)
    targets_bad = targets.clone()
    targets_bad[~mask] = math.inf
    vl = value_loss(values, targets_bad, mask=mask)
    vl.backward()
    assert vl.item() == pytest.approx(0.5 * ((values - targets)[mask] ** 2).mean().item(), rel=1e-14)
    assert (values.grad[~mask] == 0).all()


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, math.nan], [4.0, math.inf, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_mean(x, mask).item() == pytest.approx(13 / 4)
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([1.5, 5.0])
    with pytest.raises(ValueError, match="no entries"):
        masked_mean(x, torch.zeros_like(mask))


@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 3.3, 1000.1, -123456.7])
@pytest.mark.parametrize("n", [1, 3, 7, 100])
def test_normalize_all_equal_is_zero(value, n):
    out = normalize_advantages(torch.full((n,), value))
    assert torch.equal(out, torch.zeros(n))
    mask = torch.ones(n + 2, dtype=torch.bool)
    mask[-2:] = False
    x = torch.full((n + 2,), value)
    x[-2:] = torch.tensor([5.0, -8.0])
    assert torch.equal(normalize_advantages(x, mask), torch.zeros(n + 2))


def test_normalize_mean_zero_std_one():
    torch.manual_seed(1)
    x = torch.randn(50, dtype=torch.float64) * 7 + 3
    out = normalize_advantages(x)
    assert out.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert out.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ValueError, match="NaN"):
        normalize_advantages(torch.tensor([1.0, math.nan]))


def test_value_loss_clipping():
    v_old = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
    target = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    v = torch.tensor([0.5, 2.0, 0.5], dtype=torch.float64, requires_grad=True)
    loss = value_loss(v, target, old_values=v_old, clip_eps=0.2)
    # clipped predictions 0.2, 0.2, 0.2; max((v - R)^2, (v_clip - R)^2) = max(0.25, 0.64), max(1, 0.64),
    # max(2.25, 1.44): the larger (pessimistic) of the two errors
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.0 + 2.25) / 3, rel=1e-14)
    (g,) = torch.autograd.grad(loss, v)
    # where the clipped term is the larger one the gradient is zero (the prediction moved beyond the clip)
    assert g[0].item() == 0.0
    assert g.tolist()[1:] == pytest.approx([(2.0 - 1.0) / 3, (0.5 + 1.0) / 3], rel=1e-14)
    assert value_loss(v, target).item() == pytest.approx(0.5 * (0.25 + 1 + 2.25) / 3)
    with pytest.raises(ValueError, match="together"):
        value_loss(v, target, old_values=v_old)


def test_adaptive_kl_rule():
    assert adaptive_kl_coef(1.0, 0.001, 0.01) == 0.5          # d < d_targ / 1.5: halve
    assert adaptive_kl_coef(1.0, 0.02, 0.01) == 2.0           # d > 1.5 d_targ: double
    for d in (0.0067, 0.01, 0.0149):
        assert adaptive_kl_coef(1.0, d, 0.01) == 1.0          # in between: keep
    assert adaptive_kl_coef(1.0, 0.01 / 1.5, 0.01) == 1.0     # boundaries are kept
    assert adaptive_kl_coef(3.0, 1.0, 0.01, factor=3.0) == 9.0
    for bad in ({"beta": 0.0}, {"kl": -0.1}, {"kl_target": math.nan}, {"tolerance": 1.0}, {"factor": True}):
        args = {"beta": 1.0, "kl": 0.01, "kl_target": 0.01, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            adaptive_kl_coef(args.pop("beta"), args.pop("kl"), args.pop("kl_target"), **args)


def test_kl_penalty_loss_and_categorical_kl():
    logits_old = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
    logits = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    p, q = logits_old.softmax(-1), logits.softmax(-1)
    kl = categorical_kl(logits_old, logits)
    assert kl.tolist() == pytest.approx((p * (p / q).log()).sum(-1).tolist(), rel=1e-14)
    actions = torch.tensor([1, 0])
    logp, logp_old = q.log()[[0, 1], actions], p.log()[[0, 1], actions]
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss = kl_penalty_loss(logp, logp_old, adv, kl, beta=0.5)
    assert loss.item() == pytest.approx(-((logp - logp_old).exp() * adv - 0.5 * kl).mean().item(), rel=1e-14)


def test_validation():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        clipped_objective(x, torch.zeros(4), x)
    with pytest.raises(ValueError, match="clip_eps"):
        clipped_objective(x, x, x, clip_eps=-0.1)
    with pytest.raises(ValueError, match="floating"):
        policy_loss(torch.zeros(3, dtype=torch.long), x, x)
    with pytest.raises(ValueError, match="mask"):
        policy_loss(x, x, x, mask=torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="no entries"):
        policy_loss(x, x, x, mask=torch.zeros(3))
    with pytest.raises(ValueError, match="beta"):
        kl_penalty_loss(x, x, x, x, beta=-1.0)
    with pytest.raises(ValueError, match="objective"):
        ppo(objective="trust_region")
    with pytest.raises(ValueError, match="total_steps"):
        ppo(num_envs=8, num_steps=128, total_steps=100)
    with pytest.raises(ValueError, match="lam"):
        ppo(lam=1.5)


def test_short_ppo_run_improves(one_thread):
    hist = ppo(num_envs=8, num_steps=64, total_steps=8 * 64 * 8, seed=0, device="cpu")
    returns = np.array(hist["mean_return"])
    assert np.isfinite(returns[:2]).all()
    first, last = np.nanmean(returns[:2]), np.nanmean(returns[-3:])
    assert last > 2 * first, (first, last)
    assert all(k >= 0 for k in hist["kl_exact"])
    assert all(0 <= c <= 1 for c in hist["clip_fraction"])
