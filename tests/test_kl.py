"""Tests for rl4llm.kl: hand values, non-negativity, small-ratio accuracy, precision, directions, validation."""

from __future__ import annotations

import math

import pytest
import torch

from rl4llm.kl import ESTIMATORS, kl_k1, kl_k2, kl_k3, per_token_kl


def series_k3(x: float) -> float:
    """e^x - 1 - x by its Taylor series in float64 (for |x| <= 1e-3 the terms kept are exact to 1e-18)."""
    return x * x / 2 + x**3 / 6 + x**4 / 24


def test_hand_values():
    # p = 1/2, q = 1/4: r = 2, log r = log 2.
    logp, logq = torch.tensor([math.log(0.5)], dtype=torch.float64), torch.tensor([math.log(0.25)],
                                                                                  dtype=torch.float64)
    ln2 = math.log(2.0)
    assert kl_k1(logp, logq).item() == pytest.approx(-ln2, rel=1e-15)
    assert kl_k2(logp, logq).item() == pytest.approx(ln2**2 / 2, rel=1e-15)
    assert kl_k3(logp, logq).item() == pytest.approx(1 - ln2, rel=1e-15)
    # r = 1/e: k3 = 1/e - 1 + 1 = 1/e.
    assert kl_k3(torch.tensor([-1.0], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)).item() == \
        pytest.approx(math.exp(-1), rel=1e-15)


def test_unbiased_on_a_categorical():
    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    p = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    kl_qp = (q * (q / p).log()).sum()
    for k in (kl_k1, kl_k3):
        assert (q * k(p.log(), q.log())).sum().item() == pytest.approx(kl_qp.item(), rel=1e-14)
    assert (q * kl_k2(p.log(), q.log())).sum().item() != pytest.approx(kl_qp.item(), rel=1e-3)


def test_k3_nonnegative_and_k1_can_be_negative():
    x = torch.linspace(-30, 30, 100_001, dtype=torch.float32)
    zero = torch.zeros_like(x)
    assert (kl_k3(x, zero) >= 0).all()
    assert (kl_k2(x, zero) >= 0).all()
    assert (kl_k1(x, zero) < 0).any()


@pytest.mark.parametrize("x", [1e-3, 1e-5, 1e-8, -1e-8, 3e-9, -1e-9])
def test_k3_accurate_for_tiny_log_ratio(x):
    x32 = torch.tensor([x], dtype=torch.float32)
    ref = series_k3(float(x32.item()))  # reference at the float32-rounded input
    got = kl_k3(x32, torch.zeros_like(x32))
    assert got.dtype == torch.float32
    assert abs(got.item() - ref) / ref < 1e-6
    naive = torch.exp(x32) - 1 - x32
    assert abs(naive.item() - ref) / ref > 1e-2  # the naive form has no correct digits left here


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_k3_matches_expm1_form_and_gradient(dtype):
    x = torch.linspace(-5, 5, 2001, dtype=torch.float64)
    ref = torch.expm1(x) - x
    got = kl_k3(x.to(dtype), torch.zeros(x.shape, dtype=dtype))
    big = x.abs() > 1e-2
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(got.double()[big], ref[big], rtol=tol, atol=0)
    xg = x.to(dtype).clone().requires_grad_(True)
    kl_k3(xg, torch.zeros_like(xg)).sum().backward()
    assert torch.allclose(xg.grad.double(), torch.expm1(x), rtol=tol, atol=1e-30)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_accumulates_in_float32(dtype):
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=dtype)
    logq = torch.tensor([-1.0078125, -1.0, -0.75], dtype=dtype)
    x = logp.float() - logq.float()  # exact in float32
    for k, ref in ((kl_k1, -x), (kl_k2, x * x / 2), (kl_k3, (torch.expm1(x.double()) - x.double()).float())):
        out = k(logp, logq)
        assert out.dtype == torch.float32
        assert torch.allclose(out, ref, rtol=1e-6, atol=0)
    # the small entry: log r = 1/128, k3 ~ 3.07e-5, is kept to float32 accuracy
    assert kl_k3(logp, logq)[0].item() == pytest.approx(series_k3(1 / 128) + (1 / 128) ** 5 / 120, rel=1e-6)


def test_mask_zeroes_padding_and_per_token_direction():
    g = torch.Generator().manual_seed(0)
    lp_pol = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    lp_ref = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    lp_ref_padded = lp_ref.masked_fill(mask == 0, float("-inf"))  # garbage in padding must not leak
    for name, k in ESTIMATORS.items():
        out = per_token_kl(lp_pol, lp_ref_padded, mask, estimator=name)
        assert out.shape == (3, 5)
        assert (out[mask == 0] == 0).all()
        assert torch.equal(out[mask == 1], k(lp_ref, lp_pol)[mask == 1])  # policy first, estimates KL(pi||ref)
    assert torch.equal(per_token_kl(lp_pol, lp_ref), kl_k3(logp=lp_ref, logq=lp_pol))


def test_validation():
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="logq"):
        kl_k3(a, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="logp"):
        kl_k1(torch.zeros(2, 3, dtype=torch.long), a)
    with pytest.raises(ValueError, match="logq"):
        kl_k2(a, [0.0, 0.0])
    with pytest.raises(ValueError, match="mask"):
        kl_k3(a, a, mask=torch.ones(3, 2))
    with pytest.raises(ValueError, match="mask"):
        kl_k3(a, a, mask=torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="estimator"):
        per_token_kl(a, a, None, estimator="k4")
    with pytest.raises(ValueError, match="logp_policy"):
        per_token_kl(a, torch.zeros(3))
