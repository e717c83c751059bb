r"""Networks shared by the chapters (tier 1): the tanh MLP, a categorical policy and a state-value critic.

- :func:`tanh_mlp` -- the MLP behind every small network of the book (introduced in chapter 5);
- :class:`PolicyNet` -- a categorical policy over discrete actions, with sampling from a generator
  (chapter 5, §5.4; used again in chapters 6, 7 and 8);
- :class:`ValueNet` -- a state-value estimate :math:`V_\phi(s)`, the learned baseline of chapter 6 (§6.4) and the
  critic of chapters 7 and 8.

Room is left here for the networks of later chapters (a Q-network, a squashed-Gaussian policy): a chapter that
needs a network adds it here, so no chapter imports another chapter's module for its plumbing.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Categorical

from rl4llm import _validate as check

__all__ = ["PolicyNet", "QNet", "ValueNet", "tanh_mlp"]


def tanh_mlp(obs_dim: int, hidden: int | tuple[int, ...] | list[int], out_dim: int, *, head_scale: float,
             dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """The MLP behind the book's small policies and value functions: tanh hidden layers, a linear head.

    The head's weights are multiplied by ``head_scale`` at initialisation (0.01: a near-uniform policy; 0: a
    value function that starts at exactly 0) and its bias is zero.

    Args:
        obs_dim: input size.
        hidden: width of the hidden layer, or a sequence of widths (empty: a linear map).
        out_dim: output size.
        head_scale: factor applied to the head's initial weights.
        dtype: parameter dtype.
    """
    widths = (hidden,) if isinstance(hidden, int) else tuple(hidden)
    for name, v in (("obs_dim", obs_dim), ("out_dim", out_dim), *(("hidden", h) for h in widths)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    sizes = (obs_dim, *widths)
    layers: list[nn.Module] = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(d_in, d_out, dtype=dtype), nn.Tanh()]
    head = nn.Linear(sizes[-1], out_dim, dtype=dtype)
    with torch.no_grad():
        head.weight.mul_(head_scale)
        head.bias.zero_()
    return nn.Sequential(*layers, head)


class PolicyNet(nn.Module):
    """An MLP policy over discrete actions: observations ``[..., obs_dim]`` to logits ``[..., n_actions]``.

    Hidden layers use tanh. The output layer starts with its weights scaled down 100-fold and zero bias, so
    the initial policy is close to uniform.

    Args:
        obs_dim: size of an observation vector.
        n_actions: number of discrete actions.
        hidden: width of the hidden layer, or a sequence of widths (one per layer; empty: a linear policy).
        dtype: parameter dtype; observations are cast to it.
    """

    def __init__(self, obs_dim: int, n_actions: int, hidden: int | tuple[int, ...] | list[int] = 64, *,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if isinstance(n_actions, bool) or not isinstance(n_actions, int) or n_actions < 1:
            raise ValueError(f"n_actions must be a positive int, got {n_actions!r}")
        self.obs_dim, self.n_actions = obs_dim, n_actions
        self.net = tanh_mlp(obs_dim, hidden, n_actions, head_scale=0.01, dtype=dtype)

    def forward(self, obs: Tensor) -> Tensor:
        """Logits ``[..., n_actions]`` for observations ``[..., obs_dim]``."""
        return self.net(check.obs(obs, self.obs_dim).to(self.net[-1].weight.dtype))

    def dist(self, obs: Tensor) -> Categorical:
        r"""The action distribution :math:`\pi_\theta(\cdot \mid s)` for observations ``[..., obs_dim]``."""
        return Categorical(logits=self(obs))

    def log_prob(self, obs: Tensor, actions: Tensor) -> Tensor:
        r""":math:`\log \pi_\theta(a \mid s)` ``[...]`` for ``obs [..., obs_dim]`` and ``actions [...]``."""
        logits = self(obs)
        if not isinstance(actions, Tensor) or actions.shape != logits.shape[:-1]:
            shape = list(actions.shape) if isinstance(actions, Tensor) else type(actions).__name__
            raise ValueError(f"actions must have shape {list(logits.shape[:-1])}, got {shape}")
        if actions.dtype == torch.bool or actions.is_floating_point() or actions.is_complex():
            raise ValueError(f"actions must be an integer tensor, got dtype {actions.dtype}")
        if actions.numel() and (actions.min() < 0 or actions.max() >= self.n_actions):
            raise ValueError(f"actions must lie in [0, {self.n_actions}), got values outside")
        return F.log_softmax(logits, dim=-1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    def act(self, obs: Tensor, generator: torch.Generator | None = None, *,
            greedy: bool = False) -> tuple[Tensor, Tensor]:
        """Sample actions (or take the most likely ones) for observations ``[B, obs_dim]``.

        Args:
            obs: ``[B, obs_dim]`` observations.
            generator: optional ``torch.Generator`` on the policy's device, for reproducible samples.
            greedy: take the argmax action instead of sampling.

        Returns:
            ``(actions, logp)``: int64 actions ``[B]`` and their log-probabilities ``[B]``.
        """
        logits = self(obs)
        logp_all = F.log_softmax(logits, dim=-1)
        if greedy:
            actions = logits.argmax(-1)
        else:
            if generator is not None and generator.device.type != logits.device.type:
                raise ValueError(f"generator is on {generator.device} but the policy runs on {logits.device}")
            # Inverse-CDF sampling (torch.distributions cannot take a generator): the action is the number
            # of CDF boundaries at or below a uniform draw.
            cdf = logp_all.exp().cumsum(-1)
            u = torch.rand(logits.shape[:-1] + (1,), generator=generator, dtype=cdf.dtype, device=cdf.device)
            actions = (u >= cdf[..., :-1]).sum(-1)
        return actions, logp_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


class ValueNet(nn.Module):
    """An MLP state-value estimate :math:`V_\\phi(s)`: observations ``[..., obs_dim]`` to values ``[...]``.

    Tanh hidden layers and a linear output multiplied by a fixed ``scale``: returns in CartPole reach about
    :math:`1/(1-\\gamma)`, and a network whose raw output is of order one learns that range faster when the
    output is rescaled. The output layer starts at zero, so before any fitting the baseline is 0 rather than a
    random function of the state.

    Args:
        obs_dim: size of an observation vector.
        hidden: width of the hidden layer, or a sequence of widths.
        scale: positive constant the raw output is multiplied by.
        dtype: parameter dtype.
    """

    def __init__(self, obs_dim: int, hidden: int | tuple[int, ...] | list[int] = 32, *, scale: float = 1.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, Real) or not (0 < scale < math.inf):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        self.obs_dim, self.scale = obs_dim, float(scale)
        self.net = tanh_mlp(obs_dim, hidden, 1, head_scale=0.0, dtype=dtype)

    def forward(self, obs: Tensor) -> Tensor:
        """Values ``[...]`` for observations ``[..., obs_dim]``."""
        return self.scale * self.net(check.obs(obs, self.obs_dim).to(self.net[-1].weight.dtype)).squeeze(-1)



class QNet(nn.Module):
    """An action-value network for discrete actions: observations ``[..., obs_dim]`` to ``Q [..., n_actions]``.

    ReLU hidden layers (as SB3's DQN). With ``dueling="mean"`` or ``"max"`` the last hidden layer feeds a value
    head ``V [...]`` and an advantage head ``A [..., n_actions]``, combined by the aggregator of chapter 4
    (:math:`Q = V + A - \\operatorname{mean}_a A` or :math:`- \\max_a A`); ``None`` is one linear head.

    Args:
        obs_dim: observation size.
        n_actions: number of actions.
        hidden: hidden widths (a sequence, or one int), at least one layer.
        dueling: None, ``"mean"`` or ``"max"``.
        dtype: parameter dtype.
    """

    def __init__(self, obs_dim: int, n_actions: int, hidden: int | tuple[int, ...] | list[int] = (128, 128), *,
                 dueling: str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        widths = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        if not widths:
            raise ValueError("hidden must name at least one hidden layer")
        for name, v in (("obs_dim", obs_dim), ("n_actions", n_actions), *(("hidden", h) for h in widths)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if dueling not in (None, "mean", "max"):
            raise ValueError(f"dueling must be None, 'mean' or 'max', got {dueling!r}")
        sizes = (obs_dim, *widths)
        layers: list[nn.Module] = []
        for d_in, d_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(d_in, d_out, dtype=dtype), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.obs_dim, self.n_actions, self.dueling = obs_dim, n_actions, dueling
        self.head = nn.Linear(sizes[-1], n_actions, dtype=dtype)
        self.value_head = nn.Linear(sizes[-1], 1, dtype=dtype) if dueling else None

    def forward(self, obs: Tensor) -> Tensor:
        """``Q [..., n_actions]`` for observations ``[..., obs_dim]``."""
        if not isinstance(obs, Tensor) or obs.ndim < 1 or obs.shape[-1] != self.obs_dim:
            shape = list(obs.shape) if isinstance(obs, Tensor) else type(obs).__name__
            raise ValueError(f"obs must be a tensor of shape [..., {self.obs_dim}], got {shape}")
        h = self.body(obs.to(self.head.weight.dtype))
        adv = self.head(h)
        if self.value_head is None:
            return adv
        v = self.value_head(h).squeeze(-1)
        centre = adv.mean(-1, keepdim=True) if self.dueling == "mean" else adv.max(-1, keepdim=True).values
        return v.unsqueeze(-1) + adv - centre
