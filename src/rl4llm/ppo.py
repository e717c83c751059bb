r"""Proximal policy optimisation on a gymnasium environment: the KL-penalty variant and the training loop.

Chapter 8 derives PPO's clipped surrogate; its pure losses (:func:`~rl4llm.surrogate.clipped_objective`,
:func:`~rl4llm.surrogate.policy_loss`, :func:`~rl4llm.surrogate.value_loss`, :func:`~rl4llm.surrogate.masked_mean`,
:func:`~rl4llm.surrogate.normalize_advantages`) live in :mod:`rl4llm.surrogate`, because chapters 11 and 13 reuse
them on language models. This module holds what only PPO on CartPole needs, read top to bottom:

1. :func:`adaptive_kl_coef`, :func:`kl_penalty_loss` -- the KL-penalty variant of PPO and its adaptive
   coefficient (the exact per-state KL is :func:`rl4llm.kl.categorical_kl`);
2. :func:`ppo` -- the training loop on a gymnasium environment (CartPole in chapter 8), built on the rollouts of
   :class:`rl4llm.envs.RolloutCollector` and the GAE advantages of :func:`rl4llm.actor_critic.rollout_advantages`.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
import torch
from torch import Tensor

from rl4llm import _validate as check
from rl4llm.actor_critic import rollout_advantages
from rl4llm.device import get_device, seed_everything
from rl4llm.envs import RolloutCollector, check_env, evaluate, make_vector_env
from rl4llm.kl import categorical_kl
from rl4llm.nets import PolicyNet, ValueNet
from rl4llm.returns import check_gamma
from rl4llm.surrogate import masked_mean, normalize_advantages, policy_loss, value_loss

__all__ = [
    "OBJECTIVES",
    "adaptive_kl_coef",
    "kl_penalty_loss",
    "ppo",
]


# ----------------------------------------------------------------------------------------------------------
# The KL-penalty variant and its adaptive coefficient
# ----------------------------------------------------------------------------------------------------------


def adaptive_kl_coef(beta: float, kl: float, kl_target: float, *, tolerance: float = 1.5,
                     factor: float = 2.0) -> float:
    r"""The adaptive rule for the coefficient :math:`\beta` of PPO's KL-penalty objective.

    After an update whose measured divergence :math:`d = \mathrm{KL}(\pi_\mathrm{old} \,\|\, \pi_\theta)` is
    known (averaged over the batch's states): if :math:`d < d_\mathrm{targ} / \mathrm{tolerance}` the penalty
    was too strong and :math:`\beta` is divided by ``factor``; if :math:`d > d_\mathrm{targ} \cdot
    \mathrm{tolerance}` it was too weak and :math:`\beta` is multiplied by ``factor``; otherwise it is kept.
    The PPO paper uses ``tolerance = 1.5`` and ``factor = 2``.

    Args:
        beta: current coefficient, > 0.
        kl: the measured KL of the last update, >= 0.
        kl_target: the target :math:`d_\mathrm{targ}`, > 0.
        tolerance: > 1.
        factor: > 1.

    Returns:
        The coefficient for the next update, a Python float.
    """
    values = {"beta": beta, "kl": kl, "kl_target": kl_target, "tolerance": tolerance, "factor": factor}
    for name, v in values.items():
        if isinstance(v, Tensor):
            if v.numel() != 1:
                raise ValueError(f"{name} must be a scalar, got a tensor of shape {list(v.shape)}")
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite real number, got {v!r}")
        values[name] = float(v)
    if values["beta"] <= 0 or values["kl_target"] <= 0:
        raise ValueError(f"beta and kl_target must be > 0, got {values['beta']} and {values['kl_target']}")
    if values["kl"] < 0:
        raise ValueError(f"kl must be >= 0 (a divergence), got {values['kl']}")
    if values["tolerance"] <= 1 or values["factor"] <= 1:
        raise ValueError(f"tolerance and factor must be > 1, got {values['tolerance']} and {values['factor']}")
    beta, kl, target, tol, fac = (values[k] for k in ("beta", "kl", "kl_target", "tolerance", "factor"))
    if kl < target / tol:
        return beta / fac
    if kl > target * tol:
        return beta * fac
    return beta


def kl_penalty_loss(logp: Tensor, logp_old: Tensor, advantages: Tensor, kl: Tensor, *, beta: float,
                    mask: Tensor | None = None) -> Tensor:
    r"""PPO's KL-penalty loss, :math:`-\mathrm{mean}\bigl(\rho \hat A - \beta\, \mathrm{KL}\bigr)`.

    The unclipped surrogate :math:`\rho \hat A` with :math:`\rho = \exp(\log\pi_\theta - \log\pi_\mathrm{old})`,
    penalised by :math:`\beta` times a per-sample divergence, usually the exact
    :math:`\mathrm{KL}(\pi_\mathrm{old}(\cdot \mid s) \,\|\, \pi_\theta(\cdot \mid s))` of the sample's state
    (or an estimate of it). :func:`adaptive_kl_coef` adapts :math:`\beta` between updates.

    Args:
        logp: ``[...]`` log-probabilities of the sampled actions under the current policy (with grad).
        logp_old: ``[...]`` the same under the sampling policy (constant).
        advantages: ``[...]`` advantage estimates (constant).
        kl: ``[...]`` per-sample divergence (with grad).
        beta: penalty coefficient, >= 0.
        mask: optional 0/1 tensor of ``logp``'s shape.

    Returns:
        Scalar loss (float32, or float64 for float64 inputs).
    """
    for name, x in (("logp", logp), ("logp_old", logp_old), ("advantages", advantages), ("kl", kl)):
        check.floating(x, name)
    for name, x in (("logp_old", logp_old), ("advantages", advantages), ("kl", kl)):
        check.same(x, logp, name, "logp")
    beta = check.nonneg_real(beta, "beta")
    mask = check.mask_or_none(mask, logp, "logp")
    if mask is not None:
        logp, logp_old, advantages, kl = (torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
                                          for x in (logp, logp_old, advantages, kl))
    acc = check.accumulation_dtype(logp, logp_old, advantages, kl)
    ratio = torch.exp(logp.to(acc) - logp_old.detach().to(acc))
    return -masked_mean(ratio * advantages.detach().to(acc) - beta * kl.to(acc), mask)


# ----------------------------------------------------------------------------------------------------------
# PPO on a gymnasium environment
# ----------------------------------------------------------------------------------------------------------

OBJECTIVES = ("clip", "kl_penalty")
"""The policy objectives :func:`ppo` accepts."""


def _positive_real(name: str, value, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def ppo(env_id: str = "CartPole-v1", *, num_envs: int = 8, num_steps: int = 128, total_steps: int = 150_000,
        lr: float = 2.5e-3, anneal_lr: bool = True, epochs: int = 4, minibatches: int = 4, gamma: float = 0.99,
        lam: float = 0.95, objective: str = "clip", clip_eps: float = 0.2, kl_target: float = 0.01,
        kl_beta: float = 1.0, value_coef: float = 0.5, value_clip: float | None = None,
        entropy_coef: float = 0.01, max_grad_norm: float | None = 0.5, normalize_adv: bool = True,
        hidden: int | tuple[int, ...] = 64, seed: int = 0, device: str | torch.device | None = None,
        target_return: float | None = None, eval_trigger: float | None = None, eval_episodes: int = 20,
        eval_seed: int = 10_000, eval_greedy: bool = False, log_every: int | None = None) -> dict:
    r"""Train a :class:`~rl4llm.nets.PolicyNet` and a :class:`~rl4llm.nets.ValueNet` with PPO.

    Each iteration collects ``num_steps`` steps from each of ``num_envs`` sub-environments
    (:class:`rl4llm.envs.RolloutCollector`; the reset steps of next-step autoreset are masked out),
    computes GAE advantages and :math:`\lambda`-return targets with the value network that collected them
    (:func:`rl4llm.actor_critic.rollout_advantages`: a time-limit truncation bootstraps from the value of the
    final observation, a termination does not), then runs ``epochs`` passes over the real steps in
    ``minibatches`` random minibatches. On each minibatch it takes one Adam step on

    .. math:: \mathcal L = \mathcal L^\mathrm{policy} + c_V\, \mathcal L^\mathrm{value}
       - c_H\, \mathbb E[\mathcal H(\pi_\theta(\cdot \mid s))],

    where :math:`\mathcal L^\mathrm{policy}` is :func:`~rl4llm.surrogate.policy_loss` (``objective="clip"``) or
    :func:`kl_penalty_loss` with the exact per-state KL (``objective="kl_penalty"``, with :math:`\beta`
    adapted after every iteration by :func:`adaptive_kl_coef`), the advantages of the minibatch are normalised
    (:func:`~rl4llm.surrogate.normalize_advantages`) if ``normalize_adv``, and :math:`\mathcal L^\mathrm{value}` is
    :func:`~rl4llm.surrogate.value_loss` (clipped if ``value_clip`` is given). The gradient norm of each network
    is clipped to ``max_grad_norm``; the learning rate decays linearly to 0 over the run if ``anneal_lr``.

    If ``target_return`` is given, the policy is evaluated (:func:`rl4llm.envs.evaluate`, ``eval_episodes``
    episodes seeded with ``eval_seed``) after every iteration in which the training episodes that ended
    averaged at least ``eval_trigger`` (default: ``target_return``), and training stops as soon as an
    evaluation reaches ``target_return``.

    Args:
        env_id: gymnasium id with a 1-D Box observation space and Discrete actions.
        num_envs: parallel environments.
        num_steps: steps per environment and iteration.
        total_steps: environment-step budget; the run has ``total_steps // (num_envs * num_steps)`` iterations.
        lr: Adam learning rate (both networks).
        anneal_lr: decay the learning rate linearly to 0.
        epochs: passes over each batch.
        minibatches: minibatches per pass.
        gamma: discount in (0, 1].
        lam: GAE :math:`\lambda` in [0, 1].
        objective: one of :data:`OBJECTIVES`.
        clip_eps: the clip range :math:`\epsilon` (``objective="clip"``).
        kl_target: :math:`d_\mathrm{targ}` (``objective="kl_penalty"``).
        kl_beta: initial :math:`\beta` (``objective="kl_penalty"``).
        value_coef: :math:`c_V`.
        value_clip: clip range of the value change, or ``None`` for the plain squared error.
        entropy_coef: :math:`c_H`.
        max_grad_norm: gradient-norm clip per network, or ``None``.
        normalize_adv: normalise the advantages per minibatch.
        hidden: hidden width(s) of both networks (tanh MLPs).
        seed: non-negative int; seeds the networks, the minibatch order, the action samples and the
            environments.
        device: device for the networks; ``None``: :func:`~rl4llm.device.get_device`.
        target_return: stop once an evaluation reaches this mean return (``None``: never stop early).
        eval_trigger: training-episode mean return from which evaluations are run (``None``: ``target_return``).
        eval_episodes: episodes per evaluation.
        eval_seed: seed of the evaluation episodes.
        eval_greedy: evaluate the greedy (argmax) policy instead of sampling from it.
        log_every: print a progress line every this many iterations.

    Returns:
        A dict of per-iteration lists: ``"iteration"``, ``"env_steps"`` (cumulative), ``"mean_return"``
        (of the training episodes that ended in the iteration, NaN if none did), ``"kl_exact"`` (mean over the
        batch's states of :math:`\mathrm{KL}(\pi_\mathrm{old} \,\|\, \pi_\theta)` after the update),
        ``"approx_kl_k1"``, ``"approx_kl_k3"`` (its k1 and k3 estimates from the sampled actions),
        ``"clip_fraction"`` (share of samples whose gradient the clip zeroes after the update, advantages
        normalised over the batch), ``"entropy"``, ``"value_loss"``, ``"beta"`` (the penalty coefficient used,
        NaN for ``"clip"``); ``"evaluations"``, a list of ``(env_steps, mean_return)``; ``"solved_at"``, the
        env steps at the first evaluation that reached ``target_return`` (else ``None``); and the trained
        ``"policy"`` and ``"value"``.
    """
    if not isinstance(env_id, str):
        raise ValueError(f"env_id must be a gymnasium environment id (str), got {env_id!r}")
    for name, v in (("num_envs", num_envs), ("num_steps", num_steps), ("total_steps", total_steps),
                    ("epochs", epochs), ("minibatches", minibatches), ("eval_episodes", eval_episodes)):
        check.positive_int(name, v)
    iterations = total_steps // (num_envs * num_steps)
    if iterations < 1:
        raise ValueError(f"total_steps ({total_steps}) must be at least num_envs * num_steps "
                         f"({num_envs * num_steps})")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    lr = _positive_real("lr", lr)
    gamma = check_gamma(gamma)
    if isinstance(lam, bool) or not isinstance(lam, Real) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam (the GAE lambda) must be a real number in [0, 1], got {lam!r}")
    clip_eps, kl_target, beta = (_positive_real("clip_eps", clip_eps), _positive_real("kl_target", kl_target),
                                 _positive_real("kl_beta", kl_beta))
    value_coef = _positive_real("value_coef", value_coef, allow_zero=True)
    entropy_coef = _positive_real("entropy_coef", entropy_coef, allow_zero=True)
    if value_clip is not None:
        value_clip = _positive_real("value_clip", value_clip)
    if max_grad_norm is not None:
        max_grad_norm = _positive_real("max_grad_norm", max_grad_norm)
    if target_return is not None and (isinstance(target_return, bool) or not isinstance(target_return, Real)
                                      or not math.isfinite(target_return)):
        raise ValueError(f"target_return must be None or a finite number, got {target_return!r}")
    if eval_trigger is None:
        eval_trigger = target_return
    elif isinstance(eval_trigger, bool) or not isinstance(eval_trigger, Real) or not math.isfinite(eval_trigger):
        raise ValueError(f"eval_trigger must be None or a finite number, got {eval_trigger!r}")
    for name, v in (("seed", seed), ("eval_seed", eval_seed)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if log_every is not None:
        check.positive_int("log_every", log_every)
    device = get_device(None if device is None else str(device))

    seed_everything(seed)
    env = make_vector_env(env_id, num_envs)
    try:
        obs_dim, n_actions, _ = check_env(env)
        policy = PolicyNet(obs_dim, n_actions, hidden).to(device)
        value = ValueNet(obs_dim, hidden).to(device)
        params = [*policy.parameters(), *value.parameters()]
        optimizer = torch.optim.Adam(params, lr=lr, eps=1e-5)
        generator = torch.Generator(device=device).manual_seed(seed)
        collector = RolloutCollector(env, seed=seed)
        keys = ("iteration", "env_steps", "mean_return", "kl_exact", "approx_kl_k1", "approx_kl_k3",
                "clip_fraction", "entropy", "value_loss", "beta")
        history: dict = {k: [] for k in keys}
        history.update(evaluations=[], solved_at=None)
        for it in range(iterations):
            if anneal_lr:
                for group in optimizer.param_groups:
                    group["lr"] = lr * (1.0 - it / iterations)
            ro, episodes = collector.collect(policy, num_steps, generator=generator)
            with torch.no_grad():
                val, adv, ret = rollout_advantages(ro, value, gamma=gamma, lam=lam)
            m = ro.mask
            obs, actions, adv, ret, val = ro.obs[m], ro.actions[m], adv[m], ret[m], val[m]
            with torch.no_grad():
                logits_old = policy(obs)
                logp_old = torch.log_softmax(logits_old, -1).gather(-1, actions[:, None]).squeeze(-1)
            n = obs.shape[0]
            value_losses = []
            for _ in range(epochs):
                perm = torch.randperm(n, generator=generator, device=device)
                for idx in perm.tensor_split(minibatches):
                    if idx.numel() == 0:
                        continue
                    logits = policy(obs[idx])
                    log_pi = torch.log_softmax(logits, -1)
                    logp = log_pi.gather(-1, actions[idx, None]).squeeze(-1)
                    a = normalize_advantages(adv[idx]) if normalize_adv else adv[idx]
                    if objective == "clip":
                        pl, _ = policy_loss(logp, logp_old[idx], a, clip_eps=clip_eps)
                    else:
                        kl = categorical_kl(torch.log_softmax(logits_old[idx], -1), torch.log_softmax(logits, -1))
                        pl = kl_penalty_loss(logp, logp_old[idx], a, kl, beta=beta)
                    entropy = -(log_pi.exp() * log_pi).sum(-1).mean()
                    v = value(obs[idx])
                    if value_clip is None:
                        vl = value_loss(v, ret[idx])
                    else:
                        vl = value_loss(v, ret[idx], old_values=val[idx], clip_eps=value_clip)
                    loss = pl + value_coef * vl - entropy_coef * entropy
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
                        torch.nn.utils.clip_grad_norm_(value.parameters(), max_grad_norm)
                    optimizer.step()
                    value_losses.append(vl.item())

            with torch.no_grad():
                logits_new = policy(obs)
                logp_new = torch.log_softmax(logits_new, -1).gather(-1, actions[:, None]).squeeze(-1)
                _, stats = policy_loss(logp_new, logp_old, normalize_advantages(adv), clip_eps=clip_eps)
                kl_exact = categorical_kl(torch.log_softmax(logits_old, -1),
                                          torch.log_softmax(logits_new, -1)).mean().item()
                log_pi_new = torch.log_softmax(logits_new, -1)
                entropy_new = -(log_pi_new.exp() * log_pi_new).sum(-1).mean().item()
            history["beta"].append(beta if objective == "kl_penalty" else math.nan)
            if objective == "kl_penalty":
                beta = adaptive_kl_coef(beta, max(kl_exact, 0.0), kl_target)
            env_steps = (it + 1) * num_envs * num_steps
            mean_return = float(np.mean([r for r, _ in episodes])) if episodes else math.nan
            history["iteration"].append(it)
            history["env_steps"].append(env_steps)
            history["mean_return"].append(mean_return)
            history["kl_exact"].append(kl_exact)
            history["approx_kl_k1"].append(stats.approx_kl_k1)
            history["approx_kl_k3"].append(stats.approx_kl_k3)
            history["clip_fraction"].append(stats.clip_fraction)
            history["entropy"].append(entropy_new)
            history["value_loss"].append(float(np.mean(value_losses)))
            if log_every is not None and (it % log_every == 0 or it == iterations - 1):
                print(f"iteration {it:4d}  env steps {env_steps:7d}  mean return {mean_return:6.1f}  "
                      f"kl {kl_exact:.4f}  clip fraction {stats.clip_fraction:.3f}")
            if target_return is not None and mean_return >= eval_trigger:
                score = evaluate(policy, env_id, eval_episodes, eval_seed, greedy=eval_greedy)
                history["evaluations"].append((env_steps, score))
                if score >= target_return:
                    history["solved_at"] = env_steps
                    break
    finally:
        env.close()
    history["policy"], history["value"] = policy, value
    return history
