"""Tests for rl4llm.grpo: advantages and per-token weights against hand computations, the loss's gradient
against its formula, masks, the variants' identities (DAPO accumulation, GSPO at ratio 1), bad input, and a
short deterministic training run."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl4llm import grpo as GR
from rl4llm.kl import kl_k3
from rl4llm.lm import TinyLM, TinyLMConfig
from rl4llm.tasks import SortTask

F64 = torch.float64
PROPERTY = settings(max_examples=25, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield


def randn(*shape, seed=0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------
# Group advantages
# ----------------------------------------------------------------------------------------------------------
def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=F64)
    std1 = math.sqrt(4 * 0.25 / 3)  # ddof = 1
    a = GR.group_advantages(r, eps=0.0)
    assert torch.allclose(a, torch.tensor([[1, -1, -1, 1]], dtype=F64) * 0.5 / std1, atol=1e-15)
    a = GR.group_advantages(r, eps=1e-4)
    assert torch.allclose(a, torch.tensor([[1, -1, -1, 1]], dtype=F64) * 0.5 / (std1 + 1e-4), atol=1e-15)
    a = GR.group_advantages(r, ddof=0, eps=0.0)  # population std 1/2
    assert torch.allclose(a, torch.tensor([[1.0, -1, -1, 1]], dtype=F64), atol=1e-15)
    a = GR.group_advantages(r, scale="none")
    assert torch.allclose(a, torch.tensor([[0.5, -0.5, -0.5, 0.5]], dtype=F64), atol=1e-15)
    a = GR.group_advantages(r, scale="none", leave_one_out=True)  # r_i - mean of the other three
    assert torch.allclose(a, torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3]], dtype=F64), atol=1e-15)


def test_batch_scaling_uses_one_std_for_all_groups():
    r = torch.tensor([[1.0, 0.0], [3.0, 1.0]], dtype=F64)
    std = torch.tensor([1.0, 0.0, 3.0, 1.0], dtype=F64).std()  # ddof = 1 over the whole batch
    a = GR.group_advantages(r, scale="batch", eps=0.0)
    assert torch.allclose(a, torch.tensor([[0.5, -0.5], [1.0, -1.0]], dtype=F64) / std, atol=1e-15)
    a_group = GR.group_advantages(r, scale="group", eps=0.0)
    assert torch.allclose(a_group[0], a_group[1])  # per-group scaling erases the difference in spread


@PROPERTY
@given(b=st.integers(1, 4), g=st.integers(2, 9), seed=st.integers(0, 10_000))
def test_property_zero_mean_unit_std_and_leave_one_out_rescaling(b, g, seed):
    r = randn(b, g, seed=seed)
    a = GR.group_advantages(r, eps=0.0)
    assert torch.allclose(a.mean(-1), torch.zeros(b, dtype=F64), atol=1e-12)
    assert torch.allclose(a.std(-1), torch.ones(b, dtype=F64), atol=1e-12)
    mean_c = GR.group_advantages(r, scale="none")
    loo_c = GR.group_advantages(r, scale="none", leave_one_out=True)
    assert torch.allclose(mean_c, (g - 1) / g * loo_c, atol=1e-12)


@pytest.mark.parametrize("scale", GR.SCALINGS)
@pytest.mark.parametrize("loo", [False, True])
@pytest.mark.parametrize("eps", [0.0, 1e-4])
def test_all_equal_rewards_give_exactly_zero(scale, loo, eps):
    r = torch.tensor([[0.1, 0.1, 0.1], [1.0, 0.0, 1.0]], dtype=torch.float32)  # 0.1 * 3 / 3 != 0.1 in floats
    a = GR.group_advantages(r, scale=scale, leave_one_out=loo, eps=eps)
    assert torch.isfinite(a).all()
    assert (a[0] == 0).all()
    assert (a[1] != 0).all()
    everything_equal = torch.full((2, 4), 0.7)
    assert (GR.group_advantages(everything_equal, scale=scale, leave_one_out=loo, eps=eps) == 0).all()


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="G >= 2"):
        GR.group_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="G >= 2"):
        GR.group_advantages(torch.tensor(1.0))
    with pytest.raises(ValueError, match="NaN"):
        GR.group_advantages(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        GR.group_advantages(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="floating-point"):
        GR.group_advantages(torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="scale"):
        GR.group_advantages(torch.ones(2, 2), scale="std")
    with pytest.raises(ValueError, match="eps"):
        GR.group_advantages(torch.ones(2, 2), eps=-1e-3)
    with pytest.raises(ValueError, match="ddof"):
        GR.group_advantages(torch.ones(2, 2), ddof=2)


# ----------------------------------------------------------------------------------------------------------
# Process supervision
# ----------------------------------------------------------------------------------------------------------
def test_process_advantages_by_hand():
    # Two completions; the first has steps ending at tokens 1 and 3, the second one step ending at token 2.
    rewards = torch.tensor([[1.0, 0.0], [0.5, 0.0]], dtype=F64)
    ends = torch.tensor([[1, 3], [2, 0]])
    smask = torch.tensor([[1, 1], [1, 0]])
    a = GR.process_advantages(rewards, ends, 5, step_mask=smask, scale=False)
    m = 0.5  # mean of the three real step rewards 1, 0, 0.5
    expected = torch.tensor([[(1 - m) + (0 - m), (1 - m) + (0 - m), 0 - m, 0 - m, 0.0],
                             [0.5 - m, 0.5 - m, 0.5 - m, 0.0, 0.0]], dtype=F64)
    assert torch.allclose(a, expected, atol=1e-15)
    # A step's own last token is credited with its reward (">=", not ">").
    assert a[0, 1] == expected[0, 1] and a[0, 3] == 0 - m
    std = torch.tensor([1.0, 0.0, 0.5], dtype=F64).std()
    scaled = GR.process_advantages(rewards, ends, 5, step_mask=smask, eps=0.0)
    assert torch.allclose(scaled, expected / std, atol=1e-15)


def test_process_with_one_step_at_the_end_is_outcome_supervision():
    r = randn(3, 5, seed=1)
    lengths = torch.tensor([[2, 5, 3, 4, 1], [5, 5, 5, 5, 5], [1, 2, 3, 4, 5]])
    a = GR.process_advantages(r[..., None], (lengths - 1)[..., None], 5, eps=1e-4)  # [3, 5, L=5]
    outcome = GR.group_advantages(r, eps=1e-4)
    token_mask = torch.arange(5) < lengths[..., None]
    assert torch.allclose(a, outcome[..., None] * token_mask, atol=1e-12)


def test_process_advantages_bad_input():
    r = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="step_ends"):
        GR.process_advantages(r, torch.zeros(2, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="step_ends must lie"):
        GR.process_advantages(r, torch.full((2, 2), 4), 4)
    with pytest.raises(ValueError, match="NaN"):
        GR.process_advantages(torch.tensor([[0.0, float("nan")]]), torch.zeros(1, 2, dtype=torch.long), 2)


# ----------------------------------------------------------------------------------------------------------
# Per-token weights
# ----------------------------------------------------------------------------------------------------------
MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])  # two completions of lengths 2 and 4


def test_token_weights_by_hand():
    q, e = 1 / 4, 1 / 8  # GRPO: 1 / (G |o_i|) with G = 2
    expected = {
        "grpo": [[q, q, 0, 0], [e, e, e, e]],
        "bnpo": [[1 / 6] * 2 + [0, 0], [1 / 6] * 4],
        "dapo": [[1 / 6] * 2 + [0, 0], [1 / 6] * 4],
        "dr_grpo": [[1 / 8] * 2 + [0, 0], [1 / 8] * 4],  # 1 / (G L_max) with L_max = L = 4
    }
    for agg, w in expected.items():
        got = GR.token_weights(MASK, agg)
        assert torch.allclose(got, torch.tensor(w)), agg
    assert torch.allclose(GR.token_weights(MASK, "dr_grpo", max_len=10), MASK / 20.0)
    assert torch.allclose(GR.token_weights(MASK, "dapo", num_tokens=12), MASK / 12.0)
    # Every sequence gets total weight 1/G under GRPO; under the token-level losses it is proportional to length.
    assert torch.allclose(GR.token_weights(MASK, "grpo").sum(1), torch.tensor([0.5, 0.5]))
    assert torch.allclose(GR.token_weights(MASK, "bnpo").sum(1), torch.tensor([2 / 6, 4 / 6]))


def test_token_weights_empty_rows_and_bad_input():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    w = GR.token_weights(mask, "grpo")
    assert torch.isfinite(w).all() and (w[1] == 0).all() and w[0, 0] == 0.25  # the empty row still counts in N
    with pytest.raises(ValueError, match="no tokens"):
        GR.token_weights(torch.zeros(2, 3), "bnpo")
    with pytest.raises(ValueError, match="aggregation"):
        GR.token_weights(MASK, "token_mean")
    with pytest.raises(ValueError, match="max_len"):
        GR.token_weights(MASK, "dr_grpo", max_len=3)
    with pytest.raises(ValueError, match="num_tokens"):
        GR.token_weights(MASK, "dapo", num_tokens=5)
    with pytest.raises(ValueError, match="0 and 1"):
        GR.token_weights(MASK * 2, "grpo")
    with pytest.raises(ValueError, match="2-D"):
        GR.token_weights(torch.ones(4), "grpo")


# ----------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------
def _batch(n=4, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    mask = (torch.arange(length) < lengths[:, None]).to(F64)
    logp_old = -torch.rand(n, length, dtype=F64, generator=g) * 2 * mask
    logp = (logp_old + 0.1 * torch.randn(n, length, dtype=F64, generator=g)) * mask
    adv = torch.randn(n, dtype=F64, generator=g)
    logp_ref = (logp_old - 0.3 * torch.rand(n, length, dtype=F64, generator=g)) * mask
    return logp, logp_old, adv, mask, logp_ref


@pytest.mark.parametrize("agg", GR.AGGREGATIONS)
def test_gradient_at_ratio_one_is_minus_weight_times_advantage(agg):
    _, logp_old, adv, mask, _ = _batch()
    logp = logp_old.clone().requires_grad_(True)
    loss, stats = GR.grpo_loss(logp, logp_old, adv, mask, aggregation=agg, max_len=7)
    (grad,) = torch.autograd.grad(loss, logp)
    w = GR.token_weights(mask, agg, max_len=7, dtype=F64)
    assert torch.allclose(grad, -w * adv[:, None], atol=1e-15)
    assert stats.clip_fraction == 0 and stats.ratio_mean == pytest.approx(1.0)


def test_loss_value_against_formula_with_clip_and_kl():
    logp, logp_old, adv, mask, logp_ref = _batch(n=6, seed=3)
    logp = logp + 0.4 * torch.randn(6, 5, dtype=F64, generator=torch.Generator().manual_seed(9)) * mask
    for agg in GR.AGGREGATIONS:
        loss, stats = GR.grpo_loss(logp, logp_old, adv, mask, aggregation=agg, clip_eps=0.2, clip_eps_high=0.28,
                                   beta=0.05, logp_ref=logp_ref)
        rho = (logp - logp_old).exp()
        a = adv[:, None]
        obj = torch.minimum(rho * a, rho.clamp(0.8, 1.28) * a)
        k3 = kl_k3(logp_ref, logp)
        w = GR.token_weights(mask, agg, dtype=F64)
        assert loss.item() == pytest.approx((w * (-obj + 0.05 * k3) * mask).sum().item(), rel=1e-12), agg
        assert stats.kl_loss == pytest.approx((w * k3 * mask).sum().item(), rel=1e-12)
        assert 0 < stats.clip_fraction < 1


def test_clip_higher_is_asymmetric():
    logp_old = torch.zeros(1, 2, dtype=F64)
    logp = torch.log(torch.tensor([[1.25, 0.75]], dtype=F64)).requires_grad_(True)
    mask = torch.ones(1, 2)
    for eps_high, grad_zero in ((None, True), (0.28, False)):  # ratio 1.25 is clipped by 0.2, not by 0.28
        loss, _ = GR.grpo_loss(logp, logp_old, torch.tensor([1.0], dtype=F64), mask, clip_eps=0.2,
                               clip_eps_high=eps_high)
        (g,) = torch.autograd.grad(loss, logp)
        assert (g[0, 0] == 0) == grad_zero
        assert g[0, 1] != 0  # ratio 0.75 with A > 0: the unclipped branch is the minimum, gradient flows


def test_padding_contributes_nothing():
    logp, logp_old, adv, mask, logp_ref = _batch(n=5, seed=4)
    junk = torch.randn(5, 5, dtype=F64, generator=torch.Generator().manual_seed(1)) * 50
    pad = mask == 0
    assert pad.any()
    results = []
    for fill in (None, junk, torch.full_like(junk, float("nan"))):
        lp = logp.clone() if fill is None else torch.where(pad, fill, logp)
        lp_old = logp_old.clone() if fill is None else torch.where(pad, fill, logp_old)
        lp_ref = logp_ref.clone() if fill is None else torch.where(pad, fill, logp_ref)
        for level in GR.IMPORTANCE_LEVELS:
            x = lp.clone().requires_grad_(True)
            loss, _ = GR.grpo_loss(x, lp_old, adv, mask, importance_level=level, beta=0.1, logp_ref=lp_ref,
                                   aggregation="bnpo")
            (g,) = torch.autograd.grad(loss, x)
            assert torch.isfinite(loss) and torch.isfinite(g).all()
            assert (g[pad] == 0).all()
            results.append((level, loss.item(), g))
    for level in GR.IMPORTANCE_LEVELS:
        ref = [r for r in results if r[0] == level]
        for _, value, g in ref[1:]:
            assert value == ref[0][1] and torch.equal(g, ref[0][2])


def test_empty_response_is_finite_and_empty_batch_raises():
    logp, logp_old, adv, mask, _ = _batch(n=3, seed=5)
    mask[1] = 0
    for agg in GR.AGGREGATIONS:
        for level in GR.IMPORTANCE_LEVELS:
            x = logp.clone().requires_grad_(True)
            loss, _ = GR.grpo_loss(x, logp_old, adv, mask, aggregation=agg, importance_level=level)
            (g,) = torch.autograd.grad(loss, x)
            assert torch.isfinite(loss) and torch.isfinite(g).all() and (g[1] == 0).all()
    with pytest.raises(ValueError, match="no tokens"):
        GR.grpo_loss(logp, logp_old, adv, torch.zeros_like(mask))


def test_loss_bad_input():
    logp, logp_old, adv, mask, logp_ref = _batch()
    with pytest.raises(ValueError, match="logp_old"):
        GR.grpo_loss(logp, logp_old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        GR.grpo_loss(logp, logp_old, adv[:3], mask)
    with pytest.raises(ValueError, match="mask"):
        GR.grpo_loss(logp, logp_old, adv, mask[:, :3])
    with pytest.raises(ValueError, match="logp_ref"):
        GR.grpo_loss(logp, logp_old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="logp_ref"):
        GR.grpo_loss(logp, logp_old, adv, mask, beta=0.1, logp_ref=logp_ref[:2])
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        GR.grpo_loss(logp[0], logp_old[0], adv[:1], mask[0])
    with pytest.raises(ValueError, match="NaN"):
        GR.grpo_loss(logp, logp_old, adv * float("nan"), mask)
    with pytest.raises(ValueError, match="importance_level"):
        GR.grpo_loss(logp, logp_old, adv, mask, importance_level="group")
    with pytest.raises(ValueError, match="one advantage per completion"):
        GR.grpo_loss(logp, logp_old, adv[:, None].expand_as(logp), mask, importance_level="sequence")
    with pytest.raises(ValueError, match="beta"):
        GR.grpo_loss(logp, logp_old, adv, mask, beta=-1.0)
    with pytest.raises(ValueError, match="floating-point"):
        GR.grpo_loss(logp, logp_old, adv.long(), mask)


def test_dapo_accumulation_equals_the_full_batch_token_mean():
    logp, logp_old, adv, mask, _ = _batch(n=6, seed=6)
    x = logp.clone().requires_grad_(True)
    full, _ = GR.grpo_loss(x, logp_old, adv, mask, aggregation="bnpo")
    (g_full,) = torch.autograd.grad(full, x)
    total = int(mask.sum())
    for agg, kwargs, same in (("dapo", {"num_tokens": total}, True), ("bnpo", {}, False)):
        x = logp.clone().requires_grad_(True)
        acc = sum(GR.grpo_loss(x[s], logp_old[s], adv[s], mask[s], aggregation=agg, **kwargs)[0]
                  for s in (slice(0, 2), slice(2, 6)))
        (g,) = torch.autograd.grad(acc, x)
        assert torch.allclose(g, g_full, atol=1e-15) == same, agg


def test_gspo_sequence_ratio_and_equality_with_grpo_at_ratio_one():
    logp, logp_old, adv, mask, _ = _batch(n=4, seed=7)
    log_s = GR.sequence_log_ratio(logp, logp_old, mask)
    expected = ((logp - logp_old) * mask).sum(1) / mask.sum(1)
    assert torch.allclose(log_s, expected, atol=1e-15)
    x = logp_old.clone().requires_grad_(True)
    grads = []
    for level in GR.IMPORTANCE_LEVELS:
        loss, _ = GR.grpo_loss(x, logp_old, adv, mask, importance_level=level, aggregation="grpo")
        grads.append(torch.autograd.grad(loss, x)[0])
    assert torch.allclose(grads[0], grads[1], atol=1e-15)
    # Off-policy they differ: the sequence ratio weights every token by s_i.
    x = logp.clone().requires_grad_(True)
    g_tok, g_seq = (torch.autograd.grad(GR.grpo_loss(x, logp_old, adv, mask, importance_level=lv,
                                                     clip_eps=10.0)[0], x)[0] for lv in GR.IMPORTANCE_LEVELS)
    assert not torch.allclose(g_tok, g_seq)
    w = GR.token_weights(mask, "grpo", dtype=F64)
    assert torch.allclose(g_seq, -w * (adv * log_s.exp())[:, None], atol=1e-14)


def test_grpo_loss_starts_at_zero_only_for_the_sequence_mean():
    g = torch.Generator().manual_seed(8)
    rewards = torch.rand(3, 4, generator=g, dtype=F64)
    adv = GR.group_advantages(rewards).reshape(-1)
    lengths = torch.randint(1, 6, (12,), generator=g)
    mask = (torch.arange(6) < lengths[:, None]).to(F64)
    logp = (-torch.rand(12, 6, generator=g, dtype=F64) * mask).requires_grad_(True)
    values = {}
    for agg in GR.AGGREGATIONS:
        loss, _ = GR.grpo_loss(logp, logp.detach(), adv, mask, aggregation=agg)
        (grad,) = torch.autograd.grad(loss, logp)
        values[agg] = loss.item()
        assert grad.abs().max() > 1e-3
    assert abs(values["grpo"]) < 1e-15
    assert abs(values["bnpo"]) > 1e-6 and abs(values["dr_grpo"]) > 1e-6


def test_float32_and_bool_masks():
    logp, logp_old, adv, mask, _ = _batch(seed=10)
    l64, _ = GR.grpo_loss(logp, logp_old, adv, mask)
    l32, _ = GR.grpo_loss(logp.float(), logp_old.float(), adv.float(), mask.bool())
    assert l32.dtype == torch.float32 and l32.item() == pytest.approx(l64.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------------
def test_config_validation():
    with pytest.raises(ValueError, match="group_size"):
        GR.GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="minibatches"):
        GR.GRPOConfig(prompts_per_step=3, group_size=3, minibatches=2)
    with pytest.raises(ValueError, match="aggregation"):
        GR.GRPOConfig(aggregation="mean")
    with pytest.raises(ValueError, match="lr"):
        GR.GRPOConfig(lr=0.0)


def test_train_grpo_runs_and_is_deterministic():
    task = SortTask(3)

    def run():
        torch.manual_seed(0)
        model = TinyLM(TinyLMConfig(vocab_size=task.tokenizer.vocab_size, n_layer=1, d_model=16, max_len=16))
        cfg = GR.GRPOConfig(steps=3, prompts_per_step=2, group_size=4, epochs=2, minibatches=2, eval_every=2,
                            eval_n=8, aggregation="dr_grpo")
        return GR.train_grpo(model, task, cfg), model

    h1, m1 = run()
    h2, m2 = run()
    assert h1.eval_steps == [0, 2, 3] and len(h1.reward) == 3 and len(h1.kl) == 3
    assert h1.reward == h2.reward and h1.kl == h2.kl and h1.accuracy == h2.accuracy
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters(), strict=True))
    assert h1.kl[0] == pytest.approx(0.0, abs=1e-6)  # the reference is the starting policy
    assert all(math.isfinite(v) for v in h1.kl + h1.length + h1.clip_fraction)
