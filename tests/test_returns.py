"""Tests for rl4llm.returns: property tests against plain Python loops, precision, and input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl4llm.returns import discount_powers, discounted_returns, episode_returns, episode_steps, reward_to_go

TOL = dict(rtol=1e-12, atol=1e-12)

# ----------------------------------------------------------------------------------------------------------
# Reference implementations: one row at a time, straight from the definitions.
# ----------------------------------------------------------------------------------------------------------


def ref_steps(d: list[bool]) -> list[int]:
    k, out = 0, []
    for t in range(len(d)):
        out.append(k)
        k = 0 if d[t] else k + 1
    return out


def ref_episode_end(d: list[bool], t: int) -> int:
    """Index one past the last step of the episode containing step t."""
    for u in range(t, len(d)):
        if d[u]:
            return u + 1
    return len(d)


def ref_discounted(r: list[float], g: float, d: list[bool], boot: float) -> list[float]:
    T, out = len(r), []
    for t in range(T):
        end = ref_episode_end(d, t)
        total = sum(g ** (u - t) * r[u] for u in range(t, end))
        if end == T and not (T and d[T - 1]):
            total += g ** (T - t) * boot
        out.append(total)
    return out


def ref_rtg(r: list[float], g: float, d: list[bool], from_start: bool) -> list[float]:
    k = ref_steps(d)
    out = []
    for t in range(len(r)):
        end = ref_episode_end(d, t)
        if from_start:
            out.append(sum(g ** k[u] * r[u] for u in range(t, end)))
        else:
            out.append(sum(g ** (u - t) * r[u] for u in range(t, end)))
    return out


def ref_episode_returns(r: list[float], g: float, d: list[bool]) -> list[float]:
    k = ref_steps(d)
    out = []
    for t in range(len(r)):
        start, end = t - k[t], ref_episode_end(d, t)
        out.append(sum(g ** (u - start) * r[u] for u in range(start, end)))
    return out


def rows(x: torch.Tensor) -> list:
    """The rows of a ``[..., T]`` tensor as nested Python lists (works for empty shapes too)."""
    return x.reshape(int(np.prod(x.shape[:-1])), x.shape[-1]).tolist()


def rowwise(fn, rewards: torch.Tensor, dones: torch.Tensor, *args) -> torch.Tensor:
    """Apply a reference ``fn(r_row, d_row, *args)`` to every row of ``[..., T]`` tensors."""
    r2, d2 = rows(rewards), rows(dones)
    out = [fn(r, d, *args) for r, d in zip(r2, d2, strict=True)]
    return torch.tensor(out, dtype=torch.float64).reshape(rewards.shape)


# ----------------------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------------------

gammas = st.one_of(st.just(1.0), st.floats(min_value=1e-3, max_value=1.0, exclude_min=True))


@st.composite
def batches(draw, min_T: int = 0):
    """Random ``[..., T]`` float64 rewards with random dones (and ``dones=None`` sometimes)."""
    batch = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    T = draw(st.integers(min_T, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rewards = torch.from_numpy(rng.uniform(-10, 10, size=(*batch, T)))
    p_done = draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]))
    dones = torch.from_numpy(rng.random(size=(*batch, T)) < p_done)
    return rewards, dones


# ----------------------------------------------------------------------------------------------------------
# Property tests
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(batches(), gammas, st.sampled_from(["none", "float", "tensor"]), st.booleans())
def test_discounted_returns_matches_reference(batch, gamma, boot_kind, pass_dones):
    rewards, dones = batch
    if not pass_dones:
        dones = torch.zeros_like(dones)
    if boot_kind == "none":
        boot, boot_rows = None, torch.zeros(rewards.shape[:-1], dtype=torch.float64)
    elif boot_kind == "float":
        boot, boot_rows = 3.5, torch.full(rewards.shape[:-1], 3.5, dtype=torch.float64)
    else:
        boot = torch.linspace(-2, 2, max(1, int(np.prod(rewards.shape[:-1])))).reshape(rewards.shape[:-1])
        boot = boot.to(torch.float64)
        boot_rows = boot
    got = discounted_returns(rewards, gamma, dones=dones if pass_dones else None, bootstrap=boot)
    r2, d2, b2 = rows(rewards), rows(dones), boot_rows.reshape(-1).tolist()
    want = [ref_discounted(r, gamma, d, b) for r, d, b in zip(r2, d2, b2, strict=True)]
    want = torch.tensor(want, dtype=torch.float64)
    assert got.dtype == torch.float64 and got.shape == rewards.shape
    torch.testing.assert_close(got, want.reshape(rewards.shape), **TOL)


@settings(max_examples=60, deadline=None)
@given(batches(), gammas, st.booleans())
def test_reward_to_go_matches_reference(batch, gamma, from_start):
    rewards, dones = batch
    got = reward_to_go(rewards, gamma, dones=dones, from_start=from_start)
    want = rowwise(lambda r, d: ref_rtg(r, gamma, d, from_start), rewards, dones)
    assert got.shape == rewards.shape
    torch.testing.assert_close(got, want, **TOL)


@settings(max_examples=60, deadline=None)
@given(batches(), gammas)
def test_reward_to_go_without_dones_is_one_episode_per_row(batch, gamma):
    rewards, _ = batch
    no_dones = torch.zeros(rewards.shape, dtype=torch.bool)
    for from_start in (True, False):
        torch.testing.assert_close(
            reward_to_go(rewards, gamma, from_start=from_start),
            rowwise(lambda r, d, fs=from_start: ref_rtg(r, gamma, d, fs), rewards, no_dones), **TOL,
        )


@settings(max_examples=60, deadline=None)
@given(batches(), gammas)
def test_episode_returns_matches_reference(batch, gamma):
    rewards, dones = batch
    got = episode_returns(rewards, gamma, dones=dones)
    want = rowwise(lambda r, d: ref_episode_returns(r, gamma, d), rewards, dones)
    torch.testing.assert_close(got, want, **TOL)
    if rewards.shape[-1] > 0:  # without dones: the first step's reward-to-go at every step
        got = episode_returns(rewards, gamma)
        torch.testing.assert_close(got, reward_to_go(rewards, gamma)[..., :1].expand(rewards.shape), **TOL)


@settings(max_examples=60, deadline=None)
@given(batches(), gammas)
def test_episode_steps_and_powers(batch, gamma):
    rewards, dones = batch
    steps = episode_steps(dones)
    want = torch.tensor([ref_steps(d) for d in rows(dones)], dtype=torch.int64)
    assert steps.dtype == torch.int64
    assert torch.equal(steps, want.reshape(dones.shape))
    powers = discount_powers(gamma, steps, dtype=torch.float64)
    want_powers = torch.tensor(gamma, dtype=torch.float64) ** want.reshape(dones.shape).double()
    torch.testing.assert_close(powers, want_powers, **TOL)


@settings(max_examples=30, deadline=None)
@given(batches(min_T=1))
def test_gamma_one_forms_coincide(batch):
    rewards, dones = batch
    a = reward_to_go(rewards, 1.0, dones=dones, from_start=True)
    b = reward_to_go(rewards, 1.0, dones=dones, from_start=False)
    torch.testing.assert_close(a, b, **TOL)


def test_hand_example():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    d = torch.tensor([[False, True, False, False]])

    def row(*xs):
        return torch.tensor([xs], dtype=torch.float64)

    boot = torch.tensor([10.0], dtype=r.dtype)
    torch.testing.assert_close(discounted_returns(r, 0.5, dones=d, bootstrap=boot), row(2.0, 2.0, 7.5, 9.0))
    torch.testing.assert_close(reward_to_go(r, 0.5, dones=d), row(2.0, 1.0, 5.0, 2.0))
    torch.testing.assert_close(reward_to_go(r, 0.5, dones=d, from_start=False), row(2.0, 2.0, 5.0, 4.0))
    torch.testing.assert_close(episode_returns(r, 0.5, dones=d), row(2.0, 2.0, 5.0, 5.0))


def test_done_at_last_step_ignores_bootstrap():
    r = torch.tensor([1.0, 1.0])
    d = torch.tensor([False, True])
    torch.testing.assert_close(discounted_returns(r, 0.9, dones=d, bootstrap=100.0), torch.tensor([1.9, 1.0]))


def test_numeric_dones_accepted():
    r = torch.randn(3, 5, dtype=torch.float64)
    d = torch.rand(3, 5) < 0.3
    for as_type in (torch.int64, torch.float32):
        torch.testing.assert_close(reward_to_go(r, 0.9, dones=d.to(as_type)), reward_to_go(r, 0.9, dones=d))


# ----------------------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_accumulates_in_float32(dtype):
    # 1000 ones: a 16-bit running sum stalls (bf16 at 256, fp16 at 2048 for ones but loses the tail of the
    # discounted sum); a float32 accumulator gets the exact value, representable in both formats.
    r = torch.ones(2, 1000, dtype=dtype)
    g = discounted_returns(r, 1.0)
    assert g.dtype == dtype
    assert g[0, 0].item() == 1000.0
    rng = torch.Generator().manual_seed(0)
    r = torch.randn(4, 300, generator=rng).to(dtype)
    d = torch.rand(4, 300, generator=rng) < 0.05
    for fn in (discounted_returns, reward_to_go, episode_returns):
        got = fn(r, 0.99, dones=d)
        want = fn(r.double(), 0.99, dones=d)
        assert got.dtype == dtype
        # Only the final rounding to 16 bits remains: at most half an ulp (eps / 2 relative), plus the float32
        # accumulation error (~1e-5 here); summing in 16 bits would be off by many ulps.
        eps = torch.finfo(dtype).eps
        assert ((got.double() - want.double()).abs() <= eps / 2 * want.double().abs() + 1e-4).all()


def test_float32_stays_float32():
    r = torch.randn(3, 7)
    assert discounted_returns(r, 0.9).dtype == torch.float32
    assert reward_to_go(r, 0.9).dtype == torch.float32


def test_empty_time_dimension():
    r = torch.zeros(3, 0)
    for out in (discounted_returns(r, 0.9), reward_to_go(r, 0.9), episode_returns(r, 0.9),
                reward_to_go(r, 0.9, dones=torch.zeros(3, 0, dtype=torch.bool))):
        assert out.shape == (3, 0)


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------

FUNCS = [discounted_returns, reward_to_go, episode_returns]


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("gamma", [0.0, -0.5, 1.0001, float("nan"), float("inf"), True, "0.9", None])
def test_bad_gamma_raises(fn, gamma):
    with pytest.raises(ValueError, match="gamma"):
        fn(torch.ones(2, 3), gamma)


@pytest.mark.parametrize("fn", FUNCS)
def test_bad_rewards_raise(fn):
    with pytest.raises(ValueError, match="rewards"):
        fn([1.0, 2.0], 0.9)
    with pytest.raises(ValueError, match="rewards"):
        fn(torch.tensor(1.0), 0.9)
    with pytest.raises(ValueError, match="rewards"):
        fn(torch.ones(2, 3, dtype=torch.int64), 0.9)
    for bad in (float("nan"), float("inf"), -float("inf")):
        r = torch.ones(2, 3)
        r[1, 2] = bad
        with pytest.raises(ValueError, match="rewards"):
            fn(r, 0.9)


@pytest.mark.parametrize("fn", FUNCS)
def test_bad_dones_raise(fn):
    r = torch.ones(2, 3)
    with pytest.raises(ValueError, match="dones"):
        fn(r, 0.9, dones=torch.zeros(2, 1, dtype=torch.bool))  # would broadcast; refused
    with pytest.raises(ValueError, match="dones"):
        fn(r, 0.9, dones=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="dones"):
        fn(r, 0.9, dones=torch.full((2, 3), 2))
    with pytest.raises(ValueError, match="dones"):
        fn(r, 0.9, dones=np.zeros((2, 3), dtype=bool))
    with pytest.raises(ValueError, match="dones"):
        fn(r, 0.9, dones=torch.zeros(2, 3, dtype=torch.bool, device="meta"))


def test_bad_bootstrap_raises():
    r = torch.ones(4, 3)
    nan_row = torch.tensor([0.0, 0.0, float("nan"), 0.0])
    int_row = torch.zeros(4, dtype=torch.int64)
    wrong_shapes = (torch.zeros(4, 1), torch.zeros(3), torch.zeros(()))
    for bad in (*wrong_shapes, nan_row, int_row, float("inf"), "1", True):
        with pytest.raises(ValueError, match="bootstrap"):
            discounted_returns(r, 0.9, bootstrap=bad)


def test_bad_steps_raise():
    with pytest.raises(ValueError, match="steps"):
        discount_powers(0.9, torch.arange(3.0))
    with pytest.raises(ValueError, match="steps"):
        discount_powers(0.9, torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="dones"):
        episode_steps(torch.tensor(True))
