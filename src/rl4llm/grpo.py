r"""Group relative policy optimisation (GRPO) and its variants, with every normalisation an explicit argument.

GRPO (Shao et al., 2024, "DeepSeekMath") replaces PPO's critic by a baseline computed from a *group*: for each
prompt ``q`` it samples ``G`` completions :math:`o_1, \dots, o_G` from :math:`\pi_{\theta_\mathrm{old}}`, scores them
with a verifier, and gives every token of :math:`o_i` the advantage

.. math:: \hat A_i = \frac{r_i - \operatorname{mean}(r_1, \dots, r_G)}{\operatorname{std}(r_1, \dots, r_G) + \epsilon}.

The policy then takes several gradient steps on the clipped objective of :mod:`rl4llm.surrogate`, with per-token
ratios :math:`\rho_{i,t} = \pi_\theta(o_{i,t} \mid q, o_{i,<t}) / \pi_{\theta_\mathrm{old}}(o_{i,t} \mid q,
o_{i,<t})`, minus :math:`\beta` times a per-token :math:`k_3` estimate of :math:`\mathrm{KL}(\pi_\theta \,\|\,
\pi_\mathrm{ref})` placed *in the loss* (not in the reward). What papers and libraries disagree about, and what
this module makes an argument of each function:

- :func:`group_advantages` -- the baseline (the group mean including the sample, or the leave-one-out mean of
  RLOO), the scale (the group's std, the batch's std, or none as in Dr. GRPO), the std's ``ddof`` and the
  :math:`\epsilon`; a group whose rewards are all equal gets advantage exactly 0, never ``0/0``.
- :func:`process_advantages` -- process supervision: a token's advantage is the sum of the normalised rewards
  of the steps that end at or after it.
- :func:`token_weights` -- how the per-token losses are summed into one number: ``"grpo"``
  (:math:`1/(G\,|o_i|)`, a mean per sequence, then over sequences), ``"bnpo"`` and ``"dapo"``
  (:math:`1/\sum_j |o_j|`, a mean over all tokens; ``"dapo"`` can count the tokens of a whole accumulated
  batch) and ``"dr_grpo"`` (:math:`1/(G\,L_\mathrm{max})`, a constant).
- :func:`grpo_loss` -- the loss with those weights, token-level ratios or GSPO's length-normalised sequence
  ratio :math:`s_i = (\pi_\theta(o_i \mid q) / \pi_{\theta_\mathrm{old}}(o_i \mid q))^{1/|o_i|}`, asymmetric
  clipping (DAPO's clip-higher) and the per-token :math:`k_3` penalty computed stably (:func:`rl4llm.kl.kl_k3`).
- :func:`train_grpo` -- a short training loop on a task of :mod:`rl4llm.tasks`: sample ``G`` completions per
  prompt with :func:`rl4llm.lm.sample`, score them with the task's verifier, run several minibatch epochs
  against the frozen :math:`\pi_{\theta_\mathrm{old}}` log-probabilities, penalise the KL to a frozen reference.

Shapes: rewards are ``[B, G]`` (prompts by group members, the group along the last dim); per-token tensors are
``[N, L]`` with ``N`` completions (any grouping) and ``L`` positions, time-last, with an explicit 0/1 mask that is
1 on the completion's tokens (up to and including end-of-sequence). Arithmetic is float32 (float64 stays float64).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from numbers import Real

import torch
from torch import Tensor, nn

from rl4llm.kl import per_token_kl
from rl4llm.lm import frozen_copy, sample, token_logprobs
from rl4llm.returns import batch_mean_baseline, leave_one_out_baseline
from rl4llm.surrogate import clipped_objective

__all__ = [
    "AGGREGATIONS",
    "IMPORTANCE_LEVELS",
    "SCALINGS",
    "GRPOConfig",
    "GRPOHistory",
    "GRPOLossStats",
    "group_advantages",
    "grpo_loss",
    "process_advantages",
    "sequence_log_ratio",
    "token_weights",
    "train_grpo",
]

AGGREGATIONS = ("grpo", "bnpo", "dapo", "dr_grpo")
"""How per-token losses are combined; see :func:`token_weights`."""

SCALINGS = ("group", "batch", "none")
"""What the centred rewards are divided by; see :func:`group_advantages`."""

IMPORTANCE_LEVELS = ("token", "sequence")
"""Per-token ratios (GRPO, DAPO, Dr. GRPO) or one length-normalised ratio per sequence (GSPO)."""


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------
def _acc(*xs: Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _check_float(x, name: str, shape: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point {shape} tensor, got {got}")
    return x


def _check_mask(mask, shape: torch.Size, device: torch.device) -> Tensor:
    """A 0/1 (or bool) ``[N, L]`` mask as a bool tensor."""
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a 0/1 tensor of shape [N, L] = {list(shape)}, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"mask must have shape [N, L] = {list(shape)}, got {list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but logp is on {device}")
    if mask.dtype != torch.bool:
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0 and 1 (or be a bool tensor)")
        mask = mask != 0
    return mask


def _check_choice(value, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_nonneg(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= float(value) < math.inf:
        raise ValueError(f"{name} must be a finite real number >= 0, got {value!r}")
    return float(value)


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------------------
def _std(x: Tensor, dim, ddof: int) -> Tensor:
    """Standard deviation with ``ddof`` over ``dim`` (keepdim), or over everything for ``dim=None``."""
    n = x.numel() if dim is None else x.shape[dim]
    mean = x.mean() if dim is None else x.mean(dim, keepdim=True)
    ss = (x - mean).square()
    ss = ss.sum() if dim is None else ss.sum(dim, keepdim=True)
    return (ss / (n - ddof)).sqrt()


def group_advantages(rewards: Tensor, *, scale: str = "group", leave_one_out: bool = False, eps: float = 1e-4,
                     ddof: int = 1) -> Tensor:
    r"""Group-relative advantages :math:`\hat A_i = (r_i - b_i) / (\sigma + \epsilon)`, one per completion.

    The baseline :math:`b_i` is the mean of the group (``leave_one_out=False``, GRPO; it includes
    :math:`r_i` itself, which shrinks the expected gradient by :math:`(G-1)/G`, see
    :func:`rl4llm.returns.batch_mean_baseline`) or the mean of the *other* :math:`G - 1` rewards
    (``leave_one_out=True``, RLOO; :func:`rl4llm.returns.leave_one_out_baseline`). The scale
    :math:`\sigma` is

    - ``"group"``: the standard deviation of the group's rewards (GRPO; a per-prompt rescaling that weights
      prompts the model almost always or almost never solves more, the "difficulty bias" of Dr. GRPO);
    - ``"batch"``: one standard deviation of all rewards in the batch, so prompts keep their relative weight;
    - ``"none"``: no division (Dr. GRPO, RLOO); :math:`\epsilon` and ``ddof`` are then unused.

    A group whose rewards are all equal carries no signal; its advantages are exactly 0 (no ``0/0``), and so
    is every advantage when the scale is 0. Any other group has a positive std, so ``eps = 0`` (the formula as
    printed in DeepSeekMath) is safe too.

    Args:
        rewards: ``[..., G]`` finite rewards, the group along the last dim (``[B, G]`` for ``B`` prompts), ``G >= 2``.
        scale: one of :data:`SCALINGS`.
        leave_one_out: use the leave-one-out mean as the baseline.
        eps: ``>= 0``, added to the std (1e-4 in TRL).
        ddof: delta degrees of freedom of the std: 1 (Bessel's correction, ``torch.std``'s default, TRL) or 0.

    Returns:
        ``[..., G]`` advantages in ``rewards``' dtype (float32 arithmetic for 16-bit input).

    Raises:
        ValueError: ``rewards`` not a floating-point tensor with a last dim ``G >= 2``, NaN or infinite
            rewards, an unknown ``scale``, a negative ``eps``, ``ddof`` not 0 or 1.
    """
    _check_float(rewards, "rewards", "[..., G]")
    if rewards.dim() < 1 or rewards.shape[-1] < 2:
        raise ValueError(f"rewards must be [..., G] with group size G >= 2 (a group of one has no baseline), "
                         f"got shape {list(rewards.shape)}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or infinite values")
    _check_choice(scale, "scale", SCALINGS)
    eps = _check_nonneg(eps, "eps")
    if ddof not in (0, 1) or isinstance(ddof, bool):
        raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
    r = rewards.to(_acc(rewards))
    baseline = leave_one_out_baseline(r, -1) if leave_one_out else batch_mean_baseline(r, -1)
    tied = (r.amax(-1, keepdim=True) == r.amin(-1, keepdim=True))  # [..., 1] groups with no signal
    centred = torch.where(tied, torch.zeros_like(r), r - baseline)
    if scale == "none":
        return centred.to(rewards.dtype)
    if scale == "group":
        std = _std(r, -1, ddof)  # [..., 1]
    else:
        std = _std(r, None, ddof).expand_as(r[..., :1]) if r.numel() > ddof else torch.zeros_like(r[..., :1])
    den = std + eps
    ok = den > 0
    out = torch.where(ok, centred / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(centred))
    return out.to(rewards.dtype)


def process_advantages(step_rewards: Tensor, step_ends: Tensor, length: int, *, step_mask: Tensor | None = None,
                       scale: bool = True, eps: float = 1e-4, ddof: int = 1) -> Tensor:
    r"""Process-supervision advantages: each token gets the normalised rewards of the steps ending at or after it.

    Completion :math:`i` of a group is split into steps; step :math:`j` ends at token index
    :math:`e_{i,j}` (0-based) and gets a reward :math:`r_{i,j}` from a process reward model. The rewards of the
    whole group are normalised together, :math:`\tilde r_{i,j} = (r_{i,j} - \operatorname{mean} R) /
    (\operatorname{std} R + \epsilon)` over all the group's steps :math:`R`, and

    .. math:: \hat A_{i,t} = \sum_{j:\ e_{i,j} \ge t} \tilde r_{i,j},

    so the last token of a step is credited with that step's reward (DeepSeekMath's ":math:`\ge`"; a strict
    ":math:`>`" would leave it out).

    Args:
        step_rewards: ``[..., G, K]`` rewards of up to ``K`` steps per completion, finite where ``step_mask`` is 1.
        step_ends: ``[..., G, K]`` integer index of each step's last token, in ``[0, length)``.
        length: ``L``, the number of token positions of the output.
        step_mask: optional ``[..., G, K]`` 0/1, 1 on real steps (completions have different numbers of steps).
        scale: divide by the group's std (else only centre).
        eps: ``>= 0``, added to the std.
        ddof: 0 or 1, of the std over the group's real steps.

    Returns:
        ``[..., G, L]`` per-token advantages (float32, float64 for float64 input).

    Raises:
        ValueError: shapes that differ, step ends outside ``[0, length)``, non-finite rewards on real steps,
            a group with fewer than ``ddof + 1`` real steps while scaling, bad ``eps``/``ddof``.
    """
    _check_float(step_rewards, "step_rewards", "[..., G, K]")
    if step_rewards.dim() < 2:
        raise ValueError(f"step_rewards must be [..., G, K], got shape {list(step_rewards.shape)}")
    if not isinstance(step_ends, Tensor) or step_ends.is_floating_point() or step_ends.dtype == torch.bool \
            or step_ends.shape != step_rewards.shape:
        got = f"{step_ends.dtype} {list(step_ends.shape)}" if isinstance(step_ends, Tensor) else type(step_ends)
        raise ValueError(f"step_ends must be an integer tensor of step_rewards' shape {list(step_rewards.shape)}, "
                         f"got {got}")
    length = _check_positive_int(length, "length")
    if step_mask is None:
        keep = torch.ones_like(step_rewards, dtype=torch.bool)
    else:
        if not isinstance(step_mask, Tensor) or step_mask.shape != step_rewards.shape:
            raise ValueError(f"step_mask must have step_rewards' shape {list(step_rewards.shape)}")
        if step_mask.dtype != torch.bool and not bool(((step_mask == 0) | (step_mask == 1)).all()):
            raise ValueError("step_mask must hold only 0 and 1")
        keep = step_mask != 0
    if bool(((step_ends < 0) | (step_ends >= length))[keep].any()):
        raise ValueError(f"step_ends must lie in [0, length={length}) on real steps")
    if not bool(torch.isfinite(step_rewards[keep]).all()):
        raise ValueError("step_rewards contain NaN or infinite values on real steps")
    eps = _check_nonneg(eps, "eps")
    if ddof not in (0, 1) or isinstance(ddof, bool):
        raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
    acc = _acc(step_rewards)
    r = torch.where(keep, step_rewards.to(acc), torch.zeros((), dtype=acc, device=step_rewards.device))
    m = keep.to(acc)
    count = m.sum((-2, -1), keepdim=True)  # [..., 1, 1] real steps per group
    if bool((count < ddof + 1).any()) and scale:
        raise ValueError(f"every group needs at least {ddof + 1} real step(s) to take a std with ddof={ddof}")
    mean = r.sum((-2, -1), keepdim=True) / count.clamp(min=1)
    centred = (r - mean) * m
    if scale:
        std = (centred.square().sum((-2, -1), keepdim=True) / (count - ddof).clamp(min=1)).sqrt()
        den = std + eps
        ok = den > 0
        norm = torch.where(ok, centred / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(centred))
    else:
        norm = centred
    t = torch.arange(length, device=step_rewards.device)  # [L]
    credited = (step_ends.unsqueeze(-1) >= t) & keep.unsqueeze(-1)  # [..., G, K, L]
    return (norm.unsqueeze(-1) * credited.to(acc)).sum(-2)  # [..., G, L]


# ----------------------------------------------------------------------------------------------------------
# Aggregation and the loss
# ----------------------------------------------------------------------------------------------------------
def token_weights(mask: Tensor, aggregation: str = "grpo", *, max_len: int | None = None,
                  num_tokens: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    r"""The weight :math:`w_{i,t}` of each token's loss in the aggregated loss :math:`\sum_{i,t} w_{i,t} \ell_{i,t}`.

    For ``N`` completions (``G`` per prompt, ``N = B G``) with lengths :math:`|o_i|` (``mask.sum(1)``):

    - ``"grpo"``: :math:`w_{i,t} = 1 / (N\, |o_i|)`: each completion's tokens are averaged, then the
      completions. A token of a short completion weighs more than one of a long completion.
    - ``"bnpo"``: :math:`w_{i,t} = 1 / \sum_j |o_j|` over this call's completions: every token weighs the same.
    - ``"dapo"``: :math:`w_{i,t} = 1 / T` with ``T = num_tokens``, the number of tokens in the whole batch
      whose gradient is being accumulated over several calls (DAPO's token-level loss); with
      ``num_tokens=None`` it is this call's count and equals ``"bnpo"``.
    - ``"dr_grpo"``: :math:`w_{i,t} = 1 / (N\, L_\mathrm{max})`, a constant; ``L_max = max_len``, the generation
      budget (``max_completion_length``), or ``L`` of the mask when ``None``.

    Padding (mask 0) has weight 0. A completion with no tokens gets no weight but still counts in ``N``.

    Args:
        mask: ``[N, L]`` 0/1 (or bool), 1 on completion tokens.
        aggregation: one of :data:`AGGREGATIONS`.
        max_len: ``L_max`` for ``"dr_grpo"`` (``>= L``); ignored otherwise.
        num_tokens: total tokens of the accumulated batch for ``"dapo"`` (``>=`` this call's count).
        dtype: floating-point dtype of the result.

    Returns:
        ``[N, L]`` weights in ``dtype``.

    Raises:
        ValueError: a mask that is not 2-D 0/1 or selects no token at all, an unknown aggregation, a
            ``max_len`` below ``L`` or a ``num_tokens`` below the tokens present.
    """
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        got = list(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a 2-D [N, L] 0/1 tensor, got {got}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    keep = _check_mask(mask, mask.shape, mask.device).to(dtype)
    _check_choice(aggregation, "aggregation", AGGREGATIONS)
    N, L = keep.shape
    total = keep.sum()
    if float(total) == 0:
        raise ValueError("mask selects no tokens (all zeros): there is no loss to aggregate")
    if aggregation == "grpo":
        lengths = keep.sum(1, keepdim=True).clamp(min=1.0)
        return keep / (N * lengths)
    if aggregation == "bnpo":
        return keep / total
    if aggregation == "dapo":
        if num_tokens is None:
            return keep / total
        num_tokens = _check_positive_int(num_tokens, "num_tokens")
        if num_tokens < float(total):
            raise ValueError(f"num_tokens={num_tokens} is below the {int(total)} tokens in mask")
        return keep / num_tokens
    if max_len is None:
        max_len = L
    max_len = _check_positive_int(max_len, "max_len")
    if max_len < L:
        raise ValueError(f"max_len={max_len} must be >= the mask's length L={L}")
    return keep / (N * max_len)


def sequence_log_ratio(logp: Tensor, logp_old: Tensor, mask: Tensor) -> Tensor:
    r"""GSPO's length-normalised log-ratio :math:`\log s_i = \frac{1}{|o_i|} \sum_t (\log \pi_\theta - \log
    \pi_{\theta_\mathrm{old}})(o_{i,t})`, so :math:`s_i = (\pi_\theta(o_i) / \pi_{\theta_\mathrm{old}}(o_i))^{1/|o_i|}`.

    Args:
        logp: ``[N, L]`` token log-probabilities under the current policy (with grad).
        logp_old: ``[N, L]`` the same under the sampling policy (treated as constants).
        mask: ``[N, L]`` 0/1; empty rows give 0.

    Returns:
        ``[N]`` log-ratios, differentiable with respect to ``logp``.
    """
    _check_float(logp, "logp", "[N, L]")
    _check_float(logp_old, "logp_old", "[N, L]")
    if logp.dim() != 2 or logp_old.shape != logp.shape:
        raise ValueError(f"logp and logp_old must both be [N, L], got {list(logp.shape)} and {list(logp_old.shape)}")
    keep = _check_mask(mask, logp.shape, logp.device)
    acc = _acc(logp, logp_old)
    zero = torch.zeros((), dtype=acc, device=logp.device)
    diff = torch.where(keep, logp.to(acc), zero) - torch.where(keep, logp_old.detach().to(acc), zero)
    return diff.sum(1) / keep.sum(1).clamp(min=1).to(acc)


@dataclass(frozen=True)
class GRPOLossStats:
    """Diagnostics of one :func:`grpo_loss` evaluation (floats, no graph).

    Attributes:
        policy_loss: the aggregated clipped term, :math:`-\\sum w\\, \\ell^\\mathrm{clip}`.
        kl_loss: the aggregated penalty :math:`\\sum w\\, k_3` (before multiplying by ``beta``); 0 without a
            reference.
        kl_mean: token mean of the per-token :math:`k_3` (0 without a reference).
        clip_fraction: share of tokens whose clipped branch is active (their gradient is zeroed).
        ratio_mean: token mean of the importance ratio (per-token, or the sequence ratio broadcast).
    """

    policy_loss: float
    kl_loss: float
    kl_mean: float
    clip_fraction: float
    ratio_mean: float


def grpo_loss(logp: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor, *, aggregation: str = "grpo",
              clip_eps: float = 0.2, clip_eps_high: float | None = None, importance_level: str = "token",
              beta: float = 0.0, logp_ref: Tensor | None = None, max_len: int | None = None,
              num_tokens: int | None = None) -> tuple[Tensor, GRPOLossStats]:
    r"""The GRPO loss :math:`\sum_{i,t} w_{i,t} (-\ell^\mathrm{clip}_{i,t} + \beta\, k_{3,i,t})`, to be minimised.

    :math:`\ell^\mathrm{clip}_{i,t} = \min(\rho \hat A_{i,t}, \mathrm{clip}(\rho, 1 - \epsilon_\mathrm{low}, 1 +
    \epsilon_\mathrm{high}) \hat A_{i,t})` is :func:`rl4llm.surrogate.clipped_objective`, with

    - ``importance_level="token"``: :math:`\rho_{i,t} = \pi_\theta(o_{i,t}) / \pi_{\theta_\mathrm{old}}(o_{i,t})`;
    - ``importance_level="sequence"`` (GSPO): :math:`\rho = s_i`, the length-normalised sequence ratio of
      :func:`sequence_log_ratio`, the same for every token of :math:`o_i` (then ``advantages`` must be per
      sequence, ``[N]``). With ``aggregation="grpo"`` the loss is GSPO's :math:`-\frac1N \sum_i \min(s_i \hat
      A_i, \mathrm{clip}(s_i) \hat A_i)`.

    :math:`k_{3,i,t} = \pi_\mathrm{ref}/\pi_\theta - 1 - \log(\pi_\mathrm{ref}/\pi_\theta)` at the sampled token
    (:func:`rl4llm.kl.per_token_kl`, stable for ratios near 1), the KL penalty in the loss as in DeepSeekMath.
    The weights :math:`w_{i,t}` are :func:`token_weights`; padding has weight 0 and contributes nothing to the
    loss or its gradient, whatever values ``logp`` holds there.

    Args:
        logp: ``[N, L]`` log-probabilities of the sampled tokens under the current policy (with grad).
        logp_old: ``[N, L]`` the same under the policy that sampled them (no grad).
        advantages: ``[N]`` per completion (outcome supervision) or ``[N, L]`` per token (process supervision).
        mask: ``[N, L]`` 0/1, 1 on completion tokens.
        aggregation: one of :data:`AGGREGATIONS`.
        clip_eps: :math:`\epsilon_\mathrm{low}` (and :math:`\epsilon_\mathrm{high}` unless given), ``>= 0``.
        clip_eps_high: :math:`\epsilon_\mathrm{high}` (DAPO's clip-higher, e.g. 0.28).
        importance_level: one of :data:`IMPORTANCE_LEVELS`.
        beta: ``>= 0``, coefficient of the KL penalty; ``> 0`` needs ``logp_ref``.
        logp_ref: ``[N, L]`` log-probabilities under the reference policy (no grad).
        max_len: ``L_max`` for ``"dr_grpo"``.
        num_tokens: tokens of the whole accumulated batch for ``"dapo"``.

    Returns:
        ``(loss, stats)``: the scalar loss (float32, float64 for float64 input) and a :class:`GRPOLossStats`.

    Raises:
        ValueError: shapes that do not match ``[N, L]`` / ``[N]``, a mask that selects nothing, NaN or infinite
            values on real tokens, ``beta > 0`` without ``logp_ref``, per-token advantages with sequence-level
            ratios, unknown options.
    """
    _check_float(logp, "logp", "[N, L]")
    if logp.dim() != 2:
        raise ValueError(f"logp must be [N, L], got shape {list(logp.shape)}")
    N, L = logp.shape
    _check_float(logp_old, "logp_old", "[N, L]")
    if logp_old.shape != logp.shape:
        raise ValueError(f"logp_old must have logp's shape [N, L] = {[N, L]}, got {list(logp_old.shape)}")
    _check_float(advantages, "advantages", "[N] or [N, L]")
    if advantages.shape not in ((N,), (N, L)):
        raise ValueError(f"advantages must be [N] = [{N}] or [N, L] = {[N, L]}, got {list(advantages.shape)}")
    keep = _check_mask(mask, logp.shape, logp.device)
    _check_choice(aggregation, "aggregation", AGGREGATIONS)
    _check_choice(importance_level, "importance_level", IMPORTANCE_LEVELS)
    beta = _check_nonneg(beta, "beta")
    if beta > 0 and logp_ref is None:
        raise ValueError("beta > 0 needs logp_ref, the reference policy's log-probabilities [N, L]")
    if logp_ref is not None:
        _check_float(logp_ref, "logp_ref", "[N, L]")
        if logp_ref.shape != logp.shape:
            raise ValueError(f"logp_ref must have logp's shape [N, L] = {[N, L]}, got {list(logp_ref.shape)}")
    if importance_level == "sequence" and advantages.dim() == 2:
        raise ValueError("importance_level='sequence' needs one advantage per completion, advantages [N]")
    acc = _acc(logp, logp_old, advantages, *(() if logp_ref is None else (logp_ref,)))
    w = token_weights(keep, aggregation, max_len=max_len, num_tokens=num_tokens, dtype=acc)  # raises if empty
    tok_adv = advantages[:, None].expand(N, L) if advantages.dim() == 1 else advantages
    for name, x in (("logp", logp), ("logp_old", logp_old), ("advantages", tok_adv), ("logp_ref", logp_ref)):
        if x is not None and not bool(torch.isfinite(x.detach()[keep]).all()):
            raise ValueError(f"{name} has NaN or infinite values on real (mask = 1) tokens")

    zero = torch.zeros((), dtype=acc, device=logp.device)
    lp = torch.where(keep, logp.to(acc), zero)             # padding never reaches exp() or the gradient
    lp_old = torch.where(keep, logp_old.detach().to(acc), zero)
    adv = torch.where(keep, tok_adv.detach().to(acc), zero)
    if importance_level == "token":
        objective = clipped_objective(lp, lp_old, adv, clip_eps=clip_eps, clip_eps_high=clip_eps_high)
        log_ratio = (lp - lp_old).detach()
    else:
        log_s = sequence_log_ratio(lp, lp_old, keep)       # [N]
        adv_seq = advantages.detach().to(acc)
        objective = clipped_objective(log_s, torch.zeros_like(log_s), adv_seq, clip_eps=clip_eps,
                                      clip_eps_high=clip_eps_high)[:, None].expand(N, L)
        log_ratio = log_s.detach()[:, None].expand(N, L)
    objective = torch.where(keep, objective, zero)
    policy_loss = -(w * objective).sum()
    if logp_ref is not None:
        k3 = per_token_kl(lp, torch.where(keep, logp_ref.detach().to(acc), zero), keep, "k3")
        kl_loss = (w * k3).sum()
    else:
        k3, kl_loss = None, torch.zeros((), dtype=acc, device=logp.device)
    loss = policy_loss + beta * kl_loss if beta > 0 else policy_loss

    with torch.no_grad():
        eps_low = float(clip_eps)
        eps_high = eps_low if clip_eps_high is None else float(clip_eps_high)
        ratio = log_ratio.exp()
        a = adv if importance_level == "token" else advantages.detach().to(acc)[:, None].expand(N, L)
        clipped = ((a > 0) & (ratio > 1 + eps_high)) | ((a < 0) & (ratio < 1 - eps_low))
        n_tok = keep.sum().to(acc)
        stats = GRPOLossStats(
            policy_loss=float(policy_loss),
            kl_loss=float(kl_loss),
            kl_mean=float(k3.sum() / n_tok) if k3 is not None else 0.0,
            clip_fraction=float((clipped & keep).sum() / n_tok),
            ratio_mean=float(torch.where(keep, ratio, zero).sum() / n_tok),
        )
    return loss, stats


# ----------------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GRPOConfig:
    """Settings of :func:`train_grpo`; the defaults are the chapter's GRPO run.

    Attributes:
        steps: number of sampled batches (each followed by ``epochs * minibatches`` optimiser steps).
        prompts_per_step: ``B``, prompts per batch.
        group_size: ``G``, completions per prompt.
        epochs: passes over each batch (``mu`` in DeepSeekMath, ``num_iterations`` in TRL).
        minibatches: optimiser steps per pass; ``B * G`` must be divisible by it.
        lr: AdamW learning rate.
        max_grad_norm: gradient-norm clip (None: off).
        aggregation: one of :data:`AGGREGATIONS` (``"dapo"`` counts the tokens of the minibatch, which is one
            optimiser step here, so it coincides with ``"bnpo"``).
        importance_level: one of :data:`IMPORTANCE_LEVELS`.
        clip_eps, clip_eps_high: clip range.
        beta: KL coefficient (the reference is frozen at the start of training).
        scale, leave_one_out, eps, ddof: see :func:`group_advantages`.
        extra_tokens: tokens allowed beyond the task's answer budget, so that completions can ramble before
            ``<eos>`` (and lengths can drift); Dr. GRPO's ``L_max`` is the resulting budget.
        temperature: sampling temperature.
        eval_every: steps between held-out accuracy measurements (also measured before the first step).
        eval_n: held-out prompts per measurement (the same prompts for greedy and sampled accuracy).
        seed: seeds prompts, sampling and minibatch order (not the model's initialisation).
    """

    steps: int = 240
    prompts_per_step: int = 8
    group_size: int = 8
    epochs: int = 2
    minibatches: int = 2
    lr: float = 3e-4
    max_grad_norm: float | None = 1.0
    aggregation: str = "grpo"
    importance_level: str = "token"
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    beta: float = 0.04
    scale: str = "group"
    leave_one_out: bool = False
    eps: float = 1e-4
    ddof: int = 1
    extra_tokens: int = 4
    temperature: float = 1.0
    eval_every: int = 20
    eval_n: int = 128
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "group_size", "epochs", "minibatches", "eval_every", "eval_n"):
            _check_positive_int(getattr(self, name), name)
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {self.group_size}")
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            raise ValueError(f"minibatches={self.minibatches} must divide prompts_per_step * group_size = "
                             f"{self.prompts_per_step * self.group_size}")
        if not (isinstance(self.lr, Real) and 0 < self.lr < math.inf):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        _check_choice(self.aggregation, "aggregation", AGGREGATIONS)
        _check_choice(self.importance_level, "importance_level", IMPORTANCE_LEVELS)
        _check_choice(self.scale, "scale", SCALINGS)
        _check_nonneg(self.clip_eps, "clip_eps")
        if self.clip_eps_high is not None:
            _check_nonneg(self.clip_eps_high, "clip_eps_high")
        _check_nonneg(self.beta, "beta")
        _check_nonneg(self.eps, "eps")
        if isinstance(self.extra_tokens, bool) or not isinstance(self.extra_tokens, int) or self.extra_tokens < 0:
            raise ValueError(f"extra_tokens must be an int >= 0, got {self.extra_tokens!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")


@dataclass
class GRPOHistory:
    """What :func:`train_grpo` measured.

    Per step (one entry per sampled batch, measured on that batch before the update): ``reward`` (mean
    verifier reward), ``length`` (mean completion length in tokens, ``<eos>`` included), ``length_correct`` /
    ``length_wrong`` (the same over rewarded / unrewarded completions; NaN if there were none), ``kl`` (mean over
    completions of the summed per-token :math:`k_3`: an unbiased estimate of the sequence-level
    :math:`\\mathrm{KL}(\\pi_\\theta \\,\\|\\, \\pi_\\mathrm{ref})`), ``solved_groups`` (share of groups with
    mixed rewards, the only ones that carry a gradient), ``clip_fraction`` (mean over the step's updates).

    Per evaluation: ``eval_steps`` (number of steps done), ``accuracy`` (greedy decoding) and ``sampled_accuracy``
    (one sample per prompt at temperature 1, the policy GRPO optimises), both on the same held-out prompts and with
    the training budget of tokens.

    ``seconds``: CPU time of the whole run (``time.process_time``), evaluations included.
    """

    reward: list[float] = field(default_factory=list)
    length: list[float] = field(default_factory=list)
    length_correct: list[float] = field(default_factory=list)
    length_wrong: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    solved_groups: list[float] = field(default_factory=list)
    clip_fraction: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    sampled_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def _accuracy(model: nn.Module, task, prompts: Tensor, budget: int, generator: torch.Generator | None) -> float:
    """Mean verifier reward: greedy decoding when ``generator`` is None, else sampling at temperature 1."""
    tok = task.tokenizer
    out = sample(model, prompts, budget, eos_id=tok.eos_id, pad_id=tok.pad_id,
                 temperature=0.0 if generator is None else 1.0, generator=generator)
    return task.reward(prompts, out.tokens, out.mask).mean().item()


def train_grpo(model: nn.Module, task, config: GRPOConfig = GRPOConfig(), *, reference: nn.Module | None = None,
               eval_prompts: Tensor | None = None) -> GRPOHistory:
    """Train ``model`` in place with GRPO (or a variant, as ``config`` says) on a verifiable task.

    Each step: draw ``B`` training prompts; sample ``G`` completions of each from the current policy (which
    is :math:`\\pi_{\\theta_\\mathrm{old}}` for this batch) with up to ``task.max_new_tokens +
    config.extra_tokens`` tokens; score them with ``task.reward``; turn the ``[B, G]`` rewards into advantages
    (:func:`group_advantages`); record the sampling policy's and the reference's token log-probabilities; then
    run ``epochs`` passes over the batch in ``minibatches`` shuffled minibatches, one AdamW step on
    :func:`grpo_loss` each. The first update of a batch has ratio 1 everywhere; the later ones are off-policy
    and the clip acts.

    Args:
        model: the policy (a :class:`~rl4llm.lm.TinyLM` or any ids -> logits module), trained in place.
        task: a :class:`~rl4llm.tasks.Task` (prompts, verifier).
        config: a :class:`GRPOConfig`.
        reference: the frozen reference policy; None: a frozen copy of ``model`` as it is now.
        eval_prompts: ``[n, P]`` held-out prompt ids for the accuracy curve; None: ``config.eval_n`` prompts of
            the task's test split drawn with seed ``config.seed + 1``.

    Returns:
        a :class:`GRPOHistory`.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, GRPOConfig):
        raise ValueError(f"config must be a GRPOConfig, got {type(config).__name__}")
    cfg = config
    device = _device_of(model)
    reference = frozen_copy(model) if reference is None else reference
    tok = task.tokenizer
    if eval_prompts is None:
        eval_gen = torch.Generator().manual_seed(cfg.seed + 1)
        eval_prompts = task.encode_prompts(task.sample_prompts(cfg.eval_n, generator=eval_gen, split="test"),
                                           device=device)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    B, G = cfg.prompts_per_step, cfg.group_size
    budget = task.max_new_tokens + cfg.extra_tokens
    history = GRPOHistory()
    start = time.process_time()
    model.train()
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            history.eval_steps.append(step)
            history.accuracy.append(_accuracy(model, task, eval_prompts, budget, None))
            history.sampled_accuracy.append(
                _accuracy(model, task, eval_prompts, budget, torch.Generator().manual_seed(cfg.seed + 2)))
        if step == cfg.steps:
            break
        prompts = task.encode_prompts(task.sample_prompts(B, generator=gen), device=device)
        x = prompts.repeat_interleave(G, dim=0)  # [B*G, P], group members adjacent
        out = sample(model, x, budget, eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=cfg.temperature,
                     generator=gen)
        y, mask = out.tokens, out.mask
        rewards = task.reward(x, y, mask)  # [B*G]
        adv = group_advantages(rewards.view(B, G), scale=cfg.scale, leave_one_out=cfg.leave_one_out,
                               eps=cfg.eps, ddof=cfg.ddof).reshape(-1)
        with torch.no_grad():
            logp_old = token_logprobs(model, x, y, mask)
            logp_ref = token_logprobs(reference, x, y, mask)
        lengths = mask.sum(1)
        right = rewards > 0.5
        history.reward.append(rewards.mean().item())
        history.length.append(lengths.mean().item())
        history.length_correct.append(lengths[right].mean().item() if bool(right.any()) else math.nan)
        history.length_wrong.append(lengths[~right].mean().item() if bool((~right).any()) else math.nan)
        history.kl.append(per_token_kl(logp_old, logp_ref, mask, "k3").sum(1).mean().item())
        r = rewards.view(B, G)
        history.solved_groups.append((r.amax(1) > r.amin(1)).float().mean().item())
        clip_fracs = []
        size = B * G // cfg.minibatches
        for _ in range(cfg.epochs):
            order = torch.randperm(B * G, generator=gen).to(device)
            for k in range(cfg.minibatches):
                idx = order[k * size:(k + 1) * size]
                logp = token_logprobs(model, x[idx], y[idx], mask[idx])
                loss, stats = grpo_loss(logp, logp_old[idx], adv[idx], mask[idx], aggregation=cfg.aggregation,
                                        clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
                                        importance_level=cfg.importance_level, beta=cfg.beta,
                                        logp_ref=logp_ref[idx], max_len=budget)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                opt.step()
                clip_fracs.append(stats.clip_fraction)
        history.clip_fraction.append(sum(clip_fracs) / len(clip_fracs))
    history.seconds = time.process_time() - start
    return history
