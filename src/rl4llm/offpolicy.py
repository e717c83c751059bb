r"""Learning and evaluating from another policy's samples: importance weights, their truncations, Retrace and V-trace.

The data come from a behaviour policy :math:`\mu` (an older checkpoint, an inference engine with other numerics);
the quantities wanted belong to a target policy :math:`\pi`. Everything here is a pure function of tensors,
derived in the appendix on off-policy causality (``notebooks/appA_off_policy``), read in order:

- :func:`importance_ratios`, :func:`truncated_ratios`, :func:`cumulative_ratios` -- per-step ratios
  :math:`\rho_t = \pi(a_t \mid s_t) / \mu(a_t \mid s_t)`, their truncation :math:`\min(\rho_t, \bar c)` and the
  running products :math:`W_{0:t} = \prod_{k \le t} \rho_k` (§A.1).
- :func:`full_is_weights`, :func:`per_decision_weights` -- the coefficient of each score
  :math:`\nabla \log \pi(a_t \mid s_t)` in the unbiased off-policy policy gradients: the whole trajectory's weight
  times its return, and the per-decision form :math:`\sum_{t' \ge t} \gamma^{t'} r_{t'} W_{0:t'}` (§A.2).
- :func:`ordinary_is`, :func:`weighted_is`, :func:`per_decision_is` -- off-policy evaluation of
  :math:`J(\pi)` from episodes of :math:`\mu` (§A.5). Truncated importance sampling is any of them fed
  :func:`truncated_ratios`.
- :func:`vtrace_targets`, :func:`retrace_targets`, :func:`vtrace_fixed_point_policy` -- the value targets of
  IMPALA's V-trace and of Retrace(λ), and the policy whose value V-trace actually estimates (§A.4).

Conventions. Tensors are time-last: ``[..., T]``, with a batch of episodes as ``[..., N, T]`` for the evaluation
estimators. ``mask[..., t]`` is 1 on the steps of an episode and 0 on padding after it: a padded step has ratio 1
and reward 0, so it changes no product and no sum. ``terminated[..., t]`` (V-trace, Retrace) is True when the
episode ended at step ``t``: nothing is bootstrapped past it and the traces are cut there; the next step, if any,
starts a new episode. Ratios may be 0 (the target never takes the action) but never negative, NaN or infinite.
Low-precision inputs are accumulated in float32 and returned in float32.

The seeds' variants -- the literal formula (2.10) of the survey, and the "simplified" and "first-order" surrogates
that drop the weights of the past -- are not here: the appendix shows that the first is biased and the other two are
exact only at :math:`\pi = \mu`, and keeps them in the notebook.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

from rl4llm.returns import accumulation_dtype, as_bool, check_gamma

__all__ = [
    "cumulative_ratios",
    "full_is_weights",
    "importance_ratios",
    "ordinary_is",
    "per_decision_is",
    "per_decision_weights",
    "retrace_targets",
    "truncated_ratios",
    "vtrace_fixed_point_policy",
    "vtrace_targets",
    "weighted_is",
]


# ----------------------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------------------
def _float(x, name: str, *, min_dim: int = 1, shape: torch.Size | None = None, like: str = "") -> Tensor:
    """``x`` as a floating tensor of at least ``min_dim`` dims (and of ``shape``), in its accumulation dtype."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dim(s) (time last), got shape {list(x.shape)}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} must have shape {list(shape)}{like}, got {list(x.shape)} "
                         "(no broadcasting: a silent broadcast would mix episodes or steps)")
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    return x.to(accumulation_dtype(x.dtype))


def _finite(x: Tensor, name: str) -> Tensor:
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} must be finite, found inf")
    return x


def _ratios(ratios, name: str = "ratios", *, min_dim: int = 1, shape=None, like: str = "") -> Tensor:
    r = _finite(_float(ratios, name, min_dim=min_dim, shape=shape, like=like), name)
    if (r < 0).any():
        raise ValueError(f"{name} must be >= 0 (a ratio of probabilities), found {r.min().item():.3g}")
    return r


def _mask(mask, like: Tensor, like_name: str) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor of shape {list(like.shape)}, got {type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(f"mask must have the shape of {like_name} {list(like.shape)}, got {list(mask.shape)}")
    m = as_bool(mask.to(like.device), "mask")
    if not m.any(dim=-1).all():
        raise ValueError("mask has rows with no steps (all zero); every episode needs at least one step")
    return m


def _nonneg(value, name: str, *, allow_inf: bool = True, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v) or v < 0 or (not allow_inf and math.isinf(v)) or (upper is not None and v > upper):
        bound = f"[0, {upper}]" if upper is not None else ("[0, inf]" if allow_inf else "[0, inf)")
        raise ValueError(f"{name} must be in {bound}, got {value!r}")
    return v


def _discounts(gamma: float, T: int, like: Tensor) -> Tensor:
    return gamma ** torch.arange(T, dtype=like.dtype, device=like.device)


def _pair(ratios, rewards, mask) -> tuple[Tensor, Tensor, Tensor | None]:
    rewards = _finite(_float(rewards, "rewards"), "rewards")
    ratios = _ratios(ratios, shape=rewards.shape, like=" (that of rewards)").to(rewards.device)
    ratios, rewards = ratios.to(torch.promote_types(ratios.dtype, rewards.dtype)), rewards
    rewards = rewards.to(ratios.dtype)
    m = _mask(mask, rewards, "rewards")
    if m is not None:
        ratios = torch.where(m, ratios, torch.ones_like(ratios))
        rewards = torch.where(m, rewards, torch.zeros_like(rewards))
    return ratios, rewards, m


# ----------------------------------------------------------------------------------------------------------
# ratios
# ----------------------------------------------------------------------------------------------------------
def importance_ratios(logp_target: Tensor, logp_behavior: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""Per-step ratios :math:`\rho_t = \exp(\log\pi(a_t \mid s_t) - \log\mu(a_t \mid s_t))` (§A.1).

    Args:
        logp_target: ``[..., T]`` log-probabilities of the actions taken under the target; ``-inf`` (probability 0)
            gives ratio 0. Differentiable: the ratio carries the target's gradient.
        logp_behavior: ``[..., T]`` the same under the behaviour policy that drew them; must be finite.
        mask: optional ``[..., T]`` 0/1, 0 on padding, where the ratio is set to exactly 1.

    Returns:
        ``[..., T]`` ratios.
    """
    lp_b = _finite(_float(logp_behavior, "logp_behavior"), "logp_behavior")
    lp_t = _float(logp_target, "logp_target", shape=lp_b.shape, like=" (that of logp_behavior)")
    if (lp_t == float("inf")).any():
        raise ValueError("logp_target must be <= 0 and not +inf")
    rho = torch.exp(lp_t - lp_b.to(lp_t.device))
    m = _mask(mask, rho, "logp_target")
    return rho if m is None else torch.where(m, rho, torch.ones_like(rho))


def truncated_ratios(ratios: Tensor, clip: float) -> Tensor:
    r""":math:`\min(\rho_t, \bar c)`, the truncation of V-trace, Retrace and truncated importance sampling (§A.4).

    Args:
        ratios: ``[...]`` non-negative ratios.
        clip: the threshold :math:`\bar c \ge 0`; ``math.inf`` leaves the ratios as they are.

    Returns:
        ``[...]`` truncated ratios (gradients flow where the ratio is below the threshold).
    """
    r = _ratios(ratios, min_dim=0)
    c = _nonneg(clip, "clip")
    return r if math.isinf(c) else torch.clamp(r, max=c)


def cumulative_ratios(ratios: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""Running products :math:`W_{0:t} = \prod_{k \le t} \rho_k`, shape ``[..., T]`` (§A.1).

    ``W_{0:T-1}`` (the last column) is the importance weight of the whole episode. Padded steps (``mask`` 0) count
    as ratio 1. The product of many ratios can overflow; that is the variance problem of §A.3, not a numerical one.
    """
    r = _ratios(ratios)
    m = _mask(mask, r, "ratios")
    if m is not None:
        r = torch.where(m, r, torch.ones_like(r))
    return torch.cumprod(r, dim=-1)


# ----------------------------------------------------------------------------------------------------------
# policy-gradient weights
# ----------------------------------------------------------------------------------------------------------
def full_is_weights(ratios: Tensor, rewards: Tensor, *, gamma: float = 1.0, mask: Tensor | None = None) -> Tensor:
    r"""Coefficients of the scores in full-trajectory importance sampling (§A.2).

    The estimate is :math:`\sum_t c_t \nabla\log\pi(a_t \mid s_t)` with
    :math:`c_t = W_{0:T-1} \sum_{t'} \gamma^{t'} r_{t'}` for every step: unbiased for :math:`\nabla J(\pi)` when
    the episodes come from :math:`\mu` (and :math:`\mu > 0` wherever :math:`\pi > 0`).

    Args:
        ratios: ``[..., T]`` per-step ratios :math:`\pi/\mu` of the actions taken.
        rewards: ``[..., T]`` rewards; each row starts at the first step of an episode.
        gamma: discount in ``(0, 1]``, counted from the episode's first step.
        mask: optional ``[..., T]`` 0/1, 1 on the episode's steps.

    Returns:
        ``[..., T]`` coefficients, 0 on padded steps. Multiply by ``log pi`` of the taken actions (coefficients
        detached) and sum to get a surrogate whose gradient is the estimate.
    """
    gamma = check_gamma(gamma)
    ratios, rewards, m = _pair(ratios, rewards, mask)
    ret = (rewards * _discounts(gamma, rewards.shape[-1], rewards)).sum(-1, keepdim=True)
    c = (ratios.prod(-1, keepdim=True) * ret).expand_as(rewards)
    return c if m is None else torch.where(m, c, torch.zeros_like(c))


def per_decision_weights(ratios: Tensor, rewards: Tensor, *, gamma: float = 1.0,
                         mask: Tensor | None = None) -> Tensor:
    r"""Coefficients of the scores in the per-decision off-policy gradient (§A.2, equation (eq-per-decision)).

    :math:`c_t = \sum_{t' \ge t} \gamma^{t'} r_{t'} W_{0:t'}`: each reward keeps the weights of every step up to its
    own, and only those. Unbiased for :math:`\nabla J(\pi)`; with all ratios 1 it is the on-policy reward-to-go
    :math:`\gamma^{t} G_t`-form of chapter 5. Arguments and return as :func:`full_is_weights`.
    """
    gamma = check_gamma(gamma)
    ratios, rewards, m = _pair(ratios, rewards, mask)
    terms = rewards * _discounts(gamma, rewards.shape[-1], rewards) * torch.cumprod(ratios, -1)
    c = terms.flip(-1).cumsum(-1).flip(-1)
    return c if m is None else torch.where(m, c, torch.zeros_like(c))


# ----------------------------------------------------------------------------------------------------------
# off-policy evaluation
# ----------------------------------------------------------------------------------------------------------
def _episodes(ratios, rewards, gamma, mask) -> tuple[Tensor, Tensor, Tensor]:
    if isinstance(rewards, Tensor) and rewards.dim() < 2:
        raise ValueError(f"rewards must have shape [..., N, T] (episodes, steps), got {list(rewards.shape)}")
    gamma = check_gamma(gamma)
    ratios, rewards, _ = _pair(ratios, rewards, mask)
    disc = _discounts(gamma, rewards.shape[-1], rewards)
    return ratios, rewards * disc, torch.cumprod(ratios, -1)


def ordinary_is(ratios: Tensor, rewards: Tensor, *, gamma: float = 1.0, mask: Tensor | None = None) -> Tensor:
    r"""Ordinary importance sampling, :math:`\frac1N \sum_n W^{(n)} G^{(n)}` (§A.5; Sutton & Barto (5.5)).

    Unbiased for :math:`J(\pi) = \mathbb E_\pi[\sum_t \gamma^t r_t]`.

    Args:
        ratios: ``[..., N, T]`` per-step ratios of ``N`` episodes of the behaviour policy.
        rewards: ``[..., N, T]`` their rewards.
        gamma: discount in ``(0, 1]``.
        mask: optional ``[..., N, T]`` 0/1, 1 on each episode's steps.

    Returns:
        ``[...]`` estimates (a 0-dim tensor for ``[N, T]`` inputs).
    """
    _, disc_r, W = _episodes(ratios, rewards, gamma, mask)
    return (W[..., -1] * disc_r.sum(-1)).mean(-1)


def weighted_is(ratios: Tensor, rewards: Tensor, *, gamma: float = 1.0, mask: Tensor | None = None) -> Tensor:
    r"""Weighted importance sampling, :math:`\sum_n W^{(n)} G^{(n)} / \sum_n W^{(n)}` (§A.5; Sutton & Barto (5.6)).

    Biased for finite ``N`` (consistent as ``N`` grows), with bounded variance for bounded returns. Where every
    weight of a batch is 0 the estimate is 0, the textbook convention. Arguments and return as :func:`ordinary_is`.
    """
    _, disc_r, W = _episodes(ratios, rewards, gamma, mask)
    w = W[..., -1]
    num, den = (w * disc_r.sum(-1)).sum(-1), w.sum(-1)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def per_decision_is(ratios: Tensor, rewards: Tensor, *, gamma: float = 1.0, mask: Tensor | None = None) -> Tensor:
    r"""Per-decision importance sampling, :math:`\frac1N \sum_n \sum_t \gamma^t r^{(n)}_t W^{(n)}_{0:t}` (§A.5).

    Each reward is weighted by the ratios up to its own step only (Precup, Sutton & Singh 2000); unbiased, and equal
    to :func:`ordinary_is` when the only reward of an episode comes at its last step. Arguments and return as
    :func:`ordinary_is`.
    """
    _, disc_r, W = _episodes(ratios, rewards, gamma, mask)
    return (disc_r * W).sum(-1).mean(-1)


# ----------------------------------------------------------------------------------------------------------
# value targets: V-trace and Retrace
# ----------------------------------------------------------------------------------------------------------
def _continues(terminated, like: Tensor) -> Tensor:
    if terminated is None:
        return torch.ones_like(like)
    if not isinstance(terminated, Tensor):
        raise TypeError(f"terminated must be a torch.Tensor of shape {list(like.shape)}, "
                        f"got {type(terminated).__name__}")
    if terminated.shape != like.shape:
        raise ValueError(f"terminated must have the shape of rewards {list(like.shape)}, "
                         f"got {list(terminated.shape)}")
    return (~as_bool(terminated.to(like.device), "terminated")).to(like.dtype)


def vtrace_targets(rewards: Tensor, values: Tensor, bootstrap_value: Tensor, ratios: Tensor, *, gamma: float,
                   terminated: Tensor | None = None, rho_bar: float = 1.0, c_bar: float = 1.0,
                   lam: float = 1.0) -> tuple[Tensor, Tensor]:
    r"""V-trace targets and policy-gradient advantages (Espeholt et al. 2018; §A.4).

    With :math:`\rho_t = \min(\bar\rho, \pi/\mu)`, :math:`c_t = \lambda\min(\bar c, \pi/\mu)` and
    :math:`\delta_t = \rho_t (r_t + \gamma V(x_{t+1}) - V(x_t))`,

    .. math:: v_s = V(x_s) + \sum_{t \ge s} \gamma^{t-s} \Big(\prod_{i=s}^{t-1} c_i\Big) \delta_t,

    computed backwards as :math:`v_s - V(x_s) = \delta_s + \gamma c_s (v_{s+1} - V(x_{s+1}))`. The advantages are
    :math:`\rho_t (r_t + \gamma v_{t+1} - V(x_t))` (with :math:`v_T` the bootstrap value). In expectation the
    targets' fixed point is the value of :func:`vtrace_fixed_point_policy`, not of :math:`\pi`, unless
    :math:`\bar\rho \ge \max \pi/\mu`.

    Args:
        rewards: ``[..., T]``.
        values: ``[..., T]`` :math:`V(x_t)` (treated as data: no gradient is taken through the targets).
        bootstrap_value: ``[...]`` :math:`V(x_T)`, the value of the state after the last step.
        ratios: ``[..., T]`` :math:`\pi(a_t \mid x_t)/\mu(a_t \mid x_t)`.
        gamma: discount in ``(0, 1]``.
        terminated: optional ``[..., T]`` bool; True where the episode ended at step ``t`` (no bootstrap, traces cut).
        rho_bar, c_bar: truncation thresholds, ``>= 0`` (``math.inf`` for none).
        lam: trace decay in ``[0, 1]``.

    Returns:
        ``(vs, advantages)``, both ``[..., T]``, detached.
    """
    gamma = check_gamma(gamma)
    rho_bar, c_bar, lam = _nonneg(rho_bar, "rho_bar"), _nonneg(c_bar, "c_bar"), _nonneg(lam, "lam", upper=1.0)
    rewards = _finite(_float(rewards, "rewards"), "rewards").detach()
    shape, like = rewards.shape, " (that of rewards)"
    values = _finite(_float(values, "values", shape=shape, like=like), "values").detach().to(rewards)
    boot = _finite(_float(bootstrap_value, "bootstrap_value", min_dim=0, shape=shape[:-1],
                          like=" (rewards' shape without its last dim)"), "bootstrap_value").detach().to(rewards)
    ratios = _ratios(ratios, shape=shape, like=like).detach().to(rewards)
    cont = _continues(terminated, rewards)
    rho = truncated_ratios(ratios, rho_bar)
    c = lam * truncated_ratios(ratios, c_bar)
    next_values = torch.cat([values[..., 1:], boot[..., None]], -1)
    disc = gamma * cont
    delta = rho * (rewards + disc * next_values - values)
    acc = torch.zeros_like(boot)
    out = []
    for t in range(shape[-1] - 1, -1, -1):
        acc = delta[..., t] + disc[..., t] * c[..., t] * acc
        out.append(acc)
    vs = values + torch.stack(out[::-1], -1)
    vs_next = torch.cat([vs[..., 1:], boot[..., None]], -1)
    adv = rho * (rewards + disc * vs_next - values)
    return vs, adv


def retrace_targets(rewards: Tensor, q_taken: Tensor, next_expected_q: Tensor, ratios: Tensor, *, gamma: float,
                    terminated: Tensor | None = None, lam: float = 1.0, c_bar: float = 1.0) -> Tensor:
    r"""Retrace(λ) targets for :math:`Q(x_t, a_t)` (Munos et al. 2016; §A.4).

    With traces :math:`c_t = \lambda \min(\bar c, \pi(a_t \mid x_t)/\mu(a_t \mid x_t))` and
    :math:`\delta_t = r_t + \gamma \mathbb E_\pi Q(x_{t+1}, \cdot) - Q(x_t, a_t)`,

    .. math:: G_s = Q(x_s, a_s) + \sum_{t \ge s} \gamma^{t-s} \Big(\prod_{i=s+1}^{t} c_i\Big) \delta_t,

    computed backwards as :math:`G_s - Q_s = \delta_s + \gamma c_{s+1} (G_{s+1} - Q_{s+1})`. For any traces with
    :math:`0 \le c_t \le \pi/\mu` (any ``lam`` in [0, 1], any ``c_bar``) the expected operator is a
    :math:`\gamma`-contraction with fixed point :math:`Q^\pi`.

    Args:
        rewards: ``[..., T]``.
        q_taken: ``[..., T]`` :math:`Q(x_t, a_t)` of the actions taken (data: detached).
        next_expected_q: ``[..., T]`` :math:`\sum_a \pi(a \mid x_{t+1}) Q(x_{t+1}, a)`; the last entry is the bootstrap.
        ratios: ``[..., T]`` :math:`\pi/\mu` of the actions taken (entry 0 is not used: the first action is given).
        gamma: discount in ``(0, 1]``.
        terminated: optional ``[..., T]`` bool, True where the episode ended at step ``t``.
        lam: trace decay in ``[0, 1]``.
        c_bar: trace truncation, ``>= 0`` (1 in Retrace; ``math.inf`` is plain per-decision importance sampling).

    Returns:
        ``[..., T]`` targets, detached.
    """
    gamma = check_gamma(gamma)
    lam, c_bar = _nonneg(lam, "lam", upper=1.0), _nonneg(c_bar, "c_bar")
    rewards = _finite(_float(rewards, "rewards"), "rewards").detach()
    shape, like = rewards.shape, " (that of rewards)"
    q = _finite(_float(q_taken, "q_taken", shape=shape, like=like), "q_taken").detach().to(rewards)
    eq = _finite(_float(next_expected_q, "next_expected_q", shape=shape, like=like),
                 "next_expected_q").detach().to(rewards)
    c = lam * truncated_ratios(_ratios(ratios, shape=shape, like=like).detach().to(rewards), c_bar)
    disc = gamma * _continues(terminated, rewards)
    delta = rewards + disc * eq - q
    acc = torch.zeros_like(rewards[..., 0])
    out = []
    for t in range(shape[-1] - 1, -1, -1):
        c_next = c[..., t + 1] if t + 1 < shape[-1] else torch.zeros_like(acc)
        acc = delta[..., t] + disc[..., t] * c_next * acc
        out.append(acc)
    return q + torch.stack(out[::-1], -1)


def vtrace_fixed_point_policy(mu: Tensor, pi: Tensor, rho_bar: float) -> Tensor:
    r"""The policy whose value V-trace converges to: :math:`\pi_{\bar\rho} \propto \min(\bar\rho\,\mu, \pi)` (§A.4).

    Args:
        mu: ``[..., A]`` behaviour probabilities (rows sum to 1).
        pi: ``[..., A]`` target probabilities, same shape.
        rho_bar: the truncation :math:`\bar\rho > 0`; for :math:`\bar\rho \ge \max \pi/\mu` the result is ``pi``.

    Returns:
        ``[..., A]`` probabilities.
    """
    mu = _finite(_float(mu, "mu"), "mu")
    pi = _finite(_float(pi, "pi", shape=mu.shape, like=" (that of mu)"), "pi").to(mu)
    for name, p in (("mu", mu), ("pi", pi)):
        if (p < 0).any() or not torch.allclose(p.sum(-1), torch.ones_like(p[..., 0]), atol=1e-6):
            raise ValueError(f"{name} must hold probabilities over the last dim (non-negative, rows summing to 1)")
    rb = _nonneg(rho_bar, "rho_bar")
    if rb == 0:
        raise ValueError("rho_bar must be > 0 (at 0 every step has weight 0 and no policy is defined)")
    m = torch.minimum(rb * mu, pi)
    return m / m.sum(-1, keepdim=True)
