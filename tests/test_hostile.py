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
