r"""Direct preference optimisation: the loss, the implicit reward, and the optimum it targets.

The KL-regularised objective of RLHF, for one prompt :math:`x`,

.. math:: J(\pi) = \mathbb E_{y \sim \pi}[r(x, y)] - \beta\, \mathrm{KL}(\pi \,\|\, \pi_\mathrm{ref}),

is maximised by :math:`\pi^*(y \mid x) = \pi_\mathrm{ref}(y \mid x)\, e^{r(x, y)/\beta} / Z(x)`. Solved for the
reward, :math:`r = \beta \log(\pi^*/\pi_\mathrm{ref}) + \beta \log Z(x)`, and in a Bradley-Terry likelihood the
:math:`Z(x)` cancels, which leaves a loss on the policy alone (Rafailov et al., 2023):

.. math:: \mathcal L_\mathrm{DPO} = -\mathbb E\Big[\log \sigma\Big(\beta \log
   \frac{\pi_\theta(y_w \mid x)}{\pi_\mathrm{ref}(y_w \mid x)} - \beta \log
   \frac{\pi_\theta(y_l \mid x)}{\pi_\mathrm{ref}(y_l \mid x)}\Big)\Big].

What is here:

- :func:`dpo_loss` -- the loss on sequence log-probabilities of chosen and rejected responses, with
  ``logsigmoid`` (finite for any margin), float32 accumulation of low-precision inputs, an optional pair mask,
  and the implicit rewards and preference accuracy as statistics (:class:`DPOStats`).
- :func:`implicit_rewards` -- :math:`\hat r_\theta(x, y) = \beta \log \pi_\theta(y \mid x) / \pi_\mathrm{ref}(y
  \mid x)`: the reward DPO's policy defines, up to the prompt-dependent constant :math:`\beta \log Z(x)`.
- :func:`masked_sequence_logps` -- :math:`\log \pi(y \mid x) = \sum_t m_t \log \pi(y_t \mid x, y_{<t})` from
  per-token log-probabilities, summed in float32.
- For an enumerable response set (a categorical over the last dimension): :func:`optimal_policy` (the closed
  form :math:`\log \pi^*`, via ``logsumexp``), :func:`log_partition` (:math:`\log Z`),
  :func:`categorical_kl` and :func:`kl_regularised_objective` (:math:`J(\pi)` exactly), which the book uses to
  check that DPO and KL-regularised RL land on the same policy.
- :func:`train_dpo` -- a short training loop for a :class:`~rl4llm.lm.TinyLM` on
  :class:`~rl4llm.tasks.PreferencePairs`, with the reference log-probabilities computed once.

Conventions: the pure functions take tensors of any shape (``[B]`` for a batch of pairs; ``[..., V]`` for a
categorical over ``V`` responses, normalised along ``dim``); bfloat16/float16 inputs are upcast, and all
arithmetic is float32 (float64 if any input is float64). Bad input raises :class:`ValueError` naming the
argument.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rl4llm.kl import categorical_kl
from rl4llm.lm import sequence_logprobs

__all__ = [
    "DPOStats",
    "dpo_loss",
    "implicit_rewards",
    "masked_sequence_logps",
    "optimal_policy",
    "log_partition",
    "categorical_kl",
    "kl_regularised_objective",
    "DPOHistory",
    "train_dpo",
]


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------
def _acc(*xs: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (the accumulation dtype of 16-bit inputs too)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _check_tensor(x, name: str, *, allow_neg_inf: bool = False) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point tensor, got {got}")
    if x.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    if bool(torch.isnan(x).any()):
        raise ValueError(f"{name} contains NaN")
    bad = torch.isposinf(x) if allow_neg_inf else ~torch.isfinite(x)
    if bool(bad.any()):
        what = "+inf" if allow_neg_inf else "infinite values"
        raise ValueError(f"{name} contains {what}; log-probabilities and rewards must be finite"
                         + (" (or -inf for a zero probability)" if allow_neg_inf else ""))
    return x


def _check_like(x: Tensor, like: Tensor, name: str, like_name: str) -> None:
    if x.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name}, {tuple(like.shape)}, got {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but {like_name} is on {like.device}")


def _check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, Real) or not 0.0 < float(beta) < math.inf:
        raise ValueError(f"beta must be a finite real number > 0, got {beta!r}")
    return float(beta)


def _check_mask(mask, like: Tensor, like_name: str) -> Tensor | None:
    """None, or ``mask`` as a bool tensor of ``like``'s shape; ValueError if not 0/1 or all zero."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a 0/1 tensor of shape {tuple(like.shape)}, got {type(mask).__name__}")
    _check_like(mask, like, "mask", like_name)
    if mask.dtype != torch.bool:
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0 and 1 (or be a bool tensor)")
        mask = mask != 0
    if not bool(mask.any()):
        raise ValueError("mask is all zeros: there is no pair to average over")
    return mask


def _check_dim(dim, x: Tensor) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}) for a tensor of shape "
                         f"{tuple(x.shape)}, got {dim!r}")
    return dim


# ----------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DPOStats:
    """Diagnostics of one :func:`dpo_loss` evaluation (detached tensors).

    Attributes:
        chosen_rewards: ``[...]`` implicit rewards :math:`\\beta \\log \\pi_\\theta(y_w)/\\pi_\\mathrm{ref}(y_w)`.
        rejected_rewards: ``[...]`` the same for the rejected responses.
        margins: ``[...]`` ``chosen_rewards - rejected_rewards``, the argument of the sigmoid.
        accuracy: 0-d tensor, share of (masked) pairs whose chosen response has the larger implicit reward;
            a tie counts one half, so a policy equal to its reference scores exactly 0.5.
    """

    chosen_rewards: Tensor
    rejected_rewards: Tensor
    margins: Tensor
    accuracy: Tensor


def implicit_rewards(policy_logps: Tensor, ref_logps: Tensor, *, beta: float) -> Tensor:
    r""":math:`\hat r_\theta(x, y) = \beta\, (\log \pi_\theta(y \mid x) - \log \pi_\mathrm{ref}(y \mid x))`.

    The reward that a policy defines through DPO's reparameterisation. It equals the reward the policy is
    optimal for up to a function of the prompt alone (:math:`\beta \log Z(x)`), so it compares responses to the
    same prompt; it is a per-response log-ratio, not a KL (its mean under :math:`\pi_\theta` is
    :math:`\beta\,\mathrm{KL}(\pi_\theta \,\|\, \pi_\mathrm{ref})`, and single values can be negative).

    Args:
        policy_logps: ``[...]`` sequence log-probabilities under the policy (with or without grad).
        ref_logps: ``[...]`` the same responses under the reference (treated as constants).
        beta: the KL coefficient, > 0.

    Returns:
        ``[...]`` float32 rewards (float64 for float64 inputs), differentiable in ``policy_logps``.

    Raises:
        ValueError: non-floating, empty, NaN or infinite inputs, shapes or devices that differ, ``beta <= 0``.
    """
    _check_tensor(policy_logps, "policy_logps")
    _check_tensor(ref_logps, "ref_logps")
    _check_like(ref_logps, policy_logps, "ref_logps", "policy_logps")
    b = _check_beta(beta)
    acc = _acc(policy_logps, ref_logps)
    return b * (policy_logps.to(acc) - ref_logps.detach().to(acc))


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float, mask: Tensor | None = None,
             reduction: str = "mean") -> tuple[Tensor, DPOStats]:
    r"""The DPO loss :math:`-\log \sigma(\hat r_\theta(x, y_w) - \hat r_\theta(x, y_l))`, averaged over pairs.

    Computed as ``-logsigmoid(margin)``, which is exact for any margin: for a margin of :math:`-10^4` it is
    :math:`10^4` (``-log(sigmoid(.))`` would be ``inf``), for :math:`+10^4` it is :math:`e^{-10^4}` (0 in
    float32), and its gradient :math:`-\sigma(-\mathrm{margin})` is finite everywhere. bfloat16/float16
    log-probabilities are upcast before the differences are taken.

    Gradient (with respect to the policy's parameters; the reference is a constant):
    :math:`\nabla \mathcal L = -\beta\, \mathbb E[\sigma(\hat r_l - \hat r_w)\,(\nabla \log \pi_\theta(y_w) -
    \nabla \log \pi_\theta(y_l))]`: each pair is weighted by how wrongly the implicit reward orders it.

    Args:
        policy_chosen_logps: ``[...]`` (usually ``[B]``) sequence log-probabilities :math:`\log \pi_\theta(y_w
            \mid x)` of the chosen responses, with grad.
        policy_rejected_logps: ``[...]`` the same for the rejected responses.
        ref_chosen_logps: ``[...]`` :math:`\log \pi_\mathrm{ref}(y_w \mid x)` (treated as constants).
        ref_rejected_logps: ``[...]`` :math:`\log \pi_\mathrm{ref}(y_l \mid x)` (treated as constants).
        beta: the KL coefficient :math:`\beta > 0` of the objective DPO solves.
        mask: optional ``[...]`` 0/1 tensor; pairs where it is 0 (padding) contribute nothing. Not all zero.
        reduction: ``"mean"`` over the (masked) pairs, ``"sum"``, or ``"none"`` for the per-pair losses (0 where
            masked), e.g. to weight pairs by their probability in an exact expected loss.

    Returns:
        ``(loss, stats)``: the loss (a scalar, or ``[...]`` for ``reduction="none"``), float32 or float64 for
        float64 inputs, and a :class:`DPOStats`.

    Raises:
        ValueError: an input that is not a non-empty floating-point tensor, NaN or infinite log-probabilities,
            shapes or devices that differ, ``beta <= 0``, a mask that is not 0/1 or is all zero, an unknown
            ``reduction``.
    """
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    xs = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    for name, x in zip(names, xs, strict=True):
        _check_tensor(x, name)
    for name, x in zip(names[1:], xs[1:], strict=True):
        _check_like(x, policy_chosen_logps, name, names[0])
    b = _check_beta(beta)
    mask = _check_mask(mask, policy_chosen_logps, names[0])
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    acc = _acc(*xs)
    chosen = b * (policy_chosen_logps.to(acc) - ref_chosen_logps.detach().to(acc))
    rejected = b * (policy_rejected_logps.to(acc) - ref_rejected_logps.detach().to(acc))
    margins = chosen - rejected
    losses = 0.0 - F.logsigmoid(margins)  # 0.0 - x, not -x: a loss of exactly +0, never -0
    zero = torch.zeros((), dtype=acc, device=losses.device)
    if mask is not None:
        losses = torch.where(mask, losses, zero)
    n = losses.numel() if mask is None else mask.sum()
    loss = losses if reduction == "none" else losses.sum() if reduction == "sum" else losses.sum() / n
    with torch.no_grad():
        m = margins.detach()
        hit = (m > 0).to(acc) + 0.5 * (m == 0).to(acc)
        if mask is not None:
            hit = torch.where(mask, hit, zero)
        stats = DPOStats(chosen_rewards=chosen.detach(), rejected_rewards=rejected.detach(), margins=m,
                         accuracy=hit.sum() / n)
    return loss, stats


def masked_sequence_logps(token_logps: Tensor, mask: Tensor) -> Tensor:
    r""":math:`\log \pi(y \mid x) = \sum_t m_t \log \pi(y_t \mid x, y_{<t})`, summed in float32.

    Args:
        token_logps: ``[..., T]`` per-token log-probabilities (bfloat16/float16 are upcast before summing).
        mask: ``[..., T]`` 0/1 tensor, 1 on the response's tokens; no row may be all zero (an empty response).

    Returns:
        ``[...]`` float32 (float64 for float64 input) sequence log-probabilities.

    Raises:
        ValueError: non-floating or NaN ``token_logps``, a ``mask`` of another shape or not 0/1, or a row of
            ``mask`` with no token.
    """
    if not isinstance(token_logps, Tensor) or not token_logps.is_floating_point() or token_logps.dim() < 1:
        got = f"dtype {token_logps.dtype}, shape {tuple(token_logps.shape)}" if isinstance(token_logps, Tensor) \
            else type(token_logps).__name__
        raise ValueError(f"token_logps must be a floating-point [..., T] tensor, got {got}")
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a 0/1 tensor of shape {tuple(token_logps.shape)}, got {type(mask).__name__}")
    _check_like(mask, token_logps, "mask", "token_logps")
    if mask.dtype != torch.bool:
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0 and 1 (or be a bool tensor)")
        mask = mask != 0
    if not bool(mask.any(dim=-1).all()):
        raise ValueError("mask [..., T] has a row of all zeros: every response needs at least one token")
    acc = _acc(token_logps)
    x = token_logps.to(acc)
    if bool(torch.isnan(x[mask]).any()):
        raise ValueError("token_logps contains NaN on a masked-in token")
    return torch.where(mask, x, torch.zeros((), dtype=acc, device=x.device)).sum(dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Enumerable response sets: the closed form and the exact objective
# ----------------------------------------------------------------------------------------------------------
def _tilted(ref_logprobs: Tensor, rewards: Tensor, beta: float, dim: int) -> Tensor:
    """``log pi_ref + r / beta`` in the accumulation dtype, after the checks shared by the closed-form functions."""
    _check_tensor(ref_logprobs, "ref_logprobs", allow_neg_inf=True)
    _check_tensor(rewards, "rewards")
    _check_like(rewards, ref_logprobs, "rewards", "ref_logprobs")
    b = _check_beta(beta)
    _check_dim(dim, ref_logprobs)
    if bool(torch.isneginf(ref_logprobs).all(dim=dim).any()):
        raise ValueError(f"ref_logprobs is -inf everywhere along dim={dim} for some entry: the reference must "
                         "give some response a positive probability")
    acc = _acc(ref_logprobs, rewards)
    return ref_logprobs.to(acc) + rewards.to(acc) / b


def optimal_policy(ref_logprobs: Tensor, rewards: Tensor, *, beta: float, dim: int = -1) -> Tensor:
    r"""Log-probabilities of :math:`\pi^* = \pi_\mathrm{ref}\, e^{r/\beta} / Z`, the maximiser of
    :math:`\mathbb E_\pi[r] - \beta\, \mathrm{KL}(\pi \,\|\, \pi_\mathrm{ref})`, for an enumerable response set.

    Computed as ``t - logsumexp(t)`` with ``t = log pi_ref + r / beta``, so it is exact for any ``beta`` and
    reward scale (no ``exp`` overflows). Responses with zero reference probability (``-inf``) keep probability
    zero. The result is normalised whether or not ``ref_logprobs`` is.

    Args:
        ref_logprobs: ``[..., V, ...]`` reference log-probabilities of the ``V`` responses along ``dim``
            (``-inf`` allowed for impossible responses, but not for all of them).
        rewards: rewards :math:`r(x, y)` of the same shape (finite).
        beta: the KL coefficient, > 0.
        dim: the dimension that enumerates the responses.

    Returns:
        ``log pi*`` of the input's shape, float32 (float64 for float64 inputs); differentiable.

    Raises:
        ValueError: non-floating, empty, NaN inputs, ``+inf`` log-probabilities, non-finite rewards, shapes that
            differ, ``beta <= 0``, a bad ``dim``, or a reference that is ``-inf`` along all of ``dim``.
    """
    t = _tilted(ref_logprobs, rewards, beta, dim)
    return t - torch.logsumexp(t, dim=dim, keepdim=True)


def log_partition(ref_logprobs: Tensor, rewards: Tensor, *, beta: float, dim: int = -1) -> Tensor:
    r""":math:`\log Z = \log \sum_y \pi_\mathrm{ref}(y)\, e^{r(y)/\beta}`, by ``logsumexp``.

    :math:`\beta \log Z` is the optimal value of :math:`\mathbb E_\pi[r] - \beta\,\mathrm{KL}(\pi \,\|\,
    \pi_\mathrm{ref})` when ``ref_logprobs`` is normalised along ``dim``, and the constant by which the implicit
    reward of :math:`\pi^*` differs from :math:`r`.

    Args: as for :func:`optimal_policy`.

    Returns:
        ``log Z`` with ``dim`` removed, float32 (float64 for float64 inputs).
    """
    return torch.logsumexp(_tilted(ref_logprobs, rewards, beta, dim), dim=dim)


def kl_regularised_objective(logprobs: Tensor, ref_logprobs: Tensor, rewards: Tensor, *, beta: float,
                             dim: int = -1) -> Tensor:
    r"""Exact :math:`J(\pi) = \sum_y \pi(y)\, r(y) - \beta\, \mathrm{KL}(\pi \,\|\, \pi_\mathrm{ref})` of a
    categorical policy over an enumerable response set.

    Maximising it over ``logprobs`` (e.g. over the logits of a softmax) is "KL-regularised RL" solved exactly;
    its maximiser is :func:`optimal_policy` and its maximum ``beta * log_partition``.

    Args:
        logprobs: ``[..., V, ...]`` normalised log-probabilities of the policy along ``dim`` (with grad).
        ref_logprobs: the reference's, same shape.
        rewards: the rewards, same shape (finite).
        beta: the KL coefficient, > 0.
        dim: the dimension that enumerates the responses.

    Returns:
        :math:`J` with ``dim`` removed, float32 (float64 for float64 inputs); ``-inf`` if the policy puts mass
        where the reference has none.

    Raises:
        ValueError: as for :func:`categorical_kl`, plus non-finite ``rewards`` or ``beta <= 0``.
    """
    _check_tensor(logprobs, "logprobs", allow_neg_inf=True)
    _check_tensor(ref_logprobs, "ref_logprobs", allow_neg_inf=True)
    _check_tensor(rewards, "rewards")
    _check_like(ref_logprobs, logprobs, "ref_logprobs", "logprobs")
    _check_like(rewards, logprobs, "rewards", "logprobs")
    b = _check_beta(beta)
    _check_dim(dim, logprobs)
    acc = _acc(logprobs, ref_logprobs, rewards)
    lp = logprobs.to(acc)
    return (lp.exp() * rewards.to(acc)).sum(dim=dim) - b * categorical_kl(lp, ref_logprobs.to(acc), dim=dim)


# ----------------------------------------------------------------------------------------------------------
# Training a language model on preference pairs
# ----------------------------------------------------------------------------------------------------------
@dataclass
class DPOHistory:
    """What :func:`train_dpo` did, one entry per optimiser step (measured on that step's minibatch).

    Attributes:
        loss: the DPO loss.
        accuracy: the share of pairs ordered correctly by the implicit reward (ties count one half).
        chosen_reward: mean implicit reward of the chosen responses.
        rejected_reward: mean implicit reward of the rejected responses.
        evals: ``(step, eval_fn(policy))`` for each evaluation asked for (step 0 is before training).
        seconds: wall-clock time of the whole run, evaluations included.
    """

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    chosen_reward: list[float] = field(default_factory=list)
    rejected_reward: list[float] = field(default_factory=list)
    evals: list[tuple[int, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        """Number of optimiser steps taken."""
        return len(self.loss)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _pair_logps(model: nn.Module, prompts: Tensor, chosen: Tensor, chosen_mask: Tensor, rejected: Tensor,
                rejected_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Sequence log-probs ``[B]`` of the chosen and the rejected responses, in one forward pass when possible."""
    if chosen.shape == rejected.shape:
        lp = sequence_logprobs(model, prompts.repeat(2, 1), torch.cat([chosen, rejected]),
                               torch.cat([chosen_mask, rejected_mask]))
        return lp[: len(prompts)], lp[len(prompts):]
    return (sequence_logprobs(model, prompts, chosen, chosen_mask),
            sequence_logprobs(model, prompts, rejected, rejected_mask))


def train_dpo(policy: nn.Module, reference: nn.Module, pairs, *, beta: float, steps: int, batch_size: int = 64,
              lr: float = 1e-3, max_grad_norm: float | None = 1.0, seed: int = 0,
              eval_fn: Callable[[nn.Module], Any] | None = None, eval_every: int | None = None,
              device: torch.device | str | None = None) -> DPOHistory:
    r"""Train ``policy`` in place with the DPO loss on labelled response pairs.

    The reference log-probabilities of every pair are computed once, before training (the reference does not
    change). Each step takes the next ``batch_size`` pairs of a random permutation of the data (a new
    permutation each epoch, from a generator seeded by ``seed``), computes the sequence log-probabilities of the
    chosen and rejected responses with :func:`rl4llm.lm.sequence_logprobs` (masks included), and takes an
    AdamW step (no weight decay) on :func:`dpo_loss`, after clipping the gradient norm if asked.

    Args:
        policy: the model to train (usually a copy of the reference); left in train mode.
        reference: the reference model :math:`\pi_\mathrm{ref}`; only read.
        pairs: a :class:`~rl4llm.tasks.PreferencePairs` (or anything with ``prompts [N, P]``, ``chosen
            [N, L]``, ``chosen_mask [N, L]``, ``rejected [N, L']``, ``rejected_mask [N, L']``).
        beta: the KL coefficient, > 0.
        steps: number of optimiser steps.
        batch_size: pairs per step (at most the number of pairs).
        lr: AdamW learning rate.
        max_grad_norm: clip the global gradient norm to this value (None: no clipping).
        seed: seeds the order in which pairs are visited.
        eval_fn: optional ``policy -> anything``, called (in eval mode, without grad) before the first step and
            every ``eval_every`` steps; the results go into :attr:`DPOHistory.evals`.
        eval_every: steps between evaluations (default: only before and after training).
        device: where to train; the policy and the reference must already be there. None: the policy's device.

    Returns:
        a :class:`DPOHistory`.

    Raises:
        ValueError: bad ``beta``, ``steps``, ``batch_size``, ``lr``, ``max_grad_norm`` or ``eval_every``, or pairs
            whose tensors do not have matching leading dimensions.
    """
    b = _check_beta(beta)
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if eval_every is not None and (not isinstance(eval_every, int) or isinstance(eval_every, bool) or eval_every < 1):
        raise ValueError(f"eval_every must be a positive int or None, got {eval_every!r}")
    if not (isinstance(lr, Real) and 0 < lr < math.inf):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, Real) and 0 < max_grad_norm < math.inf):
        raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
    try:
        data = [pairs.prompts, pairs.chosen, pairs.chosen_mask, pairs.rejected, pairs.rejected_mask]
    except AttributeError as exc:
        raise ValueError(f"pairs must have prompts, chosen, chosen_mask, rejected, rejected_mask; {exc}") from None
    n = data[0].shape[0] if isinstance(data[0], Tensor) and data[0].dim() == 2 else None
    names = ("prompts", "chosen", "chosen_mask", "rejected", "rejected_mask")
    for name, x in zip(names, data, strict=True):
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] != n:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"pairs.{name} must be a 2-D tensor with N = {n} rows (as pairs.prompts), got {got}")
    if batch_size > n:
        raise ValueError(f"batch_size must be at most the number of pairs, {n}, got {batch_size}")
    device = torch.device(device) if device is not None else _model_device(policy)
    data = [x.to(device) for x in data]

    history = DPOHistory()
    start = time.perf_counter()
    with torch.no_grad():  # the reference is fixed: score every pair once
        ref_c, ref_r = [], []
        for s in range(0, n, 1024):
            c, r = _pair_logps(reference, *(x[s:s + 1024] for x in data))
            ref_c.append(c)
            ref_r.append(r)
        ref_chosen, ref_rejected = torch.cat(ref_c), torch.cat(ref_r)

    def evaluate(step: int) -> None:
        if eval_fn is None:
            return
        was_training = policy.training
        policy.eval()
        with torch.no_grad():
            history.evals.append((step, eval_fn(policy)))
        policy.train(was_training)

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    policy.train()
    evaluate(0)
    order, pos = torch.randperm(n, generator=gen), 0
    for step in range(1, steps + 1):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch_size].to(device)
        pos += batch_size
        pol_c, pol_r = _pair_logps(policy, *(x[idx] for x in data))
        loss, stats = dpo_loss(pol_c, pol_r, ref_chosen[idx], ref_rejected[idx], beta=b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
        opt.step()
        history.loss.append(loss.item())
        history.accuracy.append(stats.accuracy.item())
        history.chosen_reward.append(stats.chosen_rewards.mean().item())
        history.rejected_reward.append(stats.rejected_rewards.mean().item())
        if eval_every is not None and step % eval_every == 0 and step != steps:
            evaluate(step)
    evaluate(steps)
    history.seconds = time.perf_counter() - start
    return history
