r"""Soft actor-critic: maximum-entropy control with a squashed Gaussian policy (chapter 10).

The soft Bellman equations of this module's convention (Spinning Up's: the entropy bonus counts from the next
step on, so :math:`Q` excludes the entropy of its own first action) are

.. math:: Q(s, a) = r(s, a) + \gamma\,\mathbb E_{s'}[V(s')], \qquad
          V(s) = \mathbb E_{a \sim \pi}[Q(s, a) - \alpha \log \pi(a \mid s)],

and SAC (Haarnoja et al. 2018) replaces the expectations by samples. The module, read top to bottom:

1. :func:`tanh_log_det`, :func:`squashed_log_prob` -- the change of variables :math:`a = c \tanh u` in its
   stable form (section 10.3);
2. :class:`SquashedGaussianActor`, :class:`TwinQ` -- the networks (section 10.4);
3. :func:`soft_q_target`, :func:`actor_loss`, :func:`temperature_loss` -- the three losses (sections 10.2--10.4);
4. :class:`SACConfig`, :class:`SACHistory`, :func:`sac` -- SAC with automatic temperature on a gymnasium
   environment with a bounded continuous action space (section 10.5), with the buffer
   :class:`rl4llm.envs.ReplayBuffer` and the environment :func:`rl4llm.envs.make_box_env`.

Conventions: batches are ``[B]`` for per-sample quantities and ``[B, D]`` for actions; ``terminated`` is the
environment's termination flag only (Pendulum-v1 never terminates: its 200-step limit is a truncation and
bootstraps).
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
from torch import Tensor, nn

from rl4llm import _validate as check
from rl4llm.envs import ReplayBuffer, make_box_env

__all__ = [
    "LOG_STD_MIN", "LOG_STD_MAX", "tanh_log_det", "squashed_log_prob", "SquashedGaussianActor", "TwinQ",
    "soft_q_target", "actor_loss", "temperature_loss", "evaluate_actor", "SACConfig", "SACHistory", "sac",
]

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
"""The clamp on the actor's log standard deviation (Spinning Up's and SB3's bounds)."""


def _floating(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    return x


def _real(value, name: str, *, positive: bool = False, nonneg: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    if positive and not float(value) > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if nonneg and not float(value) >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------------------------------
# 1. The tanh change of variables
# ----------------------------------------------------------------------------------------------------------------

def tanh_log_det(u: Tensor) -> Tensor:
    r"""Elementwise :math:`\log(1 - \tanh^2 u) = 2(\log 2 - u - \operatorname{softplus}(-2u))`, stable for all u.

    The direct form loses everything once :math:`\tanh^2 u` rounds to 1 (:math:`|u| \gtrsim 9` in float32), and
    the usual guard :math:`\log(1 - \tanh^2 u + 10^{-6})` then sticks at :math:`\log 10^{-6} \approx -13.8`
    whatever the true value. Chapter 10, section 10.3.

    Args:
        u: pre-squash values, any shape, floating.

    Returns:
        The log-derivative of ``tanh`` at ``u``, same shape and dtype.
    """
    u = _floating(u, "u")
    return 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))


def squashed_log_prob(u: Tensor, mean: Tensor, log_std: Tensor, scale: float = 1.0) -> Tensor:
    r"""Log-density of the action :math:`a = c \tanh u` when :math:`u \sim \mathcal N(\mu, \operatorname{diag}
    \sigma^2)`, summed over the last (action) axis.

    .. math:: \log \pi(a) = \sum_i \Bigl[\log \mathcal N(u_i; \mu_i, \sigma_i) - \log c - \log(1 - \tanh^2 u_i)
              \Bigr].

    The argument is the pre-squash ``u``, not ``a``: inverting ``tanh`` at a saturated action is ill-conditioned.
    Chapter 10, section 10.3.

    Args:
        u: ``[..., D]`` pre-squash samples.
        mean, log_std: ``[..., D]`` parameters of the Gaussian over ``u`` (broadcastable to ``u``).
        scale: the action bound ``c > 0`` (actions in ``(-c, c)``).

    Returns:
        ``[...]`` log-densities of the actions (with respect to Lebesgue measure on the action box).
    """
    u, mean, log_std = _floating(u, "u"), _floating(mean, "mean"), _floating(log_std, "log_std")
    scale = _real(scale, "scale", positive=True)
    if u.ndim < 1:
        raise ValueError(f"u must have shape [..., D] with an action axis, got {list(u.shape)}")
    try:
        torch.broadcast_shapes(u.shape, mean.shape, log_std.shape)
    except RuntimeError as err:
        raise ValueError(f"mean {list(mean.shape)} and log_std {list(log_std.shape)} must broadcast to u "
                         f"{list(u.shape)}") from err
    z = (u - mean) * torch.exp(-log_std)
    gauss = -0.5 * z * z - log_std - 0.5 * math.log(2.0 * math.pi)
    return (gauss - tanh_log_det(u) - math.log(scale)).sum(dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# 2. Networks
# ----------------------------------------------------------------------------------------------------------------

def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _hidden(hidden) -> tuple[int, ...]:
    h = (hidden,) if isinstance(hidden, int) and not isinstance(hidden, bool) else tuple(hidden)
    if not h or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in h):
        raise ValueError(f"hidden must be a positive int or a non-empty sequence of them, got {hidden!r}")
    return h


class SquashedGaussianActor(nn.Module):
    r"""The policy :math:`a = c \tanh(\mu_\phi(s) + \sigma_\phi(s)\,\varepsilon)`, :math:`\varepsilon \sim
    \mathcal N(0, I)`: a ReLU MLP gives the mean and the (state-dependent, clamped) log standard deviation.

    Args:
        obs_dim: size of an observation.
        act_dim: size of an action.
        hidden: widths of the hidden layers.
        scale: the action bound ``c``.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden=(64, 64), *, scale: float = 1.0):
        super().__init__()
        check.positive_int("obs_dim", obs_dim)
        check.positive_int("act_dim", act_dim)
        self.scale = _real(scale, "scale", positive=True)
        self.act_dim = act_dim
        self.body = _mlp([obs_dim, *_hidden(hidden), 2 * act_dim])

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, log_std)`` of the pre-squash Gaussian, each ``[B, act_dim]``; ``log_std`` clamped."""
        mean, log_std = self.body(obs).chunk(2, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, obs: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        r"""A reparameterised action and its log-density: ``(a [B, D], log_pi [B])``, differentiable in
        :math:`\phi` through :math:`u = \mu + \sigma\varepsilon` (the ``rsample`` path; a ``sample()`` would cut it).
        """
        mean, log_std = self(obs)
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        u = mean + torch.exp(log_std) * eps
        return self.scale * torch.tanh(u), squashed_log_prob(u, mean, log_std, self.scale)

    @torch.no_grad()
    def greedy(self, obs: Tensor) -> Tensor:
        r"""The deterministic action :math:`c \tanh \mu_\phi(s)` used for evaluation."""
        return self.scale * torch.tanh(self(obs)[0])


class TwinQ(nn.Module):
    r"""Two independent action-value networks :math:`Q_{\theta_1}, Q_{\theta_2}` of :math:`(s, a)`."""

    def __init__(self, obs_dim: int, act_dim: int, hidden=(64, 64)):
        super().__init__()
        check.positive_int("obs_dim", obs_dim)
        check.positive_int("act_dim", act_dim)
        h = _hidden(hidden)
        self.q1 = _mlp([obs_dim + act_dim, *h, 1])
        self.q2 = _mlp([obs_dim + act_dim, *h, 1])

    def forward(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """``(q1 [B], q2 [B])`` at the pairs ``(obs [B, obs_dim], actions [B, act_dim])``."""
        x = torch.cat([obs, actions], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------------
# 3. Losses
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def soft_q_target(rewards: Tensor, next_q1: Tensor, next_q2: Tensor, next_log_pi: Tensor, terminated: Tensor,
                  gamma: float, alpha: float) -> Tensor:
    r"""The clipped double-Q soft target :math:`y = r + \gamma(1 - d)\bigl(\min_j Q_{\bar\theta_j}(s', a') - \alpha
    \log\pi(a' \mid s')\bigr)` with :math:`a' \sim \pi(\cdot \mid s')` fresh, no gradient. Chapter 10, section 10.4.

    Args:
        rewards, next_q1, next_q2, next_log_pi: ``[B]`` each.
        terminated: ``[B]`` bool or 0/1 (a truncation is not a termination).
        gamma: discount in ``[0, 1]``.
        alpha: temperature ``>= 0``.

    Returns:
        ``[B]`` targets, detached.
    """
    names = ("rewards", "next_q1", "next_q2", "next_log_pi")
    xs = [_floating(x, n) for x, n in zip((rewards, next_q1, next_q2, next_log_pi), names, strict=True)]
    if xs[0].ndim != 1:
        raise ValueError(f"rewards must have shape [B], got {list(xs[0].shape)} (a [B, 1] column would broadcast)")
    for x, n in zip(xs, names, strict=True):
        if x.shape != xs[0].shape:
            raise ValueError(f"{n} must have shape [B] = {list(xs[0].shape)} like rewards, got {list(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{n} must be finite, found NaN or inf")
    gamma = _real(gamma, "gamma", nonneg=True)
    if gamma > 1:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    alpha = _real(alpha, "alpha", nonneg=True)
    if not isinstance(terminated, Tensor) or terminated.shape != xs[0].shape:
        raise ValueError(f"terminated must be a tensor of shape [B] = {list(xs[0].shape)}")
    if terminated.dtype != torch.bool:
        if not bool(((terminated == 0) | (terminated == 1)).all()):
            raise ValueError("terminated must hold only 0 and 1 (or be bool)")
        terminated = terminated != 0
    r, q1, q2, lp = xs
    keep = (~terminated).to(r.dtype)
    return r + gamma * keep * (torch.minimum(q1, q2) - alpha * lp)


def actor_loss(log_pi: Tensor, q1: Tensor, q2: Tensor, alpha: float) -> Tensor:
    r"""The reparameterised policy loss :math:`\mathbb E[\alpha \log\pi_\phi(a \mid s) - \min_j Q_{\theta_j}(s, a)]`,
    :math:`a = f_\phi(\varepsilon; s)`. Per state it equals :math:`\alpha\,\mathrm{KL}(\pi_\phi \,\|\,
    e^{Q/\alpha}/Z) - \alpha \log Z` (section 10.2): a KL up to a constant, not a KL. Chapter 10, section 10.4.

    Args:
        log_pi, q1, q2: ``[B]`` each; ``log_pi`` must carry the actor's gradient.
        alpha: temperature ``>= 0``.
    """
    names = ("log_pi", "q1", "q2")
    xs = [_floating(x, n) for x, n in zip((log_pi, q1, q2), names, strict=True)]
    for x, n in zip(xs, names, strict=True):
        if x.ndim != 1 or x.shape != xs[0].shape:
            raise ValueError(f"{n} must have shape [B] = {list(xs[0].shape)} like log_pi, got {list(x.shape)}")
    alpha = _real(alpha, "alpha", nonneg=True)
    return (alpha * xs[0] - torch.minimum(xs[1], xs[2])).mean()


def temperature_loss(log_alpha: Tensor, log_pi: Tensor, target_entropy: float) -> Tensor:
    r"""The temperature loss :math:`J(\alpha) = \mathbb E_{a\sim\pi}[-\alpha(\log\pi(a \mid s) + \bar{\mathcal H})]`
    with :math:`\alpha = e^{\log\alpha}` (Haarnoja et al. 2018b, section 5; CleanRL's form).

    Its derivative in :math:`\alpha` is :math:`\mathcal H(\pi) - \bar{\mathcal H}` (estimated by the batch): a
    descent step lowers :math:`\alpha` when the entropy exceeds the target and raises it when it falls short.
    ``log_pi`` is detached here. Chapter 10, section 10.4.

    Args:
        log_alpha: scalar tensor, the parameter.
        log_pi: ``[B]`` log-densities of fresh actions.
        target_entropy: :math:`\bar{\mathcal H}` (SAC's choice: :math:`-\dim\mathcal A`).
    """
    log_alpha, log_pi = _floating(log_alpha, "log_alpha"), _floating(log_pi, "log_pi")
    if log_alpha.numel() != 1:
        raise ValueError(f"log_alpha must be a scalar tensor, got shape {list(log_alpha.shape)}")
    if log_pi.ndim != 1 or log_pi.shape[0] == 0:
        raise ValueError(f"log_pi must have shape [B] with B >= 1, got {list(log_pi.shape)}")
    target_entropy = _real(target_entropy, "target_entropy")
    return -(log_alpha.exp().reshape(()) * (log_pi.detach() + target_entropy)).mean()


# ----------------------------------------------------------------------------------------------------------------
# 4. SAC on a gymnasium environment
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_actor(actor: SquashedGaussianActor, env_id: str = "Pendulum-v1", episodes: int = 10,
                   seed: int = 0) -> tuple[float, float]:
    r"""Mean and worst undiscounted return of the greedy action :math:`c\tanh\mu_\phi(s)` over ``episodes``
    complete episodes, the ``k``-th reset with seed ``seed + k``. Chapter 10, section 10.5.

    Returns:
        ``(mean, worst)`` over the episodes.
    """
    if not isinstance(actor, SquashedGaussianActor):
        raise ValueError(f"actor must be a SquashedGaussianActor, got {type(actor).__name__}")
    check.positive_int("episodes", episodes)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    env = make_box_env(env_id)
    totals = []
    try:
        for k in range(episodes):
            obs, _ = env.reset(seed=seed + k)
            total, done = 0.0, False
            while not done:
                a = actor.greedy(torch.as_tensor(obs, dtype=torch.float32)[None])[0]
                obs, r, terminated, truncated, _ = env.step(a.numpy())
                total += float(r)
                done = terminated or truncated
            totals.append(total)
    finally:
        env.close()
    return float(np.mean(totals)), float(np.min(totals))


@dataclass
class SACConfig:
    """Settings of :func:`sac`; the defaults are chapter 10's Pendulum-v1 run.

    Twin Q networks with Polyak-averaged targets (rate ``tau``), a squashed Gaussian actor, and (with
    ``auto_alpha``) a learned temperature whose loss is :func:`temperature_loss` with target
    ``target_entropy`` (``None``: :math:`-\\dim\\mathcal A`). The first ``learning_starts`` actions are uniform
    on the action box; from then on every environment step is followed by one gradient step on each of the
    critics, the actor and the temperature, on a minibatch of ``batch_size``. The returned actor is measured by
    :func:`evaluate_actor` on ``final_episodes`` episodes from seed ``final_seed``.
    """

    env_id: str = "Pendulum-v1"
    total_steps: int = 8000
    hidden: tuple[int, ...] = (64, 64)
    lr: float = 1e-3
    batch_size: int = 128
    buffer_size: int = 100_000
    learning_starts: int = 1000
    gamma: float = 0.99
    tau: float = 0.005
    alpha: float = 1.0
    auto_alpha: bool = True
    target_entropy: float | None = None
    final_episodes: int = 10
    final_seed: int = 10_000
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.env_id, str):
            raise ValueError(f"env_id must be a gymnasium id (str), got {self.env_id!r}")
        for name in ("total_steps", "batch_size", "buffer_size", "learning_starts", "final_episodes"):
            check.positive_int(name, getattr(self, name))
        for name in ("final_seed", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        self.hidden = _hidden(self.hidden)
        self.lr = _real(self.lr, "lr", positive=True)
        self.gamma = _real(self.gamma, "gamma", nonneg=True)
        if self.gamma > 1:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma!r}")
        self.tau = _real(self.tau, "tau", positive=True)
        if self.tau > 1:
            raise ValueError(f"tau must be in (0, 1], got {self.tau!r}")
        self.alpha = _real(self.alpha, "alpha", positive=True)
        if not isinstance(self.auto_alpha, bool):
            raise ValueError(f"auto_alpha must be a bool, got {self.auto_alpha!r}")
        if self.target_entropy is not None:
            self.target_entropy = _real(self.target_entropy, "target_entropy")
        if self.batch_size > self.learning_starts:
            raise ValueError(f"batch_size ({self.batch_size}) must be <= learning_starts ({self.learning_starts})")


@dataclass
class SACHistory:
    """What :func:`sac` returns.

    Attributes:
        actor, critic: the trained networks.
        episode_steps, episode_returns: for every finished training episode, the step it ended at and its return
            (stochastic behaviour).
        update_steps, alphas, entropies, critic_losses: every ``log_every`` gradient steps, the environment step,
            the temperature, the batch estimate :math:`-\\overline{\\log\\pi}` of the policy's entropy, and the
            critic loss.
        target_entropy: the target :math:`\\bar{\\mathcal H}` used.
        terminated_stored: how many stored transitions carry ``terminated=True``.
        final_return, final_worst: mean and worst greedy return of :func:`evaluate_actor` at the end.
        stopped: None, or why training stopped early for a non-finite quantity.
        seconds: CPU time of the run (``time.process_time``), the evaluation included.
    """

    actor: SquashedGaussianActor
    critic: TwinQ
    episode_steps: list[int] = field(default_factory=list)
    episode_returns: list[float] = field(default_factory=list)
    update_steps: list[int] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    critic_losses: list[float] = field(default_factory=list)
    target_entropy: float = math.nan
    terminated_stored: int = 0
    final_return: float = math.nan
    final_worst: float = math.nan
    stopped: str | None = None
    seconds: float = 0.0


def _finite(*modules: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules for p in m.parameters())


def sac(config: SACConfig | None = None, *, log_every: int = 50) -> SACHistory:
    """Soft actor-critic (Haarnoja et al. 2018a, b) with twin critics and automatic temperature.

    One environment with explicit resets; at an episode end the stored transition keeps the episode's true final
    observation and the environment's ``terminated`` flag (a truncation bootstraps). Per step after
    ``learning_starts``: critic regression on :func:`soft_q_target` (MSE, summed over the twins), actor step on
    :func:`actor_loss` with the critics frozen, temperature step on :func:`temperature_loss`, Polyak update of the
    target critics. Training stops at the first non-finite loss or parameter, and ``stopped`` says where. CPU,
    float32. Chapter 10, section 10.5.

    Args:
        config: a :class:`SACConfig` (default: the chapter's run).
        log_every: record temperature, entropy and critic loss every this many gradient steps.
    """
    cfg = SACConfig() if config is None else config
    if not isinstance(cfg, SACConfig):
        raise ValueError(f"config must be a SACConfig, got {type(cfg).__name__}")
    check.positive_int("log_every", log_every)
    t0 = time.process_time()
    torch.manual_seed(cfg.seed)
    env = make_box_env(cfg.env_id)
    obs_dim, act_dim = int(env.observation_space.shape[0]), int(env.action_space.shape[0])
    scale = float(env.action_space.high.flat[0])
    actor = SquashedGaussianActor(obs_dim, act_dim, cfg.hidden, scale=scale)
    critic = TwinQ(obs_dim, act_dim, cfg.hidden)
    target = copy.deepcopy(critic).requires_grad_(False)
    log_alpha = torch.tensor(math.log(cfg.alpha), requires_grad=cfg.auto_alpha)
    opt_pi = torch.optim.Adam(actor.parameters(), lr=cfg.lr)
    opt_q = torch.optim.Adam(critic.parameters(), lr=cfg.lr)
    opt_a = torch.optim.Adam([log_alpha], lr=cfg.lr) if cfg.auto_alpha else None
    target_entropy = -float(act_dim) if cfg.target_entropy is None else cfg.target_entropy
    buffer = ReplayBuffer(cfg.buffer_size, obs_dim, action_shape=(act_dim,), action_dtype=torch.float32)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    hist = SACHistory(actor=actor, critic=critic, target_entropy=target_entropy)
    obs, _ = env.reset(seed=cfg.seed)
    ep_return, n_updates = 0.0, 0
    try:
        for step in range(1, cfg.total_steps + 1):
            if step <= cfg.learning_starts:
                action = rng.uniform(-scale, scale, size=act_dim).astype(np.float32)
            else:
                with torch.no_grad():
                    a, _ = actor.sample(torch.as_tensor(obs, dtype=torch.float32)[None], generator=gen)
                action = a[0].numpy()
            next_obs, reward, terminated, truncated, _ = env.step(action)
            buffer.add(obs[None], action[None], [float(reward)], next_obs[None], [bool(terminated)])
            ep_return += float(reward)
            if terminated or truncated:
                hist.episode_steps.append(step)
                hist.episode_returns.append(ep_return)
                ep_return = 0.0
                obs, _ = env.reset()
            else:
                obs = next_obs
            if step < cfg.learning_starts:
                continue
            alpha = float(log_alpha.detach().exp())
            b = buffer.sample(cfg.batch_size, generator=gen)
            with torch.no_grad():
                a2, lp2 = actor.sample(b.next_obs, generator=gen)
                t1, t2 = target(b.next_obs, a2)
            y = soft_q_target(b.rewards, t1, t2, lp2, b.terminated, cfg.gamma, alpha)
            q1, q2 = critic(b.obs, b.actions)
            loss_q = F.mse_loss(q1, y) + F.mse_loss(q2, y)
            if not bool(torch.isfinite(loss_q)):
                hist.stopped = f"non-finite critic loss at env step {step}"
                break
            opt_q.zero_grad(set_to_none=True)
            loss_q.backward()
            opt_q.step()
            a_new, lp = actor.sample(b.obs, generator=gen)
            critic.requires_grad_(False)
            n1, n2 = critic(b.obs, a_new)
            loss_pi = actor_loss(lp, n1, n2, alpha)
            if not bool(torch.isfinite(loss_pi)):
                critic.requires_grad_(True)
                hist.stopped = f"non-finite actor loss at env step {step}"
                break
            opt_pi.zero_grad(set_to_none=True)
            loss_pi.backward()
            opt_pi.step()
            critic.requires_grad_(True)
            if opt_a is not None:
                loss_a = temperature_loss(log_alpha, lp, target_entropy)
                if not bool(torch.isfinite(loss_a)):
                    hist.stopped = f"non-finite temperature loss at env step {step}"
                    break
                opt_a.zero_grad(set_to_none=True)
                loss_a.backward()
                opt_a.step()
            with torch.no_grad():
                for p, pt in zip(critic.parameters(), target.parameters(), strict=True):
                    pt.mul_(1.0 - cfg.tau).add_(p, alpha=cfg.tau)
            if not (_finite(actor, critic) and math.isfinite(float(log_alpha.detach()))):
                hist.stopped = f"non-finite parameter at env step {step}"
                break
            if n_updates % log_every == 0:
                hist.update_steps.append(step)
                hist.alphas.append(alpha)
                hist.entropies.append(-float(lp.detach().mean()))
                hist.critic_losses.append(float(loss_q.detach()))
            n_updates += 1
    finally:
        env.close()
    hist.terminated_stored = int(buffer.terminated[:len(buffer)].sum())
    if hist.stopped is None:
        hist.final_return, hist.final_worst = evaluate_actor(actor, cfg.env_id, episodes=cfg.final_episodes,
                                                             seed=cfg.final_seed)
    hist.seconds = time.process_time() - t0
    return hist
