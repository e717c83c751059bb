"""Every public tensor function against a battery of bad inputs, as a hostile user would call it.

For each function a valid call is built at ``B == T`` (so a broadcast would be silent), then one tensor argument
at a time is replaced by: a tensor of the wrong rank, broadcastable shapes (``[B]``, ``[B, 1]``, ``[1, T]``), a NaN
at a real position, an empty tensor, and for masks the values 2 and -1 (shape variants only where two arguments
must agree: a lone ``[..., T]`` argument may have any rank, and its empty input has the exact empty
answer). Each of these must raise ValueError or
TypeError. Then every floating-point input is cast to bfloat16: the call must succeed and agree with the float32
call to bfloat16 rounding. The number of cases is printed by ``test_battery_size``.
"""

from __future__ import annotations

import math

import pytest
import torch

from rl4llm import dpo, grpo, kl, pg, ppo, returns, reward_model, rlhf, surrogate

B = T = 4


def _lp(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(B, T, generator=g) - 0.1


def _mask() -> torch.Tensor:
    m = torch.ones(B, T, dtype=torch.bool)
    m[0, 3] = m[1, 2:] = False
    return m


def _vec(seed: int) -> torch.Tensor:
    return torch.randn(B, generator=torch.Generator().manual_seed(seed))


def _scalar(out):
    """A tensor that summarises the output (the loss, or the first element of a tuple)."""
    if isinstance(out, tuple):
        out = out[0]
    return out.float()


# name -> (function, builder of the valid keyword arguments, names of [B, T] args, names of mask args,
#          names of [B] args, fixed non-tensor keyword arguments)
CASES = {
    "surrogate.masked_mean": (surrogate.masked_mean, lambda: dict(x=_lp(0), mask=_mask()), ["x"], ["mask"], [], {}),
    "surrogate.normalize_advantages": (surrogate.normalize_advantages,
                                       lambda: dict(advantages=_lp(1), mask=_mask()), ["advantages"], ["mask"], [], {}),
    "surrogate.clipped_objective": (surrogate.clipped_objective,
                                    lambda: dict(logp=_lp(0), logp_old=_lp(1), advantages=_lp(2)),
                                    ["logp", "logp_old", "advantages"], [], [], {}),
    "surrogate.policy_loss": (surrogate.policy_loss,
                              lambda: dict(logp=_lp(0), logp_old=_lp(1), advantages=_lp(2), mask=_mask()),
                              ["logp", "logp_old", "advantages"], ["mask"], [], {}),
    "surrogate.value_loss": (surrogate.value_loss, lambda: dict(values=_lp(0), returns=_lp(1), mask=_mask()),
                             ["values", "returns"], ["mask"], [], {}),
    "ppo.kl_penalty_loss": (ppo.kl_penalty_loss,
                            lambda: dict(logp=_lp(0), logp_old=_lp(1), advantages=_lp(2), kl=-_lp(3), mask=_mask()),
                            ["logp", "logp_old", "advantages", "kl"], ["mask"], [], {"beta": 0.5}),
    "kl.kl_k1": (kl.kl_k1, lambda: dict(logp=_lp(0), logq=_lp(1), mask=_mask()), ["logp", "logq"], ["mask"], [], {}),
    "kl.kl_k2": (kl.kl_k2, lambda: dict(logp=_lp(0), logq=_lp(1), mask=_mask()), ["logp", "logq"], ["mask"], [], {}),
    "kl.kl_k3": (kl.kl_k3, lambda: dict(logp=_lp(0), logq=_lp(1), mask=_mask()), ["logp", "logq"], ["mask"], [], {}),
    "kl.per_token_kl": (kl.per_token_kl, lambda: dict(logp_policy=_lp(0), logp_ref=_lp(1), mask=_mask()),
                        ["logp_policy", "logp_ref"], ["mask"], [], {}),
    "returns.discounted_returns": (returns.discounted_returns, lambda: dict(rewards=_lp(0)), ["rewards"], [], [],
                                   {"gamma": 0.9}),
    "returns.reward_to_go": (returns.reward_to_go, lambda: dict(rewards=_lp(0)), ["rewards"], [], [], {"gamma": 0.9}),
    "returns.gae": (returns.gae, lambda: dict(rewards=_lp(0), values=_lp(1), mask=_mask()), ["rewards", "values"],
                    ["mask"], [], {"gamma": 0.9, "lam": 0.8}),
    "returns.batch_mean_baseline": (returns.batch_mean_baseline, lambda: dict(returns=_lp(0), mask=_mask()),
                                    ["returns"], ["mask"], [], {}),
    "returns.leave_one_out_baseline": (returns.leave_one_out_baseline, lambda: dict(returns=_lp(0), mask=_mask()),
                                       ["returns"], ["mask"], [], {}),
    "pg.reinforce_surrogate": (pg.reinforce_surrogate, lambda: dict(logp=_lp(0), weights=_lp(1), mask=_mask()),
                               ["logp", "weights"], ["mask"], [], {}),
    "grpo.grpo_loss": (grpo.grpo_loss, lambda: dict(logp=_lp(0), logp_old=_lp(1), advantages=_vec(2), mask=_mask()),
                       ["logp", "logp_old"], ["mask"], ["advantages"], {}),
    "grpo.sequence_log_ratio": (grpo.sequence_log_ratio, lambda: dict(logp=_lp(0), logp_old=_lp(1), mask=_mask()),
                                ["logp", "logp_old"], ["mask"], [], {}),
    "reward_model.bradley_terry_loss": (reward_model.bradley_terry_loss,
                                        lambda: dict(chosen_rewards=_vec(0), rejected_rewards=_vec(1)), [], [],
                                        ["chosen_rewards", "rejected_rewards"], {}),
    "reward_model.kwise_ranking_loss": (reward_model.kwise_ranking_loss,
                                        lambda: dict(rewards_ranked=_lp(0), mask=_mask()), ["rewards_ranked"],
                                        ["mask"], [], {}),
    "dpo.dpo_loss": (dpo.dpo_loss, lambda: dict(policy_chosen_logps=_vec(0), policy_rejected_logps=_vec(1),
                                                ref_chosen_logps=_vec(2), ref_rejected_logps=_vec(3)), [], [],
                     ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"],
                     {"beta": 0.1}),
    "dpo.masked_sequence_logps": (dpo.masked_sequence_logps, lambda: dict(token_logps=_lp(0), mask=_mask()),
                                  ["token_logps"], ["mask"], [], {}),
    "rlhf.kl_shaped_rewards": (rlhf.kl_shaped_rewards,
                               lambda: dict(scores=_vec(0), logp=_lp(1), logp_ref=_lp(2), mask=_mask()),
                               ["logp", "logp_ref"], ["mask"], ["scores"], {"beta": 0.1}),
}


def _bad_variants(kwargs, seq_args, mask_args, vec_args):
    """``(label, arguments)`` for every bad substitution of one argument."""
    m = kwargs.get("mask")
    # a lone [..., T] argument may have any rank; shapes are a contract between two or more arguments
    paired = len(seq_args) + len(mask_args) + len(vec_args) > 1
    for name in seq_args:
        x = kwargs[name]
        if paired:
            yield f"{name} wrong rank", {**kwargs, name: x[None]}
            yield f"{name} as [B]", {**kwargs, name: x[:, 0]}
            yield f"{name} as [B, 1]", {**kwargs, name: x[:, :1]}
            yield f"{name} as [1, T]", {**kwargs, name: x[:1]}
        nan = x.clone()
        nan[2, 0] = math.nan                              # a real position (row 2 is all real)
        yield f"{name} NaN", {**kwargs, name: nan}
        if paired:   # a lone [..., T] sum of nothing is the empty result, exactly (tests/test_returns.py)
            yield f"{name} empty", {**kwargs, name: x[:0]}
    for name in vec_args:
        x = kwargs[name]
        yield f"{name} wrong rank", {**kwargs, name: x[:, None, None]}
        nan = x.clone()
        nan[2] = math.nan
        yield f"{name} NaN", {**kwargs, name: nan}
        yield f"{name} empty", {**kwargs, name: x[:0]}
    for name in mask_args:
        for v in (2, -1):
            bad = m.long().clone()
            bad[2, 1] = v
            yield f"{name} holds {v}", {**kwargs, name: bad}
        yield f"{name} as [B]", {**kwargs, name: m[:, 0]}
        yield f"{name} as [1, T]", {**kwargs, name: m[:1]}


BAD = [(fname, label) for fname, (fn, build, seq, masks, vecs, fixed) in CASES.items()
       for label, _ in _bad_variants(build(), seq, masks, vecs)]


@pytest.mark.parametrize("fname, label", BAD, ids=[f"{f}: {lab}" for f, lab in BAD])
def test_bad_input_is_refused(fname, label):
    fn, build, seq, masks, vecs, fixed = CASES[fname]
    args = dict(_bad_variants(build(), seq, masks, vecs))[label]
    with pytest.raises((ValueError, TypeError)):
        fn(**args, **fixed)


@pytest.mark.parametrize("fname", list(CASES))
def test_bfloat16_inputs_are_accumulated_in_float32(fname):
    fn, build, seq, masks, vecs, fixed = CASES[fname]
    kwargs = build()
    ref = _scalar(fn(**kwargs, **fixed))
    low = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in kwargs.items()}
    rounded = {k: (v.float() if v.is_floating_point() else v) for k, v in low.items()}
    out = fn(**low, **fixed)
    val = _scalar(out)
    assert torch.isfinite(val).all()
    # the bf16 call must be the float32 call on the bf16-rounded inputs, up to the bf16 rounding of the result
    exact = _scalar(fn(**rounded, **fixed))
    assert torch.allclose(val, exact, rtol=1e-2, atol=1e-2), (val, exact)
    assert torch.isfinite(ref).all()


def test_battery_size():
    print(f"\n{len(CASES)} public functions, {len(BAD)} bad inputs, {len(CASES)} bfloat16 calls")
    assert len(BAD) > 150


# ----------------------------------------------------------------------------------------------------------
# The examples of each bug class, as regression tests
# ----------------------------------------------------------------------------------------------------------


def test_policy_loss_refuses_broadcast_advantages_with_a_mask():
    logp, m = _lp(0), _mask()
    for adv in (_vec(1), _vec(1)[:, None], _vec(1)[None, :]):
        with pytest.raises(ValueError, match="advantages must have the shape of logp"):
            surrogate.policy_loss(logp, _lp(1), adv, mask=m)


def test_string_booleans_and_infinite_learning_rates_are_refused():
    with pytest.raises(ValueError, match="leave_one_out must be True or False"):
        grpo.GRPOConfig(leave_one_out="no")
    with pytest.raises(ValueError, match="leave_one_out must be True or False"):
        grpo.group_advantages(torch.rand(2, 4), leave_one_out="no")
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        grpo.GRPOConfig(lr=math.inf)
    with pytest.raises(ValueError, match="discount_powers|dtype must be a floating-point"):
        returns.discount_powers(0.5, torch.arange(4), dtype=torch.int64)


def test_full_width_digits_are_not_task_prompts():
    from rl4llm.tasks import AdditionTask, CopyTask

    with pytest.raises(ValueError):
        AdditionTask(2).answer("\uff11\uff12+\uff13\uff14=")
    task = CopyTask(4)
    prompt = task.sample_prompts(1, generator=torch.Generator().manual_seed(0))[0]
    wide = "".join(chr(ord(c) + 0xFEE0) if c.isdigit() else c for c in prompt)
    with pytest.raises(ValueError):
        task.answer(wide)


def test_leave_one_out_without_cancellation_and_std_without_overflow():
    from rl4llm import baselines

    r = torch.tensor([1e8, 1.0, 2.0, 1.5])                  # float32, one dominating sample
    assert baselines.optimal_baseline(torch.ones(4, 1), r, leave_one_out=True)[0, 0].item() == 1.5
    assert returns.leave_one_out_baseline(r, 0)[0].item() == 1.5
    big = torch.tensor([[1e19, -1e19, 3e19, 0.0]])
    adv = grpo.group_advantages(big, eps=0.0)
    assert torch.isfinite(adv).all() and (adv != 0).any()        # float32 squares overflow here
    assert torch.allclose(adv, grpo.group_advantages(big.double() / 1e19, eps=0.0).float(), rtol=1e-5)


def test_bf16_moments_are_accumulated_in_float32():
    from rl4llm import baselines

    x = torch.tensor([0.0, 2.0], dtype=torch.bfloat16)
    mean, var = baselines.weighted_mean_var(x, torch.tensor([0.5, 0.5]))
    assert mean.item() == 1.0 and var.item() == 1.0
    with pytest.raises(ValueError, match="prob must"):
        baselines.weighted_mean_var(x, torch.tensor([0.5, -0.5]))


def test_padding_reaches_no_gradient():
    logp = _lp(0).requires_grad_()
    m = _mask()
    poisoned = torch.where(m, _lp(1), torch.tensor(math.nan))
    for fn in (kl.kl_k2, kl.kl_k3):
        (g,) = torch.autograd.grad(fn(logp, poisoned, m).sum(), logp)
        assert torch.isfinite(g).all() and (g[~m] == 0).all()
    adv = torch.where(m, _lp(2), torch.tensor(-math.inf)).requires_grad_()
    (g,) = torch.autograd.grad(surrogate.normalize_advantages(adv, m).square().sum(), adv)
    assert torch.isfinite(g).all()
    rr = torch.where(m, _lp(3), torch.tensor(math.nan)).requires_grad_()
    (g,) = torch.autograd.grad(reward_model.kwise_ranking_loss(rr, m), rr)
    assert torch.isfinite(g).all()


def test_gae_differentiates_values_on_the_scan_path():
    r = torch.randn(2, 40, dtype=torch.float64)
    v = torch.randn(2, 40, dtype=torch.float64, requires_grad=True)
    (g_scan,) = torch.autograd.grad(returns.gae(r, v, gamma=0.9, lam=0.8, method="scan").sum(), v)
    (g_loop,) = torch.autograd.grad(returns.gae(r, v, gamma=0.9, lam=0.8, method="loop").sum(), v)
    assert torch.allclose(g_scan, g_loop, rtol=1e-12, atol=1e-12)


def test_preference_pairs_refuse_nan_rewards():
    from rl4llm.tasks import preference_pairs

    ids = torch.zeros(2, 3, dtype=torch.long)
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="NaN"):
        preference_pairs(lambda p, t, m: torch.full((2,), math.nan), ids, ids, mask, ids, mask)


def test_a_training_loop_stops_at_the_first_non_finite_update():
    from rl4llm.lm import TinyLM, TinyLMConfig
    from rl4llm.tasks import CopyTask, supervised_warmstart

    task = CopyTask(2)
    model = TinyLM(TinyLMConfig(vocab_size=task.tokenizer.vocab_size, d_model=16, n_head=2, n_layer=1,
                                max_len=16))
    with torch.no_grad():
        model.wte.weight[3, 0] = math.nan
    with pytest.raises(FloatingPointError, match="step 1: the loss is nan"):
        supervised_warmstart(model, task, steps=3, batch_size=4, device="cpu")
    with pytest.raises(ValueError, match="lr must be a finite real number > 0"):
        supervised_warmstart(model, task, steps=1, lr=math.inf, device="cpu")
