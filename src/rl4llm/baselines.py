"""Baselines for policy-gradient estimators: batch means, the optimal baseline, a value network, a loop.

A baseline turns the one-sample estimate :math:`\\hat g = \\sum_t \\Psi_t \\nabla_\\theta \\log
\\pi_\\theta(a_t \\mid s_t)` into :math:`\\hat g - \\sum_t b_t \\nabla_\\theta \\log \\pi_\\theta(a_t \\mid
s_t)`. When :math:`b_t` is fixed before :math:`a_t` is drawn, the subtracted term has mean zero, so the mean
of the estimate is unchanged while its variance moves. In general a baseline is a *control variate*: with
:math:`X` the estimate, :math:`Y` a quantity of mean zero and :math:`b` a coefficient, :math:`X - bY` has the
mean of :math:`X` and, per coordinate, the variance :math:`\\operatorname{Var} X - 2b\\,\\mathbb E[XY] + b^2
\\mathbb E[Y^2]`, smallest at :math:`b^* = \\mathbb E[XY] / \\mathbb E[Y^2]`.

The module, read top to bottom:

1. :func:`control_variate_coefficient`, :func:`optimal_baseline` -- the variance-minimising coefficient per
   parameter coordinate, :math:`b^*_h = \\mathbb E[g_h^2 R] / \\mathbb E[g_h^2]` in the total-return form;
2. :func:`weighted_mean_var`, :func:`leave_one_out_batch_variance` -- exact moments of estimators over an
   enumerated distribution, including the batch estimate with a leave-one-out baseline;
3. :func:`fit_value` -- fitting the learned state-value baseline :class:`~rl4llm.nets.ValueNet`, :math:`V_\\phi(s)`;
4. :func:`per_step_scores`, :func:`reinforce_with_baseline` -- the per-step score vectors of a
   :class:`~rl4llm.nets.PolicyNet` in closed form, and REINFORCE with each baseline, which records the
   variance of the one-episode gradient estimate under every baseline on the same batch.

The batch means themselves, :func:`~rl4llm.returns.batch_mean_baseline` (which includes the sample, and so
shrinks the gradient by :math:`(N-1)/N`) and :func:`~rl4llm.returns.leave_one_out_baseline` (which leaves it
out and does not), live in :mod:`rl4llm.returns`.

Shapes: samples (trajectories, episodes) along dim 0 unless stated; per-step tensors are time-last ``[B, T]``.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor, nn

from rl4llm import _validate as check
from rl4llm.device import get_device, seed_everything
from rl4llm.envs import collect_episodes, make_vector_env
from rl4llm.nets import PolicyNet, ValueNet
from rl4llm.pg import pg_weights
from rl4llm.returns import check_gamma, discount_powers, discounted_returns, leave_one_out_baseline

__all__ = [
    "BASELINES",
    "control_variate_coefficient",
    "fit_value",
    "leave_one_out_batch_variance",
    "optimal_baseline",
    "per_step_scores",
    "reinforce_with_baseline",
    "weighted_mean_var",
]

BASELINES = ("none", "batch_mean", "value", "optimal")


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------


def _check_weights(weights, n: int, like: Tensor) -> Tensor | None:
    """Optional per-sample weights (e.g. exact probabilities) ``[n]``, finite and nonnegative."""
    if weights is None:
        return None
    weights = check.float_tensor(weights, "weights")
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape [N] = [{n}] (one per sample along dim 0), "
                         f"got {list(weights.shape)}")
    if weights.device != like.device:
        raise ValueError(f"weights are on {weights.device} but the samples are on {like.device}")
    if (weights < 0).any():
        raise ValueError("weights must be nonnegative")
    return weights


# ----------------------------------------------------------------------------------------------------------
# 1. The optimal (variance-minimising) baseline
# ----------------------------------------------------------------------------------------------------------


def control_variate_coefficient(target: Tensor, control: Tensor, *, weights: Tensor | None = None,
                                leave_one_out: bool = False) -> Tensor:
    """The coefficient :math:`b^* = \\mathbb E[XY] / \\mathbb E[Y^2]` that minimises the variance of
    :math:`X - bY`, coordinate by coordinate, when :math:`\\mathbb E[Y] = 0`.

    Expectations are over the samples along dim 0: plain averages, or weighted by ``weights`` (e.g. the exact
    probabilities of enumerated trajectories). For a policy gradient with a constant per-coordinate baseline,
    ``target`` is the per-sample estimate without baseline and ``control`` the per-sample sum of the scores
    the baseline multiplies. Where :math:`\\mathbb E[Y^2] = 0` the coefficient is 0.

    Args:
        target: ``[N, ...]`` per-sample :math:`X`, finite floating point.
        control: ``[N, ...]`` per-sample :math:`Y`, same shape.
        weights: optional ``[N]`` nonnegative weights.
        leave_one_out: if True, sample ``i`` gets the coefficient computed from the other ``N - 1`` samples,
            so that it is independent of sample ``i`` (needs ``N >= 2``); the result is then ``[N, ...]``.

    Returns:
        ``[...]`` (``[N, ...]`` with ``leave_one_out``), in the inputs' dtype.
    """
    target = check.float_tensor(target, "target")
    control = check.float_tensor(control, "control")
    if control.shape != target.shape:
        raise ValueError(f"control must have target's shape {list(target.shape)}, got {list(control.shape)}")
    if control.device != target.device:
        raise ValueError(f"control is on {control.device} but target is on {target.device}")
    n = target.shape[0]
    w = _check_weights(weights, n, target)
    if leave_one_out and n < 2:
        raise ValueError(f"target must have at least 2 samples along dim 0 for leave_one_out, "
                         f"got shape {list(target.shape)}")
    w = torch.ones(n, dtype=target.dtype, device=target.device) if w is None else w.to(target.dtype)
    w = w.reshape(n, *([1] * (target.dim() - 1)))
    num_i, den_i = w * target * control, w * control.square()
    num, den = num_i.sum(0), den_i.sum(0)
    if leave_one_out:
        num, den = num - num_i, den - den_i
    return check.safe_ratio(num, den, torch.zeros_like(den))


def optimal_baseline(grads_sq: Tensor, returns: Tensor, *, weights: Tensor | None = None,
                     leave_one_out: bool = False) -> Tensor:
    """The per-coordinate optimal constant baseline :math:`b^*_h = \\mathbb E[g_h^2 R] / \\mathbb E[g_h^2]`.

    For the total-return estimate :math:`g\\,(R - b)` with :math:`g = \\nabla_\\theta \\log p_\\theta(\\tau)`,
    the variance of coordinate ``h`` is smallest at :math:`b^*_h`, a mean of the returns weighted by the
    squared score of that coordinate. It is one number *per parameter coordinate*: no single scalar is optimal
    for every coordinate. Where a coordinate's squared score is zero in every sample, the plain (weighted)
    mean of the returns is used (the baseline does not matter there).

    Args:
        grads_sq: ``[N, ...]`` squared per-sample scores :math:`g_{i,h}^2` (nonnegative, finite).
        returns: ``[N]`` returns :math:`R_i`, finite.
        weights: optional ``[N]`` nonnegative weights (exact probabilities); ``None``: equal weights.
        leave_one_out: if True, sample ``i`` gets the baseline computed from the other samples (``N >= 2``),
            which keeps the estimate unbiased when :math:`b^*` is estimated from the same batch.

    Returns:
        ``[...]`` baseline per coordinate (``[N, ...]`` with ``leave_one_out``).
    """
    grads_sq = check.float_tensor(grads_sq, "grads_sq")
    returns = check.float_tensor(returns, "returns")
    n = grads_sq.shape[0]
    if returns.shape != (n,):
        raise ValueError(f"returns must have shape [N] = [{n}] (grads_sq is {list(grads_sq.shape)}), "
                         f"got {list(returns.shape)}")
    if returns.device != grads_sq.device:
        raise ValueError(f"returns are on {returns.device} but grads_sq is on {grads_sq.device}")
    if (grads_sq < 0).any():
        raise ValueError("grads_sq must be nonnegative (squared scores)")
    w = _check_weights(weights, n, grads_sq)
    if leave_one_out and n < 2:
        raise ValueError(f"returns must have at least 2 samples for leave_one_out, "
                         f"got shape {list(returns.shape)}")
    w = torch.ones(n, dtype=grads_sq.dtype, device=grads_sq.device) if w is None else w.to(grads_sq.dtype)
    shape = (n, *([1] * (grads_sq.dim() - 1)))
    r, w = returns.to(grads_sq.dtype).reshape(shape), w.reshape(shape)
    terms = [w * grads_sq * r, w * grads_sq, (w * r).expand_as(grads_sq), w.expand_as(grads_sq)]
    sums = [x.sum(0) for x in terms]
    if leave_one_out:
        sums = [s - x for s, x in zip(sums, terms, strict=True)]
    num, den, plain_num, plain_den = sums
    return check.safe_ratio(num, den, check.safe_ratio(plain_num, plain_den, torch.zeros_like(plain_den)))


# ----------------------------------------------------------------------------------------------------------
# 2. Exact moments over an enumerated distribution
# ----------------------------------------------------------------------------------------------------------


def weighted_mean_var(x: Tensor, prob: Tensor) -> tuple[Tensor, Tensor]:
    """Exact mean and variance, coordinate by coordinate, of a random vector with finitely many values.

    Args:
        x: ``[M, ...]`` the value in each of ``M`` outcomes.
        prob: ``[M]`` their probabilities (nonnegative, summing to 1 within 1e-9).

    Returns:
        ``(mean, var)``, each of shape ``[...]``; ``var`` is :math:`\\sum_m p_m (x_m - \\mu)^2`.
    """
    x = check.float_tensor(x, "x")
    prob = _check_weights(prob, x.shape[0], x)
    if prob is None or abs(prob.sum().item() - 1) > 1e-9:
        raise ValueError("prob must be a tensor of probabilities [M] that sums to 1")
    p = prob.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    mean = (p * x).sum(0)
    return mean, (p * (x - mean).square()).sum(0)


def leave_one_out_batch_variance(prob: Tensor, target: Tensor, control: Tensor, values: Tensor,
                                 batch_size: int) -> Tensor:
    """Exact variance of the batch estimate with a per-step leave-one-out baseline, per coordinate.

    A batch holds ``N = batch_size`` i.i.d. samples. Sample ``i`` contributes
    :math:`U_i = X_i - \\sum_t Y_{i,t}\\, \\bar G_{-i,t}`, with :math:`\\bar G_{-i,t}` the mean of
    :math:`G_{j,t}` over the other samples :math:`j \\ne i`, and the batch estimate is
    :math:`\\frac1N \\sum_i U_i`. With :math:`\\mathbb E[Y_t] = 0`, :math:`m_t = \\mathbb E[G_t]`,
    :math:`C_{tt'} = \\operatorname{Cov}(G_t, G_{t'})` and :math:`M_{tt'} = \\mathbb E[Y_t G_{t'}]`,

    .. math::
        N \\operatorname{Var}\\Big(\\frac1N \\sum_i U_i\\Big)
        = \\operatorname{Var}\\Big(X - \\sum_t m_t Y_t\\Big)
        + \\frac{1}{N-1} \\sum_{t,t'} \\Big(C_{tt'}\\, \\mathbb E[Y_t Y_{t'}] + M_{tt'} M_{t't}\\Big).

    The first term is the variance with the ideal baseline :math:`m_t`; the second is the price of
    estimating it from :math:`N-1` other samples: the noise of the estimate, and the correlation it induces
    between the samples of a batch.

    Args:
        prob: ``[M]`` probabilities of the ``M`` outcomes of one sample.
        target: ``[M, ...]`` :math:`X` in each outcome (the estimate without baseline).
        control: ``[M, T, ...]`` :math:`Y_t` in each outcome (what the baseline at step ``t`` multiplies);
            must have mean zero under ``prob``.
        values: ``[M, T]`` :math:`G_t`, what the baseline averages.
        batch_size: ``N >= 2``.

    Returns:
        ``[...]``: the variance of the batch estimate (times ``N`` it compares with one-sample variances).
    """
    target = check.float_tensor(target, "target")
    control = check.float_tensor(control, "control", min_dim=2)
    values = check.float_tensor(values, "values", min_dim=2)
    M = target.shape[0]
    if values.dim() != 2 or values.shape[0] != M:
        raise ValueError(f"values must have shape [M, T] with M = {M}, got {list(values.shape)}")
    T = values.shape[1]
    if control.shape != (M, T, *target.shape[1:]):
        raise ValueError(f"control must have shape {[M, T, *target.shape[1:]]} ([M, T] + target's trailing "
                         f"shape), got {list(control.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2 for a leave-one-out baseline, got {batch_size!r}")
    m, _ = weighted_mean_var(values, prob)                                            # [T]; validates prob
    p = prob.to(target.dtype)
    extra = [1] * (target.dim() - 1)
    y_mean, _ = weighted_mean_var(control, p)
    if (y_mean.abs() > 1e-8 * (1 + control.abs().amax())).any():
        raise ValueError("control must have mean zero under prob (it should be made of scores)")
    _, var_ideal = weighted_mean_var(target - (m.reshape(1, T, *extra) * control).sum(1), p)
    centred = values - m
    C = torch.einsum("m,mt,mu->tu", p, centred, centred).reshape(T, T, *extra)       # Cov(G_t, G_t')
    pe = p.reshape(M, 1, 1, *extra)
    EYY = (pe * control[:, :, None] * control[:, None, :]).sum(0)                    # [T, T, ...]
    EYG = (pe * control[:, :, None] * values.reshape(M, 1, T, *extra)).sum(0)        # [T, T', ...]
    price = (C * EYY + EYG * EYG.transpose(0, 1)).sum((0, 1))
    return (var_ideal + price / (batch_size - 1)) / batch_size


# ----------------------------------------------------------------------------------------------------------
# 3. A learned state-value baseline
# ----------------------------------------------------------------------------------------------------------


def fit_value(value: ValueNet, optimizer: torch.optim.Optimizer, obs: Tensor, targets: Tensor,
              mask: Tensor | None = None, *, steps: int = 20) -> float:
    """Regress :math:`V_\\phi(s_t)` on ``targets`` (e.g. the returns :math:`G_t`) with full-batch steps.

    Minimises the mean of :math:`(V_\\phi(s_t) - G_t)^2` over the real steps. To keep a learned baseline
    unbiased, use it on a batch *before* fitting it on that batch.

    Args:
        value: the value network.
        optimizer: an optimizer over ``value``'s parameters.
        obs: ``[..., obs_dim]`` observations.
        targets: ``[...]`` regression targets, finite.
        mask: optional ``[...]`` bool, True at real steps (not all False).
        steps: number of optimizer steps, ``>= 1``.

    Returns:
        The mean squared error before the last step (a Python float).
    """
    if not isinstance(value, ValueNet):
        raise ValueError(f"value must be a ValueNet, got {type(value).__name__}")
    targets = check.float_tensor(targets, "targets", min_dim=0)
    if not isinstance(obs, Tensor) or obs.shape[:-1] != targets.shape:
        got = list(obs.shape) if isinstance(obs, Tensor) else type(obs).__name__
        raise ValueError(f"obs must have shape {[*targets.shape, value.obs_dim]} (targets' shape + obs_dim), "
                         f"got {got}")
    mask = check.mask_or_all(mask, targets, "targets")
    if not mask.any():
        raise ValueError("mask has no real step")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    x, y = obs[mask], targets[mask].to(value.net[-1].weight.dtype)
    loss = torch.zeros(())
    for _ in range(steps):
        loss = (value(x) - y).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


# ----------------------------------------------------------------------------------------------------------
# 4. Per-step scores of a PolicyNet, and REINFORCE with baselines
# ----------------------------------------------------------------------------------------------------------


def per_step_scores(policy: PolicyNet, obs: Tensor, actions: Tensor) -> Tensor:
    """The score :math:`\\nabla_\\theta \\log \\pi_\\theta(a \\mid s)` of every step, in closed form.

    For the MLP of :class:`~rl4llm.nets.PolicyNet` (linear layers with tanh between them) the per-sample
    gradient is a backward pass written out: at the output, :math:`\\partial \\log \\pi(a) / \\partial z =
    e_a - \\operatorname{softmax}(z)`; a linear layer :math:`z = W h + c` gets :math:`\\delta h^\\top` for
    :math:`W` and :math:`\\delta` for :math:`c`, and passes back :math:`W^\\top \\delta`, times
    :math:`1 - h^2` through a tanh. One batched pass gives every per-step score, with no autograd graph.

    Args:
        policy: a :class:`~rl4llm.nets.PolicyNet`.
        obs: ``[..., obs_dim]`` observations.
        actions: ``[...]`` integer actions.

    Returns:
        ``[..., P]`` scores, ``P`` the number of parameters, in the order of ``policy.parameters()`` (each
        flattened row-major), in the parameters' dtype.
    """
    if not isinstance(policy, PolicyNet):
        raise ValueError(f"policy must be a PolicyNet, got {type(policy).__name__}")
    if not isinstance(obs, Tensor) or obs.dim() < 1 or obs.shape[-1] != policy.obs_dim:
        got = list(obs.shape) if isinstance(obs, Tensor) else type(obs).__name__
        raise ValueError(f"obs must be a tensor of shape [..., {policy.obs_dim}], got {got}")
    if not isinstance(actions, Tensor) or actions.shape != obs.shape[:-1] or actions.is_floating_point():
        got = list(actions.shape) if isinstance(actions, Tensor) else type(actions).__name__
        raise ValueError(f"actions must be an integer tensor of shape {list(obs.shape[:-1])}, got {got}")
    if actions.numel() and (int(actions.min()) < 0 or int(actions.max()) >= policy.n_actions):
        raise ValueError(f"actions must lie in [0, {policy.n_actions})")
    layers = list(policy.net)
    linears = layers[0::2]
    if len(layers) % 2 == 0 or not all(isinstance(m, nn.Linear) for m in linears) \
            or not all(isinstance(m, nn.Tanh) for m in layers[1::2]):
        raise ValueError("policy.net must alternate Linear and Tanh layers, starting and ending with Linear")
    with torch.no_grad():
        h = obs.reshape(-1, policy.obs_dim).to(linears[0].weight.dtype)
        inputs = []                                           # the input of each linear layer
        for m in layers:
            if isinstance(m, nn.Linear):
                inputs.append(h)
            h = m(h)
        onehot = nn.functional.one_hot(actions.reshape(-1).long(), policy.n_actions).to(h.dtype)
        delta = onehot - h.softmax(-1)                        # d log pi(a) / d logits
        grads: list[Tensor] = []
        for k in range(len(linears) - 1, -1, -1):
            x = inputs[k]
            grads = [(delta[:, :, None] * x[:, None, :]).flatten(1), delta, *grads]
            if k > 0:                                         # x = tanh(pre-activation) of the layer below
                delta = (delta @ linears[k].weight) * (1 - x.square())
        return torch.cat(grads, -1).reshape(*obs.shape[:-1], -1)


def reinforce_with_baseline(env_id: str = "CartPole-v1", *, baseline: str = "value", num_envs: int = 16,
                            iterations: int = 30, lr: float = 1e-2, gamma: float = 0.99,
                            hidden: int | tuple[int, ...] = 32, value_hidden: int | tuple[int, ...] = 32,
                            value_lr: float = 1e-2, value_steps: int = 20,
                            max_episode_steps: int | None = None, seed: int = 0,
                            device: str | torch.device | None = None) -> dict:
    """REINFORCE with reward-to-go and one of four baselines, measuring every baseline's gradient variance.

    Each iteration samples ``num_envs`` complete episodes (:func:`~rl4llm.envs.collect_episodes`), computes
    the score of every step (:func:`per_step_scores`), and forms the one-episode estimate
    :math:`\\hat g_i = \\sum_t \\gamma^t (G_{i,t} - b_{i,t})\\, \\nabla_\\theta \\log \\pi_\\theta(a_{i,t}
    \\mid s_{i,t})` (weights from :func:`~rl4llm.pg.pg_weights`) under each baseline:

    - ``"none"``: :math:`b = 0`;
    - ``"batch_mean"``: :math:`b_{i,t}` is the mean of :math:`G_{j,t}` over the other episodes
      :math:`j \\ne i` still running at step ``t`` (:func:`leave_one_out_baseline` with the mask);
    - ``"value"``: :math:`b_{i,t} = V_\\phi(s_{i,t})`, a :class:`ValueNet` fitted to the returns of the
      *previous* batches (it is fitted on a batch only after serving as that batch's baseline);
    - ``"optimal"``: a constant per parameter coordinate, :math:`b_{i,h} = \\sum_{j\\ne i} X_{j,h} Y_{j,h} /
      \\sum_{j \\ne i} Y_{j,h}^2` with :math:`X_j` the estimate without baseline and :math:`Y_j = \\sum_t
      \\gamma^t \\nabla \\log \\pi` (:func:`control_variate_coefficient`, leave-one-out so it stays unbiased).

    The update is one Adam step along the batch mean of :math:`\\hat g_i` for the chosen ``baseline``. Every
    run fits the value network, so that on each batch the variance under all four baselines can be measured
    side by side: ``grad_var[name]`` is the sum over parameters of the sample variance of :math:`\\hat g_i`
    across the batch's episodes.

    Args:
        env_id: gymnasium id with a 1-D Box observation space and Discrete actions (CartPole-v1).
        baseline: one of :data:`BASELINES`.
        num_envs: episodes per iteration, ``>= 2``.
        iterations: number of updates.
        lr: Adam learning rate of the policy.
        gamma: discount in (0, 1].
        hidden: policy hidden width(s).
        value_hidden: value network hidden width(s).
        value_lr: Adam learning rate of the value network.
        value_steps: value regression steps per iteration.
        max_episode_steps: optional time limit passed to ``gym.make_vec`` (None: the environment's own).
        seed: non-negative int; seeds everything, as in :func:`rl4llm.pg.reinforce`.
        device: device for the networks and tensors; None: :func:`~rl4llm.device.get_device`.

    Returns:
        dict with per-iteration lists ``"iteration"``, ``"env_steps"`` (cumulative), ``"mean_return"`` (of
        the batch collected before the update), ``"grad_var"`` (a dict: baseline name -> list), and
        ``"policy"``, ``"value"`` (the trained networks).
    """
    if not isinstance(env_id, str):
        raise ValueError(f"env_id must be a gymnasium environment id (str), got {env_id!r}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    check.positive_int("num_envs", num_envs)
    if num_envs < 2:
        raise ValueError(f"num_envs must be >= 2 (leave-one-out baselines need other episodes), "
                         f"got {num_envs}")
    check.positive_int("iterations", iterations)
    check.positive_int("value_steps", value_steps)
    for name, v in (("lr", lr), ("value_lr", value_lr)):
        if isinstance(v, bool) or not isinstance(v, Real) or not (0 < v < math.inf):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    gamma = check_gamma(gamma)
    if max_episode_steps is not None:
        check.positive_int("max_episode_steps", max_episode_steps)
    device = get_device(device) if not isinstance(device, torch.device) else get_device(str(device))

    seed_everything(seed)
    env = make_vector_env(env_id, num_envs, max_episode_steps=max_episode_steps)
    try:
        obs_dim, n_actions = env.single_observation_space.shape[0], int(env.single_action_space.n)
        policy = PolicyNet(obs_dim, n_actions, hidden).to(device)
        value = ValueNet(obs_dim, value_hidden, scale=1 / (1 - gamma) if gamma < 1 else 100.0).to(device)
        generator = torch.Generator(device=device).manual_seed(seed)
        opt = torch.optim.Adam(policy.parameters(), lr=float(lr))
        value_opt = torch.optim.Adam(value.parameters(), lr=float(value_lr))
        history: dict = {"iteration": [], "env_steps": [], "mean_return": [],
                         "grad_var": {name: [] for name in BASELINES}}
        env_steps = 0
        for it in range(iterations):
            batch = collect_episodes(env, policy, generator=generator, seed=seed if it == 0 else None)
            mask, T = batch.mask, batch.rewards.shape[-1]
            scores = per_step_scores(policy, batch.obs, batch.actions) * mask[..., None]    # [B, T, P]
            G = discounted_returns(batch.rewards, gamma, dones=batch.dones)                 # [B, T]
            with torch.no_grad():
                v = torch.where(mask, value(batch.obs), torch.zeros((), device=device))
            # Every row starts an episode at t = 0, so pg_weights(..., baseline=b) = psi - gamma^t b:
            # subtract here instead of recomputing the reward-to-go once per baseline.
            psi = pg_weights(batch.rewards, gamma, dones=batch.dones)                        # gamma^t G_t
            disc = discount_powers(gamma, torch.arange(T, device=device), dtype=psi.dtype) * mask
            est = {"none": torch.einsum("bt,btp->bp", psi * mask, scores)}
            for name, b in (("batch_mean", leave_one_out_baseline(G, 0, mask=mask)), ("value", v)):
                est[name] = est["none"] - torch.einsum("bt,btp->bp", disc * b, scores)
            Y = torch.einsum("bt,btp->bp", disc, scores)                               # sum_t gamma^t g_t
            est["optimal"] = est["none"] - control_variate_coefficient(est["none"], Y, leave_one_out=True) * Y
            for name in BASELINES:
                history["grad_var"][name].append(est[name].var(0).sum().item())

            grad = est[baseline].mean(0)
            opt.zero_grad(set_to_none=True)
            offset = 0
            for p in policy.parameters():
                p.grad = -grad[offset:offset + p.numel()].view_as(p).to(p.dtype)
                offset += p.numel()
            opt.step()
            fit_value(value, value_opt, batch.obs, G, mask, steps=value_steps)

            env_steps += int(batch.lengths.sum())
            history["iteration"].append(it)
            history["env_steps"].append(env_steps)
            history["mean_return"].append(batch.returns.mean().item())
    finally:
        env.close()
    history["policy"], history["value"] = policy, value
    return history
