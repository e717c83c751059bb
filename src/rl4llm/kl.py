r"""Monte Carlo estimators of a KL divergence from log-probabilities of samples.

For samples :math:`x \sim q` and the log-ratio :math:`\log r(x) = \log p(x) - \log q(x)`, three per-sample
estimators of :math:`\mathrm{KL}(q \,\|\, p) = \mathbb E_{x \sim q}[\log q(x) - \log p(x)]` are in common use:

- :func:`kl_k1` -- :math:`k_1 = -\log r`, unbiased, can be negative, high variance when ``p`` and ``q`` differ;
- :func:`kl_k2` -- :math:`k_2 = \tfrac12 (\log r)^2`, non-negative, biased (it equals the KL to second order);
- :func:`kl_k3` -- :math:`k_3 = (r - 1) - \log r`, unbiased (because :math:`\mathbb E_q[r] = 1`) and
  non-negative (because :math:`\log r \le r - 1`).

Direction. Every function takes ``(logp, logq)`` with the samples drawn from ``q``: the *second* argument is the
log-probability under the sampling distribution, and the estimate is of ``KL(q || p)``. In RL for language
models the samples come from the policy :math:`\pi_\theta`, so
``kl_k3(logp=log pi_ref, logq=log pi_theta)`` estimates the reverse KL :math:`\mathrm{KL}(\pi_\theta \,\|\,
\pi_\mathrm{ref})`; :func:`per_token_kl` takes its arguments in that order (policy first) so the call site cannot
get it backwards.

Numerics. :math:`k_3 = e^{x} - 1 - x` with :math:`x = \log r` is a difference of nearly equal numbers when
:math:`|x|` is small: the naive ``exp(x) - 1 - x`` has an absolute error of about one unit in the last place of
1, i.e. a relative error of order :math:`\epsilon / x^2`, and ``expm1(x) - x`` still has a relative error of
order :math:`\epsilon / |x|` (in float32 it returns exactly 0 for :math:`|x| < 10^{-4}` or so). :func:`kl_k3`
uses ``expm1(x) - x`` for :math:`|x| \ge 1/2`, where the cancellation costs at most a few units in the last
place, and the Taylor series :math:`\sum_{k=2}^{17} x^k / k!` (Horner form) below it, whose truncation error is
below float64 round-off there; the result has full relative accuracy for every ``x`` and is never negative.

Precision. bfloat16 and float16 inputs are upcast and all arithmetic, and the result, is float32; float32 and
float64 inputs are computed in their own precision. Tensors of any shape are accepted (time-last ``[B, T]``
for per-token values); an optional ``mask`` of the same shape marks the entries to keep, and the result is
exactly 0 elsewhere.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rl4llm import _validate as check

__all__ = ["ESTIMATORS", "categorical_kl", "kl_k1", "kl_k2", "kl_k3", "per_token_kl"]

# Taylor coefficients 1/k! of e^x - 1 - x, highest degree first (for Horner's scheme).
_SERIES_DEGREE = 17
_SERIES_COEFS = [1.0 / math.factorial(k) for k in range(_SERIES_DEGREE, 1, -1)]
_SERIES_RADIUS = 0.5


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _check_logprobs(name: str, x) -> None:
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        got = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point tensor of log-probabilities, got {got}")


def _log_ratio(logp, logq, mask, names=("logp", "logq")) -> tuple[Tensor, Tensor | None]:
    """Validate the inputs; return ``log r = logp - logq`` in the accumulation dtype and the boolean mask."""
    _check_logprobs(names[0], logp)
    _check_logprobs(names[1], logq)
    if logp.shape != logq.shape:
        raise ValueError(f"{names[1]} must have the shape of {names[0]}, {tuple(logp.shape)}, "
                         f"got {tuple(logq.shape)}")
    if logp.device != logq.device:
        raise ValueError(f"{names[1]} must be on {names[0]}'s device {logp.device}, got {logq.device}")
    acc = torch.promote_types(_accumulation_dtype(logp.dtype), _accumulation_dtype(logq.dtype))
    log_r = logp.to(acc) - logq.to(acc)
    if mask is None:
        return log_r, None
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a tensor of 0/1 with shape {tuple(logp.shape)}, got {type(mask).__name__}")
    if mask.shape != logp.shape:
        raise ValueError(f"mask must have the shape of {names[0]}, {tuple(logp.shape)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0 and 1")
        mask = mask != 0
    return log_r, mask.to(log_r.device)


def _masked(value: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return value
    return torch.where(mask, value, torch.zeros((), dtype=value.dtype, device=value.device))


def kl_k1(logp: Tensor, logq: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""Per-sample :math:`k_1 = -\log r = \log q(x) - \log p(x)`, an unbiased estimate of ``KL(q || p)``, x ~ q.

    Args:
        logp: ``[...]`` log-probabilities of the samples under ``p`` (the distribution compared against).
        logq: ``[...]`` log-probabilities of the same samples under ``q`` (the sampling distribution).
        mask: optional ``[...]`` 0/1 (bool, int or float) tensor; entries where it is 0 are returned as 0.

    Returns:
        ``[...]`` estimates, float32 for bfloat16/float16 inputs, else the inputs' (promoted) dtype.

    Raises:
        ValueError: an input is not a floating-point tensor, the shapes or devices differ, or ``mask`` is not
            0/1 of the same shape.
    """
    log_r, mask = _log_ratio(logp, logq, mask)
    return _masked(-log_r, mask)


def kl_k2(logp: Tensor, logq: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""Per-sample :math:`k_2 = \tfrac12 (\log r)^2`: non-negative, a biased estimate of ``KL(q || p)``, x ~ q.

    Its expectation is an f-divergence that agrees with the KL to second order in :math:`\log r`.

    Args:
        logp: ``[...]`` log-probabilities of the samples under ``p``.
        logq: ``[...]`` log-probabilities of the same samples under ``q`` (the sampling distribution).
        mask: optional ``[...]`` 0/1 tensor; entries where it is 0 are returned as 0.

    Returns:
        ``[...]`` estimates, float32 for bfloat16/float16 inputs, else the inputs' (promoted) dtype.

    Raises:
        ValueError: as for :func:`kl_k1`.
    """
    log_r, mask = _log_ratio(logp, logq, mask)
    return _masked(0.5 * log_r.square(), mask)


def _expm1_minus_x(x: Tensor) -> Tensor:
    """``e^x - 1 - x`` with full relative accuracy: Taylor series for ``|x| < 1/2``, ``expm1(x) - x`` above."""
    small = x.abs() < _SERIES_RADIUS
    xs = torch.where(small, x, torch.zeros((), dtype=x.dtype, device=x.device))  # keep the unused branch finite
    poly = torch.full_like(xs, _SERIES_COEFS[0])
    if torch.is_grad_enabled() and xs.requires_grad:
        for c in _SERIES_COEFS[1:]:
            poly = poly * xs + c
    else:  # no graph to keep: update in place, saving one allocation per term on large inputs
        for c in _SERIES_COEFS[1:]:
            poly.mul_(xs).add_(c)
    series = poly * xs * xs
    xl = torch.where(small, torch.ones((), dtype=x.dtype, device=x.device), x)
    return torch.where(small, series, torch.expm1(xl) - xl)


def kl_k3(logp: Tensor, logq: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""Per-sample :math:`k_3 = (r - 1) - \log r`: non-negative and unbiased for ``KL(q || p)``, x ~ q.

    Computed as ``e^x - 1 - x`` of ``x = logp - logq`` with full relative accuracy for every ``x`` (see the
    module docstring): a Taylor series for ``|x| < 1/2`` and ``expm1(x) - x`` otherwise. Differentiable; the
    gradient is accurate too (``(e^x - 1) dx``, also from the series for small ``x``).

    Args:
        logp: ``[...]`` log-probabilities of the samples under ``p``.
        logq: ``[...]`` log-probabilities of the same samples under ``q`` (the sampling distribution).
        mask: optional ``[...]`` 0/1 tensor; entries where it is 0 are returned as 0.

    Returns:
        ``[...]`` estimates, float32 for bfloat16/float16 inputs, else the inputs' (promoted) dtype.

    Raises:
        ValueError: as for :func:`kl_k1`.
    """
    log_r, mask = _log_ratio(logp, logq, mask)
    return _masked(_expm1_minus_x(log_r), mask)


ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
"""The estimators by name, as accepted by :func:`per_token_kl`."""


def per_token_kl(logp_policy: Tensor, logp_ref: Tensor, mask: Tensor | None = None, estimator: str = "k3") -> Tensor:
    r"""Per-token estimates of ``KL(pi_policy || pi_ref)`` for tokens sampled from the policy.

    ``out[b, t]`` estimates :math:`\mathrm{KL}(\pi(\cdot \mid x, y_{<t}) \,\|\, \pi_\mathrm{ref}(\cdot \mid x,
    y_{<t}))` at the sampled token ``y_t``; summed over ``t`` (with k1 or k3) it is an unbiased estimate of the
    sequence-level KL between the two models' distributions over completions. It equals
    ``ESTIMATORS[estimator](logp=logp_ref, logq=logp_policy, mask=mask)``.

    The estimate is only unbiased when the tokens were sampled from the policy whose log-probabilities are
    ``logp_policy``; with samples from an older policy, weight it by the importance ratio.

    Args:
        logp_policy: ``[B, T]`` (or any ``[..., T]``) log-probabilities of the sampled tokens under the policy.
        logp_ref: ``[B, T]`` log-probabilities of the same tokens under the reference model.
        mask: optional ``[B, T]`` 0/1 tensor, 1 on real tokens; padding positions are returned as 0.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        ``[B, T]`` per-token estimates (float32 for bfloat16/float16 inputs).

    Raises:
        ValueError: an unknown ``estimator``, or bad inputs as for :func:`kl_k1` (reported under these argument
            names).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {estimator!r}")
    log_r, mask = _log_ratio(logp_ref, logp_policy, mask, names=("logp_ref", "logp_policy"))
    if estimator == "k1":
        value = -log_r
    elif estimator == "k2":
        value = 0.5 * log_r.square()
    else:
        value = _expm1_minus_x(log_r)
    return _masked(value, mask)


# ----------------------------------------------------------------------------------------------------------
# The exact KL of two categorical distributions
# ----------------------------------------------------------------------------------------------------------


def _plogp_ratio(logp: Tensor, logq: Tensor) -> Tensor:
    """``p (log p - log q)`` elementwise, with ``0 log 0 = 0`` and ``+inf`` where ``p > 0 = q``."""
    p = logp.exp()
    diff = torch.where(p > 0, logp - logq, torch.zeros((), dtype=logp.dtype, device=logp.device))
    return p * diff


def categorical_kl(logp: Tensor, logq: Tensor, *, dim: int = -1) -> Tensor:
    r"""Exact :math:`\mathrm{KL}(p \,\|\, q) = \sum_y p(y) \log(p(y)/q(y))` of two categoricals along ``dim``.

    Terms with :math:`p(y) = 0` are 0 (also where :math:`q(y) = 0`); :math:`p(y) > 0 = q(y)` gives ``inf``.
    Differentiable in both arguments. This is the one exact categorical KL of the package: PPO and TRPO
    (chapter 8) call it on ``log_softmax`` of their logits, DPO (chapter 12, §12.2) on normalised log-probabilities.

    Args:
        logp: ``[..., V, ...]`` normalised log-probabilities of ``p`` (``-inf`` allowed).
        logq: the same for ``q``.
        dim: the dimension that enumerates the outcomes.

    Returns:
        the KL with ``dim`` removed, float32 (float64 for float64 inputs).

    Raises:
        ValueError: non-floating, empty or NaN inputs, ``+inf``, shapes that differ, a bad ``dim``.
    """
    check.finite_float(logp, "logp", allow_neg_inf=True)
    check.finite_float(logq, "logq", allow_neg_inf=True)
    check.like(logq, logp, "logq", "logp")
    check.dim_index(dim, logp)
    acc = check.accumulation_dtype(logp, logq)
    return _plogp_ratio(logp.to(acc), logq.to(acc)).sum(dim=dim)

