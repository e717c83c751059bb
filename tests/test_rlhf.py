"""Tests for rl4llm.rlhf: Bradley-Terry and K-wise losses, KL-shaped rewards, the scalar-head model, the toy
setting, evaluation and short training runs."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl4llm import reward_model as RM
from rl4llm import rlhf
from rl4llm.lm import TinyLMConfig, frozen_copy, sample

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------
# Bradley-Terry loss
# ----------------------------------------------------------------------------------------------------------
def test_bt_loss_matches_naive_formula():
    g = torch.Generator().manual_seed(0)
    c, r = torch.randn(100, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64)
    naive = -torch.log(1 / (1 + torch.exp(-(c - r))))
    assert torch.allclose(RM.bradley_terry_loss(c, r, reduction="none"), naive, rtol=1e-12, atol=0)
    assert RM.bradley_terry_loss(c, r).item() == pytest.approx(naive.mean().item(), rel=1e-12)
    assert RM.bradley_terry_loss(c, r, reduction="sum").item() == pytest.approx(naive.sum().item(), rel=1e-12)


def test_bt_loss_large_differences_are_finite_and_right():
    c = torch.tensor([1e4, -1e4, 0.0], requires_grad=True)
    r = torch.zeros(3)
    loss = RM.bradley_terry_loss(c, r, reduction="none")
    assert torch.isfinite(loss).all()
    assert loss[0].item() == 0.0  # log(1 + e^-1e4) underflows to exactly 0
    assert loss[1].item() == pytest.approx(1e4, rel=1e-7)
    assert loss[2].item() == pytest.approx(math.log(2), rel=1e-6)
    naive = -torch.log(torch.sigmoid(torch.tensor(-1e4)))
    assert torch.isinf(naive)  # what the stable form avoids
    loss.sum().backward()
    # d/dd (-log sigmoid(d)) = -sigmoid(-d): -0 at +1e4, -1 at -1e4, -1/2 at 0
    assert torch.allclose(c.grad, torch.tensor([0.0, -1.0, -0.5]), atol=1e-7)


def test_bt_loss_gradient_is_minus_sigmoid_of_minus_d():
    d = torch.linspace(-30, 30, 241, dtype=torch.float64, requires_grad=True)
    RM.bradley_terry_loss(d, torch.zeros_like(d), reduction="sum").backward()
    assert torch.allclose(d.grad, -torch.sigmoid(-d.detach()), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bt_loss_low_precision_upcasts(dtype):
    c = torch.tensor([3.0, -2.5, 100.0, -100.0], dtype=dtype)
    r = torch.tensor([-1.0, 0.5, 0.0, 0.0], dtype=dtype)
    out = RM.bradley_terry_loss(c, r, reduction="none")
    assert out.dtype == torch.float32
    ref = -torch.nn.functional.logsigmoid(c.double() - r.double())
    assert torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-38)  # e^-100 is a float32 subnormal


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(-50, 50), st.floats(-50, 50), st.floats(-1e3, 1e3)), min_size=1, max_size=20))
def test_bt_loss_invariant_to_per_prompt_shift(rows):
    c, r, f = (torch.tensor(col, dtype=torch.float64) for col in zip(*rows, strict=True))
    a = RM.bradley_terry_loss(c, r, reduction="none")
    b = RM.bradley_terry_loss(c + f, r + f, reduction="none")
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------
# K-wise ranking loss
# ----------------------------------------------------------------------------------------------------------
def kwise_loop(rewards, counts):
    total = 0.0
    for row, k in zip(rewards.tolist(), counts, strict=True):
        pairs = list(itertools.combinations(range(k), 2))
        total += sum(math.log1p(math.exp(-(row[i] - row[j]))) for i, j in pairs) / len(pairs)
    return total / len(counts)


@pytest.mark.parametrize("K", [2, 3, 5, 9])
def test_kwise_equals_explicit_loop(K):
    g = torch.Generator().manual_seed(K)
    r = torch.randn(6, K, generator=g, dtype=torch.float64) * 3
    assert RM.kwise_ranking_loss(r).item() == pytest.approx(kwise_loop(r, [K] * 6), rel=1e-12)


def test_kwise_with_mask_equals_loop_over_valid_responses():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(4, 6, generator=g, dtype=torch.float64)
    counts = [6, 2, 4, 3]
    mask = torch.tensor([[1] * k + [0] * (6 - k) for k in counts])
    r_padded = torch.where(mask.bool(), r, torch.tensor(float("nan"), dtype=torch.float64))  # padding ignored
    assert RM.kwise_ranking_loss(r_padded, mask).item() == pytest.approx(kwise_loop(r, counts), rel=1e-12)


def test_kwise_with_two_is_bradley_terry():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(10, 2, generator=g, dtype=torch.float64)
    assert RM.kwise_ranking_loss(r).item() == pytest.approx(
        RM.bradley_terry_loss(r[:, 0], r[:, 1]).item(), rel=1e-12)


# ----------------------------------------------------------------------------------------------------------
# KL-shaped rewards
# ----------------------------------------------------------------------------------------------------------
def random_batch(seed, B=5, T=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    logp_ref = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dtype)
    scores = torch.randn(B, generator=g, dtype=dtype)
    return scores, logp, logp_ref, mask, lengths


@pytest.mark.parametrize("seed", range(5))
def test_kl_shaped_rewards_sum_to_sequence_reward(seed):
    scores, logp, logp_ref, mask, lengths = random_batch(seed)
    beta = 0.37
    r = rlhf.kl_shaped_rewards(scores, logp, logp_ref, mask, beta=beta)
    seq = scores - beta * ((logp - logp_ref) * mask).sum(1)
    assert torch.allclose(r.sum(1), seq, rtol=1e-12, atol=1e-12)
    assert torch.allclose(rlhf.sequence_kl_shaped_reward(scores, logp, logp_ref, mask, beta=beta), seq,
                          rtol=1e-12, atol=1e-12)
    # score exactly at the last valid token, -beta * log-ratio everywhere else, 0 on padding
    for b in range(r.shape[0]):
        last = int(lengths[b]) - 1
        expected = -beta * (logp[b] - logp_ref[b]) * mask[b]
        expected[last] += scores[b]
        assert torch.allclose(r[b], expected, rtol=1e-12, atol=1e-12)
        assert (r[b, last + 1:] == 0).all()


def test_kl_shaped_rewards_ignore_padding_values():
    scores, logp, logp_ref, mask, _ = random_batch(7)
    r = rlhf.kl_shaped_rewards(scores, logp, logp_ref, mask, beta=0.5, estimator="k3")
    pad = mask == 0
    logp2, ref2 = logp.clone(), logp_ref.clone()
    logp2[pad], ref2[pad] = -1e3, 7.0
    assert torch.equal(rlhf.kl_shaped_rewards(scores, logp2, ref2, mask, beta=0.5, estimator="k3"), r)
    assert (r[pad] == 0).all() and not torch.signbit(r[pad]).any()


def test_kl_shaped_rewards_with_non_prefix_mask_puts_score_on_last_one():
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    r = rlhf.kl_shaped_rewards(torch.tensor([2.0]), torch.zeros(1, 4), torch.zeros(1, 4), mask, beta=1.0)
    assert torch.equal(r, torch.tensor([[0.0, 0.0, 2.0, 0.0]]))


def test_kl_shaped_rewards_bf16_accumulates_in_float32():
    scores, logp, logp_ref, mask, _ = random_batch(3, dtype=torch.float32)
    r = rlhf.kl_shaped_rewards(scores.bfloat16(), logp.bfloat16(), logp_ref.bfloat16(), mask, beta=0.2)
    assert r.dtype == torch.float32
    ref = rlhf.kl_shaped_rewards(scores.bfloat16().float(), logp.bfloat16().float(), logp_ref.bfloat16().float(),
                                 mask, beta=0.2)
    assert torch.equal(r, ref)


def test_gamma_one_gae_with_zero_values_gives_sequence_reward_at_every_token():
    from rl4llm.returns import gae
    scores, logp, logp_ref, mask, _ = random_batch(11)
    r = rlhf.kl_shaped_rewards(scores, logp, logp_ref, mask, beta=0.1)
    returns = gae(r, torch.zeros_like(r), gamma=1.0, lam=1.0, mask=mask)  # reward-to-go
    seq = rlhf.sequence_kl_shaped_reward(scores, logp, logp_ref, mask, beta=0.1)
    assert torch.allclose(returns[:, 0], seq, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta=-0.1), "beta"),
    (dict(beta=float("nan")), "beta"),
    (dict(beta=0.1, estimator="k4"), "estimator"),
])
def test_kl_shaped_rewards_validation_of_options(kwargs, match):
    scores, logp, logp_ref, mask, _ = random_batch(0)
    with pytest.raises(ValueError, match=match):
        rlhf.kl_shaped_rewards(scores, logp, logp_ref, mask, **kwargs)


def test_kl_shaped_rewards_validation_of_tensors():
    scores, logp, logp_ref, mask, _ = random_batch(0)
    bad_mask = mask.clone()
    bad_mask[1] = 0
    nan_logp = logp.clone()
    nan_logp[0, 0] = float("nan")
    cases = [
        ((scores[:-1], logp, logp_ref, mask), "scores"),
        ((scores, logp, logp_ref[:, :-1], mask), "logp_ref"),
        ((scores, logp[0], logp_ref, mask), "logp"),
        ((scores, logp, logp_ref, mask[:, :-1]), "mask"),
        ((scores, logp, logp_ref, bad_mask), "no tokens"),
        ((scores, logp, logp_ref, mask * 2), "0 and 1"),
        ((scores, nan_logp, logp_ref, mask), "NaN"),
        ((torch.tensor([float("inf")] * 5), logp, logp_ref, mask), "NaN or infinite"),
        ((scores.long(), logp, logp_ref, mask), "floating-point"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            rlhf.kl_shaped_rewards(*args, beta=0.1)


def test_loss_validation():
    with pytest.raises(ValueError, match="rejected_rewards"):
        RM.bradley_terry_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        RM.bradley_terry_loss(torch.tensor([float("nan")]), torch.zeros(1))
    with pytest.raises(ValueError, match="floating-point"):
        RM.bradley_terry_loss(torch.zeros(3, dtype=torch.long), torch.zeros(3))
    with pytest.raises(ValueError, match="reduction"):
        RM.bradley_terry_loss(torch.zeros(3), torch.zeros(3), reduction="max")
    with pytest.raises(ValueError, match="K >= 2"):
        RM.kwise_ranking_loss(torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        RM.kwise_ranking_loss(torch.zeros(3))
    with pytest.raises(ValueError, match="at least two"):
        RM.kwise_ranking_loss(torch.zeros(2, 3), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    with pytest.raises(ValueError, match="NaN"):
        RM.kwise_ranking_loss(torch.tensor([[0.0, float("nan")]]))


# ----------------------------------------------------------------------------------------------------------
# Scalar-head model, true reward
# ----------------------------------------------------------------------------------------------------------
def tiny_cfg():
    return TinyLMConfig(vocab_size=41, n_layer=1, n_head=2, d_model=16, max_len=16)


def test_scalar_model_score_reads_last_valid_token_and_ignores_padding():
    torch.manual_seed(0)
    m = RM.ScalarModel(tiny_cfg())
    torch.nn.init.normal_(m.head.weight)
    prompts = torch.randint(3, 41, (3, 4))
    comp = torch.randint(3, 41, (3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).float()
    s = m.score(prompts, comp, mask)
    full = m(torch.cat([prompts, comp], 1))
    assert torch.equal(s, torch.stack([full[0, 4 + 2], full[1, 4 + 4], full[2, 4 + 0]]))
    comp2 = torch.where(mask.bool(), comp, torch.randint(3, 41, comp.shape))
    assert torch.allclose(m.score(prompts, comp2, mask), s, atol=1e-6)  # causal: padding after is not seen
    v = m.values(prompts, comp, mask)
    assert v.shape == (3, 5) and (v[mask == 0] == 0).all()
    assert torch.equal(v[1], full[1, 3:8])  # V(x, y_<t) is read before token t


def test_scalar_model_from_lm_copies_backbone_and_starts_at_zero():
    torch.manual_seed(0)
    from rl4llm.lm import TinyLM
    lm = TinyLM(tiny_cfg())
    m = RM.ScalarModel.from_lm(lm)
    for (n1, p1), (n2, p2) in zip(lm.named_parameters(), m.backbone.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    assert (m(torch.randint(0, 41, (2, 6))) == 0).all()
    torch.nn.init.normal_(m.head.weight)
    m2 = RM.ScalarModel.from_lm(m)
    ids = torch.randint(0, 41, (2, 6))
    assert torch.equal(m2(ids), m(ids))
    with pytest.raises(ValueError, match="TinyLM"):
        RM.ScalarModel.from_lm(torch.nn.Linear(2, 2))


def test_digit_gain_hand_values():
    from rl4llm.tasks import CopyTask
    task = CopyTask(4)
    reward = rlhf.DigitGain(task)
    tok = task.tokenizer
    x = task.encode_prompts(["c1234=", "c0000=", "c9999="])
    y = torch.tensor([tok.encode("1234", eos=True), tok.encode("9999", eos=True), tok.encode("12", eos=True) + [0, 0]])
    mask = torch.tensor([[1.0] * 5, [1.0] * 5, [1.0] * 3 + [0.0] * 2])
    r = reward(x, y, mask)
    assert torch.allclose(r, torch.tensor([0.0, 36 / 4.5, (3 - 36) / 4.5]))
    # only the first four positions count; masked tokens count 0
    y5 = torch.tensor([tok.encode("12349")])
    assert reward(x[:1], y5, torch.ones(1, 5)).item() == 0.0
    assert reward(x[:1], y[:1], torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]])).item() == pytest.approx((3 - 10) / 4.5)
    with pytest.raises(ValueError, match="prompt_ids"):
        reward(torch.ones(1, 6, dtype=torch.long), y[:1], torch.ones(1, 5))
    with pytest.raises(ValueError, match="scale"):
        rlhf.DigitGain(task, scale=0)


# ----------------------------------------------------------------------------------------------------------
# The toy setting: evaluation and short training runs
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setting(one_thread):
    return rlhf.make_setting(0, warmstart_steps=60)


def test_make_setting_is_deterministic(setting):
    again = rlhf.make_setting(0, warmstart_steps=60)
    for p1, p2 in zip(setting.reference.parameters(), again.reference.parameters(), strict=True):
        assert torch.equal(p1, p2)


def test_evaluate_policy_reference_has_zero_kl_and_is_reproducible(setting):
    ref = frozen_copy(setting.reference)
    e1 = rlhf.evaluate_policy(setting.reference, ref, setting.task, setting.true_reward, n=64, seed=3)
    e2 = rlhf.evaluate_policy(setting.reference, ref, setting.task, setting.true_reward, n=64, seed=3)
    assert e1 == e2 and e1.kl == 0.0 and e1.n == 64
    # the reward it reports is the true reward of the completions sampled with that seed
    gen = torch.Generator().manual_seed(3)
    task = setting.task
    x = task.encode_prompts(task.sample_prompts(64, generator=gen, split="test"))
    out = sample(setting.reference, x, task.max_new_tokens, eos_id=2, pad_id=0, generator=gen)
    assert e1.reward == pytest.approx(setting.true_reward(x, out.tokens, out.mask).double().mean().item(), abs=1e-12)
    with pytest.raises(ValueError, match="estimator"):
        rlhf.evaluate_policy(setting.reference, ref, task, setting.true_reward, n=8, estimator="k2")


def test_preference_data_labels_follow_bradley_terry(setting):
    pairs = rlhf.preference_data(setting, 256, seed=0)
    r_c = setting.true_reward(pairs.prompts, pairs.chosen, pairs.chosen_mask)
    assert torch.allclose(r_c, pairs.chosen_reward)
    # the higher-reward response is chosen more often than not
    diff = pairs.chosen_reward - pairs.rejected_reward
    assert (diff > 0).float().mean() > (diff < 0).float().mean()


def test_short_reward_model_training_beats_chance(setting):
    tr = rlhf.preference_data(setting, 512, seed=1)
    rm = RM.ScalarModel.from_lm(setting.reference)
    before = RM.preference_accuracy(rm, tr)
    assert before == 0.5  # zero head: every score is 0, every pair a tie
    hist = RM.train_reward_model(rm, tr, epochs=2, batch_size=64, lr=3e-3)
    assert hist.loss[-1] < math.log(2) and hist.train_accuracy[-1] > 0.6


def test_short_ppo_run_raises_the_reward_it_is_trained_on(setting):
    policy = copy.deepcopy(setting.reference)
    ref = frozen_copy(setting.reference)
    hist = rlhf.ppo_lm(policy, ref, setting.true_reward, setting.task, beta=0.01, true_reward=setting.true_reward,
                       iterations=8, batch_size=32, epochs=2, minibatches=2, lr=3e-3, seed=0)
    assert len(hist.true_reward) == 8 and hist.kl[0] == 0.0
    assert hist.true_reward == hist.score
    assert sum(hist.true_reward[-3:]) / 3 > hist.true_reward[0] + 0.3
    with pytest.raises(ValueError, match="minibatches"):
        rlhf.ppo_lm(policy, ref, setting.true_reward, setting.task, beta=0.1, batch_size=10, minibatches=3)
    with pytest.raises(ValueError, match="beta"):
        rlhf.ppo_lm(policy, ref, setting.true_reward, setting.task, beta=-1.0)
