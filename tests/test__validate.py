"""One property test per check of rl4llm._validate: what it accepts, what it refuses, and that it names the argument."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rl4llm import _validate as check

NAME = "some_arg"
anything = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=3),
                     st.just([1, 2]))


def refused(fn, *args, match: str = NAME, **kw):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kw)


@given(anything)
def test_positive_int(v):
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
    if ok:
        assert check.positive_int(NAME, v) == v
    else:
        refused(check.positive_int, NAME, v)


@given(anything)
def test_positive_real(v):
    ok = isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < math.inf
    if ok:
        assert check.positive_real(NAME, v) == float(v)
    else:
        refused(check.positive_real, NAME, v)
    refused(check.positive_real, NAME, math.inf)


@given(anything)
def test_nonneg_real(v):
    ok = isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < math.inf
    if ok:
        assert check.nonneg_real(v, NAME) == float(v)
    else:
        refused(check.nonneg_real, v, NAME)


@given(anything)
def test_flag(v):
    if isinstance(v, bool):
        assert check.flag(NAME, v) is v
    else:
        refused(check.flag, NAME, v)
    refused(check.flag, NAME, "no")


shapes = st.lists(st.integers(0, 3), min_size=0, max_size=3)


@settings(max_examples=60)
@given(shapes, st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool]),
       st.sampled_from([None, "nan", "inf"]), st.integers(0, 2))
def test_float_tensor(shape, dtype, poison, min_dim):
    x = torch.zeros(shape, dtype=dtype)
    if poison and x.numel() and dtype.is_floating_point:
        x.view(-1)[0] = float(poison)
    ok = dtype.is_floating_point and len(shape) >= min_dim and not (poison and x.numel())
    if ok:
        assert check.float_tensor(x, NAME, min_dim=min_dim) is x
    else:
        refused(check.float_tensor, x, NAME, min_dim=min_dim)


@settings(max_examples=60)
@given(shapes, st.sampled_from([torch.float32, torch.float16, torch.int32]),
       st.sampled_from([None, "nan", "inf", "-inf"]), st.booleans())
def test_finite_float(shape, dtype, poison, allow_neg_inf):
    x = torch.zeros(shape, dtype=dtype)
    if poison and x.numel() and dtype.is_floating_point:
        x.view(-1)[0] = float(poison)
    bad_value = poison and x.numel() and dtype.is_floating_point and not (poison == "-inf" and allow_neg_inf)
    ok = dtype.is_floating_point and x.numel() > 0 and not bad_value
    if ok:
        check.finite_float(x, NAME, allow_neg_inf=allow_neg_inf)
    else:
        refused(check.finite_float, x, NAME, allow_neg_inf=allow_neg_inf)


@settings(max_examples=40)
@given(shapes, st.sampled_from([None, 1, 2]), st.booleans())
def test_float_nonempty(shape, dim, nan):
    x = torch.zeros(shape)
    if nan and x.numel():
        x.view(-1)[-1] = math.nan
    ok = (dim is None or len(shape) == dim) and x.numel() > 0 and not nan
    if ok:
        check.float_nonempty(x, NAME, "[B, T]", dim)
    else:
        refused(check.float_nonempty, x, NAME, "[B, T]", dim)


@given(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.bool]))
def test_floating(dtype):
    x = torch.zeros(2, dtype=dtype)
    if dtype.is_floating_point:
        assert check.floating(x, NAME) is x
    else:
        refused(check.floating, x, NAME)
    refused(check.floating, [0.0], NAME)


@given(shapes, shapes)
def test_same_and_like(a, b):
    x, y = torch.zeros(a), torch.zeros(b)
    for fn in (check.same, check.like):
        if a == b:
            fn(x, y, NAME, "other")
        else:
            refused(fn, x, y, NAME, "other")       # broadcastable shapes are refused too


@settings(max_examples=60)
@given(st.lists(st.integers(-1, 2), min_size=1, max_size=6), st.sampled_from([torch.int64, torch.float32, torch.bool]))
def test_masks(values, dtype):
    like = torch.zeros(len(values))
    m = torch.tensor(values).to(dtype)
    ok = dtype == torch.bool or all(v in (0, 1) for v in values)
    for fn, args in ((check.mask_or_all, (m, like, NAME)), (check.mask_or_none, (m, like, NAME)),
                     (check.token_mask, (NAME, m, like.shape, "[N]"))):
        if ok:
            out = fn(*args)
            assert out.dtype == torch.bool and torch.equal(out, m != 0)
        else:
            with pytest.raises(ValueError, match="mask|0 and 1|{0, 1}|" + NAME):
                fn(*args)
    assert check.mask_or_none(None, like, NAME) is None
    assert check.mask_or_all(None, like, NAME).all()
    refused(check.mask_or_all, torch.ones(len(values) + 1), like, NAME, match="mask")


@given(st.lists(st.integers(-3, 12), min_size=0, max_size=6), st.integers(1, 3))
def test_ids(values, rows):
    x = torch.tensor([values] * rows, dtype=torch.int64)
    ok = len(values) > 0 and all(0 <= v < 10 for v in values)
    if ok:
        check.ids(NAME, x, vocab_size=10)
    else:
        refused(check.ids, NAME, x, vocab_size=10)
    refused(check.ids, NAME, x.float(), vocab_size=10)
    refused(check.ids, NAME, x[0], vocab_size=10)


@given(st.integers(-4, 4), st.integers(1, 3))
def test_batch_dim_and_dim_index(dim, ndim):
    x = torch.zeros([2] * ndim)
    if -ndim <= dim < ndim:
        assert check.batch_dim(dim, x, NAME) == dim % ndim
        assert check.dim_index(dim, x) == dim
    else:
        refused(check.batch_dim, dim, x, NAME, match="dim")
        refused(check.dim_index, dim, x, match="dim")
    refused(check.batch_dim, True, x, NAME, match="dim")


@given(st.lists(st.integers(1, 4), min_size=0, max_size=3), st.integers(1, 4))
def test_obs(lead, d):
    x = torch.zeros(*lead, d)
    assert check.obs(x, d) is x
    refused(check.obs, x, d + 1, match="obs")


@given(st.lists(st.floats(-10, 10), min_size=1, max_size=5),
       st.lists(st.one_of(st.just(0.0), st.floats(0.5, 3)), min_size=1, max_size=5))
def test_safe_ratio(num, den):
    n = min(len(num), len(den))
    a, b = torch.tensor(num[:n]), torch.tensor(den[:n], requires_grad=True)
    out = check.safe_ratio(a, b, torch.full_like(a, 7.0))
    assert torch.equal(out, torch.where(b > 0, a / torch.where(b > 0, b, 1.0), 7.0))
    out.sum().backward()
    assert torch.isfinite(b.grad).all()                    # a zero denominator gives no NaN gradient
    assert (b.grad[b == 0] == 0).all()


@settings(max_examples=60)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=7))
def test_others_sum(values):
    x = torch.tensor(values, dtype=torch.float64)
    ref = torch.tensor([sum(v for j, v in enumerate(values) if j != i) for i in range(len(values))],
                       dtype=torch.float64)
    assert torch.allclose(check.others_sum(x, 0), ref, rtol=1e-12, atol=1e-9)
    # no cancellation: one huge sample leaves the others' sum exact in float32
    y = torch.tensor([1e8, 1.0, 2.0, 1.5], dtype=torch.float32)
    assert check.others_sum(y, 0)[0].item() == 4.5


@given(st.lists(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]), min_size=1,
                max_size=3))
def test_accumulation_dtype(dtypes):
    xs = [torch.zeros(1, dtype=d) for d in dtypes]
    expected = torch.float64 if torch.float64 in dtypes else torch.float32
    assert check.accumulation_dtype(*xs) == expected


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["loss", "grad", "param", None]), st.integers(0, 1000))
def test_finite_update_and_parameters(poison, step):
    net = nn.Linear(2, 1)
    loss = net(torch.ones(1, 2)).sum()
    loss.backward()
    if poison == "loss":
        loss = loss * math.nan
    if poison == "grad":
        net.weight.grad[0, 0] = math.inf
    if poison == "param":
        with torch.no_grad():
            net.bias[0] = math.nan
    if poison in ("loss", "grad"):
        with pytest.raises(FloatingPointError, match=f"step {step}: the (loss|gradient norm)"):
            check.finite_update(step, loss, net)
    else:
        check.finite_update(step, loss, net)
    if poison == "param":
        with pytest.raises(FloatingPointError, match=f"step {step}: parameter bias"):
            check.finite_parameters(step, net)
    else:
        check.finite_parameters(step, net)


def test_meta_tensors_are_refused_by_name():
    x = torch.zeros(2, 3, device="meta")
    for fn, args in ((check.float_tensor, (x, NAME)), (check.finite_float, (x, NAME)), (check.floating, (x, NAME)),
                     (check.float_nonempty, (x, NAME, "[B, T]")), (check.ids, (NAME, x.long()))):
        refused(fn, *args, match=f"{NAME} is a meta tensor")
