r"""Value-based control: Q-learning and its relatives, tabular and deep (chapter 4).

The optimal action value is the fixed point of the Bellman optimality operator,

.. math:: Q^*(s, a) = r(s, a) + \gamma\, \mathbb E_{s'}\bigl[\max_{a'} Q^*(s', a')\bigr],

and every method here replaces the expectation by a sample and the fixed point by a stochastic iteration. The
module, read top to bottom:

1. :func:`dqn_targets`, :func:`q_regression_loss` -- the (Double) DQN target with ``terminated`` masking and a
   loss that refuses the ``[B, 1]`` against ``[B]`` broadcast (chapter 4, section 4.3);
2. :func:`dueling` -- the mean and max aggregators of a dueling head (section 4.3);
3. :func:`epsilon_greedy_probs`, :func:`linear_epsilon` -- the behaviour policy and its schedule;
4. :func:`tabular_control` (Q-learning, SARSA, Expected SARSA, double Q-learning) and
   :func:`synchronous_q_learning`, each vectorised over independent runs (section 4.2);
5. :class:`DQNConfig`, :class:`DQNHistory`, :func:`dqn` -- DQN and Double DQN on a gymnasium environment with a
   discrete action space (section 4.4), with the network :class:`rl4llm.nets.QNet`, the buffer
   :class:`rl4llm.envs.ReplayBuffer` and the evaluation :func:`rl4llm.envs.evaluate_q`.

Conventions: batches are ``[B]`` for per-sample quantities and ``[B, A]`` for action values; ``terminated`` is the
environment's termination flag only (a time-limit truncation bootstraps); tabular action values are
``[runs, S, A]``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from numbers import Real

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rl4llm.envs import ReplayBuffer, evaluate_q, make_env
from rl4llm.nets import QNet

__all__ = [
    "dqn_targets", "q_regression_loss", "dueling", "epsilon_greedy_probs", "linear_epsilon",
    "TABULAR_METHODS", "TabularHistory", "tabular_control", "synchronous_q_learning",
    "DQNConfig", "DQNHistory", "dqn",
]

TABULAR_METHODS = ("q_learning", "sarsa", "expected_sarsa", "double_q_learning")


def _float_tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    return x


def _check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, Real) or not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must be a real number in [0, 1], got {gamma!r}")
    return float(gamma)


def _check_unit(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a real number in [0, 1], got {value!r}")
    return float(value)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# 1. Targets and the regression loss
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def dqn_targets(rewards: Tensor, next_q_target: Tensor, terminated: Tensor, gamma: float, *,
                next_q_online: Tensor | None = None) -> Tensor:
    r"""The DQN regression target :math:`y = r + \gamma (1 - d)\, Q_{\bar\theta}(s', a')`, with no gradient.

    Plain DQN takes :math:`a' = \arg\max_a Q_{\bar\theta}(s', a)` (so the value is :math:`\max_a
    Q_{\bar\theta}(s', a)`); Double DQN (van Hasselt et al. 2016), selected by passing ``next_q_online``, takes
    :math:`a' = \arg\max_a Q_\theta(s', a)` from the online network and evaluates it with the target network.
    Chapter 4, section 4.3.

    Args:
        rewards: ``[B]`` rewards.
        next_q_target: ``[B, A]`` target-network action values at the next observation (for a truncated step:
            the true final observation, not the reset one).
        terminated: ``[B]`` bool or 0/1 termination flags (truncation is *not* termination).
        gamma: discount in ``[0, 1]``.
        next_q_online: optional ``[B, A]`` online-network values at the next observation (Double DQN).

    Returns:
        ``[B]`` targets, detached, in the dtype of ``next_q_target``.

    Raises:
        ValueError: a shape other than the above (in particular ``rewards`` of shape ``[B, 1]``), non-finite
            rewards or values, or ``terminated`` holding values other than 0 and 1.
    """
    rewards, next_q_target = _float_tensor(rewards, "rewards"), _float_tensor(next_q_target, "next_q_target")
    gamma = _check_gamma(gamma)
    if next_q_target.ndim != 2 or next_q_target.shape[1] < 1:
        raise ValueError(f"next_q_target must have shape [B, A], got {list(next_q_target.shape)}")
    B = next_q_target.shape[0]
    if tuple(rewards.shape) != (B,):
        raise ValueError(f"rewards must have shape [B] = [{B}] (one reward per sample), got {list(rewards.shape)}; "
                         "a [B, 1] column would broadcast against [B] into a [B, B] matrix")
    if not isinstance(terminated, Tensor) or tuple(terminated.shape) != (B,):
        shape = list(terminated.shape) if isinstance(terminated, Tensor) else type(terminated).__name__
        raise ValueError(f"terminated must be a tensor of shape [B] = [{B}], got {shape}")
    if terminated.dtype != torch.bool:
        if not bool(((terminated == 0) | (terminated == 1)).all()):
            raise ValueError("terminated must hold only 0 and 1 (or be bool)")
        terminated = terminated != 0
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite, found NaN or inf")
    if not bool(torch.isfinite(next_q_target).all()):
        raise ValueError("next_q_target must be finite, found NaN or inf")
    if next_q_online is None:
        next_value = next_q_target.max(dim=1).values
    else:
        next_q_online = _float_tensor(next_q_online, "next_q_online")
        if next_q_online.shape != next_q_target.shape:
            raise ValueError(f"next_q_online must have the shape of next_q_target {list(next_q_target.shape)}, "
                             f"got {list(next_q_online.shape)}")
        best = next_q_online.argmax(dim=1, keepdim=True)
        next_value = next_q_target.gather(1, best).squeeze(1)
    keep = (~terminated.to(next_value.device)).to(next_value.dtype)
    return rewards.to(next_value.dtype) + gamma * keep * next_value


def q_regression_loss(q_taken: Tensor, targets: Tensor, *, loss: str = "huber") -> Tensor:
    r"""Mean regression loss of the taken-action values on their targets, both ``[B]``.

    ``"huber"`` is ``smooth_l1`` with :math:`\delta = 1` (as SB3's DQN), ``"mse"`` is :math:`\frac12(q - y)^2`.
    The targets must already carry no gradient (use :func:`dqn_targets`).

    Raises:
        ValueError: the shapes differ (``q.gather(1, a)`` gives ``[B, 1]``: squeeze it; broadcasting it against
            ``[B]`` targets would regress every value to the batch-mean target, chapter 4 section 4.3), the
            targets require grad, or ``loss`` is unknown.
    """
    q_taken, targets = _float_tensor(q_taken, "q_taken"), _float_tensor(targets, "targets")
    if q_taken.ndim != 1 or q_taken.shape != targets.shape:
        raise ValueError(f"q_taken and targets must both have shape [B], got {list(q_taken.shape)} and "
                         f"{list(targets.shape)}; a [B, 1] against [B] would broadcast to [B, B] silently")
    if targets.requires_grad:
        raise ValueError("targets must not require grad (the target is held fixed: compute it under no_grad)")
    if loss == "huber":
        return F.smooth_l1_loss(q_taken, targets.to(q_taken.dtype))
    if loss == "mse":
        return 0.5 * F.mse_loss(q_taken, targets.to(q_taken.dtype))
    raise ValueError(f"loss must be 'huber' or 'mse', got {loss!r}")


# ----------------------------------------------------------------------------------------------------------------
# 2. Dueling aggregators
# ----------------------------------------------------------------------------------------------------------------

def dueling(values: Tensor, advantages: Tensor, *, how: str = "mean") -> Tensor:
    r"""Combine a value stream and an advantage stream into action values (Wang et al. 2016).

    ``how="mean"``: :math:`Q = V + A - \operatorname{mean}_a A`, so :math:`\operatorname{mean}_a Q = V`;
    ``how="max"``: :math:`Q = V + A - \max_a A`, so :math:`\max_a Q = V`. The naive :math:`V + A` is not
    identifiable (:math:`(V + c, A - c)` gives the same Q) and is refused. Chapter 4, section 4.3.

    Args:
        values: ``[...]`` state values (one per state; a trailing singleton is not accepted).
        advantages: ``[..., A]`` advantages.

    Returns:
        ``[..., A]`` action values.
    """
    values, advantages = _float_tensor(values, "values"), _float_tensor(advantages, "advantages")
    if advantages.ndim < 1 or tuple(values.shape) != tuple(advantages.shape[:-1]):
        raise ValueError(f"values must have shape [...] = {list(advantages.shape[:-1])} (advantages without its "
                         f"action axis), got {list(values.shape)} against advantages {list(advantages.shape)}")
    if how == "mean":
        centre = advantages.mean(dim=-1, keepdim=True)
    elif how == "max":
        centre = advantages.max(dim=-1, keepdim=True).values
    else:
        raise ValueError(f"how must be 'mean' or 'max', got {how!r}")
    return values.unsqueeze(-1) + advantages - centre


# ----------------------------------------------------------------------------------------------------------------
# 3. The behaviour policy
# ----------------------------------------------------------------------------------------------------------------

def epsilon_greedy_probs(q: Tensor, epsilon: float) -> Tensor:
    r"""ε-greedy action probabilities for action values ``q`` of shape ``[..., A]``.

    :math:`\pi(a) = \epsilon / A + (1 - \epsilon)\,[a \in \arg\max]/|\arg\max|`: ties share the greedy mass, so
    the result is a function of ``q`` (an ``argmax`` that picks the first maximum would not be).
    """
    q = _float_tensor(q, "q")
    epsilon = _check_unit(epsilon, "epsilon")
    if q.ndim < 1 or q.shape[-1] < 1:
        raise ValueError(f"q must have shape [..., A] with A >= 1, got {list(q.shape)}")
    best = (q == q.max(dim=-1, keepdim=True).values).to(q.dtype)
    return epsilon / q.shape[-1] + (1.0 - epsilon) * best / best.sum(dim=-1, keepdim=True)


def linear_epsilon(step: int, *, start: float = 1.0, end: float = 0.04, duration: int = 8000) -> float:
    """ε annealed linearly from ``start`` to ``end`` over the first ``duration`` steps, then held at ``end``."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    start, end = _check_unit(start, "start"), _check_unit(end, "end")
    duration = _positive_int(duration, "duration")
    return end + (start - end) * max(0.0, 1.0 - step / duration)


# ----------------------------------------------------------------------------------------------------------------
# 4. Tabular control, vectorised over independent runs
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class TabularHistory:
    """What :func:`tabular_control` returns.

    Attributes:
        q: ``[runs, S, A]`` final action values (for double Q-learning, the mean of the two tables).
        returns: ``[runs, episodes]`` undiscounted return of every episode.
        lengths: ``[runs, episodes]`` number of steps of every episode.
        first_actions: ``[runs, episodes]`` the action taken at the first step of every episode.
    """

    q: Tensor
    returns: Tensor
    lengths: Tensor
    first_actions: Tensor


def _greedy_probs_np(q: np.ndarray, epsilon: float, legal: np.ndarray) -> np.ndarray:
    """ε-greedy over the legal actions of each row (``legal`` ``[N, A]`` bool), ties sharing the greedy mass."""
    qm = np.where(legal, q, -np.inf)
    best = (qm == qm.max(axis=-1, keepdims=True)).astype(q.dtype)
    n_legal = legal.sum(axis=-1, keepdims=True)
    return epsilon * legal / n_legal + (1.0 - epsilon) * best / best.sum(axis=-1, keepdims=True)


def _sample_np(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row of ``probs`` ``[N, K]`` by inverting the cumulative distribution."""
    u = rng.random(probs.shape[0])[:, None]
    return np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), probs.shape[-1] - 1)


def _check_tabular(mdp, terminal, reward_std, legal):
    P, R = mdp.P, mdp.R
    S, A = R.shape
    if terminal is None:
        stay = torch.diagonal(P, dim1=0, dim2=2).T                         # [S, A]: P[s, a, s]
        terminal = (stay == 1).all(dim=1) & (R == 0).all(dim=1)
    if not isinstance(terminal, Tensor) or terminal.dtype != torch.bool or tuple(terminal.shape) != (S,):
        raise ValueError(f"terminal must be a bool tensor of shape [S] = [{S}]")
    if bool(terminal.all()):
        raise ValueError("terminal marks every state: there is nothing to learn")
    if reward_std is not None:
        reward_std = _float_tensor(reward_std, "reward_std")
        if tuple(reward_std.shape) != (S, A) or not bool((reward_std >= 0).all()):
            raise ValueError(f"reward_std must be a non-negative tensor of shape [S, A] = {[S, A]}")
    if legal is None:
        legal = torch.ones(S, A, dtype=torch.bool)
    if not isinstance(legal, Tensor) or legal.dtype != torch.bool or tuple(legal.shape) != (S, A):
        raise ValueError(f"legal must be a bool tensor of shape [S, A] = {[S, A]}")
    if not bool(legal.any(dim=1).all()):
        raise ValueError("legal must allow at least one action in every state")
    return terminal, reward_std, legal


def tabular_control(mdp, method: str, *, episodes: int, alpha: float = 0.5, epsilon: float = 0.1,
                    runs: int = 1, terminal: Tensor | None = None, reward_std: Tensor | None = None,
                    legal: Tensor | None = None, max_steps: int = 1_000_000, seed: int = 0) -> TabularHistory:
    r"""Run ``runs`` independent learners of ``method`` on an episodic tabular MDP, all at once.

    Each run starts an episode in a state drawn from ``mdp.p0``, acts ε-greedily with respect to its current
    values (ties broken at random), and after every step updates :math:`Q(s, a) \leftarrow Q(s, a) + \alpha(y -
    Q(s, a))` with the target :math:`y` of its method (the next action :math:`a'` is chosen before the update,
    as in Sutton and Barto's Sarsa):

    - ``"q_learning"``: :math:`y = r + \gamma \max_{a'} Q(s', a')`;
    - ``"sarsa"``: :math:`y = r + \gamma Q(s', a')`;
    - ``"expected_sarsa"``: :math:`y = r + \gamma \sum_{a'} \pi_\epsilon(a' \mid s') Q(s', a')`;
    - ``"double_q_learning"``: with probability 1/2, :math:`Q_1(s, a)` moves towards :math:`r + \gamma
      Q_2(s', \arg\max_{a'} Q_1(s', a'))`, otherwise the same with the tables swapped; the behaviour policy is
      ε-greedy in :math:`Q_1 + Q_2`.

    Entering a ``terminal`` state ends the episode (no bootstrap) and the run starts the next one; a run that has
    finished its ``episodes`` stops changing. The arithmetic runs in numpy float64 (one step of all runs is a
    handful of array operations). Chapter 4, section 4.2.

    Args:
        mdp: a :class:`rl4llm.mdp.TabularMDP` (``P [S, A, S]``, ``R [S, A]``, ``p0 [S]``, ``gamma``; its
            ``horizon`` is not used: episodes end at a terminal state).
        method: one of :data:`TABULAR_METHODS`.
        episodes: episodes per run.
        alpha: constant step size in ``(0, 1]``.
        epsilon: exploration rate of the ε-greedy behaviour policy, in ``[0, 1]``.
        runs: number of independent runs.
        terminal: ``[S]`` bool; default: the absorbing states with zero reward (as
            ``rl4llm.dp.from_toy_text`` builds them).
        reward_std: optional ``[S, A]`` standard deviation of Gaussian noise added to ``R`` at every step.
        legal: optional ``[S, A]`` bool, the actions available in each state (default: all); the behaviour
            policy, the max and the expectation range over legal actions only.
        max_steps: a bound on the number of steps of the slowest run; exceeding it raises ``RuntimeError``.
        seed: seed of the numpy generator behind every random draw.

    Returns:
        A :class:`TabularHistory` (float64 tensors).
    """
    if method not in TABULAR_METHODS:
        raise ValueError(f"method must be one of {TABULAR_METHODS}, got {method!r}")
    episodes, runs = _positive_int(episodes, "episodes"), _positive_int(runs, "runs")
    max_steps = _positive_int(max_steps, "max_steps")
    alpha = _check_unit(alpha, "alpha")
    if alpha == 0.0:
        raise ValueError("alpha must be in (0, 1], got 0")
    epsilon = _check_unit(epsilon, "epsilon")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    terminal, reward_std, legal = _check_tabular(mdp, terminal, reward_std, legal)
    rng = np.random.default_rng(seed)
    P = mdp.P.detach().cpu().double().numpy()
    R = mdp.R.detach().cpu().double().numpy()
    p0 = mdp.p0.detach().cpu().double().numpy()
    term = terminal.cpu().numpy()
    ok = legal.cpu().numpy()
    noise = None if reward_std is None else reward_std.detach().cpu().double().numpy()
    gamma = mdp.gamma
    S, A = R.shape
    if (p0[term] > 0).any():
        raise ValueError("p0 puts mass on a terminal state")
    n_tables = 2 if method == "double_q_learning" else 1
    Q = np.zeros((n_tables, runs, S, A))
    idx = np.arange(runs)
    returns = np.zeros((runs, episodes))
    lengths = np.zeros((runs, episodes), dtype=np.int64)
    first_actions = np.zeros((runs, episodes), dtype=np.int64)

    def behaviour(rows, states):
        return _sample_np(_greedy_probs_np(Q[:, rows, states].sum(axis=0), epsilon, ok[states]), rng)

    s = _sample_np(np.broadcast_to(p0, (runs, S)), rng)
    a = behaviour(idx, s)
    first_actions[:, 0] = a
    episode = np.zeros(runs, dtype=np.int64)
    ep_return = np.zeros(runs)
    ep_len = np.zeros(runs, dtype=np.int64)
    for _ in range(max_steps):
        active = episode < episodes
        if not active.any():
            break
        s_next = _sample_np(P[s, a], rng)
        r = R[s, a] if noise is None else R[s, a] + noise[s, a] * rng.standard_normal(runs)
        done = term[s_next]
        a_next = behaviour(idx, s_next)
        if method == "double_q_learning":
            upd = (rng.random(runs) < 0.5).astype(np.int64)
            best = np.where(ok[s_next], Q[upd, idx, s_next], -np.inf).argmax(axis=1)
            next_value = Q[1 - upd, idx, s_next, best]
        else:
            upd = np.zeros(runs, dtype=np.int64)
            q_next = Q[0, idx, s_next]
            if method == "q_learning":
                next_value = np.where(ok[s_next], q_next, -np.inf).max(axis=1)
            elif method == "sarsa":
                next_value = q_next[idx, a_next]
            else:
                next_value = (_greedy_probs_np(q_next, epsilon, ok[s_next]) * q_next).sum(axis=1)
        target = r + gamma * np.where(done, 0.0, next_value)
        current = Q[upd, idx, s, a]
        Q[upd, idx, s, a] = current + alpha * active * (target - current)
        ep_return += r * active
        ep_len += active
        ended = done & active
        if ended.any():
            rows = idx[ended]
            returns[rows, episode[rows]] = ep_return[rows]
            lengths[rows, episode[rows]] = ep_len[rows]
            episode[rows] += 1
            ep_return[rows] = 0.0
            ep_len[rows] = 0
            s_next[rows] = _sample_np(np.broadcast_to(p0, (rows.size, S)), rng)
            a_next[rows] = behaviour(rows, s_next[rows])
            more = rows[episode[rows] < episodes]
            first_actions[more, episode[more]] = a_next[more]
        s, a = s_next, a_next
    else:
        raise RuntimeError(f"tabular_control: {max_steps} steps were not enough for {episodes} episodes in every "
                           "run (an episode that never ends?)")
    return TabularHistory(q=torch.from_numpy(Q.mean(axis=0)), returns=torch.from_numpy(returns),
                          lengths=torch.from_numpy(lengths), first_actions=torch.from_numpy(first_actions))


def synchronous_q_learning(mdp, sweeps: int, *, runs: int = 1, step_power: float | None = 1.0,
                           alpha: float = 0.1, generator: torch.Generator | None = None) -> Tensor:
    r"""Q-learning with a generative model: every sweep samples one next state for every ``(s, a)`` and updates all.

    With ``step_power = w`` the step of sweep :math:`k = 1, 2, \ldots` is :math:`\alpha_k = k^{-w}`; the
    Robbins--Monro conditions :math:`\sum_k \alpha_k = \infty`, :math:`\sum_k \alpha_k^2 < \infty` hold for
    :math:`w \in (1/2, 1]`, and then the iterates converge to :math:`Q^*` with probability 1 (Watkins and Dayan
    1992; here every pair is visited every sweep). ``step_power=None`` uses the constant step ``alpha``, which
    leaves a noise floor. Chapter 4, section 4.2.

    Args:
        mdp: an infinite-horizon :class:`rl4llm.mdp.TabularMDP` (``gamma < 1``).
        sweeps: number of sweeps.
        runs: independent runs.

    Returns:
        ``[sweeps + 1, runs, S, A]`` the iterates, starting from zeros.
    """
    sweeps, runs = _positive_int(sweeps, "sweeps"), _positive_int(runs, "runs")
    if step_power is not None and (isinstance(step_power, bool) or not isinstance(step_power, Real)
                                   or not 0.0 <= float(step_power) <= 1.0):
        raise ValueError(f"step_power must be None or a real number in [0, 1], got {step_power!r}")
    alpha = _check_unit(alpha, "alpha")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    P, R, gamma = mdp.P, mdp.R, mdp.gamma
    S, A = R.shape
    cum_p = P.cumsum(dim=-1)
    Q = torch.zeros(runs, S, A, dtype=R.dtype)
    out = [Q.clone()]
    for k in range(1, sweeps + 1):
        u = torch.rand(runs, S, A, 1, generator=generator, dtype=R.dtype)
        s_next = (cum_p[None] < u).sum(dim=-1).clamp_max(S - 1)          # [runs, S, A]
        v_next = Q.max(dim=-1).values                                      # [runs, S]
        target = R[None] + gamma * torch.gather(v_next, 1, s_next.reshape(runs, -1)).reshape(runs, S, A)
        step = alpha if step_power is None else k ** (-float(step_power))
        Q = Q + step * (target - Q)
        out.append(Q.clone())
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------------------
# 5. DQN on a gymnasium environment
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class DQNConfig:
    """Settings of :func:`dqn`; the defaults are chapter 4's CartPole run (rl-zoo's schedule, a [128, 128] net).

    Every ``train_freq`` environment steps (once ``learning_starts`` transitions are stored) a *round* copies the
    online network into the target network and then takes ``gradient_steps`` Adam steps on minibatches of
    ``batch_size`` from the replay buffer: the target is frozen for the whole round, so a round is one
    approximate application of the Bellman optimality operator (chapter 4, section 4.4). Every ``eval_every``
    steps a greedy evaluation on ``eval_episodes`` episodes (seeds ``eval_seed, ...``) runs, and training stops
    as soon as its mean reaches ``target_return``. At the end a fresh greedy evaluation on ``final_episodes``
    episodes with the other seeds ``final_seed, ...`` measures the returned network.
    """

    env_id: str = "CartPole-v1"
    total_steps: int = 50_000
    hidden: tuple[int, ...] = (128, 128)
    dueling: str | None = None
    double: bool = False
    lr: float = 2.3e-3
    batch_size: int = 64
    buffer_size: int = 100_000
    learning_starts: int = 1000
    gamma: float = 0.99
    train_freq: int = 256
    gradient_steps: int = 64
    eps_start: float = 1.0
    eps_end: float = 0.04
    exploration_steps: int = 8000
    loss: str = "huber"
    max_grad_norm: float | None = 10.0
    eval_every: int = 2560
    eval_episodes: int = 10
    eval_seed: int = 10_000
    target_return: float | None = 475.0
    final_episodes: int = 20
    final_seed: int = 20_000
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.env_id, str):
            raise ValueError(f"env_id must be a gymnasium id (str), got {self.env_id!r}")
        for name in ("total_steps", "batch_size", "buffer_size", "learning_starts", "train_freq", "gradient_steps",
                     "exploration_steps", "eval_every", "eval_episodes", "final_episodes"):
            _positive_int(getattr(self, name), name)
        for name in ("eval_seed", "final_seed", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        hidden = (self.hidden,) if isinstance(self.hidden, int) else tuple(self.hidden)
        if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden must be a non-empty sequence of positive ints, got {self.hidden!r}")
        self.hidden = hidden
        if self.dueling not in (None, "mean", "max"):
            raise ValueError(f"dueling must be None, 'mean' or 'max', got {self.dueling!r}")
        if not isinstance(self.double, bool):
            raise ValueError(f"double must be a bool, got {self.double!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, Real) or not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        self.gamma = _check_gamma(self.gamma)
        self.eps_start, self.eps_end = _check_unit(self.eps_start, "eps_start"), _check_unit(self.eps_end, "eps_end")
        if self.loss not in ("huber", "mse"):
            raise ValueError(f"loss must be 'huber' or 'mse', got {self.loss!r}")
        if self.max_grad_norm is not None and (isinstance(self.max_grad_norm, bool)
                                               or not isinstance(self.max_grad_norm, Real)
                                               or not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0)):
            raise ValueError(f"max_grad_norm must be None or a finite number > 0, got {self.max_grad_norm!r}")
        if self.target_return is not None and (isinstance(self.target_return, bool)
                                               or not isinstance(self.target_return, Real)
                                               or not math.isfinite(self.target_return)):
            raise ValueError(f"target_return must be None or a finite number, got {self.target_return!r}")
        if self.batch_size > self.learning_starts:
            raise ValueError(f"batch_size ({self.batch_size}) must be <= learning_starts ({self.learning_starts})")


@dataclass
class DQNHistory:
    """What :func:`dqn` returns.

    Attributes:
        q: the trained online network.
        episode_steps, episode_returns: for every finished training episode, the environment step at which it
            ended and its return (ε-greedy behaviour).
        loss_steps, losses: for every round, the environment step and the mean loss of its gradient steps.
        eval_steps, eval_returns: the greedy evaluations during training.
        solved_at: the environment step at which the greedy evaluation first reached ``target_return`` (None if
            it never did).
        final_return: the fresh greedy evaluation of the returned network on the other seeds.
        stopped: None, or why training stopped early for a non-finite quantity (step and name).
        seconds: CPU time of the run (``time.process_time``), evaluations included.
    """

    q: QNet
    episode_steps: list[int] = field(default_factory=list)
    episode_returns: list[float] = field(default_factory=list)
    loss_steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_returns: list[float] = field(default_factory=list)
    solved_at: int | None = None
    final_return: float = math.nan
    stopped: str | None = None
    seconds: float = 0.0


def dqn(config: DQNConfig | None = None) -> DQNHistory:
    """DQN (Mnih et al. 2015), or Double DQN with ``config.double``, on one gymnasium environment.

    One environment with explicit resets: at an episode end the transition stored is (s, a, r, the episode's
    true final observation, ``terminated``), and the next step starts from the reset observation; truncation
    (CartPole's 500-step limit) is stored with ``terminated=False`` and bootstraps. ε-greedy behaviour with
    :func:`linear_epsilon`; targets from :func:`dqn_targets`; loss :func:`q_regression_loss`; schedule and
    stopping rule as in :class:`DQNConfig`. Training stops at the first non-finite loss or parameter, and
    ``stopped`` says where. Runs on the CPU in float32 (the networks are small; one forward per step).
    """
    cfg = DQNConfig() if config is None else config
    if not isinstance(cfg, DQNConfig):
        raise TypeError(f"config must be a DQNConfig, got {type(cfg).__name__}")
    t0 = time.process_time()
    torch.manual_seed(cfg.seed)
    env = make_env(cfg.env_id)
    obs_dim, n_actions = int(env.observation_space.shape[0]), int(env.action_space.n)
    q = QNet(obs_dim, n_actions, cfg.hidden, dueling=cfg.dueling)
    target = copy.deepcopy(q).requires_grad_(False)
    opt = torch.optim.Adam(q.parameters(), lr=cfg.lr)
    buffer = ReplayBuffer(cfg.buffer_size, obs_dim)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    hist = DQNHistory(q=q)
    obs, _ = env.reset(seed=cfg.seed)
    env.action_space.seed(cfg.seed)
    ep_return = 0.0
    try:
        for step in range(1, cfg.total_steps + 1):
            eps = linear_epsilon(step - 1, start=cfg.eps_start, end=cfg.eps_end, duration=cfg.exploration_steps)
            if rng.random() < eps:
                action = int(rng.integers(n_actions))
            else:
                with torch.no_grad():
                    action = int(q(torch.as_tensor(obs, dtype=torch.float32)).argmax())
            next_obs, reward, terminated, truncated, _ = env.step(action)
            buffer.add(obs[None], [action], [float(reward)], next_obs[None], [bool(terminated)])
            ep_return += float(reward)
            if terminated or truncated:
                hist.episode_steps.append(step)
                hist.episode_returns.append(ep_return)
                ep_return = 0.0
                obs, _ = env.reset()
            else:
                obs = next_obs
            if step >= cfg.learning_starts and step % cfg.train_freq == 0:
                target.load_state_dict(q.state_dict())
                total = 0.0
                for _ in range(cfg.gradient_steps):
                    b = buffer.sample(cfg.batch_size, generator=gen)
                    with torch.no_grad():
                        next_t = target(b.next_obs)
                        next_o = q(b.next_obs) if cfg.double else None
                    y = dqn_targets(b.rewards, next_t, b.terminated, cfg.gamma, next_q_online=next_o)
                    q_taken = q(b.obs).gather(1, b.actions[:, None]).squeeze(1)
                    loss = q_regression_loss(q_taken, y, loss=cfg.loss)
                    if not torch.isfinite(loss):
                        hist.stopped = f"non-finite loss ({loss.item()}) at env step {step}"
                        break
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(q.parameters(), cfg.max_grad_norm)
                    opt.step()
                    total += loss.item()
                if hist.stopped is None and not all(bool(torch.isfinite(p).all()) for p in q.parameters()):
                    hist.stopped = f"non-finite parameter at env step {step}"
                if hist.stopped is not None:
                    break
                hist.loss_steps.append(step)
                hist.losses.append(total / cfg.gradient_steps)
            if step >= cfg.learning_starts and step % cfg.eval_every == 0:
                ret = evaluate_q(q, cfg.env_id, episodes=cfg.eval_episodes, seed=cfg.eval_seed)
                hist.eval_steps.append(step)
                hist.eval_returns.append(ret)
                if cfg.target_return is not None and ret >= cfg.target_return:
                    hist.solved_at = step
                    break
    finally:
        env.close()
    if hist.stopped is None:
        hist.final_return = evaluate_q(q, cfg.env_id, episodes=cfg.final_episodes, seed=cfg.final_seed)
    hist.seconds = time.process_time() - t0
    return hist
