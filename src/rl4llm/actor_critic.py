r"""Advantage actor-critic (A2C): synchronous n-step rollouts from vectorised environments, GAE advantages.

The actor is a policy :math:`\pi_\theta`, the critic a state-value estimate :math:`V_\phi`. Each update:

1. :class:`RolloutCollector` -- step ``N`` environments in lockstep for ``T`` steps with the current policy
   (``N x T`` transitions, several episodes per environment when they are short);
2. :func:`rollout_advantages` -- evaluate the critic on every observation and on every *next* observation, and
   compute GAE advantages and :math:`\lambda`-return targets with :func:`rl4llm.returns.gae`, bootstrapping
   from the critic wherever an episode is cut rather than finished (a time limit, or the end of the rollout);
3. :func:`a2c_loss` -- one gradient step on the policy-gradient loss, the critic's regression loss and an
   entropy bonus.

:func:`a2c` runs the whole loop on a gymnasium environment with discrete actions (CartPole-v1).

Episode ends. Gymnasium distinguishes ``terminated`` (a terminal state was reached: its value is 0) from
``truncated`` (a time limit cut the episode: the state it was cut at has a value like any other), and a vector
environment resets a finished sub-environment by itself, in one of two ways:

- next-step autoreset (gymnasium's default, and the only mode of its fast numpy CartPole): the observation
  returned with a done is the episode's final observation; the *next* step ignores its action and returns the
  first observation of the new episode with reward 0. That step belongs to no episode: it is masked out.
- same-step autoreset: the observation returned with a done is already the new episode's first one, and the
  final observation is in ``infos["final_obs"]``.

:class:`Rollout` records, for every step, the observation that really followed it (``next_obs``), so that a
truncated step bootstraps from the value of the observation it was cut at and never from the next episode's
first one, whatever the mode.

Tensors are time-last: per-step quantities of a rollout have shape ``[N, T]`` (environments, steps),
observations ``[N, T, obs_dim]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rl4llm.baselines import ValueNet
from rl4llm.device import get_device, seed_everything
from rl4llm.pg import PolicyNet
from rl4llm.returns import check_gamma, check_lam, gae

__all__ = [
    "Rollout",
    "RolloutCollector",
    "a2c",
    "a2c_loss",
    "make_vector_env",
    "rollout_advantages",
]


# ----------------------------------------------------------------------------------------------------------
# 1. Collecting a rollout
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """``T`` steps of ``N`` environments, time-last.

    Attributes:
        obs: ``[N, T, obs_dim]`` observation :math:`s_t` each action was taken in.
        actions: ``[N, T]`` int64 actions.
        rewards: ``[N, T]`` rewards.
        terminated: ``[N, T]`` bool, True where the episode reached a terminal state at step ``t``.
        truncated: ``[N, T]`` bool, True where a time limit cut the episode at step ``t`` (never together
            with ``terminated``).
        next_obs: ``[N, T, obs_dim]`` the observation after step ``t``: the episode's final observation where it
            ended at ``t``, else the observation step ``t + 1`` acts in (for the last step: the one the next
            rollout starts from).
        mask: ``[N, T]`` bool, False at the reset steps of next-step autoreset (they belong to no episode).
    """

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    terminated: Tensor
    truncated: Tensor
    next_obs: Tensor
    mask: Tensor

    @property
    def dones(self) -> Tensor:
        """``[N, T]`` bool, True where an episode ended (terminated or truncated)."""
        return self.terminated | self.truncated


AUTORESET_MODES = ("next_step", "same_step")


def make_vector_env(env_id: str = "CartPole-v1", num_envs: int = 8, *, autoreset: str = "next_step",
                    max_episode_steps: int | None = None) -> gym.vector.VectorEnv:
    """A gymnasium vector environment for :class:`RolloutCollector`.

    Args:
        env_id: gymnasium id with a 1-D ``Box`` observation space and ``Discrete`` actions.
        num_envs: number of sub-environments ``N >= 1``.
        autoreset: ``"next_step"``: ``gym.make_vec``'s default (for CartPole-v1 its numpy-vectorised
            implementation, which steps all sub-environments at once); ``"same_step"``: a synchronous vector
            environment (one Python call per sub-environment) with same-step autoreset.
        max_episode_steps: optional time limit (``None``: the environment's own; 500 for CartPole-v1).
    """
    if not isinstance(env_id, str):
        raise ValueError(f"env_id must be a gymnasium environment id (str), got {env_id!r}")
    _positive_int("num_envs", num_envs)
    if autoreset not in AUTORESET_MODES:
        raise ValueError(f"autoreset must be one of {AUTORESET_MODES}, got {autoreset!r}")
    kwargs = {}
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = _positive_int("max_episode_steps", max_episode_steps)
    if autoreset == "same_step":
        kwargs.update(vectorization_mode="sync",
                      vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    return gym.make_vec(env_id, num_envs=num_envs, **kwargs)


def _check_env(env) -> tuple[int, int, str]:
    """``(obs_dim, n_actions, autoreset mode)`` of a supported vector environment, or ``ValueError``."""
    if not isinstance(env, gym.vector.VectorEnv):
        raise ValueError(f"env must be a gymnasium VectorEnv, got {type(env).__name__}")
    modes = {gym.vector.AutoresetMode.NEXT_STEP: "next_step", gym.vector.AutoresetMode.SAME_STEP: "same_step"}
    mode = modes.get(env.metadata.get("autoreset_mode", gym.vector.AutoresetMode.NEXT_STEP))
    if mode is None:
        raise ValueError(f"env must use next-step or same-step autoreset, got {env.metadata['autoreset_mode']}")
    obs_space, act_space = env.single_observation_space, env.single_action_space
    if not isinstance(act_space, gym.spaces.Discrete) or act_space.start != 0:
        raise ValueError(f"env must have Discrete actions starting at 0, got {act_space}")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise ValueError(f"env must have a 1-D Box observation space, got {obs_space}")
    return int(obs_space.shape[0]), int(act_space.n), mode


class RolloutCollector:
    """Steps a vector environment with a policy, ``T`` steps at a time, and remembers where it is.

    Environments are reset once, here; after that the vector environment's autoreset starts every new episode,
    so an episode may span several rollouts and a rollout may hold several episodes per environment.

    Args:
        env: a gymnasium vector environment with a 1-D ``Box`` observation space, ``Discrete`` actions and
            next-step or same-step autoreset (:func:`make_vector_env`).
        seed: passed to the first ``env.reset``.

    Attributes:
        obs: ``[N, obs_dim]`` float32 array, the observations the next rollout starts from.
    """

    def __init__(self, env: gym.vector.VectorEnv, *, seed: int | None = None):
        self.obs_dim, self.n_actions, self.autoreset = _check_env(env)
        self.env = env
        obs, _ = env.reset(seed=seed)
        self.obs = np.array(obs, dtype=np.float32)
        n = env.num_envs
        self._return, self._length = np.zeros(n), np.zeros(n, dtype=np.int64)   # of each running episode
        self._resetting = np.zeros(n, dtype=bool)      # next-step autoreset: the coming step is a reset step

    def collect(self, policy: PolicyNet, steps: int, *, generator: torch.Generator | None = None
                ) -> tuple[Rollout, list[tuple[float, int]]]:
        """Step every sub-environment ``steps`` times with actions sampled from ``policy``.

        Args:
            policy: the policy; the rollout's tensors live on its device, in its dtype.
            steps: rollout length ``T >= 1``.
            generator: optional generator on the policy's device for the action samples.

        Returns:
            ``(rollout, episodes)``: the :class:`Rollout`, and ``(undiscounted return, length)`` of every episode
            that ended during it, counted from the episode's first step (which may lie in an earlier rollout).
        """
        if (self.obs_dim, self.n_actions) != (policy.obs_dim, policy.n_actions):
            raise ValueError(f"policy maps {policy.obs_dim} observations to {policy.n_actions} actions; "
                             f"env has {self.obs_dim} and {self.n_actions}")
        _positive_int("steps", steps)
        param = next(policy.parameters())
        device, dtype = param.device, param.dtype
        keys = ("obs", "actions", "rewards", "terminated", "truncated", "next_obs", "mask")
        rec: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        episodes: list[tuple[float, int]] = []
        obs = self.obs
        for _ in range(steps):
            with torch.no_grad():
                actions, _ = policy.act(torch.from_numpy(obs).to(device, dtype), generator)
            actions = actions.cpu().numpy()
            new_obs, reward, terminated, truncated, infos = self.env.step(actions)
            real = ~self._resetting                          # False: a next-step reset, no episode's step
            terminated = np.asarray(terminated, dtype=bool) & real
            truncated = np.asarray(truncated, dtype=bool) & ~terminated & real
            reward = np.where(real, reward, 0.0)
            done = terminated | truncated
            next_obs = np.array(new_obs, dtype=np.float32)   # a copy: vector envs may reuse their buffers
            if self.autoreset == "same_step":               # new_obs[i] already starts the next episode
                for i in np.flatnonzero(done):
                    if not infos.get("_final_obs", np.zeros(len(done), bool))[i]:
                        raise RuntimeError("an episode ended without its final observation in infos['final_obs']")
                    next_obs[i] = infos["final_obs"][i]
            else:
                self._resetting = done
            self._return += reward
            self._length += real
            episodes += [(float(self._return[i]), int(self._length[i])) for i in np.flatnonzero(done)]
            self._return[done], self._length[done] = 0.0, 0
            for k, x in zip(keys, (obs, actions, reward, terminated, truncated, next_obs, real), strict=True):
                rec[k].append(np.asarray(x))
            obs = np.array(new_obs, dtype=np.float32)
        self.obs = obs

        def stack(k, dt):
            return torch.from_numpy(np.stack(rec[k], axis=1)).to(device=device, dtype=dt)

        rollout = Rollout(obs=stack("obs", dtype), actions=stack("actions", torch.int64),
                          rewards=stack("rewards", dtype), terminated=stack("terminated", torch.bool),
                          truncated=stack("truncated", torch.bool), next_obs=stack("next_obs", dtype),
                          mask=stack("mask", torch.bool))
        return rollout, episodes


# ----------------------------------------------------------------------------------------------------------
# 2. Advantages and value targets
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
        rollout: the :class:`Rollout`.
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
# 3. The loss
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
        rollout: the :class:`Rollout` (``obs``, ``actions``).
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
# 4. The training loop
# ----------------------------------------------------------------------------------------------------------


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def a2c(env_id: str = "CartPole-v1", *, num_envs: int = 8, steps: int = 32, updates: int = 200,
        gamma: float = 0.99, lam: float = 0.95, lr: float = 2e-3, value_coef: float = 0.5,
        entropy_coef: float = 0.01, normalize_advantages: bool = False, max_grad_norm: float = 0.5,
        hidden: int | tuple[int, ...] = 64,
        truncation_as_termination: bool = False, max_episode_steps: int | None = None,
        autoreset: str = "next_step", seed: int = 0, device: str | torch.device | None = None) -> dict:
    r"""Train an advantage actor-critic with GAE on a gymnasium environment with discrete actions.

    Synchronous n-step A2C (Mnih et al., 2016, without the asynchrony): ``num_envs`` environments are stepped in
    lockstep for ``steps`` steps (:class:`RolloutCollector`), GAE advantages and :math:`\lambda`-return targets
    are computed for all ``num_envs * steps`` transitions at once (:func:`rollout_advantages`), and one Adam step
    is taken on :func:`a2c_loss` with each network's gradient norm clipped to ``max_grad_norm``. Environments are
    never reset between updates: an episode may span several rollouts, and a rollout may hold several episodes
    per environment.

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
        autoreset: the vector environment's autoreset mode, see :func:`make_vector_env`; both give the same
            transitions, the default is faster for CartPole.
        seed: non-negative int.
        device: device for the networks and tensors; ``None``: :func:`~rl4llm.device.get_device`.

    Returns:
        dict with per-update lists ``"update"``, ``"env_steps"`` (cumulative at the end of the update),
        ``"policy_loss"``, ``"value_loss"``, ``"entropy"``; the list ``"episodes"`` of
        ``(env_steps, return, length)`` for every episode completed; and ``"policy"``, ``"value"``, the trained
        networks.
    """
    _positive_int("num_envs", num_envs)
    _positive_int("steps", steps)
    _positive_int("updates", updates)
    gamma, lam = check_gamma(gamma), check_lam(lam)
    for name, v in (("lr", lr), ("max_grad_norm", max_grad_norm)):
        if isinstance(v, bool) or not isinstance(v, Real) or not (0 < v < math.inf):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    device = get_device(None if device is None else str(device))

    seed_everything(seed)
    env = make_vector_env(env_id, num_envs, autoreset=autoreset, max_episode_steps=max_episode_steps)
    try:
        obs_dim, n_actions, _ = _check_env(env)
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
