r"""Environments shared by the chapters (tier 1): vector envs, the env check, episodes, rollouts, a replay buffer.

- :func:`make_vector_env`, :func:`check_env` -- build a gymnasium vector environment, and the one check of its
  spaces and autoreset mode every collector runs (1-D ``Box`` observations, ``Discrete`` actions from 0);
- :class:`Episodes`, :func:`collect_episodes`, :func:`evaluate` -- one complete episode per sub-environment, the
  Monte Carlo data of REINFORCE (chapter 5, §5.4) and its evaluation;
- :func:`make_env`, :func:`evaluate_q` -- one environment for a loop with explicit resets, and the greedy
  evaluation of an action-value network (DQN, chapter 4);
- :class:`Rollout`, :class:`RolloutCollector` -- ``T`` steps of ``N`` environments in lockstep, episodes spanning
  rollouts, the on-policy data of actor-critic and PPO (chapter 7, §7.4; chapter 8);
- :class:`ReplayBuffer` -- a ring buffer of transitions sampled uniformly, the off-policy data of value-based
  methods and of soft actor-critic.

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
first one, whatever the mode. :class:`ReplayBuffer` stores the same ``next_obs`` and only ``terminated``: a
truncated transition is an ordinary one whose target bootstraps.

Tensors are time-last: per-step quantities of a rollout have shape ``[N, T]`` (environments, steps),
observations ``[N, T, obs_dim]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from rl4llm import _validate as check
from rl4llm.nets import PolicyNet

__all__ = [
    "AUTORESET_MODES",
    "Episodes",
    "ReplayBuffer",
    "Rollout",
    "RolloutCollector",
    "Transitions",
    "check_env",
    "collect_episodes",
    "evaluate",
    "evaluate_q",
    "make_box_env",
    "make_env",
    "make_vector_env",
]


# ----------------------------------------------------------------------------------------------------------
# 1. Vector environments and the one env check
# ----------------------------------------------------------------------------------------------------------


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
    check.positive_int("num_envs", num_envs)
    if autoreset not in AUTORESET_MODES:
        raise ValueError(f"autoreset must be one of {AUTORESET_MODES}, got {autoreset!r}")
    kwargs = {}
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = check.positive_int("max_episode_steps", max_episode_steps)
    if autoreset == "same_step":
        kwargs.update(vectorization_mode="sync",
                      vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    return gym.make_vec(env_id, num_envs=num_envs, **kwargs)


def check_env(env) -> tuple[int, int, str]:
    """``(obs_dim, n_actions, autoreset mode)`` of a supported vector environment, or ``ValueError``.

    Supported: a gymnasium ``VectorEnv`` with a 1-D ``Box`` observation space, ``Discrete`` actions starting at
    0, and next-step or same-step autoreset (``"next_step"`` / ``"same_step"``).
    """
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


# ----------------------------------------------------------------------------------------------------------
# 2. Complete episodes (Monte Carlo), and evaluation
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Episodes:
    """One complete episode per row, aligned at its first step and padded after its end.

    Attributes:
        obs: ``[B, T, obs_dim]`` observation :math:`s_t` before each action.
        actions: ``[B, T]`` int64 actions :math:`a_t`.
        rewards: ``[B, T]`` rewards :math:`r_t`; 0 at padding steps.
        mask: ``[B, T]`` bool, True at the episode's real steps (a prefix of each row).
        dones: ``[B, T]`` bool, True exactly at each episode's last step.
        terminated: ``[B]`` bool: True if the episode ended in a terminal state, False if the time limit
            truncated it.
    """

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    mask: Tensor
    dones: Tensor
    terminated: Tensor

    @property
    def lengths(self) -> Tensor:
        """``[B]`` int64 episode lengths."""
        return self.mask.sum(-1)

    @property
    def returns(self) -> Tensor:
        """``[B]`` undiscounted episode returns."""
        return self.rewards.sum(-1)


def collect_episodes(env: gym.vector.VectorEnv, policy: PolicyNet, *,
                     generator: torch.Generator | None = None, seed: int | None = None, greedy: bool = False,
                     max_steps: int = 100_000) -> Episodes:
    """Reset every sub-environment and run each until its first episode ends: ``B = env.num_envs`` episodes.

    Each sub-environment contributes exactly one complete episode, so the rows are independent samples of
    whole trajectories, which is what the Monte Carlo estimator needs (keeping only the episodes that finish
    within a fixed step budget would favour short ones). An episode ends when the environment reports
    ``terminated`` (a terminal state) or ``truncated`` (a time limit: 500 steps in CartPole-v1). Both are
    treated alike: the objective is the return over the time-limited episode, so nothing is bootstrapped.

    Once its episode has ended a sub-environment keeps being stepped (the others are still running), but
    nothing it returns is recorded: with gymnasium's default next-step autoreset, the step after a done
    returns a reset observation and a reward that belong to no action of the episode. The rows are padded
    there (reward 0, mask False), so the result does not depend on the autoreset mode.

    Args:
        env: a gymnasium vector environment with a 1-D ``Box`` observation space and ``Discrete`` actions.
        policy: the policy; the returned tensors live on its device.
        generator: optional generator on the policy's device for the action samples.
        seed: passed to ``env.reset`` (``None``: continue the environments' random streams).
        greedy: take argmax actions instead of sampling.
        max_steps: raise ``RuntimeError`` if some episode has not ended after this many steps.

    Returns:
        :class:`Episodes` with ``T`` the length of the longest episode.
    """
    obs_dim, n_actions, _ = check_env(env)
    if (obs_dim, n_actions) != (policy.obs_dim, policy.n_actions):
        raise ValueError(
            f"policy maps {policy.obs_dim} observations to {policy.n_actions} actions; "
            f"env has {obs_dim} and {n_actions}"
        )
    param = next(policy.parameters())
    device, dtype = param.device, param.dtype

    obs, _ = env.reset(seed=seed)
    running = np.ones(env.num_envs, dtype=bool)        # sub-environments whose first episode goes on
    ended_terminal = np.zeros(env.num_envs, dtype=bool)
    record: dict[str, list[np.ndarray]] = {"obs": [], "actions": [], "rewards": [], "mask": [], "dones": []}
    for _ in range(max_steps):
        obs = np.array(obs)                             # a copy: some vector envs reuse their buffers
        with torch.no_grad():
            actions, _ = policy.act(torch.from_numpy(obs).to(device, dtype), generator, greedy=greedy)
        actions = actions.cpu().numpy()
        next_obs, reward, terminated, truncated, _ = env.step(actions)
        done = np.logical_or(terminated, truncated) & running
        record["obs"].append(obs)
        record["actions"].append(actions)
        record["rewards"].append(np.where(running, reward, 0.0))
        record["mask"].append(running.copy())
        record["dones"].append(done)
        ended_terminal |= np.asarray(terminated, dtype=bool) & running
        running &= ~done
        obs = next_obs
        if not running.any():
            break
    else:
        raise RuntimeError(f"{int(running.sum())} of {env.num_envs} episodes did not end within "
                           f"max_steps={max_steps}")

    def stacked(key: str, as_dtype: torch.dtype) -> Tensor:     # time-last: [B, T, ...]
        return torch.from_numpy(np.stack(record[key], axis=1)).to(device=device, dtype=as_dtype)

    return Episodes(
        obs=stacked("obs", dtype),
        actions=stacked("actions", torch.int64),
        rewards=stacked("rewards", dtype),
        mask=stacked("mask", torch.bool),
        dones=stacked("dones", torch.bool),
        terminated=torch.from_numpy(ended_terminal).to(device),
    )


def evaluate(policy: PolicyNet, env_id: str = "CartPole-v1", episodes: int = 20, seed: int = 0, *,
             greedy: bool = False) -> float:
    """Mean undiscounted return of ``policy`` over ``episodes`` complete episodes (no update).

    Args:
        policy: the policy to run, on any device.
        env_id: gymnasium id (see :func:`make_vector_env`).
        episodes: number of episodes, run in parallel (one per sub-environment).
        seed: seeds both the environments and the action sampling.
        greedy: take argmax actions instead of sampling.

    Returns:
        The mean return, a Python float.
    """
    if not isinstance(policy, PolicyNet):
        raise ValueError(f"policy must be a PolicyNet, got {type(policy).__name__}")
    check.positive_int("episodes", episodes)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    device = next(policy.parameters()).device
    env = make_vector_env(env_id, episodes)
    try:
        generator = torch.Generator(device=device).manual_seed(seed)
        batch = collect_episodes(env, policy, generator=generator, seed=seed, greedy=greedy)
    finally:
        env.close()
    return batch.returns.mean().item()


def make_env(env_id: str = "CartPole-v1", *, max_episode_steps: int | None = None) -> gym.Env:
    """One gymnasium environment (no vector wrapper, no autoreset), for loops that reset explicitly (DQN).

    Its spaces are checked as :func:`check_env` checks a vector env's: a 1-D ``Box`` observation space and
    ``Discrete`` actions from 0.
    """
    if not isinstance(env_id, str):
        raise ValueError(f"env_id must be a gymnasium environment id (str), got {env_id!r}")
    kwargs = {}
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = check.positive_int("max_episode_steps", max_episode_steps)
    env = gym.make(env_id, **kwargs)
    obs_space, act_space = env.observation_space, env.action_space
    if not isinstance(act_space, gym.spaces.Discrete) or act_space.start != 0:
        env.close()
        raise ValueError(f"env must have Discrete actions starting at 0, got {act_space}")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        env.close()
        raise ValueError(f"env must have a 1-D Box observation space, got {obs_space}")
    return env


def make_box_env(env_id: str = "Pendulum-v1", *, max_episode_steps: int | None = None) -> gym.Env:
    """One gymnasium environment with continuous actions (no vector wrapper, no autoreset), for SAC (chapter 10).

    The counterpart of :func:`make_env` for a 1-D ``Box`` action space with finite, symmetric bounds
    ``[-c, c]`` (the same ``c`` in every coordinate, so that ``a = c tanh(u)`` covers it); observations must be a
    1-D ``Box``.
    """
    if not isinstance(env_id, str):
        raise ValueError(f"env_id must be a gymnasium environment id (str), got {env_id!r}")
    kwargs = {}
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = check.positive_int("max_episode_steps", max_episode_steps)
    env = gym.make(env_id, **kwargs)
    obs_space, act_space = env.observation_space, env.action_space
    ok = (isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1
          and np.all(np.isfinite(act_space.high)) and np.allclose(act_space.low, -act_space.high)
          and np.allclose(act_space.high, act_space.high.flat[0]) and act_space.high.flat[0] > 0)
    if not ok:
        env.close()
        raise ValueError(f"env must have a 1-D Box action space with bounds [-c, c], c > 0, got {act_space}")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        env.close()
        raise ValueError(f"env must have a 1-D Box observation space, got {obs_space}")
    return env


@torch.no_grad()
def evaluate_q(q: torch.nn.Module, env_id: str = "CartPole-v1", episodes: int = 20, seed: int = 0) -> float:
    """Mean undiscounted return of the greedy policy ``argmax_a q(s)[a]`` over ``episodes`` complete episodes.

    ``q`` maps float32 observations ``[N, obs_dim]`` to action values ``[N, n_actions]`` (a
    :class:`rl4llm.nets.QNet`). The episodes run side by side, sub-environment ``i`` seeded with ``seed + i``;
    each counts up to its first end (termination or truncation).
    """
    if not isinstance(q, torch.nn.Module):
        raise ValueError(f"q must be a torch.nn.Module, got {type(q).__name__}")
    check.positive_int("episodes", episodes)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    env = make_vector_env(env_id, episodes)
    try:
        check_env(env)
        obs, _ = env.reset(seed=seed)
        total = np.zeros(episodes)
        running = np.ones(episodes, dtype=bool)
        while running.any():
            actions = q(torch.as_tensor(obs, dtype=torch.float32)).argmax(dim=-1).cpu().numpy()
            obs, r, term, trunc, _ = env.step(actions)
            total += r * running
            running &= ~(term | trunc)
    finally:
        env.close()
    return float(total.mean())


# ----------------------------------------------------------------------------------------------------------
# 3. Rollouts of fixed length (on-policy)
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
        self.obs_dim, self.n_actions, self.autoreset = check_env(env)
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
        check.positive_int("steps", steps)
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
# 4. A replay buffer (off-policy)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Transitions:
    """A batch of ``B`` transitions :math:`(s, a, r, s', \\text{terminated})`.

    Attributes:
        obs: ``[B, obs_dim]`` observations :math:`s`.
        actions: ``[B, *action_shape]`` actions :math:`a`.
        rewards: ``[B]`` rewards :math:`r`.
        next_obs: ``[B, obs_dim]`` the observation that followed :math:`a` (the episode's final observation where
            it ended), never the next episode's first one.
        terminated: ``[B]`` bool, True where :math:`s'` is terminal (its value is 0). A time-limit truncation is
            *not* terminal: its target bootstraps from :math:`s'` like any other step.
    """

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    next_obs: Tensor
    terminated: Tensor


class ReplayBuffer:
    """A ring buffer of the last ``capacity`` transitions, sampled uniformly with replacement.

    Storage is preallocated torch tensors on ``device``; :meth:`add` writes a batch of transitions (one per
    sub-environment of a vector env, or one) and overwrites the oldest once the buffer is full. Only
    ``terminated`` is stored, never ``truncated``: a transition cut by a time limit is stored with the observation
    it was cut at as ``next_obs`` and ``terminated=False``, so its target bootstraps from it.

    Args:
        capacity: maximum number of transitions, ``>= 1``.
        obs_dim: size of an observation vector.
        action_shape: shape of one action (``()`` for discrete actions, ``(act_dim,)`` for continuous ones).
        action_dtype: dtype of the stored actions (``torch.int64`` for discrete, a float dtype for continuous).
        dtype: dtype of observations and rewards.
        device: where the storage lives (``None``: the CPU).
    """

    def __init__(self, capacity: int, obs_dim: int, *, action_shape: tuple[int, ...] = (),
                 action_dtype: torch.dtype = torch.int64, dtype: torch.dtype = torch.float32,
                 device: str | torch.device | None = None):
        check.positive_int("capacity", capacity)
        check.positive_int("obs_dim", obs_dim)
        if not isinstance(action_shape, tuple) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1
                                                          for d in action_shape):
            raise ValueError(f"action_shape must be a tuple of positive ints, got {action_shape!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        if not isinstance(action_dtype, torch.dtype) or action_dtype == torch.bool or action_dtype.is_complex:
            raise ValueError(f"action_dtype must be an integer or floating-point torch.dtype, got {action_dtype!r}")
        self.capacity, self.obs_dim, self.action_shape = capacity, obs_dim, action_shape
        self.device = torch.device("cpu" if device is None else device)
        self.obs = torch.zeros(capacity, obs_dim, dtype=dtype, device=self.device)
        self.next_obs = torch.zeros(capacity, obs_dim, dtype=dtype, device=self.device)
        self.actions = torch.zeros(capacity, *action_shape, dtype=action_dtype, device=self.device)
        self.rewards = torch.zeros(capacity, dtype=dtype, device=self.device)
        self.terminated = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        self._next = 0          # the slot the next transition is written to
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def _as_tensor(self, x, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
        if dtype.is_floating_point:
            if t.dtype == torch.bool or t.is_complex():
                raise ValueError(f"{name} must be real numbers, got dtype {t.dtype}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contain NaN or infinite values")
        elif dtype == torch.bool:
            if t.dtype != torch.bool and not bool(((t == 0) | (t == 1)).all()):
                raise ValueError(f"{name} must be bool, or numeric with values in {{0, 1}}")
            t = t != 0
        elif t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer array, got dtype {t.dtype}")
        return t.to(device=self.device, dtype=dtype)

    def add(self, obs, actions, rewards, next_obs, terminated) -> None:
        """Store a batch of ``N`` transitions (numpy arrays or tensors, e.g. straight from ``env.step``).

        Args:
            obs: ``[N, obs_dim]`` observations the actions were taken in.
            actions: ``[N, *action_shape]`` actions.
            rewards: ``[N]`` finite rewards.
            next_obs: ``[N, obs_dim]`` the observations that followed: at an episode end (terminated *or*
                truncated) the episode's final observation, not the reset one.
            terminated: ``[N]`` bool (or 0/1), True only at terminal states; never pass ``truncated`` here.
        """
        r = torch.as_tensor(np.asarray(rewards) if not isinstance(rewards, Tensor) else rewards)
        if r.dim() != 1 or r.shape[0] == 0:
            raise ValueError(f"rewards must have shape [N] with N >= 1, got {list(r.shape)}")
        n = r.shape[0]
        fields = {
            "obs": self._as_tensor(obs, "obs", (n, self.obs_dim), self.obs.dtype),
            "actions": self._as_tensor(actions, "actions", (n, *self.action_shape), self.actions.dtype),
            "rewards": self._as_tensor(r, "rewards", (n,), self.rewards.dtype),
            "next_obs": self._as_tensor(next_obs, "next_obs", (n, self.obs_dim), self.next_obs.dtype),
            "terminated": self._as_tensor(terminated, "terminated", (n,), torch.bool),
        }
        if n > self.capacity:      # only the last `capacity` transitions would survive
            fields = {k: v[n - self.capacity:] for k, v in fields.items()}
            n = self.capacity
        slots = (self._next + torch.arange(n, device=self.device)) % self.capacity
        for k, v in fields.items():
            getattr(self, k)[slots] = v
        self._next = (self._next + n) % self.capacity
        self._size = min(self._size + n, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Transitions:
        """``batch_size`` transitions drawn uniformly with replacement from the stored ones.

        Args:
            batch_size: ``>= 1``.
            generator: optional generator on the buffer's device, for reproducible draws.
        """
        check.positive_int("batch_size", batch_size)
        if self._size == 0:
            raise ValueError("the buffer is empty: add transitions before sampling")
        if generator is not None and generator.device.type != self.device.type:
            raise ValueError(f"generator is on {generator.device} but the buffer is on {self.device}")
        idx = torch.randint(self._size, (batch_size,), generator=generator, device=self.device)
        return Transitions(obs=self.obs[idx], actions=self.actions[idx], rewards=self.rewards[idx],
                           next_obs=self.next_obs[idx], terminated=self.terminated[idx])
