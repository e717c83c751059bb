r"""Advantage actor-critic (A2C): synchronous n-step rollouts from vectorised environments, GAE advantages.

The actor is a policy :math:`\pi_\theta`, the critic a state-value estimate :math:`V_\phi`. Each update:

1. :class:`~rl4llm.envs.RolloutCollector` -- step ``N`` environments in lockstep for ``T`` steps with the current policy
   (``N x T`` transitions, several episodes per environment when they are short);
2. :func:`rollout_advantages` -- evaluate the critic on every observation and on every *next* observation, and
   compute GAE advantages and :math:`\lambda`-return targets with :func:`rl4llm.returns.gae`, bootstrapping
   from the critic wherever an episode is cut rather than finished (a time limit, or the end of the rollout);
3. :func:`a2c_loss` -- one gradient step on the policy-gradient loss, the critic's regression loss and an
   entropy bonus.

:func:`a2c` runs the whole loop on a gymnasium environment with discrete actions (CartPole-v1).

Episode ends (terminated against truncated, and the two autoreset modes) are handled where the rollout is
collected: see :mod:`rl4llm.envs`.

Tensors are time-last: per-step quantities of a rollout have shape ``[N, T]`` (environments, steps),
observations ``[N, T, obs_dim]``.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rl4llm import _validate as check
from rl4llm.device import get_device, seed_everything
from rl4llm.envs import Rollout, RolloutCollector, check_env, make_vector_env
from rl4llm.nets import PolicyNet, ValueNet
from rl4llm.returns import check_gamma, check_lam, gae

__all__ = [
    "a2c",
    "a2c_loss",
    "rollout_advantages",
]


# ----------------------------------------------------------------------------------------------------------
# 1. Advantages and value targets
# ----------------------------------------------------------------------------------------------------------


def rollout_advantages(rollout: Rollout, value: nn.Module, *, gamma, lam,
                       truncation_as_termination: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    r"""Critic values, GAE advantages and :math:`\lambda`-return targets of a rollout.

    :math:`V(s_t)` and :math:`V'_t = V(\text{next\_obs}_t)` come from one batched evaluation of ``value`` each;
    :func:`~rl4llm.returns.gae` then stops every sum at an episode end and bootstraps from :math:`V'_t` unless
    step ``t`` terminated. That covers both cuts: a time limit inside the rollout (``truncated``) and the
    rollout's own end (the last step, where :math:`V'` is the value of the observation the next rollout starts
    from).

    Args:
        rollout: the :class:`~rl4llm.envs.Rollout`.
        value: the critic, mapping ``[..., obs_dim]`` to ``[...]``.
        gamma: discount in (0, 1].
        lam: GAE :math:`\lambda` in [0, 1].
        truncation_as_termination: reproduce the common mistake of treating a time-limit cut as a terminal
            state (no bootstrap); only for demonstrating what it does.

    Returns:
        ``(values, advantages, targets)``, each ``[N, T]``: ``values`` carries the critic's graph (for its
        loss); ``advantages`` and ``targets = advantages + values`` are detached. At masked (reset) steps the
        advantage is 0; such steps take no part in the loss.
    """
    if not isinstance(rollout, Rollout):
        raise ValueError(f"rollout must be a Rollout, got {type(rollout).__name__}")
    gamma, lam = check_gamma(gamma), check_lam(lam)
    values = value(rollout.obs)
    with torch.no_grad():
        next_values = value(rollout.next_obs)
        terminated, truncated = rollout.terminated, rollout.truncated
        if truncation_as_termination:
            terminated, truncated = terminated | truncated, torch.zeros_like(truncated)
        adv = gae(rollout.rewards, values.detach(), next_values, gamma=gamma, lam=lam, terminated=terminated,
                  truncated=truncated, mask=rollout.mask)
    return values, adv, adv + values.detach()


# ----------------------------------------------------------------------------------------------------------
# 2. The loss
# ----------------------------------------------------------------------------------------------------------


def a2c_loss(policy: PolicyNet, rollout: Rollout, values: Tensor, advantages: Tensor, targets: Tensor, *,
             value_coef: float = 0.5, entropy_coef: float = 0.01,
             normalize_advantages: bool = False) -> tuple[Tensor, dict[str, float]]:
    r"""The A2C loss, to be minimised: :math:`L = L_\pi + c_V L_V - c_H H`.

    - :math:`L_\pi = -\frac{1}{M}\sum_{n,t} \hat A_{n,t} \log \pi_\theta(a_{n,t} \mid s_{n,t})`: its gradient
      is minus the policy-gradient estimate with the GAE advantages as weights (detached);
    - :math:`L_V = \frac{1}{M}\sum_{n,t} (V_\phi(s_{n,t}) - G^\lambda_{n,t})^2`: regression of the critic on
      the :math:`\lambda`-return targets (detached: a semi-gradient, as in TD learning);
    - :math:`H`: the mean entropy of :math:`\pi_\theta(\cdot \mid s_{n,t})`, a bonus against early collapse.

    Sums and means run over the ``M`` real steps of the rollout (``rollout.mask``).

    As in the usual A2C, the weight of step ``t`` carries no :math:`\gamma^{k_t}` (chapter 5): the
    discount is a variance-reduction device in the advantages (Schulman et al., 2016), and the update estimates
    the gradient of the undiscounted return, with the bias that this choice of advantage brings.

    Args:
        policy: the actor.
        rollout: the :class:`~rl4llm.envs.Rollout` (``obs``, ``actions``).
        values: ``[N, T]`` :math:`V_\phi(s_t)` with its graph.
        advantages: ``[N, T]`` GAE advantages.
        targets: ``[N, T]`` :math:`\lambda`-returns.
        value_coef: :math:`c_V \ge 0`.
        entropy_coef: :math:`c_H \ge 0`.
        normalize_advantages: shift and scale the advantages to mean 0 and standard deviation 1 over the real
            steps before weighting (a per-batch change of step size and baseline; no scaling if they are all
            equal).

    Returns:
        ``(loss, stats)``: the scalar loss and a dict of floats ``policy_loss``, ``value_loss``, ``entropy``.
    """
    shape = rollout.actions.shape
    for name, x in (("values", values), ("advantages", advantages), ("targets", targets)):
        if not isinstance(x, Tensor) or x.shape != shape:
            got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must have the rollout's shape {list(shape)}, got {got}")
    for name, c in (("value_coef", value_coef), ("entropy_coef", entropy_coef)):
        if isinstance(c, bool) or not isinstance(c, Real) or not (0 <= c < math.inf):
            raise ValueError(f"{name} must be a finite number >= 0, got {c!r}")
    m = rollout.mask
    if not m.any():
        raise ValueError("the rollout has no real step (its mask is all False)")
    n = m.sum()

    def mean(x):  # over the real steps
        return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum() / n

    logits = policy(rollout.obs)
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, rollout.actions.unsqueeze(-1)).squeeze(-1)
    entropy = mean(-(logp_all.exp() * logp_all).sum(-1))
    adv = advantages.detach()
    if normalize_advantages:
        adv = adv - mean(adv)
        std = mean(adv.square()).sqrt()
        if std > 0:
            adv = adv / std
    policy_loss = mean(-adv * logp)
    value_loss = mean((values - targets.detach()).square())
    loss = policy_loss + value_coef * value_loss - entropy_coef * entropy
    return loss, {"policy_loss": policy_loss.item(), "value_loss": value_loss.item(), "entropy": entropy.item()}


# ----------------------------------------------------------------------------------------------------------
# 3. The training loop
# ----------------------------------------------------------------------------------------------------------


def a2c(env_id: str = "CartPole-v1", *, num_envs: int = 8, steps: int = 32, updates: int = 200,
        gamma: float = 0.99, lam: float = 0.95, lr: float = 2e-3, value_coef: float = 0.5,
        entropy_coef: float = 0.01, normalize_advantages: bool = False, max_grad_norm: float = 0.5,
        hidden: int | tuple[int, ...] = 64,
        truncation_as_termination: bool = False, max_episode_steps: int | None = None,
        autoreset: str = "next_step", seed: int = 0, device: str | torch.device | None = None) -> dict:
    r"""Train an advantage actor-critic with GAE on a gymnasium environment with discrete actions.

    Synchronous n-step A2C (Mnih et al., 2016, without the asynchrony): ``num_envs`` environments are stepped in
    lockstep for ``steps`` steps (:class:`~rl4llm.envs.RolloutCollector`), GAE advantages and
    :math:`\lambda`-return targets are computed for all ``num_envs * steps`` transitions at once
    (:func:`rollout_advantages`), and one Adam step is taken on :func:`a2c_loss` with each network's gradient norm
    clipped to ``max_grad_norm``. Environments are never reset between updates: an episode may span several
    rollouts, and a rollout may hold several episodes per environment.

    All randomness comes from ``seed``: :func:`~rl4llm.device.seed_everything` (the networks' initialisation), a
    generator on ``device`` for the actions, and ``env.reset(seed=seed)``. On one machine, with the same number
    of threads, the same seed gives the same history.

    Args:
        env_id: gymnasium id (1-D ``Box`` observations, ``Discrete`` actions).
        num_envs: parallel environments ``N``.
        steps: rollout length ``T`` per update.
        updates: number of updates; the run takes ``updates * num_envs * steps`` vector-environment steps
            (reset steps of next-step autoreset are not counted as environment steps).
        gamma: discount in (0, 1].
        lam: GAE :math:`\lambda` in [0, 1].
        lr: Adam learning rate (actor and critic).
        value_coef: weight of the critic's loss.
        entropy_coef: weight of the entropy bonus.
        normalize_advantages: see :func:`a2c_loss`.
        max_grad_norm: gradient-norm clip of each network, > 0.
        hidden: hidden width(s) of both networks.
        truncation_as_termination: treat time-limit cuts as terminal states (the common mistake; for
            comparison only).
        max_episode_steps: optional time limit (``None``: the environment's own).
        autoreset: the vector environment's autoreset mode, see :func:`~rl4llm.envs.make_vector_env`; both give the same
            transitions, the default is faster for CartPole.
        seed: non-negative int.
        device: device for the networks and tensors; ``None``: :func:`~rl4llm.device.get_device`.

    Returns:
        dict with per-update lists ``"update"``, ``"env_steps"`` (cumulative at the end of the update),
        ``"policy_loss"``, ``"value_loss"``, ``"entropy"``; the list ``"episodes"`` of
        ``(env_steps, return, length)`` for every episode completed; and ``"policy"``, ``"value"``, the trained
        networks.
    """
    check.positive_int("num_envs", num_envs)
    check.positive_int("steps", steps)
    check.positive_int("updates", updates)
    gamma, lam = check_gamma(gamma), check_lam(lam)
    for name, v in (("lr", lr), ("max_grad_norm", max_grad_norm)):
        if isinstance(v, bool) or not isinstance(v, Real) or not (0 < v < math.inf):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    device = get_device(None if device is None else str(device))

    seed_everything(seed)
    env = make_vector_env(env_id, num_envs, autoreset=autoreset, max_episode_steps=max_episode_steps)
    try:
        obs_dim, n_actions, _ = check_env(env)
        policy = PolicyNet(obs_dim, n_actions, hidden).to(device)
        value = ValueNet(obs_dim, hidden, scale=1 / (1 - gamma) if gamma < 1 else 100.0).to(device)
        params = list(policy.parameters()) + list(value.parameters())
        optimizer = torch.optim.Adam(params, lr=float(lr))
        generator = torch.Generator(device=device).manual_seed(seed)
        collector = RolloutCollector(env, seed=seed)
        history: dict = {k: [] for k in ("update", "env_steps", "policy_loss", "value_loss", "entropy")}
        history["episodes"] = []
        env_steps = 0
        for u in range(updates):
            rollout, episodes = collector.collect(policy, steps, generator=generator)
            env_steps += int(rollout.mask.sum())
            history["episodes"] += [(env_steps, ret, length) for ret, length in episodes]
            values, adv, targets = rollout_advantages(rollout, value, gamma=gamma, lam=lam,
                                                      truncation_as_termination=truncation_as_termination)
            loss, stats = a2c_loss(policy, rollout, values, adv, targets, value_coef=value_coef,
                                   entropy_coef=entropy_coef, normalize_advantages=normalize_advantages)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Clip each network's gradient on its own: the critic's squared error is on the scale of the returns
            # squared, and one joint clip would shrink the actor's step whenever the critic's gradient is large.
            nn.utils.clip_grad_norm_(policy.parameters(), float(max_grad_norm))
            nn.utils.clip_grad_norm_(value.parameters(), float(max_grad_norm))
            optimizer.step()
            history["update"].append(u)
            history["env_steps"].append(env_steps)
            for k, x in stats.items():
                history[k].append(x)
    finally:
        env.close()
    history["policy"], history["value"] = policy, value
    return history
