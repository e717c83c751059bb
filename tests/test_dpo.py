"""Tests for rl4llm.dpo: the loss against its formula, extreme margins, low precision, the gradient, the closed
form against brute force, masks, training, validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl4llm import dpo
from rl4llm.lm import TinyLM, TinyLMConfig, frozen_copy, sequence_logprobs, token_logprobs
from rl4llm.tasks import CopyTask, sample_preference_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def naive_dpo(pc, pr, rc, rr, beta):
    """The textbook formula, in float64, as written: -log(sigmoid(beta * (log-ratio difference)))."""
    z = beta * ((pc - rc) - (pr - rr))
    return -torch.log(torch.sigmoid(z.double()))


def random_logps(n, gen, dtype=torch.float64):
    return -5 * torch.rand(n, generator=gen, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 5.0])
def test_loss_matches_the_formula(beta):
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (random_logps(64, gen) for _ in range(4))
    loss, stats = dpo.dpo_loss(pc, pr, rc, rr, beta=beta)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(naive_dpo(pc, pr, rc, rr, beta).mean().item(), rel=1e-13)
    assert torch.allclose(stats.chosen_rewards, beta * (pc - rc), rtol=1e-14, atol=0)
    assert torch.allclose(stats.rejected_rewards, beta * (pr - rr), rtol=1e-14, atol=0)
    assert torch.allclose(stats.margins, stats.chosen_rewards - stats.rejected_rewards, rtol=0, atol=0)
    assert stats.accuracy.item() == pytest.approx((stats.margins > 0).double().mean().item(), abs=0)
    per_pair, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=beta, reduction="none")
    total, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=beta, reduction="sum")
    assert per_pair.shape == (64,)
    assert total.item() == pytest.approx(per_pair.sum().item(), rel=1e-14)


def test_loss_at_the_reference_is_log2_and_accuracy_one_half():
    x = torch.tensor([-3.0, -1.0, -7.5])
    loss, stats = dpo.dpo_loss(x, x, x, x, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-7)
    assert stats.accuracy.item() == 0.5
    assert (stats.margins == 0).all()


@pytest.mark.parametrize("beta", [1.0, 0.1])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_margins_are_finite_and_exact(beta, sign):
    # The log-ratio difference is +-1e4 / beta, so the margin is +-1e4 exactly.
    d = sign * 1e4 / beta
    pc = torch.tensor([d, d / 2], dtype=torch.float32, requires_grad=True)
    pr = torch.tensor([0.0, -d / 2], dtype=torch.float32, requires_grad=True)
    zero = torch.zeros(2)
    loss, stats = dpo.dpo_loss(pc, pr, zero, zero, beta=beta)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    assert torch.allclose(stats.margins, torch.full((2,), sign * 1e4), rtol=1e-6)
    if sign > 0:
        # -log sigmoid(1e4) = log(1 + e^-1e4) = e^-1e4 (to within e^-2e4): 0 in float32, and so is the gradient.
        assert loss.item() == 0.0 and math.copysign(1.0, loss.item()) == 1.0  # +0, not -0
        assert (pc.grad == 0).all() and (pr.grad == 0).all()
        assert stats.accuracy.item() == 1.0
    else:
        # -log sigmoid(-1e4) = 1e4 + log(1 + e^-1e4) = 1e4; d loss / d log pi(y_w) = -beta sigma(1e4) / B = -beta / 2.
        assert loss.item() == pytest.approx(1e4, rel=1e-7)
        assert torch.allclose(pc.grad, torch.full((2,), -beta / 2), rtol=1e-6)
        assert torch.allclose(pr.grad, torch.full((2,), beta / 2), rtol=1e-6)
        assert stats.accuracy.item() == 0.0
    # The textbook form overflows at the same margins (float32): log(sigmoid(-1e4)) = log(0) = -inf.
    naive = -torch.log(torch.sigmoid(torch.tensor(sign * 1e4)))
    assert (sign < 0) == bool(torch.isinf(naive))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logps_accumulate_in_float32(dtype):
    gen = torch.Generator().manual_seed(1)
    # Sequence log-probs of order -100: in bf16 the spacing there is 0.5, so computing the differences in bf16
    # would round them; upcasting first keeps them exact.
    xs = [(-100 * torch.rand(32, generator=gen)).to(dtype) for _ in range(4)]
    loss, stats = dpo.dpo_loss(*xs, beta=0.1)
    assert loss.dtype == torch.float32 and stats.margins.dtype == torch.float32
    ref_loss, ref_stats = dpo.dpo_loss(*(x.float() for x in xs), beta=0.1)
    assert loss.item() == ref_loss.item()
    assert torch.equal(stats.margins, ref_stats.margins)
    exact = naive_dpo(*(x.double() for x in xs), 0.1).mean().item()
    assert loss.item() == pytest.approx(exact, rel=1e-6)
    # Gradient flows back to the bf16 leaves.
    leaf = xs[0].clone().requires_grad_(True)
    dpo.dpo_loss(leaf, *xs[1:], beta=0.1)[0].backward()
    assert leaf.grad.dtype == dtype and torch.isfinite(leaf.grad.float()).all()


@settings(max_examples=50, deadline=None)
@given(st.floats(-50, 50), st.floats(-50, 50), st.floats(0.01, 10))
def test_loss_is_nonnegative_and_decreasing_in_the_margin(a, b, beta):
    pc = torch.tensor([a, a + 1.0], dtype=torch.float64)
    pr = torch.tensor([b, b], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    per_pair, _ = dpo.dpo_loss(pc, pr, zero, zero, beta=beta, reduction="none")
    assert (per_pair >= 0).all()
    assert per_pair[1] <= per_pair[0]


# ------------------------------------------------------------------------------------------------------ gradient
def test_gradient_matches_the_closed_form():
    """grad L = -beta/B sum_i sigma(r_l - r_w) (grad log pi(y_w) - grad log pi(y_l)), for a softmax policy."""
    gen = torch.Generator().manual_seed(2)
    V, B, beta = 7, 40, 0.3
    theta = torch.randn(V, generator=gen, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(V, generator=gen, dtype=torch.float64), -1)
    yw, yl = torch.randint(0, V, (B,), generator=gen), torch.randint(0, V, (B,), generator=gen)
    logp = torch.log_softmax(theta, -1)
    loss, stats = dpo.dpo_loss(logp[yw], logp[yl], ref[yw], ref[yl], beta=beta)
    (g_auto,) = torch.autograd.grad(loss, theta)
    with torch.no_grad():
        pi = logp.exp()
        score = torch.eye(V, dtype=torch.float64) - pi  # row y: grad_theta log pi(y) = e_y - pi
        weight = torch.sigmoid(stats.rejected_rewards - stats.chosen_rewards)
        g_formula = -beta * (weight[:, None] * (score[yw] - score[yl])).mean(0)
    assert torch.allclose(g_auto, g_formula, rtol=1e-12, atol=1e-15)


def test_mask_drops_pairs_from_value_and_gradient():
    gen = torch.Generator().manual_seed(3)
    pc = random_logps(6, gen).requires_grad_(True)
    pr, rc, rr = (random_logps(6, gen) for _ in range(3))
    mask = torch.tensor([1, 0, 1, 1, 0, 1])
    loss, stats = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5, mask=mask)
    keep = mask.bool()
    sub, sub_stats = dpo.dpo_loss(pc[keep], pr[keep], rc[keep], rr[keep], beta=0.5)
    assert loss.item() == pytest.approx(sub.item(), rel=1e-14)
    assert stats.accuracy.item() == pytest.approx(sub_stats.accuracy.item(), abs=0)
    loss.backward()
    assert (pc.grad[~keep] == 0).all() and (pc.grad[keep] != 0).all()
    per_pair, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5, mask=mask.bool(), reduction="none")
    assert (per_pair[~keep] == 0).all()


def test_masked_sequence_logps():
    tok = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -100.0]], dtype=torch.bfloat16)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = dpo.masked_sequence_logps(tok, mask)
    assert out.dtype == torch.float32
    assert out.tolist() == [-6.0, -0.75]
    # NaN padding is ignored where the mask is 0, but not where it is 1.
    tok2 = tok.float().clone()
    tok2[1, 2] = float("nan")
    assert dpo.masked_sequence_logps(tok2, mask).tolist() == [-6.0, -0.75]
    with pytest.raises(ValueError, match="NaN"):
        dpo.masked_sequence_logps(tok2, torch.ones(2, 3))
    with pytest.raises(ValueError, match="all zeros"):
        dpo.masked_sequence_logps(tok, torch.tensor([[1, 0, 0], [0, 0, 0]]))


def test_sequence_logps_of_a_model_match_token_sums():
    torch.manual_seed(0)
    model = TinyLM(TinyLMConfig(vocab_size=6, n_layer=1, n_head=2, d_model=8, max_len=8))
    x = torch.randint(0, 6, (3, 2))
    y = torch.randint(0, 6, (3, 4))
    m = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    tok = token_logprobs(model, x, y, m)
    assert torch.allclose(dpo.masked_sequence_logps(tok, m), sequence_logprobs(model, x, y, m), atol=1e-6)


def test_implicit_rewards():
    p = torch.tensor([-1.0, -2.0], requires_grad=True)
    r = torch.tensor([-1.5, -1.0], requires_grad=True)
    out = dpo.implicit_rewards(p, r, beta=0.5)
    assert out.tolist() == [0.25, -0.5]  # a per-response log-ratio: it can be negative
    out.sum().backward()
    assert p.grad.tolist() == [0.5, 0.5] and r.grad is None  # the reference is a constant


# --------------------------------------------------------------------------------------- closed form, enumerable
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.02, 20.0), st.integers(2, 9))
def test_optimal_policy_is_normalised_and_beats_every_other_policy(seed, beta, V):
    gen = torch.Generator().manual_seed(seed)
    ref = torch.log_softmax(2 * torch.randn(3, V, generator=gen, dtype=torch.float64), -1)
    r = torch.randn(3, V, generator=gen, dtype=torch.float64)
    star = dpo.optimal_policy(ref, r, beta=beta)
    assert torch.allclose(star.exp().sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-12)
    # Brute force: pi_ref * exp(r / beta), normalised (fine in float64 for these scales).
    w = ref.exp() * torch.exp(r / beta)
    assert torch.allclose(star.exp(), w / w.sum(-1, keepdim=True), rtol=1e-9, atol=1e-300)
    J_star = dpo.kl_regularised_objective(star, ref, r, beta=beta)
    assert torch.allclose(J_star, beta * dpo.log_partition(ref, r, beta=beta), rtol=1e-10, atol=1e-12)
    # J(pi) = beta log Z - beta KL(pi || pi*) for any pi: check on random policies, and that none beats pi*.
    others = torch.log_softmax(3 * torch.randn(16, 3, V, generator=gen, dtype=torch.float64), -1)
    J = dpo.kl_regularised_objective(others, ref.expand_as(others), r.expand_as(others), beta=beta)
    gap = beta * dpo.categorical_kl(others, star.expand_as(others))
    assert torch.allclose(J, J_star - gap, rtol=1e-9, atol=1e-9)
    assert (J <= J_star + 1e-12).all()


def test_optimal_policy_extremes_and_zero_reference_mass():
    ref = torch.log(torch.tensor([0.5, 0.5, 0.0]))
    r = torch.tensor([1.0, 0.0, 100.0])
    star = dpo.optimal_policy(ref, r, beta=1e-4)  # r / beta = 1e6: no overflow
    assert torch.isfinite(star[:2]).all() and star[2] == float("-inf")
    assert star[0].item() == 0.0 and star[1].item() < -1e3
    big = dpo.optimal_policy(ref, r, beta=1e6)  # nearly the reference
    assert torch.allclose(big.exp(), ref.exp(), atol=1e-6)
    assert dpo.categorical_kl(star, ref).item() == pytest.approx(math.log(2.0), rel=1e-6)
    # The dim argument: responses along dim 0.
    ref2 = torch.log_softmax(torch.randn(4, 3, dtype=torch.float64), 0)
    r2 = torch.randn(4, 3, dtype=torch.float64)
    assert torch.allclose(dpo.optimal_policy(ref2, r2, beta=0.7, dim=0),
                          dpo.optimal_policy(ref2.T, r2.T, beta=0.7).T, atol=1e-14)


def test_categorical_kl_edge_cases():
    p = torch.log(torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    q = torch.log(torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64))
    assert dpo.categorical_kl(p, q).item() == pytest.approx(math.log(2.0), rel=1e-15)
    assert dpo.categorical_kl(q, p).item() == float("inf")
    assert dpo.categorical_kl(p, p).item() == 0.0


def test_exact_rl_and_exact_dpo_reach_the_closed_form():
    """The whole chapter in miniature: on a one-step problem both optimisations land on pi*."""
    gen = torch.Generator().manual_seed(5)
    V, beta = 5, 0.5
    ref = torch.log_softmax(torch.randn(V, generator=gen, dtype=torch.float64), -1)
    r = torch.randn(V, generator=gen, dtype=torch.float64)
    star = dpo.optimal_policy(ref, r, beta=beta)

    def fit(objective):
        theta = ref.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([theta], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = objective(torch.log_softmax(theta, -1))
            loss.backward()
            return loss
        opt.step(closure)
        return torch.log_softmax(theta.detach(), -1)

    rl = fit(lambda lp: -dpo.kl_regularised_objective(lp, ref, r, beta=beta))
    yw, yl = torch.meshgrid(torch.arange(V), torch.arange(V), indexing="ij")
    yw, yl = yw.flatten(), yl.flatten()
    w = ref.exp()[yw] * ref.exp()[yl] * torch.sigmoid(r[yw] - r[yl])  # P(pair drawn from ref, y_w preferred)

    def dpo_objective(lp):
        per_pair, _ = dpo.dpo_loss(lp[yw], lp[yl], ref[yw], ref[yl], beta=beta, reduction="none")
        return (w * per_pair).sum()
    fitted = fit(dpo_objective)
    assert dpo.categorical_kl(star, rl).item() < 1e-10
    assert dpo.categorical_kl(star, fitted).item() < 1e-10


# ------------------------------------------------------------------------------------------------------ training
def test_train_dpo_moves_towards_the_preferred_responses():
    torch.manual_seed(0)
    task = CopyTask(n_digits=2)
    model = TinyLM(TinyLMConfig(vocab_size=task.tokenizer.vocab_size, n_layer=1, n_head=2, d_model=16, max_len=8))
    reference = frozen_copy(model)
    pairs = sample_preference_pairs(reference, task, 128, scale=4.0, generator=torch.Generator().manual_seed(0))
    evals = []
    hist = dpo.train_dpo(model, reference, pairs, beta=0.5, steps=30, batch_size=32, lr=3e-3, seed=0,
                         eval_fn=lambda pol: evals.append(1) or len(evals), eval_every=10)
    assert hist.steps == 30 and len(hist.loss) == 30
    assert hist.loss[0] == pytest.approx(math.log(2.0), abs=1e-5)  # the policy starts at the reference
    assert hist.accuracy[0] == 0.5
    assert sum(hist.loss[-5:]) / 5 < 0.6
    assert [s for s, _ in hist.evals] == [0, 10, 20, 30]
    assert model.training
    # Determinism: the same seed gives the same run.
    torch.manual_seed(0)
    model2 = TinyLM(model.config)
    hist2 = dpo.train_dpo(model2, reference, pairs, beta=0.5, steps=30, batch_size=32, lr=3e-3, seed=0)
    assert hist2.loss == hist.loss


# ---------------------------------------------------------------------------------------------------- validation
def test_validation_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="beta"):
        dpo.dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        dpo.dpo_loss(x, x, x, x, beta=-1.0)
    with pytest.raises(ValueError, match="beta"):
        dpo.dpo_loss(x, x, x, x, beta=float("nan"))
    with pytest.raises(ValueError, match="ref_rejected_logps must have the shape"):
        dpo.dpo_loss(x, x, x, torch.zeros(4), beta=1.0)
    with pytest.raises(ValueError, match="policy_chosen_logps contains NaN"):
        dpo.dpo_loss(torch.tensor([0.0, float("nan"), 0.0]), x, x, x, beta=1.0)
    with pytest.raises(ValueError, match="ref_chosen_logps contains infinite"):
        dpo.dpo_loss(x, x, torch.tensor([0.0, -float("inf"), 0.0]), x, beta=1.0)
    with pytest.raises(ValueError, match="floating-point"):
        dpo.dpo_loss(torch.zeros(3, dtype=torch.long), x, x, x, beta=1.0)
    with pytest.raises(ValueError, match="non-empty"):
        dpo.dpo_loss(*(torch.zeros(0),) * 4, beta=1.0)
    with pytest.raises(ValueError, match="all zeros"):
        dpo.dpo_loss(x, x, x, x, beta=1.0, mask=torch.zeros(3))
    with pytest.raises(ValueError, match="only 0 and 1"):
        dpo.dpo_loss(x, x, x, x, beta=1.0, mask=torch.tensor([1.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="mask must have the shape"):
        dpo.dpo_loss(x, x, x, x, beta=1.0, mask=torch.ones(2))
    with pytest.raises(ValueError, match="reduction"):
        dpo.dpo_loss(x, x, x, x, beta=1.0, reduction="avg")
    with pytest.raises(ValueError, match="beta"):
        dpo.implicit_rewards(x, x, beta=0)
    lp = torch.log_softmax(torch.zeros(4), -1)
    with pytest.raises(ValueError, match="rewards must have the shape"):
        dpo.optimal_policy(lp, torch.zeros(3), beta=1.0)
    with pytest.raises(ValueError, match="rewards contains infinite"):
        dpo.optimal_policy(lp, torch.tensor([0.0, float("inf"), 0.0, 0.0]), beta=1.0)
    with pytest.raises(ValueError, match="ref_logprobs contains \\+inf"):
        dpo.optimal_policy(torch.tensor([0.0, float("inf")]), torch.zeros(2), beta=1.0)
    with pytest.raises(ValueError, match="-inf everywhere"):
        dpo.optimal_policy(torch.full((2, 3), -float("inf")), torch.zeros(2, 3), beta=1.0)
    with pytest.raises(ValueError, match="dim"):
        dpo.log_partition(lp, torch.zeros(4), beta=1.0, dim=1)
    with pytest.raises(ValueError, match="logq must have the shape"):
        dpo.categorical_kl(lp, torch.zeros(3))


def test_train_dpo_validation():
    task = CopyTask(n_digits=2)
    model = TinyLM(TinyLMConfig(vocab_size=task.tokenizer.vocab_size, n_layer=1, n_head=2, d_model=8, max_len=8))
    pairs = sample_preference_pairs(model, task, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="batch_size must be at most"):
        dpo.train_dpo(model, model, pairs, beta=1.0, steps=1, batch_size=16)
    with pytest.raises(ValueError, match="steps"):
        dpo.train_dpo(model, model, pairs, beta=1.0, steps=0)
    with pytest.raises(ValueError, match="beta"):
        dpo.train_dpo(model, model, pairs, beta=0.0, steps=1)
    with pytest.raises(ValueError, match="pairs must have"):
        dpo.train_dpo(model, model, object(), beta=1.0, steps=1, batch_size=4)
