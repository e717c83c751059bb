"""Tests for rl4llm.returns.gae: a brute-force double sum straight from the definition, episode boundaries
(termination, truncation, padding), every method against the reference loop, precision, and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl4llm.returns import GAE_METHODS, discounted_returns, gae, gae_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = [m for m in GAE_METHODS if m != "auto"] + ["auto"]
TOL64 = dict(rtol=1e-10, atol=1e-10)

# ----------------------------------------------------------------------------------------------------------
# The reference: one row at a time, one episode at a time, a double sum over (t, u) in float64.
# ----------------------------------------------------------------------------------------------------------


def ref_gae_row(r, v, nv, term, trunc, mask, boot, gamma, lam):
    """GAE of one row, from the definition.

    Step u is real if mask[u]. Its next value V'_u is 0 after a terminal step; next_values[u] when given;
    otherwise V(s_{u+1}) if step u+1 exists and is real, the bootstrap after the row's last step, and 0 before
    padding. delta_u = r_u + gamma V'_u - V_u. The episode of step t runs from t to the first u >= t at which it
    ends (terminated, truncated, the step before padding, or the row's last step), and
    A_t = sum_{u = t}^{end} (gamma lam)^(u - t) delta_u; A_t = 0 at padding.
    """
    T = len(r)
    real = [True] * T if mask is None else mask

    def next_value(u):
        if term[u]:
            return 0.0
        if nv is not None:
            return nv[u]
        if u == T - 1:
            return boot
        return v[u + 1] if real[u + 1] else 0.0

    def ends_at(u):
        return term[u] or trunc[u] or u == T - 1 or not real[u + 1]

    out = []
    for t in range(T):
        if not real[t]:
            out.append(0.0)
            continue
        end = next(u for u in range(t, T) if ends_at(u))
        out.append(sum((gamma * lam) ** (u - t) * (r[u] + gamma * next_value(u) - v[u]) for u in range(t, end + 1)))
    return out


def reference(rewards, values, next_values=None, *, gamma, lam, terminated=None, truncated=None, mask=None,
              bootstrap=None):
    """The reference applied to every row of ``[..., T]`` tensors; returns float64."""
    shape = rewards.shape
    n, T = int(np.prod(shape[:-1])), shape[-1]

    def rows(x, fill):
        if x is None:
            return [None if fill is None else [fill] * T for _ in range(n)]
        return x.reshape(n, T).tolist()

    r, v = rows(rewards.double(), None), rows(values.double(), None)
    nv = rows(None if next_values is None else next_values.double(), None)
    term, trunc = rows(terminated, False), rows(truncated, False)
    m = rows(mask, None)
    if isinstance(bootstrap, torch.Tensor):
        boot = bootstrap.double().reshape(n).tolist()
    else:
        boot = [0.0 if bootstrap is None else float(bootstrap)] * n
    out = [ref_gae_row(*row, gamma, lam) for row in zip(r, v, nv, term, trunc, m, boot, strict=True)]
    return torch.tensor(out, dtype=torch.float64).reshape(shape)


# ----------------------------------------------------------------------------------------------------------
# Random inputs with several episodes per row
# ----------------------------------------------------------------------------------------------------------


@st.composite
def gae_cases(draw, max_T: int = 24):
    batch = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))
    T = draw(st.integers(0, max_T))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (*batch, T)
    kind = draw(st.sampled_from(["terminated", "truncated", "both", "mask-right", "mask-middle", "none"]))
    p_end = draw(st.sampled_from([0.1, 0.3, 1.0]))
    t = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731
    kw = dict(rewards=t(rng.normal(size=shape)), values=t(rng.normal(size=shape)))
    u = rng.random(size=shape)
    if kind in ("terminated", "both"):
        kw["terminated"] = t(u < p_end / 2 if kind == "both" else u < p_end)
    if kind in ("truncated", "both"):
        kw["truncated"] = t((u >= 1 - p_end / 2) if kind == "both" else u < p_end)
        kw["next_values"] = t(rng.normal(size=shape))
    if kind == "mask-right":
        lengths = rng.integers(0, T + 1, size=batch)
        kw["mask"] = t(np.arange(T) < lengths[..., None])
        kw["terminated"] = t(rng.random(size=shape) < 0.2)
    if kind == "mask-middle":
        kw["mask"] = t(rng.random(size=shape) < 0.7)
    if draw(st.booleans()) and "next_values" not in kw:
        kw["bootstrap"] = draw(st.sampled_from(["float", "tensor"]))
        kw["bootstrap"] = 1.5 if kw["bootstrap"] == "float" else t(rng.normal(size=tuple(batch)))
    gamma = draw(st.sampled_from([1.0, 0.99, 0.9, 0.5]))
    lam = draw(st.sampled_from([0.0, 1.0, 0.95, 0.5]))
    return kw, gamma, lam


@settings(max_examples=100, deadline=None)
@given(gae_cases())
def test_every_method_matches_the_double_sum(case):
    kw, gamma, lam = case
    want = reference(**kw, gamma=gamma, lam=lam)
    for method in METHODS:
        got = gae(**kw, gamma=gamma, lam=lam, method=method)
        assert got.dtype == torch.float64 and got.shape == kw["rewards"].shape
        torch.testing.assert_close(got, want, **TOL64, msg=method)
        if "mask" in kw:
            assert (got[~kw["mask"]] == 0).all()


@settings(max_examples=40, deadline=None)
@given(gae_cases(max_T=12), st.floats(-3, 3), st.floats(-3, 3))
def test_gae_is_linear_in_rewards_and_values(case, a, b):
    kw, gamma, lam = case
    other = {k: torch.randn_like(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
             for k, x in kw.items()}
    if isinstance(kw.get("bootstrap"), float):
        other["bootstrap"] = -0.5
    mixed = {k: a * x + b * other[k] if isinstance(x, (torch.Tensor, float)) and not
             (isinstance(x, torch.Tensor) and x.dtype == torch.bool) else x for k, x in kw.items()}
    lhs = gae(**mixed, gamma=gamma, lam=lam)
    rhs = a * gae(**kw, gamma=gamma, lam=lam) + b * gae(**other, gamma=gamma, lam=lam)
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------
# Episode boundaries, by hand
# ----------------------------------------------------------------------------------------------------------


def test_hand_example_termination_truncation_padding():
    gamma, lam = 0.5, 0.5
    r = torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[2.0, 4.0, 8.0, 16.0]], dtype=torch.float64)
    nv = torch.tensor([[4.0, 100.0, 16.0, 32.0]], dtype=torch.float64)   # 100: the final observation at t = 1
    end = torch.tensor([[False, True, False, False]])
    # Terminated at t = 1: delta_1 = 1 - 4 = -3, delta_0 = 1 + 2 - 2 = 1; A_0 = 1 + 0.25 * (-3).
    # Second episode: delta_2 = 1 + 8 - 8 = 1, delta_3 = 1 + 0.5 * 32 - 16 = 1 (bootstrap 32); A_2 = 1 + 0.25.
    want_term = torch.tensor([[0.25, -3.0, 1.25, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(gae(r, v, gamma=gamma, lam=lam, terminated=end, bootstrap=32.0), want_term)
    # Truncated at t = 1 with the final observation's value 100: delta_1 = 1 + 50 - 4 = 47.
    want_trunc = torch.tensor([[1 + 0.25 * 47, 47.0, 1.25, 1.0]], dtype=torch.float64)
    for method in METHODS:
        torch.testing.assert_close(gae(r, v, nv, gamma=gamma, lam=lam, truncated=end, method=method), want_trunc)
    # Padding after t = 1: the sequence ends there with nothing to bootstrap from; padded steps are 0.
    mask = torch.tensor([[True, True, False, False]])
    want_pad = torch.tensor([[1 + 0.25 * (1 - 4), 1 - 4.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(gae(r, v, gamma=gamma, lam=lam, mask=mask, bootstrap=32.0), want_pad)


def test_truncation_treated_as_termination_is_biased_by_the_missing_bootstrap():
    gamma, lam = 0.9, 0.8
    T = 6
    r = torch.ones(1, T, dtype=torch.float64)
    v = torch.full((1, T), 10.0, dtype=torch.float64)   # the exact value of "+1 forever" at gamma = 0.9
    nv = torch.full((1, T), 10.0, dtype=torch.float64)
    cut = torch.zeros(1, T, dtype=torch.bool)
    cut[0, -1] = True
    right = gae(r, v, nv, gamma=gamma, lam=lam, truncated=cut)
    wrong = gae(r, v, nv, gamma=gamma, lam=lam, terminated=cut)
    torch.testing.assert_close(right, torch.zeros_like(right))           # exact V: every TD residual is 0
    k = torch.arange(T - 1, -1, -1, dtype=torch.float64)                 # steps to the cut
    torch.testing.assert_close(wrong - right, -(gamma * 10.0) * (gamma * lam) ** k[None])


def test_lambda_zero_and_one():
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(3, 9, generator=g, dtype=torch.float64), torch.randn(3, 9, generator=g, dtype=torch.float64)
    term = torch.rand(3, 9, generator=g) < 0.3
    boot = torch.randn(3, generator=g, dtype=torch.float64)
    nv = torch.cat([v[:, 1:], boot[:, None]], 1).masked_fill(term, 0.0)
    for method in METHODS:
        # lambda = 0: the TD residual
        torch.testing.assert_close(gae(r, v, gamma=0.9, lam=0.0, terminated=term, bootstrap=boot, method=method),
                                   r + 0.9 * nv - v, **TOL64)
        # lambda = 1: the discounted return to the episode's end (plus the bootstrap) minus V(s_t), for any V
        lam1 = gae(r, v, gamma=0.9, lam=1.0, terminated=term, bootstrap=boot, method=method)
        torch.testing.assert_close(lam1 + v, discounted_returns(r, 0.9, dones=term, bootstrap=boot), **TOL64)


def test_finite_horizon_lambda_return_with_tail_weight():
    """On one episode of n steps, GAE = (1-lam) sum_{k<n} lam^(k-1) A^(k) + lam^(n-1) A^(n) (ERRATA: tail weight)."""
    g = torch.Generator().manual_seed(1)
    n, gamma, lam = 7, 0.95, 0.7
    r, v = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    boot = 0.3
    vv = torch.cat([v, torch.tensor([boot], dtype=torch.float64)])      # V(s_0), ..., V(s_n)
    got = gae(r, v, gamma=gamma, lam=lam, bootstrap=boot)

    def k_step(t, k):  # -V(s_t) + sum_{j<k} gamma^j r_{t+j} + gamma^k V(s_{t+k})
        return -vv[t] + sum(gamma**j * r[t + j] for j in range(k)) + gamma**k * vv[t + k]

    for t in range(n):
        m = n - t
        want = (1 - lam) * sum(lam ** (k - 1) * k_step(t, k) for k in range(1, m)) + lam ** (m - 1) * k_step(t, m)
        assert math.isclose(got[t].item(), want.item(), rel_tol=1e-12, abs_tol=1e-12)
        without_tail = (1 - lam) * sum(lam ** (k - 1) * k_step(t, k) for k in range(1, m + 1))
        if m > 1:
            assert not math.isclose(got[t].item(), without_tail.item(), rel_tol=1e-6, abs_tol=1e-6)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(5)
    r, v = torch.randn(40, 6, generator=g).T, torch.randn(40, 6, generator=g).T       # [6, 40], column-major
    term = (torch.rand(40, 6, generator=g) < 0.2).T
    assert not r.is_contiguous()
    want = gae(r.contiguous(), v.contiguous(), gamma=0.9, lam=0.9, terminated=term.contiguous(), method="loop")
    for method in METHODS:
        torch.testing.assert_close(gae(r, v, gamma=0.9, lam=0.9, terminated=term, method=method), want)


def test_leading_dims_and_one_dim_input():
    g = torch.Generator().manual_seed(2)
    r, v = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    term = torch.rand(2, 3, 5, generator=g) < 0.3
    whole = gae(r, v, gamma=0.9, lam=0.9, terminated=term, method="scan")
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(whole[i, j], gae(r[i, j], v[i, j], gamma=0.9, lam=0.9, terminated=term[i, j]))


# ----------------------------------------------------------------------------------------------------------
# The fast methods on long sequences, in float32
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 3, 13, 16, 17, 1000, 3000])
@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
def test_methods_agree_with_the_loop_in_float32(T, lam):
    """Both float32 results lie within float32 rounding of the float64 truth.

    Each advantage is a sum of products of the inputs and powers of the decay; summing ``n`` terms in any order
    (the loop: sequentially; the scan: a tree of depth ceil(log2 T)) and forming the products has an error of at
    most about ``(number of roundings) * eps * S``, with ``S`` the same sum over absolute values. We allow
    ``4 * (ceil(log2 T) + 2) * eps * S`` for the scan (depth log2 T) and a bound for the loop that grows with the
    effective horizon, ``2 * min(T, 1/(1 - gamma lam)) + 8`` roundings; the scan must also stay within the loop's.
    """
    gamma = 0.99
    g = torch.Generator().manual_seed(T)
    B = 4
    r, v, nv = (torch.randn(B, T, generator=g) for _ in range(3))
    u = torch.rand(B, T, generator=g)
    term, trunc = u < 0.005, (u > 0.995)
    kw = dict(gamma=gamma, lam=lam, terminated=term, truncated=trunc)
    truth = gae(r.double(), v.double(), nv.double(), **kw, method="loop")
    # S: the same sum with every term made positive, |r_u| + gamma |V'_u| + |V_u| in place of delta_u
    S = gae(r.double().abs(), -v.double().abs(), nv.double().abs(), **kw, method="loop")
    eps = torch.finfo(torch.float32).eps
    horizon = T if gamma * lam == 1 else min(T, 1 / (1 - gamma * lam))
    bound = {"loop": (2 * horizon + 8) * eps * S, "scan": 4 * (math.ceil(math.log2(T)) + 2) * eps * S}
    bound["auto"] = torch.maximum(bound["loop"], bound["scan"])
    loop_err = (gae(r, v, nv, **kw, method="loop").double() - truth).abs()
    for method in METHODS:
        out = gae(r, v, nv, **kw, method=method)
        assert out.dtype == torch.float32
        err = (out.double() - truth).abs()
        assert (err <= bound[method] + 1e-30).all(), (method, (err / S).max().item())
        assert err.max() <= 4 * loop_err.max() + 8 * eps * S.max(), method


def test_scan_products_underflow_to_zero_without_nan():
    T = 4096
    r, v = torch.ones(2, T), torch.zeros(2, T)
    for lam in (1e-3, 0.5):
        out = gae(r, v, gamma=0.5, lam=lam, method="scan")
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, gae(r, v, gamma=0.5, lam=lam, method="loop"))


def test_scan_does_not_modify_its_inputs_and_handles_tiny_T():
    from rl4llm.returns import _gae_loop, _gae_scan

    for T in (0, 1, 2, 3):
        d = torch.randn(3, T, dtype=torch.float64)
        c = torch.rand(3, T, dtype=torch.float64)
        d0, c0 = d.clone(), c.clone()
        torch.testing.assert_close(_gae_scan(d, c), _gae_loop(d, c), **TOL64)
        assert torch.equal(d, d0) and torch.equal(c, c0)


def test_auto_picks_by_shape_and_shortcuts_lambda_zero():
    from rl4llm.returns import _auto_method

    cpu = torch.device("cpu")
    assert _auto_method(torch.Size([64, 4]), cpu) == "loop"
    assert _auto_method(torch.Size([8, 4096]), cpu) == "scan"
    assert _auto_method(torch.Size([8, 4096]), torch.device("cuda")) == "scan"
    r, v = torch.randn(2, 50), torch.randn(2, 50)
    deltas, _, _ = gae_inputs(r, v, gamma=0.9, lam=0.0)
    assert torch.equal(gae(r, v, gamma=0.9, lam=0.0), deltas)


# ----------------------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", METHODS)
def test_low_precision_inputs_accumulate_in_float32(dtype, method):
    g = torch.Generator().manual_seed(3)
    T = 600
    r, v = torch.randn(3, T, generator=g).to(dtype), torch.randn(3, T, generator=g).to(dtype)
    term = torch.rand(3, T, generator=g) < 0.01
    out = gae(r, v, gamma=0.999, lam=0.99, terminated=term, method=method)
    assert out.dtype == dtype
    want = gae(r.float(), v.float(), gamma=0.999, lam=0.99, terminated=term, method=method)
    assert torch.equal(out, want.to(dtype))   # the float32 result, rounded once at the end


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_long_sums_do_not_stall(dtype):
    """With gamma = lam = 1 and reward 1 per step, A_t = T - t. A loop accumulating in bfloat16 (float16) stalls
    at 256 (2048), where adding 1 no longer changes the sum; accumulating in float32 is exact until the final
    rounding to the input dtype."""
    T = 3000
    r, v = torch.ones(1, T, dtype=dtype), torch.zeros(1, T, dtype=dtype)
    exact = torch.arange(T, 0, -1, dtype=torch.float32)[None]
    for method in METHODS:
        assert torch.equal(gae(r, v, gamma=1.0, lam=1.0, method=method), exact.to(dtype))
    naive = torch.zeros(1, dtype=dtype)
    for t in range(T):
        naive = r[:, t] + naive
    stall = {torch.bfloat16: 256, torch.float16: 2048}[dtype]
    assert naive.item() == stall


# ----------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------

R = torch.zeros(2, 4)
V = torch.zeros(2, 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lam=1.5), "lam"),
    (dict(lam=-0.1), "lam"),
    (dict(lam=float("nan")), "lam"),
    (dict(lam=True), "lam"),
    (dict(lam=torch.ones(2)), "lam"),
    (dict(gamma=0.0), "gamma"),
    (dict(gamma=1.01), "gamma"),
    (dict(values=torch.zeros(2, 5)), "values"),
    (dict(values=torch.zeros(2, 4, dtype=torch.long)), "values"),
    (dict(values=torch.full((2, 4), float("nan"))), "values contain NaN"),
    (dict(rewards=torch.full((2, 4), float("inf"))), "rewards contain NaN"),
    (dict(rewards=R.tolist()), "rewards must be a torch.Tensor"),
    (dict(rewards=torch.tensor(1.0), values=torch.tensor(1.0)), "at least one dim"),
    (dict(next_values=torch.zeros(2, 3)), "next_values"),
    (dict(next_values=torch.tensor([[0.0, float("nan"), 0, 0]] * 2)), "next_values contain NaN"),
    (dict(terminated=torch.zeros(2, 3, dtype=torch.bool)), "terminated"),
    (dict(terminated=torch.full((2, 4), 2)), "terminated must be a bool"),
    (dict(truncated=torch.zeros(4, dtype=torch.bool)), "truncated"),
    (dict(mask=torch.ones(2, 5, dtype=torch.bool)), "mask"),
    (dict(terminated=torch.eye(2, 4, dtype=torch.bool), truncated=torch.eye(2, 4, dtype=torch.bool),
          next_values=V), "both terminated and truncated"),
    (dict(truncated=torch.tensor([[False, True, False, False]] * 2)), "need next_values"),
    (dict(truncated=torch.tensor([[False, False, False, True]] * 2)), "neither next_values nor bootstrap"),
    (dict(bootstrap=torch.zeros(3)), "bootstrap"),
    (dict(bootstrap=float("nan")), "bootstrap"),
    (dict(bootstrap=torch.tensor([0.0, float("inf")])), "bootstrap"),
    (dict(bootstrap="1"), "bootstrap"),
    (dict(method="fast"), "method"),
])
def test_bad_inputs_raise_value_error(kwargs, match):
    args = dict(rewards=R, values=V, gamma=0.9, lam=0.9) | kwargs
    with pytest.raises(ValueError, match=match):
        gae(**args)


def test_valid_edge_inputs():
    # 0/1 numeric flags are accepted; a truncated last step with a bootstrap is fine; T = 0 gives an empty result
    flags = torch.tensor([[0, 0, 0, 1], [0, 1, 0, 0]])
    out = gae(R + 1, V, gamma=0.9, lam=0.9, terminated=flags)
    assert torch.equal(out, gae(R + 1, V, gamma=0.9, lam=0.9, terminated=flags.bool()))
    cut = torch.tensor([[False, False, False, True]] * 2)
    last = gae(R, V, gamma=0.9, lam=0.9, truncated=cut, bootstrap=torch.ones(2))[:, -1]
    torch.testing.assert_close(last, torch.full((2,), 0.9))
    for method in METHODS:
        assert gae(torch.zeros(3, 0), torch.zeros(3, 0), gamma=0.9, lam=0.9, method=method).shape == (3, 0)
    # A truncated last step that is padding needs no bootstrap.
    mask = torch.tensor([[True, True, True, False]] * 2)
    assert (gae(R, V, gamma=0.9, lam=0.9, truncated=cut, mask=mask)[:, -1] == 0).all()
