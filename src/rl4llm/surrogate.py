r"""The clipped surrogate objective, the value loss and their masked reductions (tier 1: pure math).

These are the losses chapter 8 (§8.3) derives for PPO, and every later chapter that runs a PPO-style update reuses
them: PPO on CartPole (chapter 8, :mod:`rl4llm.ppo`), PPO for a language model with a KL-shaped reward (chapter
11, :mod:`rl4llm.rlhf`) and GRPO (chapter 13, :mod:`rl4llm.grpo`, which adds its own aggregation over tokens).
They live below the algorithms so that a language-model chapter does not load the gymnasium half of the package.

For a sample drawn from the old policy, with ratio :math:`\rho = \pi_\theta(a \mid s) / \pi_{\theta_\mathrm{old}}(a
\mid s)` and advantage :math:`\hat A`, the clipped objective (to be maximised) is

.. math:: \ell^{\mathrm{clip}} = \min\bigl(\rho \hat A,\ \mathrm{clip}(\rho, 1 - \epsilon_\mathrm{low},
   1 + \epsilon_\mathrm{high}) \hat A\bigr),

which equals :math:`\hat A \min(\rho, 1 + \epsilon_\mathrm{high})` for :math:`\hat A > 0` and
:math:`\hat A \max(\rho, 1 - \epsilon_\mathrm{low})` for :math:`\hat A < 0`: a pessimistic (lower) bound on the
unclipped surrogate :math:`\rho \hat A`. Symmetric clipping is :math:`\epsilon_\mathrm{low} =
\epsilon_\mathrm{high} = \epsilon`; DAPO's "clip-higher" takes :math:`\epsilon_\mathrm{high} >
\epsilon_\mathrm{low}`.

Conventions: tensors of any shape (time-last ``[B, T]`` for tokens), an optional 0/1 ``mask`` of the same shape;
log-probabilities in bfloat16/float16 are upcast, and all arithmetic is float32 (float64 stays float64). Masked
entries may hold anything (padding, ``-inf``, NaN): they reach neither a loss nor its gradient.

The module, read top to bottom:

1. :func:`masked_mean`, :func:`normalize_advantages` -- averaging over real entries, and advantage normalisation
   that returns exact zeros when all advantages are equal;
2. :func:`clipped_objective`, :func:`policy_loss`, :func:`value_loss` -- the clipped surrogate, its loss with
   diagnostics (:class:`PolicyLossStats`), and the (optionally clipped) critic loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rl4llm import _validate as check
from rl4llm.kl import kl_k1, kl_k3

__all__ = [
    "PolicyLossStats",
    "clipped_objective",
    "masked_mean",
    "normalize_advantages",
    "policy_loss",
    "value_loss",
]


def masked_mean(x: Tensor, mask: Tensor | None = None, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1 (all entries if ``mask`` is ``None``).

    Args:
        x: floating-point tensor of any shape.
        mask: optional 0/1 (or bool) tensor of ``x``'s shape.
        dim: the dims to average over; ``None`` for all.

    Returns:
        The mean, in ``x``'s dtype (float32 accumulation for 16-bit inputs).

    Raises:
        ValueError: ``mask`` has the wrong shape or holds other values than 0/1, or a mean would be over no
            entry at all (a mask of all zeros over ``dim``), which has no value.
    """
    x = check.floating(x, "x")
    mask = check.mask_or_none(mask, x, "x")
    acc = check.accumulation_dtype(x)
    xs = x.to(acc)
    if mask is None:
        if x.numel() == 0:
            raise ValueError("x is empty: the mean of nothing is undefined")
        return (xs.mean() if dim is None else xs.mean(dim=dim)).to(x.dtype)
    m = mask.to(acc)
    count = m.sum() if dim is None else m.sum(dim=dim)
    if bool((count == 0).any()):
        raise ValueError("mask selects no entries (all zeros" + ("" if dim is None else f" along dim {dim}")
                         + "): the mean of nothing is undefined")
    kept = torch.where(mask, xs, torch.zeros((), dtype=acc, device=x.device))  # NaN/inf at masked entries stay out
    total = kept.sum() if dim is None else kept.sum(dim=dim)
    return (total / count).to(x.dtype)


def normalize_advantages(advantages: Tensor, mask: Tensor | None = None, *, eps: float = 1e-8) -> Tensor:
    r"""Centre the advantages and scale them to unit standard deviation over the (masked) batch.

    ``(A - mean) / std``, with the population std over the entries ``mask`` selects. If all the selected
    advantages are equal the result is exactly 0: centring alone would leave the rounding error of the mean,
    and dividing that by an equally tiny std would turn it into +-1. If the std is at most ``eps`` the
    advantages are only centred, never divided by (nearly) zero. Masked entries are returned as 0.

    Args:
        advantages: floating-point tensor of any shape.
        mask: optional 0/1 tensor of the same shape.
        eps: std threshold below which no scaling is applied.

    Returns:
        Tensor of ``advantages``' shape and dtype.
    """
    advantages = check.floating(advantages, "advantages")
    mask = check.mask_or_none(mask, advantages, "advantages")
    if not torch.isfinite(advantages if mask is None else advantages[mask]).all():
        raise ValueError("advantages contain NaN or infinite values")
    acc = check.accumulation_dtype(advantages)
    a = advantages.to(acc)
    mean = masked_mean(a, mask)
    centred = a - mean
    var = masked_mean(centred.square(), mask)
    std = var.sqrt()
    zero = torch.zeros((), dtype=acc, device=a.device)
    scale = torch.where(std > eps, std, torch.ones((), dtype=acc, device=a.device))
    selected = a if mask is None else a[mask]
    all_equal = selected.max() == selected.min()
    out = torch.where(all_equal, zero, centred / scale)
    if mask is not None:
        out = torch.where(mask, out, zero)
    return out.to(advantages.dtype)


def clipped_objective(logp: Tensor, logp_old: Tensor, advantages: Tensor, *, clip_eps: float = 0.2,
                      clip_eps_high: float | None = None) -> Tensor:
    r"""Per-sample clipped surrogate :math:`\min(\rho \hat A, \mathrm{clip}(\rho, 1-\epsilon_\mathrm{low},
    1+\epsilon_\mathrm{high}) \hat A)`, to be maximised.

    Args:
        logp: ``[...]`` log-probabilities of the sampled actions (tokens) under the current policy (with grad).
        logp_old: ``[...]`` the same under the policy that sampled them (treated as a constant).
        advantages: ``[...]`` advantage estimates (treated as constants).
        clip_eps: :math:`\epsilon_\mathrm{low}` (and :math:`\epsilon_\mathrm{high}` unless given), >= 0.
        clip_eps_high: optional :math:`\epsilon_\mathrm{high}` for asymmetric clipping (DAPO's clip-higher).

    Returns:
        ``[...]`` objective values, float32 (float64 for float64 inputs).
    """
    for name, x in (("logp", logp), ("logp_old", logp_old), ("advantages", advantages)):
        check.floating(x, name)
    check.same(logp_old, logp, "logp_old", "logp")
    check.same(advantages, logp, "advantages", "logp")
    eps_low = check.nonneg_real(clip_eps, "clip_eps")
    eps_high = eps_low if clip_eps_high is None else check.nonneg_real(clip_eps_high, "clip_eps_high")
    acc = check.accumulation_dtype(logp, logp_old, advantages)
    ratio = torch.exp(logp.to(acc) - logp_old.detach().to(acc))
    adv = advantages.detach().to(acc)
    return torch.minimum(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)


@dataclass(frozen=True)
class PolicyLossStats:
    """Diagnostics of one policy-loss evaluation (floats, no graph).

    Attributes:
        clip_fraction: share of (masked) samples whose ratio lies outside the clip range on the side where the
            clipped branch is active, i.e. whose gradient is zeroed by the clip.
        approx_kl_k1: mean of :math:`k_1` for :math:`\\mathrm{KL}(\\pi_\\mathrm{old} \\| \\pi_\\theta)` from the
            old policy's samples.
        approx_kl_k3: mean of :math:`k_3` for the same KL (non-negative, lower variance).
        ratio_mean: mean probability ratio.
    """

    clip_fraction: float
    approx_kl_k1: float
    approx_kl_k3: float
    ratio_mean: float


def policy_loss(logp: Tensor, logp_old: Tensor, advantages: Tensor, *, clip_eps: float = 0.2,
                clip_eps_high: float | None = None, mask: Tensor | None = None) -> tuple[Tensor, PolicyLossStats]:
    r"""PPO's clipped policy loss, :math:`-` the mean of :func:`clipped_objective` over the masked samples.

    Every (unmasked) sample gets the same weight; token-level weightings other than this flat mean (GRPO's
    per-sequence average, Dr. GRPO's constant) are in :mod:`rl4llm.grpo`.

    Args:
        logp, logp_old, advantages, clip_eps, clip_eps_high: as for :func:`clipped_objective`.
        mask: optional 0/1 tensor of ``logp``'s shape; 0 marks padding, which contributes nothing to the loss
            or its gradient.

    Returns:
        ``(loss, stats)``: the scalar loss (float32, or float64 for float64 inputs) and a
        :class:`PolicyLossStats`.
    """
    for name, x in (("logp", logp), ("logp_old", logp_old), ("advantages", advantages)):
        check.floating(x, name)
    mask = check.mask_or_none(mask, logp, "logp")
    if mask is not None:  # padding may hold anything (-inf, NaN): keep it out of the value and the gradient
        logp, logp_old, advantages = (torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
                                      for x in (logp, logp_old, advantages))
    obj = clipped_objective(logp, logp_old, advantages, clip_eps=clip_eps, clip_eps_high=clip_eps_high)
    loss = -masked_mean(obj, mask)
    with torch.no_grad():
        eps_low = float(clip_eps)
        eps_high = eps_low if clip_eps_high is None else float(clip_eps_high)
        acc = obj.dtype
        log_ratio = logp.detach().to(acc) - logp_old.detach().to(acc)
        ratio = log_ratio.exp()
        adv = advantages.detach().to(acc)
        clipped = ((adv > 0) & (ratio > 1.0 + eps_high)) | ((adv < 0) & (ratio < 1.0 - eps_low))
        stats = PolicyLossStats(
            clip_fraction=float(masked_mean(clipped.to(acc), mask)),
            approx_kl_k1=float(masked_mean(kl_k1(logp.detach().to(acc), logp_old.detach().to(acc)), mask)),
            approx_kl_k3=float(masked_mean(kl_k3(logp.detach().to(acc), logp_old.detach().to(acc)), mask)),
            ratio_mean=float(masked_mean(ratio, mask)),
        )
    return loss, stats


def value_loss(values: Tensor, returns: Tensor, *, old_values: Tensor | None = None, clip_eps: float | None = None,
               mask: Tensor | None = None) -> Tensor:
    r"""Squared-error loss of the critic, :math:`\tfrac12 \,\mathrm{mean}\,(V(s) - R)^2`.

    With ``old_values`` and ``clip_eps`` it is PPO2's clipped variant,
    :math:`\tfrac12 \,\mathrm{mean} \max\bigl((V - R)^2, (V_\mathrm{old} + \mathrm{clip}(V - V_\mathrm{old},
    -\epsilon, \epsilon) - R)^2\bigr)`.

    Args:
        values: ``[...]`` the critic's predictions (with grad).
        returns: ``[...]`` targets, e.g. :math:`\lambda`-returns (treated as constants).
        old_values: optional ``[...]`` predictions of the critic that collected the data.
        clip_eps: clip range for the value change; requires ``old_values``.
        mask: optional 0/1 tensor of ``values``' shape.

    Returns:
        Scalar loss.
    """
    check.floating(values, "values")
    check.floating(returns, "returns")
    check.same(returns, values, "returns", "values")
    mask = check.mask_or_none(mask, values, "values")
    if mask is not None:  # padding may hold anything: keep it out of the value and the gradient
        values, returns = (torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
                           for x in (values, returns))
    acc = check.accumulation_dtype(values, returns)
    v = values.to(acc)
    target = returns.detach().to(acc)
    sq = (v - target).square()
    if (old_values is None) != (clip_eps is None):
        raise ValueError("old_values and clip_eps must be given together (the clipped value loss needs both)")
    if old_values is not None:
        check.floating(old_values, "old_values")
        check.same(old_values, values, "old_values", "values")
        eps = check.nonneg_real(clip_eps, "clip_eps")
        if mask is not None:
            old_values = torch.where(mask, old_values, torch.zeros((), dtype=old_values.dtype,
                                                                   device=old_values.device))
        vo = old_values.detach().to(acc)
        v_clipped = vo + (v - vo).clamp(-eps, eps)
        sq = torch.maximum(sq, (v_clipped - target).square())
    return 0.5 * masked_mean(sq, mask)

