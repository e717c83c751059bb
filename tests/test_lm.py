"""Tests for rl4llm.lm: the tiny model, sampling, and chunked log-probabilities."""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl4llm.lm import (
    Completion,
    TinyLM,
    TinyLMConfig,
    frozen_copy,
    logprobs_from_logits,
    sample,
    sequence_logprobs,
    token_logprobs,
)

V, EOS, PAD = 13, 2, 0
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def make_model(seed: int = 0, device: str = "cpu", **kw) -> TinyLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, n_layer=2, n_head=2, d_model=32, max_len=24)
    cfg.update(kw)
    return TinyLM(TinyLMConfig(**cfg)).to(device)


def naive_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------
# TinyLM
# ----------------------------------------------------------------------------------------------------------
def test_forward_shape_and_tied_head():
    model = make_model()
    ids = torch.randint(0, V, (3, 7))
    assert model(ids).shape == (3, 7, V)
    assert model.lm_head.weight is model.wte.weight
    untied = make_model(tie_weights=False)
    assert untied.lm_head.weight is not untied.wte.weight


def test_forward_is_causal():
    model = make_model()
    ids = torch.randint(0, V, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % V
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("kw", [dict(vocab_size=0), dict(d_model=30, n_head=4), dict(dropout=1.0)])
def test_config_validation(kw):
    cfg = dict(vocab_size=V)
    cfg.update(kw)
    with pytest.raises(ValueError):
        TinyLMConfig(**cfg)


def test_forward_rejects_bad_ids():
    model = make_model()
    with pytest.raises(ValueError, match="ids"):
        model(torch.tensor([[0, V]]))
    with pytest.raises(ValueError, match="ids"):
        model(torch.tensor([[-1, 0]]))
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 3))


# ----------------------------------------------------------------------------------------------------------
# logprobs_from_logits
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64, 1000])
def test_logprobs_match_naive(dtype, chunk_size, device):
    g = torch.Generator().manual_seed(0)
    N, vocab = 50, 333  # 7 does not divide 50; 64 and 1000 exceed it
    logits = (4 * torch.randn(N, vocab, generator=g)).to(device=device, dtype=dtype)
    targets = torch.randint(0, vocab, (N,), generator=g).to(device)
    ours = logprobs_from_logits(logits, targets, chunk_size=chunk_size)
    assert ours.dtype == torch.float32 and ours.shape == (N,)
    torch.testing.assert_close(ours, naive_logprobs(logits, targets), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logprobs_strided_and_batched(dtype):
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(4, 9, 101, generator=g)).to(dtype)
    targets = torch.randint(0, 101, (4, 9), generator=g)
    # A slice that cannot be viewed as [N, V], with a small chunk so it is not copied either.
    sl, t = logits[:, 2:-1], targets[:, 2:-1]
    assert not sl.is_contiguous()
    for chunk_size in (None, 2, 5):
        torch.testing.assert_close(logprobs_from_logits(sl, t, chunk_size=chunk_size), naive_logprobs(sl, t),
                                   rtol=0, atol=1e-5)
    # A vector of logits and a scalar target.
    torch.testing.assert_close(logprobs_from_logits(logits[0, 0], targets[0, 0]),
                               naive_logprobs(logits[0, 0], targets[0, 0]), rtol=0, atol=1e-5)


def test_logprobs_stable_for_huge_logits():
    logits = torch.tensor([[1e4, 0.0, -1e4], [3e38, 3e38, -3e38]])
    out = logprobs_from_logits(logits, torch.tensor([0, 1]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([0.0, -torch.log(torch.tensor(2.0)).item()]))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), vocab=st.integers(1, 50), chunk=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_logprobs_property(n, vocab, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    logits = 5 * torch.randn(n, vocab, generator=g)
    targets = torch.randint(0, vocab, (n,), generator=g)
    out = logprobs_from_logits(logits, targets, chunk_size=chunk)
    torch.testing.assert_close(out, naive_logprobs(logits, targets), rtol=0, atol=1e-5)
    assert (out <= 1e-6).all()


def test_logprobs_gradient():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 7, (3, 5), generator=g)
    assert torch.autograd.gradcheck(lambda z: logprobs_from_logits(z[:, 1:], t[:, 1:], chunk_size=2), (x,))
    # float32 and bf16: same gradient as autograd through the naive form
    for dtype in (torch.float32, torch.bfloat16):
        a = x.detach().to(dtype).requires_grad_()
        b = x.detach().to(dtype).requires_grad_()
        w = torch.randn(3, 5, generator=g)
        (logprobs_from_logits(a, t, chunk_size=4) * w).sum().backward()
        (naive_logprobs(b, t) * w).sum().backward()
        assert a.grad.dtype == dtype
        torch.testing.assert_close(a.grad, b.grad)


def test_logprobs_bad_input():
    logits, t = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="targets"):
        logprobs_from_logits(logits, torch.tensor([0, 1, 2, 6]))  # out of vocabulary
    with pytest.raises(ValueError, match="targets"):
        logprobs_from_logits(logits, torch.tensor([0, 1, -1, 2]))
    with pytest.raises(ValueError, match="shape"):
        logprobs_from_logits(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        logprobs_from_logits(logits, t.float())
    with pytest.raises(ValueError, match="floating"):
        logprobs_from_logits(logits.long(), t)
    with pytest.raises(ValueError, match="non-empty"):
        logprobs_from_logits(torch.randn(0, 6), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        logprobs_from_logits(logits, t, chunk_size=0)


# ----------------------------------------------------------------------------------------------------------
# token_logprobs / sequence_logprobs
# ----------------------------------------------------------------------------------------------------------
def test_token_logprobs_match_full_softmax():
    model = make_model()
    prompts, completions = torch.randint(0, V, (3, 4)), torch.randint(0, V, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    lp = token_logprobs(model, prompts, completions, mask)
    full = torch.log_softmax(model(torch.cat([prompts, completions], 1)), -1)
    expected = full[:, 3:-1].gather(-1, completions[..., None]).squeeze(-1) * mask
    assert lp.dtype == torch.float32 and lp.shape == (3, 5)
    torch.testing.assert_close(lp, expected, rtol=0, atol=1e-5)
    assert (lp[mask == 0] == 0).all()
    torch.testing.assert_close(sequence_logprobs(model, prompts, completions, mask), lp.sum(-1))
    # gradients reach the parameters
    lp.sum().backward()
    assert model.wte.weight.grad is not None and model.wte.weight.grad.abs().sum() > 0


def test_token_logprobs_accepts_callables():
    model = make_model()
    prompts, completions = torch.randint(0, V, (2, 3)), torch.randint(0, V, (2, 4))
    mask = torch.ones(2, 4)
    ref = token_logprobs(model, prompts, completions, mask)
    torch.testing.assert_close(token_logprobs(lambda ids: model(ids), prompts, completions, mask), ref)
    hf_like = lambda ids: types.SimpleNamespace(logits=model(ids).bfloat16())  # noqa: E731
    torch.testing.assert_close(token_logprobs(hf_like, prompts, completions, mask), ref, rtol=0, atol=0.1)


def test_token_logprobs_bad_input():
    model = make_model()
    p, c, m = torch.randint(0, V, (2, 3)), torch.randint(0, V, (2, 4)), torch.ones(2, 4)
    with pytest.raises(ValueError, match="completions"):
        token_logprobs(model, p, torch.full((2, 4), V), m)  # out of vocabulary
    with pytest.raises(ValueError, match="prompts"):
        token_logprobs(model, torch.full((2, 3), -1), c, m)
    with pytest.raises(ValueError, match="mask"):
        token_logprobs(model, p, c, torch.ones(2, 5))  # shape mismatch
    with pytest.raises(ValueError, match="mask"):
        token_logprobs(model, p, c, torch.full((2, 4), 0.5))
    with pytest.raises(ValueError, match="completions"):
        token_logprobs(model, p, torch.zeros(2, 0, dtype=torch.long), torch.ones(2, 0))  # L = 0
    with pytest.raises(ValueError, match="prompts"):
        token_logprobs(model, torch.zeros(2, 0, dtype=torch.long), c, m)  # P = 0
    with pytest.raises(ValueError, match="B"):
        token_logprobs(model, p, c[:1], m[:1])
    empty_row = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="no tokens"):
        token_logprobs(model, p, c, empty_row)
    out = token_logprobs(model, p, c, empty_row, allow_empty=True)
    assert (out[1] == 0).all()
    # a bare callable: the vocabulary is checked against the logits it returns
    with pytest.raises(ValueError, match="ids"):
        token_logprobs(lambda ids: torch.zeros(*ids.shape, V), p, torch.full((2, 4), V + 3), m)
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(lambda ids: torch.zeros(2, V), p, c, m)


# ----------------------------------------------------------------------------------------------------------
# sample
# ----------------------------------------------------------------------------------------------------------
def _check_completion(out: Completion, prompts: torch.Tensor, max_new: int):
    B, L = out.tokens.shape
    assert L <= max_new and out.mask.shape == out.logprobs.shape == (B, L)
    assert out.sequences.shape == (B, prompts.shape[1] + L)
    for b in range(B):
        toks, m = out.tokens[b].tolist(), out.mask[b].tolist()
        n = int(sum(m))
        assert m == [1.0] * n + [0.0] * (L - n)  # a prefix of ones
        assert EOS not in toks[: n - 1]
        assert bool(out.finished[b]) == (toks[n - 1] == EOS)
        assert toks[n:] == [PAD] * (L - n)
    assert (out.logprobs[out.mask == 0] == 0).all()
    assert (out.logprobs[out.mask == 1] <= 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_sample_logprobs_match_recomputed(device):
    model = make_model(device=device)
    prompts = torch.randint(3, V, (16, 4), generator=torch.Generator().manual_seed(0)).to(device)
    out = sample(model, prompts, 12, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(1))
    _check_completion(out, prompts, 12)
    assert out.mask.sum() > 16  # something beyond a first token was generated
    lp = token_logprobs(model, prompts, out.tokens, out.mask)
    torch.testing.assert_close(lp, out.logprobs, rtol=0, atol=1e-5)


def test_sample_stops_early_and_is_reproducible():
    model = make_model()
    with torch.no_grad():  # make eos overwhelmingly likely
        model.lm_head.weight.zero_()
        bias = torch.zeros(V)
        bias[EOS] = 20.0
    eos_model = lambda ids: model(ids) + bias  # noqa: E731
    prompts = torch.randint(3, V, (5, 3))
    out = sample(eos_model, prompts, 10, eos_id=EOS, pad_id=PAD)
    assert out.tokens.shape == (5, 1) and out.finished.all() and (out.tokens == EOS).all()
    model = make_model()
    a = sample(model, prompts, 8, eos_id=EOS, generator=torch.Generator().manual_seed(3))
    b = sample(model, prompts, 8, eos_id=EOS, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)


def test_sample_greedy_top_k_temperature():
    model = make_model()
    prompts = torch.randint(3, V, (6, 3))
    greedy = sample(model, prompts, 6, eos_id=EOS, pad_id=PAD, temperature=0.0)
    _check_completion(greedy, prompts, 6)
    assert (greedy.logprobs == 0).all()
    # greedy = argmax of the model at each step
    logits = model(greedy.sequences)[:, prompts.shape[1] - 1:-1]
    live = greedy.mask == 1
    assert torch.equal(logits.argmax(-1)[live], greedy.tokens[live])
    # top_k=1 is greedy too, with probability 1
    top1 = sample(model, prompts, 6, eos_id=EOS, pad_id=PAD, top_k=1,
                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(top1.tokens, greedy.tokens) and (top1.logprobs == 0).all()
    # temperature / top-k log-probs are under the modified distribution
    hot = sample(model, prompts, 6, eos_id=EOS, pad_id=PAD, temperature=2.0, top_k=4,
                 generator=torch.Generator().manual_seed(0))
    _check_completion(hot, prompts, 6)
    logits = model(hot.sequences)[:, prompts.shape[1] - 1:-1] / 2.0
    kth = logits.topk(4, dim=-1).values[..., -1:]
    expected = torch.log_softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
    expected = expected.gather(-1, hot.tokens[..., None]).squeeze(-1) * hot.mask
    torch.testing.assert_close(hot.logprobs, expected, rtol=0, atol=1e-5)


def test_sample_restores_train_mode():
    model = make_model(dropout=0.1).train()
    sample(model, torch.randint(3, V, (2, 3)), 4, eos_id=EOS)
    assert model.training


def test_sample_bad_input():
    model = make_model()
    p = torch.randint(3, V, (2, 3))
    with pytest.raises(ValueError, match="prompts"):
        sample(model, torch.full((2, 3), V), 4, eos_id=EOS)
    with pytest.raises(ValueError, match="prompts"):
        sample(model, torch.zeros(2, 0, dtype=torch.long), 4, eos_id=EOS)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample(model, p, 0, eos_id=EOS)
    with pytest.raises(ValueError, match="max_len"):
        sample(model, p, 22, eos_id=EOS)
    with pytest.raises(ValueError, match="eos_id"):
        sample(model, p, 4, eos_id=V)
    with pytest.raises(ValueError, match="temperature"):
        sample(model, p, 4, eos_id=EOS, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        sample(model, p, 4, eos_id=EOS, top_k=0)
    with pytest.raises(ValueError, match="prompts"):  # a bare callable: checked against its logits
        sample(lambda ids: torch.zeros(*ids.shape, 5), torch.full((2, 3), 7), 4, eos_id=EOS)


# ----------------------------------------------------------------------------------------------------------
# frozen_copy
# ----------------------------------------------------------------------------------------------------------
def test_frozen_copy():
    model = make_model().train()
    ref = frozen_copy(model)
    assert not ref.training and all(not p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in model.parameters()) and model.training
    ids = torch.randint(0, V, (2, 5))
    before = ref(ids).clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.testing.assert_close(ref(ids), before)
    with pytest.raises(ValueError, match="Module"):
        frozen_copy(lambda ids: ids)


def test_features_are_what_forward_reads_bit_for_bit():
    torch.manual_seed(0)
    model = TinyLM(TinyLMConfig(vocab_size=11, max_len=12)).eval()
    ids = torch.randint(0, 11, (3, 7))
    feats = model.features(ids)
    assert feats.shape == (3, 7, model.config.d_model)
    assert torch.equal(model.lm_head(feats), model(ids))
