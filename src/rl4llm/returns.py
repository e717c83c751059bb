r"""Discounted returns and reward-to-go, with episode boundaries.

Every policy-gradient estimator in the book weights the score
:math:`\nabla_\theta \log \pi_\theta(a_t \mid s_t)` by some sum of rewards. This module computes those sums
for a batch of reward sequences:

- :func:`discounted_returns` -- the return from step ``t`` on, :math:`G_t = r_t + \gamma G_{t+1}`, the
  quantity a value function estimates;
- :func:`reward_to_go` -- the policy-gradient weight of step ``t``: the same sum with the discount counted
  from the episode's first step (:math:`\gamma^t G_t`, the form whose expectation is the exact gradient of
  the discounted objective), or from step ``t`` (:math:`G_t`);
- :func:`episode_returns` -- the total discounted return of the episode, repeated at every one of its steps;
- :func:`episode_steps` and :func:`discount_powers` -- the index of each step within its episode and
  :math:`\gamma` raised to it;
- :func:`gae` -- generalised advantage estimation (chapter 7), by a loop or a parallel scan;
- :func:`batch_mean_baseline`, :func:`leave_one_out_baseline` -- means over a batch of samples, the baselines of
  chapter 6 (§6.2) that GRPO's group advantages (chapter 13) reuse.

Conventions. Tensors are time-last: ``rewards`` has shape ``[..., T]`` with any number of leading (batch)
dims. Episode boundaries are explicit: ``dones[..., t]`` is True when the episode ended at step ``t``, so
rewards after ``t`` belong to a different episode; the step after a done is the first step of the next
episode. Each row is assumed to start at the first step of an episode. A row whose last step is not a done
ends mid-episode; the sums simply stop there (or, in :func:`discounted_returns`, continue with a
``bootstrap`` value).

Low-precision inputs (bfloat16, float16) are accumulated in float32 and the result is cast back to the input
dtype; float32 and float64 are accumulated in their own precision. The recursions are backward loops over
``T``, vectorised over the batch dims.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

from rl4llm import _validate as check

__all__ = [
    "accumulation_dtype",
    "as_bool",
    "batch_mean_baseline",
    "check_dones",
    "check_gamma",
    "check_lam",
    "check_rewards",
    "discount_powers",
    "discounted_returns",
    "episode_returns",
    "episode_steps",
    "gae",
    "leave_one_out_baseline",
    "reward_to_go",
]


# ----------------------------------------------------------------------------------------------------------
# Validation helpers (shared with the policy-gradient modules)
# ----------------------------------------------------------------------------------------------------------


def check_gamma(gamma) -> float:
    """Return ``gamma`` as a Python float, or raise ``ValueError`` unless it is a real number in (0, 1]."""
    if isinstance(gamma, Tensor):
        if gamma.numel() != 1:
            raise ValueError(f"gamma must be a scalar, got a tensor of shape {list(gamma.shape)}")
        gamma = gamma.item()
    if isinstance(gamma, bool) or not isinstance(gamma, Real):
        raise ValueError(f"gamma must be a real number in (0, 1], got {gamma!r}")
    gamma = float(gamma)
    if not (0.0 < gamma <= 1.0):  # also rejects NaN
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    return gamma


def check_rewards(rewards) -> Tensor:
    """Raise ``ValueError`` unless ``rewards`` is a finite floating-point tensor ``[..., T]``."""
    if not isinstance(rewards, Tensor):
        raise ValueError(f"rewards must be a torch.Tensor of shape [..., T], got {type(rewards).__name__}")
    if rewards.dim() < 1:
        raise ValueError("rewards must have at least one dim (time last, [..., T]), got a 0-dim tensor")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating-point tensor, got dtype {rewards.dtype}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or infinite values")
    return rewards


def as_bool(x: Tensor, name: str) -> Tensor:
    """``x`` as a bool tensor: bool tensors as they are, numeric ones only if all entries are 0 or 1."""
    if x.dtype == torch.bool:
        return x
    if x.is_complex() or not ((x == 0) | (x == 1)).all():
        raise ValueError(f"{name} must be a bool tensor, or numeric with values in {{0, 1}}")
    return x != 0


def check_dones(dones, like: Tensor, name: str = "dones", like_name: str = "rewards") -> Tensor | None:
    """Return ``dones`` as a bool tensor of exactly ``like``'s shape (or ``None``), or raise ``ValueError``.

    Also used for masks (``name="mask"``).
    """
    if dones is None:
        return None
    if not isinstance(dones, Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor of shape {list(like.shape)}, got {type(dones).__name__}"
        )
    if dones.shape != like.shape:
        raise ValueError(
            f"{name} must have the same shape as {like_name} {list(like.shape)}, got {list(dones.shape)}"
        )
    if dones.device != like.device:
        raise ValueError(f"{name} is on {dones.device} but {like_name} is on {like.device}")
    return as_bool(dones, name)


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are accumulated in: float32 for 16-bit floats, else ``dtype`` itself."""
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


# ----------------------------------------------------------------------------------------------------------
# Position within an episode
# ----------------------------------------------------------------------------------------------------------


def episode_steps(dones: Tensor) -> Tensor:
    """The index of each step within its episode.

    Step ``t`` of a row has index ``k_t = 0`` if it is the row's first step or follows a done, and
    ``k_t = k_{t-1} + 1`` otherwise.

    Args:
        dones: ``[..., T]`` bool (or 0/1) tensor, True at step ``t`` when the episode ended there.

    Returns:
        ``[..., T]`` int64 tensor of step indices.
    """
    if not isinstance(dones, Tensor) or dones.dim() < 1:
        raise ValueError("dones must be a torch.Tensor of shape [..., T] with at least one dim")
    dones = as_bool(dones, "dones")
    T = dones.shape[-1]
    t = torch.arange(T, device=dones.device).expand(dones.shape)
    if T == 0:
        return t.clone()
    starts = torch.zeros_like(dones)
    starts[..., 0] = True
    starts[..., 1:] = dones[..., :-1]
    # The first step of the current episode is the latest start at or before t.
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=-1).values
    return t - first


def discount_powers(gamma, steps: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    r"""``gamma ** steps``, elementwise.

    Args:
        gamma: discount factor in (0, 1].
        steps: integer tensor of any shape, e.g. ``torch.arange(T)`` or the output of :func:`episode_steps`.
        dtype: floating dtype of the result.

    Returns:
        Tensor shaped like ``steps`` with entries :math:`\gamma^{k}`, on ``steps``' device.
    """
    gamma = check_gamma(gamma)
    if not isinstance(steps, Tensor) or steps.dtype == torch.bool or not _is_integer(steps.dtype):
        raise ValueError("steps must be an integer tensor")
    if (steps < 0).any():
        raise ValueError("steps must be non-negative")
    return torch.pow(torch.tensor(gamma, dtype=dtype, device=steps.device), steps.to(dtype))


# ----------------------------------------------------------------------------------------------------------
# The backward recursion
# ----------------------------------------------------------------------------------------------------------


def _backward_sum(rewards: Tensor, gamma: float, continues: Tensor | None, last: Tensor) -> Tensor:
    """``G_t = r_t + gamma * continues_t * G_{t+1}``, ``G_T = last``; inputs already validated and upcast.

    Shapes: ``rewards [..., T]``, ``continues [..., T]`` (same dtype, 0/1) or ``None``, ``last [...]``.
    """
    out = torch.empty_like(rewards)
    g = last
    for t in range(rewards.shape[-1] - 1, -1, -1):
        carry = gamma * g if continues is None else gamma * continues[..., t] * g
        g = rewards[..., t] + carry
        out[..., t] = g
    return out


def discounted_returns(rewards: Tensor, gamma, *, dones: Tensor | None = None, bootstrap=None) -> Tensor:
    r"""Discounted return from each step on: :math:`G_t = r_t + \gamma (1 - d_t) G_{t+1}`, :math:`G_T = b`.

    Args:
        rewards: ``[..., T]`` floating-point rewards, finite.
        gamma: discount factor in (0, 1].
        dones: optional ``[..., T]`` bool; True at step ``t`` when the episode ended there, which stops the
            sum (no reward after ``t`` is added to :math:`G_t`). ``None``: no episode ends inside the window.
        bootstrap: value :math:`b` of the state after the last step, used only for rows whose last step is
            not a done: ``None`` (zero), a real number, or a ``[...]`` tensor (one value per row).

    Returns:
        ``[..., T]`` tensor :math:`G_t`, same dtype as ``rewards``.
    """
    rewards = check_rewards(rewards)
    gamma = check_gamma(gamma)
    dones = check_dones(dones, rewards)
    acc = accumulation_dtype(rewards.dtype)
    batch = rewards.shape[:-1]
    if bootstrap is None:
        last = torch.zeros(batch, dtype=acc, device=rewards.device)
    elif isinstance(bootstrap, Tensor):
        if bootstrap.shape != batch:
            raise ValueError(
                f"bootstrap must have shape {list(batch)} (rewards' shape without the time dim), "
                f"got {list(bootstrap.shape)}"
            )
        if bootstrap.device != rewards.device:
            raise ValueError(f"bootstrap is on {bootstrap.device} but rewards are on {rewards.device}")
        if not bootstrap.is_floating_point() or not torch.isfinite(bootstrap).all():
            raise ValueError("bootstrap must be a finite floating-point tensor")
        last = bootstrap.to(acc)
    elif isinstance(bootstrap, Real) and not isinstance(bootstrap, bool) and math.isfinite(bootstrap):
        last = torch.full(batch, float(bootstrap), dtype=acc, device=rewards.device)
    else:
        raise ValueError(f"bootstrap must be None, a finite real number or a tensor of shape {list(batch)}")
    continues = None if dones is None else (~dones).to(acc)
    return _backward_sum(rewards.to(acc), gamma, continues, last).to(rewards.dtype)


def reward_to_go(rewards: Tensor, gamma, *, dones: Tensor | None = None, from_start: bool = True) -> Tensor:
    r"""The policy-gradient weight of each step: discounted rewards from step ``t`` to the end of its episode.

    Let :math:`k_t` be the index of step ``t`` within its episode (:func:`episode_steps`; 0 at the row's first
    step and right after every done). Then

    - ``from_start=True``: :math:`\Psi_t = \sum_{t' \ge t} \gamma^{k_{t'}} r_{t'} = \gamma^{k_t} G_t`, the
      discount counted from the episode's first step. This is the weight whose estimator has expectation equal
      to the gradient of the discounted objective :math:`\mathbb E[\sum_t \gamma^t r_t]`.
    - ``from_start=False``: :math:`G_t = \sum_{t' \ge t} \gamma^{t' - t} r_{t'}`, the discount counted from
      step ``t`` (what :func:`discounted_returns` returns with no bootstrap). Dropping the factor
      :math:`\gamma^{k_t}` biases the gradient unless :math:`\gamma = 1`, where the two forms coincide.

    Both sums run over ``t' >= t`` in the same episode: they stop at the first done at or after ``t``.

    Args:
        rewards: ``[..., T]`` floating-point rewards, finite.
        gamma: discount factor in (0, 1].
        dones: optional ``[..., T]`` bool episode ends (see the module docstring). ``None``: each row is one
            episode that starts at its first step.
        from_start: count the discount from the episode's first step (True) or from step ``t`` (False).

    Returns:
        ``[..., T]`` tensor, same dtype as ``rewards``.
    """
    if not from_start:
        return discounted_returns(rewards, gamma, dones=dones)
    rewards = check_rewards(rewards)
    gamma = check_gamma(gamma)
    dones = check_dones(dones, rewards)
    acc = accumulation_dtype(rewards.dtype)
    if dones is None:
        steps = torch.arange(rewards.shape[-1], device=rewards.device)
        continues = None
    else:
        steps = episode_steps(dones)
        continues = (~dones).to(acc)
    weighted = discount_powers(gamma, steps, dtype=acc) * rewards.to(acc)
    last = torch.zeros(rewards.shape[:-1], dtype=acc, device=rewards.device)
    return _backward_sum(weighted, 1.0, continues, last).to(rewards.dtype)


def episode_returns(rewards: Tensor, gamma, *, dones: Tensor | None = None) -> Tensor:
    r"""The total discounted return :math:`\sum_{k} \gamma^{k} r_k` of the episode each step belongs to.

    Every step of an episode gets the same value, the reward-to-go (from the start) of its first step. For the
    last, unfinished episode of a row the sum covers the steps observed.

    Args:
        rewards: ``[..., T]`` floating-point rewards, finite.
        gamma: discount factor in (0, 1].
        dones: optional ``[..., T]`` bool episode ends. ``None``: each row is a single episode.

    Returns:
        ``[..., T]`` tensor, same dtype as ``rewards``.
    """
    rtg = reward_to_go(rewards, gamma, dones=dones, from_start=True)
    if rtg.shape[-1] == 0:
        return rtg
    if dones is None:
        return rtg[..., :1].expand(rtg.shape).clone()
    dones = check_dones(dones, rewards)
    steps = episode_steps(dones)
    first = torch.arange(rtg.shape[-1], device=rtg.device) - steps  # index of the episode's first step
    return rtg.gather(-1, first)


# ----------------------------------------------------------------------------------------------------------
# Generalised advantage estimation
# ----------------------------------------------------------------------------------------------------------

GAE_METHODS = ("auto", "loop", "scan")
"""The values :func:`gae` accepts for ``method``: ``"loop"`` (the reference backward loop over time),
``"scan"`` (a parallel associative scan) and ``"auto"`` (whichever is faster for the shape and device)."""



def check_lam(lam) -> float:
    """Return ``lam`` as a Python float, or raise ``ValueError`` unless it is a real number in [0, 1]."""
    if isinstance(lam, Tensor):
        if lam.numel() != 1:
            raise ValueError(f"lam must be a scalar, got a tensor of shape {list(lam.shape)}")
        lam = lam.item()
    if isinstance(lam, bool) or not isinstance(lam, Real):
        raise ValueError(f"lam must be a real number in [0, 1], got {lam!r}")
    lam = float(lam)
    if not (0.0 <= lam <= 1.0):  # also rejects NaN
        raise ValueError(f"lam (the GAE lambda) must be in [0, 1], got {lam}")
    return lam


def _all_finite(x: Tensor) -> bool:
    """True when ``x`` holds no NaN or infinity; one pass over ``x`` (both propagate to its min or max)."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _check_float(x, name: str, like: Tensor | None = None) -> Tensor:
    """A finite floating-point tensor (of ``like``'s shape and device, when given), or ``ValueError``."""
    shape = "[..., T]" if like is None else str(list(like.shape))
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {shape}, got {type(x).__name__}")
    if like is None and x.dim() < 1:
        raise ValueError(f"{name} must have at least one dim (time last, [..., T]), got a 0-dim tensor")
    if like is not None and x.shape != like.shape:
        raise ValueError(f"{name} must have the shape of rewards {shape}, got {list(x.shape)}")
    if like is not None and x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but rewards are on {like.device}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if not _all_finite(x):
        raise ValueError(f"{name} contain NaN or infinite values")
    return x


def _check_bootstrap(bootstrap, batch: torch.Size, like: Tensor, acc: torch.dtype) -> Tensor:
    if bootstrap is None:
        return torch.zeros(batch, dtype=acc, device=like.device)
    if isinstance(bootstrap, Tensor):
        if bootstrap.shape != batch:
            raise ValueError(
                f"bootstrap must have shape {list(batch)} (rewards' shape without the time dim), "
                f"got {list(bootstrap.shape)}"
            )
        if bootstrap.device != like.device:
            raise ValueError(f"bootstrap is on {bootstrap.device} but rewards are on {like.device}")
        if not bootstrap.is_floating_point() or not torch.isfinite(bootstrap).all():
            raise ValueError("bootstrap must be a finite floating-point tensor")
        return bootstrap.to(acc)
    if isinstance(bootstrap, Real) and not isinstance(bootstrap, bool) and math.isfinite(bootstrap):
        return torch.full(batch, float(bootstrap), dtype=acc, device=like.device)
    raise ValueError(f"bootstrap must be None, a finite real number or a tensor of shape {list(batch)}")


def gae_inputs(rewards: Tensor, values: Tensor, next_values: Tensor | None = None, *, gamma, lam,
               terminated: Tensor | None = None, truncated: Tensor | None = None, mask: Tensor | None = None,
               bootstrap=None) -> tuple[Tensor, Tensor, float]:
    r"""Validate the inputs of :func:`gae` and reduce them to the linear recursion it solves.

    Returns ``(deltas, decay, gamma * lam)`` in the accumulation dtype, each ``[..., T]``, such that the
    advantages are the solution of :math:`A_t = \delta_t + c_t A_{t+1}` with :math:`A_T = 0` and
    :math:`c_t` = ``decay[..., t]`` (:math:`\gamma\lambda` where the episode goes on after step ``t``, else 0);
    ``deltas`` and ``decay`` are 0 at masked steps. Every implementation of the recursion (the time loop, the
    parallel scan) starts from here, so they agree on the conventions by construction.
    """
    rewards = _check_float(rewards, "rewards")
    gamma = check_gamma(gamma)
    lam = check_lam(lam)
    values = _check_float(values, "values", rewards)
    if next_values is not None:
        next_values = _check_float(next_values, "next_values", rewards)
    terminated = check_dones(terminated, rewards, "terminated")
    truncated = check_dones(truncated, rewards, "truncated")
    mask = check_dones(mask, rewards, "mask")
    acc = torch.promote_types(accumulation_dtype(rewards.dtype), accumulation_dtype(values.dtype))
    if next_values is not None:
        acc = torch.promote_types(acc, accumulation_dtype(next_values.dtype))
    batch, T = rewards.shape[:-1], rewards.shape[-1]
    last = _check_bootstrap(bootstrap, batch, rewards, acc)
    if terminated is not None and truncated is not None and (terminated & truncated).any():
        raise ValueError("a step cannot be both terminated and truncated (terminated wins in Gymnasium: "
                         "pass truncated & ~terminated)")
    if next_values is None and truncated is not None and T > 1 and truncated[..., :-1].any():
        raise ValueError(
            "truncated steps inside a row need next_values: the value of the observation the time limit cut "
            "the episode at, which is not values[..., t + 1] (that is the first state of the next episode)"
        )
    if next_values is None and bootstrap is None and truncated is not None and T > 0:
        cut_at_end = truncated[..., -1] if mask is None else truncated[..., -1] & mask[..., -1]
        if cut_at_end.any():
            raise ValueError(
                "a row's last step is truncated but neither next_values nor bootstrap was given: a time-limit "
                "cut bootstraps from the value of the final observation (pass bootstrap=V(final obs)); "
                "pass bootstrap=0.0 explicitly if the episode really ended there (then it is terminated)"
            )
    v = values.to(acc)
    if next_values is None:
        nv = torch.empty_like(v)
        if T > 0:
            nv[..., :-1] = v[..., 1:]
            nv[..., -1] = last
        if mask is not None and T > 1:
            # A valid step followed by padding is the end of its sequence: nothing to bootstrap from.
            nv[..., :-1].masked_fill_(~mask[..., 1:], 0.0)
        if terminated is not None:
            nv.masked_fill_(terminated, 0.0)
    else:
        nv = next_values.to(acc)
        if terminated is not None:
            nv = nv.masked_fill(terminated, 0.0)  # out of place: next_values may be the caller's tensor
    # delta_t = r_t + gamma V'_t - V(s_t), with V'_t = 0 after a terminal step
    deltas = torch.add(rewards.to(acc), nv, alpha=gamma).sub_(v)
    # The sum stops after step t when the episode ends there, when step t is padding, or before padding.
    ends = None
    for flags in (terminated, truncated):
        if flags is not None:
            ends = flags if ends is None else ends | flags
    if mask is not None:
        deltas.masked_fill_(~mask, 0.0)
        padding_or_before = ~mask
        if T > 1:
            padding_or_before[..., :-1] |= ~mask[..., 1:]
        ends = padding_or_before if ends is None else ends | padding_or_before
    glam = torch.tensor(gamma * lam, dtype=acc, device=rewards.device)
    if ends is None:
        decay = glam.expand(rewards.shape).clone()
    else:
        decay = torch.where(ends, torch.zeros((), dtype=acc, device=rewards.device), glam)
    return deltas, decay, gamma * lam


def _gae_loop(deltas: Tensor, decay: Tensor) -> Tensor:
    """The reference backward recursion ``A_t = delta_t + decay_t * A_{t+1}``, one time step at a time.

    ``T`` vectorised steps (over the leading dims); ``deltas``, ``decay``: ``[..., T]``, same dtype.
    """
    out = torch.empty_like(deltas)
    a = torch.zeros(deltas.shape[:-1], dtype=deltas.dtype, device=deltas.device)
    for t in range(deltas.shape[-1] - 1, -1, -1):
        a = deltas[..., t] + decay[..., t] * a
        out[..., t] = a
    return out


def _gae_scan(deltas: Tensor, decay: Tensor, *, overwrite: bool = False) -> Tensor:
    r"""The same recursion by a parallel (Hillis--Steele) scan in :math:`\lceil \log_2 T \rceil` steps.

    Step ``t`` of the recursion is the affine map :math:`x \mapsto \delta_t + c_t x` from :math:`A_{t+1}` to
    :math:`A_t`. Composing two such maps gives another, :math:`(c, d) \circ (c', d') = (c c', d + c d')`, and
    composition is associative. After the scan step with offset :math:`k = 2^j` the pair :math:`(c_t, d_t)`
    maps :math:`A_{t+2k}` to :math:`A_t`: :math:`d_t \leftarrow d_t + c_t d_{t+k}` and
    :math:`c_t \leftarrow c_t c_{t+k}` where :math:`t + k < T`, and nothing changes where :math:`t + k \ge T`
    (:math:`A_u = 0` beyond the end). Once :math:`k \ge T`, :math:`A_t = d_t`. Each step is two fused
    elementwise operations over the whole ``[..., T]`` tensor: :math:`O(T \log T)` work per row, but
    :math:`\lceil \log_2 T \rceil` Python-level steps instead of ``T``.

    Products of :math:`c` over long spans underflow to 0, which is their correct rounded value; no
    logarithm is taken (:math:`c_t` is 0 at every episode end). The result differs from the loop's only by
    the order in which the same products are summed.

    Args:
        deltas: ``[..., T]`` TD residuals.
        decay: ``[..., T]`` factors :math:`c_t`, same dtype and device.
        overwrite: allow the scan to use ``deltas`` and ``decay`` as work space (their contents are then
            undefined). Saves two allocations; :func:`gae` passes its own temporaries this way.

    Returns:
        ``[..., T]`` solution :math:`A`, a new tensor unless ``overwrite`` (then possibly ``deltas`` itself).
    """
    T = deltas.shape[-1]
    if T <= 1:
        return deltas if overwrite else deltas.clone()
    d_src, c_src = deltas, decay
    d_dst, c_dst = torch.empty_like(deltas), torch.empty_like(decay)
    first = True
    k = 1
    while k < T:
        n = T - k
        torch.addcmul(d_src[..., :n], c_src[..., :n], d_src[..., k:], out=d_dst[..., :n])
        d_dst[..., n:] = d_src[..., n:]
        if 2 * k < T:  # the products are needed by a later step
            torch.mul(c_src[..., :n], c_src[..., k:], out=c_dst[..., :n])
            c_dst[..., n:] = c_src[..., n:]
        if first and not overwrite:  # the inputs must stay intact: ping-pong between fresh buffers instead
            d_src, c_src = torch.empty_like(deltas), torch.empty_like(decay)
        first = False
        d_src, d_dst = d_dst, d_src
        c_src, c_dst = c_dst, c_src
        k *= 2
    return d_src


def _auto_method(shape: torch.Size, device: torch.device) -> str:
    """The method ``"auto"`` picks for ``[..., T]`` inputs on ``device``.

    The loop takes ``T`` vectorised steps on ``1/T`` of the data each; the scan takes ``ceil(log2 T)`` steps that
    each read and write the whole tensor a few times. On the CPU (measured with ``benchmarks/bench_gae.py`` and a
    sweep of short ``T``) the loop is faster up to ``T = 12``, and up to ``T = 16`` for tensors of a million
    elements or more, where the scan's extra passes over memory dominate; beyond that the scan wins by a factor
    that grows with ``T``. On a GPU every step is a kernel launch, so the scan is used from ``T = 3`` on.
    """
    T = shape[-1] if len(shape) else 0
    if device.type == "cpu":
        short = T <= 12 or (T <= 16 and math.prod(shape) >= 2**20)
    else:
        short = T <= 2
    return "loop" if short else "scan"


def gae(rewards: Tensor, values: Tensor, next_values: Tensor | None = None, *, gamma, lam,
        terminated: Tensor | None = None, truncated: Tensor | None = None, mask: Tensor | None = None,
        bootstrap=None, method: str = "auto") -> Tensor:
    r"""Generalised advantage estimates :math:`\hat A_t = \sum_{l \ge 0} (\gamma\lambda)^l \delta_{t+l}`.

    With the TD residual :math:`\delta_t = r_t + \gamma (1 - \mathrm{term}_t) V'_t - V(s_t)`, where
    :math:`V'_t` is the value of the observation that followed step ``t``, the advantages solve the backward
    recursion :math:`\hat A_t = \delta_t + \gamma\lambda (1 - \mathrm{end}_t) \hat A_{t+1}`. The value
    targets of the critic are the :math:`\lambda`-returns ``gae(...) + values``.

    Episode boundaries (each row may hold several episodes, as a vectorised environment produces them):

    - ``terminated[..., t]``: the episode reached a terminal state at step ``t``. No bootstrap (the value of a
      terminal state is 0) and the sum stops.
    - ``truncated[..., t]``: a time limit cut the episode at step ``t``. The sum stops, but :math:`\delta_t`
      bootstraps from :math:`V'_t`, the value of the observation the episode was cut at. Treating truncation
      as termination biases every advantage near the cut downwards (chapter 7 measures by how much).
    - ``mask[..., t]`` (language-model style, padded sequences): False marks padding. Padded steps get
      :math:`\hat A_t = 0` and take no part in any sum; a valid step followed by padding ends its sequence.

    Args:
        rewards: ``[..., T]`` floating-point rewards, finite.
        values: ``[..., T]`` :math:`V(s_t)`, the critic's value of the observation step ``t`` acted on.
        next_values: optional ``[..., T]`` :math:`V'_t`, the value of the observation after step ``t`` (for a
            truncated step: of the final observation, before any automatic reset). ``None``: ``values`` shifted
            left by one step, with ``bootstrap`` after the row's last step (and 0 before padding); this is
            only correct if no step inside a row is truncated, which is checked.
        gamma: discount factor in (0, 1].
        lam: the GAE :math:`\lambda` in [0, 1]; 0 gives :math:`\delta_t`, 1 gives the discounted return to
            the end of the episode (plus the bootstrap) minus :math:`V(s_t)`.
        terminated: optional ``[..., T]`` bool (or 0/1), see above.
        truncated: optional ``[..., T]`` bool (or 0/1), see above. A step may not be both.
        mask: optional ``[..., T]`` bool (or 0/1), True on real steps.
        bootstrap: used only when ``next_values`` is ``None``: the value of the state after each row's last
            step (``None`` for 0, a number, or a ``[...]`` tensor). Pass it for rows cut by the end of the
            rollout rather than by a terminal state; it is required (``ValueError`` otherwise) when a row's
            last step is flagged ``truncated``.
        method: how the backward recursion is solved; all methods agree to floating-point rounding.

            - ``"loop"``: the reference loop over ``T``, vectorised over the leading dims.
            - ``"scan"``: a parallel associative scan in :math:`\lceil \log_2 T \rceil` vectorised steps
              (much faster for long sequences, see chapter 7's benchmark).
            - ``"auto"`` (default): the loop for very short sequences on the CPU, the scan otherwise; and
              :math:`\hat A = \delta` directly when :math:`\gamma\lambda = 0`.

    Returns:
        ``[..., T]`` advantages in the inputs' dtype; accumulated in float32 for bfloat16/float16 inputs.
    """
    if method not in GAE_METHODS:
        raise ValueError(f"method must be one of {GAE_METHODS}, got {method!r}")
    deltas, decay, glam = gae_inputs(rewards, values, next_values, gamma=gamma, lam=lam, terminated=terminated,
                                     truncated=truncated, mask=mask, bootstrap=bootstrap)
    if method == "auto":
        method = "delta" if glam == 0.0 else _auto_method(deltas.shape, deltas.device)
    if method == "delta":
        out = deltas
    elif method == "scan":
        out = _gae_scan(deltas, decay, overwrite=True)  # both are temporaries of this call
    else:
        out = _gae_loop(deltas, decay)
    return out.to(torch.promote_types(rewards.dtype, values.dtype))


# ----------------------------------------------------------------------------------------------------------
# Batch means: the batch-mean and leave-one-out baselines (chapter 6)
# ----------------------------------------------------------------------------------------------------------


def batch_mean_baseline(returns: Tensor, dim: int = 0, *, mask: Tensor | None = None) -> Tensor:
    """The mean of ``returns`` along ``dim``, *including* each sample, broadcast back to ``returns``' shape.

    This is the baseline of GRPO-style group normalisation (chapter 6, §6.2; chapter 13). It is not independent
    of the sample it is subtracted from: since :math:`R_i - \\bar R = \\frac{N-1}{N}(R_i - \\bar R_{-i})`, the
    estimate with this baseline is exactly :math:`\\frac{N-1}{N}` times the one with the leave-one-out mean
    (:func:`leave_one_out_baseline`), so its expectation is :math:`\\frac{N-1}{N} \\nabla_\\theta J`.

    Args:
        returns: floating-point tensor, finite, with at least one dim.
        dim: the batch dim to average over.
        mask: optional bool (or 0/1) tensor of ``returns``' shape; only True entries are averaged. Where a
            slice has no True entry the baseline is 0.

    Returns:
        Tensor of ``returns``' shape and dtype.
    """
    returns = check.float_tensor(returns, "returns")
    dim = check.batch_dim(dim, returns, "returns")
    mask = check.mask_or_all(mask, returns, "returns")
    v = torch.where(mask, returns, torch.zeros((), dtype=returns.dtype, device=returns.device))
    count = mask.to(returns.dtype).sum(dim, keepdim=True)
    mean = check.safe_ratio(v.sum(dim, keepdim=True), count, torch.zeros_like(count))
    return mean.expand_as(returns).clone()


def leave_one_out_baseline(returns: Tensor, dim: int = 0, *, mask: Tensor | None = None) -> Tensor:
    """For each sample, the mean of ``returns`` over the *other* samples along ``dim``.

    :math:`\\bar R_{-i} = \\frac{1}{N-1} \\sum_{j \\ne i} R_j`. For i.i.d. samples it is independent of sample
    ``i``, so subtracting it leaves the gradient estimate unbiased (the "RLOO" baseline). With ``mask`` only
    True entries count, and where no *other* entry of a slice is True the baseline is 0 (per-step means over
    episodes of different lengths; chapter 6, §6.2).

    Args:
        returns: floating-point tensor, finite; its size along ``dim`` (the batch size) must be at least 2.
        dim: the batch dim.
        mask: optional bool (or 0/1) tensor of ``returns``' shape, True at real entries.

    Returns:
        Tensor of ``returns``' shape and dtype.
    """
    returns = check.float_tensor(returns, "returns")
    dim = check.batch_dim(dim, returns, "returns")
    if returns.shape[dim] < 2:
        raise ValueError(f"returns must have at least 2 samples along dim {dim} for a leave-one-out mean, "
                         f"got shape {list(returns.shape)}")
    mask = check.mask_or_all(mask, returns, "returns")
    v = torch.where(mask, returns, torch.zeros((), dtype=returns.dtype, device=returns.device))
    m = mask.to(returns.dtype)
    others_sum = v.sum(dim, keepdim=True) - v
    others_count = m.sum(dim, keepdim=True) - m
    return check.safe_ratio(others_sum, others_count, torch.zeros_like(others_sum))

