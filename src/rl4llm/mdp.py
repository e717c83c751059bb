"""Finite tabular MDPs, solved exactly.

Every claim the book makes about policy gradients can be checked on a small Markov decision process
where nothing has to be estimated: values come from a linear solve or backward induction, the objective
:math:`J(\\theta)` is a dot product, its gradient comes from autograd, and for short horizons every
trajectory can be listed together with its exact probability. This module holds those exact tools,
plus a batched sampler so that Monte Carlo estimators can be compared with the exact answers.

The objects, read in order:

- :class:`TabularMDP` -- transition tensor ``P[s, a, s']``, reward table ``R[s, a]``, initial
  distribution ``p0[s]``, discount ``gamma`` and either an infinite horizon (``horizon=None``,
  ``gamma < 1``) or episodes of exactly ``T`` steps, ``t = 0, ..., T-1``.
- :func:`random_mdp` -- a reproducible random instance.
- :func:`softmax_policy`, :func:`induced_chain` -- a tabular policy ``pi[s, a]`` and the Markov
  chain ``P_pi[s, s']`` with reward ``r_pi[s]`` that it induces.
- :func:`evaluate_policy`, :func:`advantage`, :func:`expected_return`, :func:`objective` --
  exact ``V``, ``Q``, ``A = Q - V`` and ``J``; all differentiable with respect to the policy.
- :func:`discounted_state_visitation` -- the state weighting in the policy gradient theorem.
- :class:`Trajectories`, :func:`enumerate_trajectories`, :func:`sample_trajectories`,
  :func:`trajectory_logprob_actions` -- trajectories as ``[N, T]`` tensors, listed exhaustively with
  exact probabilities or sampled.

Shapes. ``S`` states, ``A`` actions, ``T`` steps, ``N`` trajectories. Batches of sequences are
time-last (``states[n, t]``). Tables of values indexed by time (``V[t, s]``, ``Q[t, s, a]``,
``Pr(s_t = s)`` as ``[T, S]``) put the time index first, so that ``V[t]`` reads as "the value
function at time t".

Precision. The MDP's tensors are float64 by default (float32 is also accepted); policies passed in
are cast to the MDP's dtype, so gradients reach float32 logits unchanged in dtype. Nothing assumes a
particular device: every tensor stays on the device of the MDP.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

from rl4llm.returns import check_gamma

__all__ = [
    "TabularMDP",
    "Trajectories",
    "advantage",
    "discounted_state_visitation",
    "enumerate_trajectories",
    "evaluate_policy",
    "expected_return",
    "induced_chain",
    "objective",
    "random_mdp",
    "sample_trajectories",
    "softmax_policy",
    "tabular_score",
    "trajectory_logprob_actions",
]

_DTYPES = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------
# input checks shared by the public functions
# ----------------------------------------------------------------------------------------------------


def _sum_tol(dtype: torch.dtype) -> float:
    """Tolerance for "sums to 1": 1e-9 in float64, loosened in proportion to the precision of ``dtype``."""
    return max(1e-9, 1e3 * torch.finfo(dtype).eps)


def _check_horizon(horizon, name: str = "horizon") -> int | None:
    if horizon is None:
        return None
    try:
        return _check_positive_int(horizon, name)
    except ValueError:
        raise ValueError(f"{name} must be None or an int >= 1, got {horizon!r}") from None


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}") from None
    if out < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return out


def _check_distribution_rows(x: torch.Tensor, name: str, what: str) -> None:
    """``x`` is finite, nonnegative and sums to 1 along its last axis (``what`` names those rows)."""
    xd = x.detach()
    if not bool(torch.isfinite(xd).all()):
        raise ValueError(f"{name} must be finite, found NaN or inf")
    if bool((xd < 0).any()):
        raise ValueError(f"{name} must be nonnegative, found minimum {xd.min().item():.3g}")
    err = (xd.sum(-1) - 1).abs().max().item() if xd.numel() else 0.0
    tol = _sum_tol(xd.dtype)
    if err > tol:
        raise ValueError(f"{what} must sum to 1 (largest deviation {err:.3g} > tolerance {tol:.1g})")


def _check_policy(mdp: TabularMDP, pi, name: str = "pi") -> torch.Tensor:
    """Validate a policy table against ``mdp`` and return it in the MDP's dtype (autograd preserved)."""
    if not isinstance(pi, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [S, A], got {type(pi).__name__}")
    shape = (mdp.n_states, mdp.n_actions)
    if tuple(pi.shape) != shape:
        raise ValueError(f"{name} must have shape [S, A] = {list(shape)}, got {list(pi.shape)}")
    if not pi.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {pi.dtype}")
    if pi.device != mdp.device:
        raise ValueError(f"{name} is on {pi.device} but the MDP is on {mdp.device}; move one of them")
    _check_distribution_rows(pi, name, f"rows of {name} (pi[s, :] over actions)")
    return pi.to(mdp.dtype)


def _check_logits(logits, shape: tuple[int, int] | None = None) -> None:
    """``logits`` is a real ``[S, A]`` tensor (of ``shape``, if given) with a finite entry in every row."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor of shape [S, A], got {type(logits).__name__}")
    if logits.ndim != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"logits must have shape [S, A] with S, A >= 1, got {list(logits.shape)}")
    if shape is not None and tuple(logits.shape) != shape:
        raise ValueError(f"logits must have shape [S, A] = {list(shape)}, got {list(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    ld = logits.detach()
    if bool(torch.isnan(ld).any()) or bool((ld == math.inf).any()):
        raise ValueError("logits must not contain NaN or +inf")
    if bool((ld == -math.inf).all(-1).any()):
        raise ValueError("every row of logits needs at least one finite entry (a row is all -inf)")


def _check_mdp(mdp) -> None:
    if not isinstance(mdp, TabularMDP):
        raise ValueError(f"mdp must be a TabularMDP, got {type(mdp).__name__}")


def _resolve_horizon(mdp: TabularMDP, horizon) -> int:
    """The explicit ``horizon`` if given, else the MDP's; an infinite-horizon MDP needs an explicit one."""
    horizon = _check_horizon(horizon)
    if horizon is None:
        horizon = mdp.horizon
    if horizon is None:
        raise ValueError("horizon is required (an int >= 1) because the MDP has an infinite horizon "
                         "(mdp.horizon is None)")
    return horizon


# ----------------------------------------------------------------------------------------------------
# the MDP
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TabularMDP:
    """A finite Markov decision process with ``S`` states and ``A`` actions.

    Taking action ``a`` in state ``s`` yields reward ``R[s, a]`` and moves to ``s'`` with probability
    ``P[s, a, s']``. The first state is drawn from ``p0``. The return of an episode is
    ``sum_t gamma**t * r_t``, over ``t = 0, 1, ...`` forever when ``horizon`` is None (which needs
    ``gamma < 1`` for the sum to converge), or over ``t = 0, ..., T-1`` when ``horizon = T``.

    Instances are immutable and validated on construction; ``dataclasses.replace`` gives a modified,
    re-validated copy (for example ``replace(mdp, horizon=10)``). Equality is identity: tensors have no
    single truth value to compare by.

    ``gamma = 1`` (episodic problems, the token MDP of a language model) is handled by a finite horizon:
    give the episode an absorbing, zero-reward terminal state and ``horizon = T``, where ``T`` bounds the
    episode length (exact: nothing happens after termination) or is the time limit of the task. Values
    then come from backward induction (:func:`evaluate_policy`, :func:`rl4llm.dp.backward_induction`).
    An infinite horizon with ``gamma = 1`` is refused because the linear solve and the contraction
    arguments need ``gamma < 1``.

    Attributes:
        P: ``[S, A, S]`` transition probabilities; every ``P[s, a, :]`` sums to 1.
        R: ``[S, A]`` reward for taking ``a`` in ``s`` (deterministic).
        p0: ``[S]`` initial-state distribution.
        gamma: discount factor in ``(0, 1]``.
        horizon: ``None`` for the infinite-horizon discounted problem, or an int ``T >= 1``.

    Raises:
        ValueError: a tensor has the wrong shape, dtype (float32 or float64 required; all three the same)
            or device; a probability is negative, not finite, or its row does not sum to 1 (tolerance
            1e-9 in float64, ``1000 * eps`` in float32); a reward is not finite; ``gamma`` is outside
            ``(0, 1]``; ``horizon`` is not None or an int ``>= 1``; or ``gamma == 1`` with an infinite
            horizon.
    """

    P: torch.Tensor
    R: torch.Tensor
    p0: torch.Tensor
    gamma: float
    horizon: int | None = None

    def __post_init__(self):
        P, R, p0 = self.P, self.R, self.p0
        for name, x in (("P", P), ("R", R), ("p0", p0)):
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if P.ndim != 3 or P.shape[0] != P.shape[2] or P.shape[0] < 1 or P.shape[1] < 1:
            raise ValueError(f"P must have shape [S, A, S] with S, A >= 1, got {list(P.shape)}")
        S, A = P.shape[0], P.shape[1]
        if tuple(R.shape) != (S, A):
            raise ValueError(f"R must have shape [S, A] = {[S, A]} (matching P), got {list(R.shape)}")
        if tuple(p0.shape) != (S,):
            raise ValueError(f"p0 must have shape [S] = {[S]} (matching P), got {list(p0.shape)}")
        if P.dtype not in _DTYPES:
            raise ValueError(f"P must have dtype float32 or float64, got {P.dtype}")
        for name, x in (("R", R), ("p0", p0)):
            if x.dtype != P.dtype:
                raise ValueError(f"{name} must have the same dtype as P ({P.dtype}), got {x.dtype}")
            if x.device != P.device:
                raise ValueError(f"{name} must be on the same device as P ({P.device}), got {x.device}")
        _check_distribution_rows(P, "P", "rows of P (P[s, a, :] over next states)")
        _check_distribution_rows(p0, "p0", "p0")
        if not bool(torch.isfinite(R.detach()).all()):
            raise ValueError("R must be finite, found NaN or inf")
        gamma = check_gamma(self.gamma)
        horizon = _check_horizon(self.horizon)
        if horizon is None and gamma >= 1.0:
            raise ValueError("gamma must be < 1 when horizon is None (infinite-horizon returns would "
                             "diverge); for an episodic problem with gamma = 1, add an absorbing zero-reward "
                             "terminal state and set horizon = T, a bound on the episode length or the time "
                             "limit, and solve by backward induction (see rl4llm.dp)")
        object.__setattr__(self, "gamma", gamma)
        object.__setattr__(self, "horizon", horizon)

    @property
    def n_states(self) -> int:
        """Number of states ``S``."""
        return self.P.shape[0]

    @property
    def n_actions(self) -> int:
        """Number of actions ``A``."""
        return self.P.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype shared by ``P``, ``R`` and ``p0``."""
        return self.P.dtype

    @property
    def device(self) -> torch.device:
        """Device holding ``P``, ``R`` and ``p0``."""
        return self.P.device

    def to(self, device=None, dtype: torch.dtype | None = None) -> TabularMDP:
        """Return a copy with the tensors moved to ``device`` and/or cast to ``dtype``.

        After a change of dtype the rows of ``P`` and ``p0`` are re-normalised, so that a float32 MDP
        cast to float64 passes the float64 tolerance on row sums.
        """
        dtype = self.dtype if dtype is None else dtype
        device = self.device if device is None else torch.device(device)
        P, R, p0 = (x.to(device, dtype) for x in (self.P, self.R, self.p0))
        if dtype != self.dtype:
            P, p0 = P / P.sum(-1, keepdim=True), p0 / p0.sum()
        return TabularMDP(P, R, p0, self.gamma, self.horizon)


def _random_simplex(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Uniform (Dirichlet(1, ..., 1)) points on the simplex along the last axis, in float64 on the CPU."""
    w = torch.empty(shape, dtype=torch.float64).exponential_(1.0, generator=generator)
    return w / w.sum(-1, keepdim=True)


def random_mdp(n_states: int, n_actions: int, *, gamma: float = 0.9, horizon: int | None = None,
               seed: int = 0, reward_scale: float = 1.0, dtype: torch.dtype = torch.float64,
               device=None) -> TabularMDP:
    """A random MDP, identical for identical arguments on every machine.

    Each row ``P[s, a, :]`` and ``p0`` is drawn uniformly from the probability simplex (a Dirichlet
    with all concentrations 1, made by normalising exponential draws); rewards are
    ``R[s, a] ~ N(0, reward_scale**2)``. Everything is drawn in float64 from a CPU ``torch.Generator``
    seeded with ``seed``, then cast and moved, so the result does not depend on the device.

    Args:
        n_states: ``S >= 1``.
        n_actions: ``A >= 1``.
        gamma: discount in ``(0, 1]`` (``< 1`` when ``horizon`` is None).
        horizon: None for an infinite horizon, or an episode length ``T >= 1``.
        seed: a non-negative int.
        reward_scale: standard deviation of the rewards, ``>= 0``.
        dtype: float64 (default) or float32.
        device: where the tensors live; CPU when None.

    Returns:
        A :class:`TabularMDP` with ``P`` ``[S, A, S]``, ``R`` ``[S, A]``, ``p0`` ``[S]``.
    """
    S = _check_positive_int(n_states, "n_states")
    A = _check_positive_int(n_actions, "n_actions")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if isinstance(reward_scale, bool) or not isinstance(reward_scale, (int, float)) \
            or not math.isfinite(reward_scale) or reward_scale < 0:
        raise ValueError(f"reward_scale must be a finite number >= 0, got {reward_scale!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    P = _random_simplex((S, A, S), g)
    R = torch.randn((S, A), dtype=torch.float64, generator=g) * float(reward_scale)
    p0 = _random_simplex((S,), g)
    device = torch.device("cpu") if device is None else torch.device(device)
    P, p0 = P.to(dtype), p0.to(dtype)
    P, p0 = P / P.sum(-1, keepdim=True), p0 / p0.sum()  # re-normalise after a cast to float32
    return TabularMDP(P.to(device), R.to(dtype).to(device), p0.to(device), gamma, horizon)


# ----------------------------------------------------------------------------------------------------
# policies and exact evaluation
# ----------------------------------------------------------------------------------------------------


def softmax_policy(logits: torch.Tensor) -> torch.Tensor:
    """The tabular softmax policy ``pi(a | s) = exp(logits[s, a]) / sum_b exp(logits[s, b])``.

    Args:
        logits: ``[S, A]`` real parameters ``theta``; ``-inf`` entries (forbidden actions) are allowed as
            long as every row keeps at least one finite entry.

    Returns:
        ``[S, A]`` probabilities, rows summing to 1, differentiable with respect to ``logits``.
    """
    _check_logits(logits)
    return torch.softmax(logits, dim=-1)


def induced_chain(mdp: TabularMDP, pi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Markov reward process obtained by following ``pi`` in ``mdp``.

    ``P_pi[s, s'] = sum_a pi[s, a] P[s, a, s']`` and ``r_pi[s] = sum_a pi[s, a] R[s, a]``.

    Args:
        mdp: the MDP.
        pi: ``[S, A]`` policy, rows summing to 1.

    Returns:
        ``(P_pi, r_pi)`` of shapes ``[S, S]`` and ``[S]``, differentiable with respect to ``pi``.
    """
    _check_mdp(mdp)
    pi = _check_policy(mdp, pi)
    return torch.einsum("sa,sat->st", pi, mdp.P), (pi * mdp.R).sum(-1)


def evaluate_policy(mdp: TabularMDP, pi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact state values ``V^pi`` and action values ``Q^pi``.

    Infinite horizon: ``V`` solves the Bellman equation ``V = r_pi + gamma P_pi V``, i.e. the linear
    system ``(I - gamma P_pi) V = r_pi`` (non-singular because ``gamma < 1``), and
    ``Q[s, a] = R[s, a] + gamma sum_s' P[s, a, s'] V[s']``.

    Finite horizon ``T``: backward induction from ``V[T] = 0``,
    ``Q[t] = R + gamma P V[t+1]`` and ``V[t][s] = sum_a pi[s, a] Q[t][s, a]`` for ``t = T-1, ..., 0``.
    ``V[t][s]`` is the expected ``sum_{k=t}^{T-1} gamma**(k-t) r_k`` given ``s_t = s``
    (``T - t`` steps to go).

    Both branches are built from differentiable operations (``torch.linalg.solve`` in the first), so
    autograd flows from ``V`` and ``Q`` back to ``pi`` (and to ``P``, ``R`` if they require grad).

    Args:
        mdp: the MDP.
        pi: ``[S, A]`` policy, rows summing to 1.

    Returns:
        ``(V, Q)``: ``[S]`` and ``[S, A]`` for an infinite horizon; ``[T+1, S]`` and ``[T, S, A]`` for
        horizon ``T``.
    """
    _check_mdp(mdp)
    pi = _check_policy(mdp, pi)
    if mdp.horizon is None:
        P_pi, r_pi = torch.einsum("sa,sat->st", pi, mdp.P), (pi * mdp.R).sum(-1)
        eye = torch.eye(mdp.n_states, dtype=mdp.dtype, device=mdp.device)
        V = torch.linalg.solve(eye - mdp.gamma * P_pi, r_pi)
        Q = mdp.R + mdp.gamma * torch.einsum("sat,t->sa", mdp.P, V)
        return V, Q
    V_next = torch.zeros(mdp.n_states, dtype=mdp.dtype, device=mdp.device)
    Vs, Qs = [V_next], []
    for _ in range(mdp.horizon):
        Q_t = mdp.R + mdp.gamma * torch.einsum("sat,t->sa", mdp.P, V_next)
        V_next = (pi * Q_t).sum(-1)
        Qs.append(Q_t)
        Vs.append(V_next)
    return torch.stack(Vs[::-1]), torch.stack(Qs[::-1])


def advantage(mdp: TabularMDP, pi: torch.Tensor) -> torch.Tensor:
    """Exact advantage ``A^pi = Q^pi - V^pi``.

    Args:
        mdp: the MDP.
        pi: ``[S, A]`` policy.

    Returns:
        ``[S, A]`` for an infinite horizon, ``[T, S, A]`` (``A[t] = Q[t] - V[t]``) for horizon ``T``.
        Under ``pi`` the advantage averages to zero in every state: ``sum_a pi[s, a] A[..., s, a] = 0``.
    """
    V, Q = evaluate_policy(mdp, pi)
    if mdp.horizon is None:
        return Q - V[:, None]
    return Q - V[:-1, :, None]


def expected_return(mdp: TabularMDP, pi: torch.Tensor) -> torch.Tensor:
    """``J(pi) = E_{s0 ~ p0}[V^pi(s0)] = E[sum_t gamma**t r_t]`` (``t < T`` for horizon ``T``).

    Args:
        mdp: the MDP.
        pi: ``[S, A]`` policy.

    Returns:
        Scalar tensor, differentiable with respect to ``pi``.
    """
    V, _ = evaluate_policy(mdp, pi)
    return mdp.p0 @ (V if mdp.horizon is None else V[0])


def objective(mdp: TabularMDP, logits: torch.Tensor) -> torch.Tensor:
    """The policy-gradient objective ``J(theta)`` for the tabular softmax policy with ``logits = theta``.

    ``J(theta) = E_{s0 ~ p0}[V^{pi_theta}(s0)]``; for horizon ``T`` this is ``E[sum_{t<T} gamma**t r_t]``.
    Computed exactly, so ``torch.autograd.grad(objective(mdp, theta), theta)`` is the exact policy
    gradient.

    Args:
        mdp: the MDP.
        logits: ``[S, A]`` policy parameters.

    Returns:
        Scalar tensor in the MDP's dtype, differentiable with respect to ``logits``.
    """
    _check_mdp(mdp)
    _check_logits(logits, (mdp.n_states, mdp.n_actions))
    return expected_return(mdp, softmax_policy(logits))


def discounted_state_visitation(mdp: TabularMDP, pi: torch.Tensor) -> torch.Tensor:
    """Where the policy spends its time, as weighted in the policy gradient theorem.

    Infinite horizon: the normalised discounted visitation
    ``d(s) = (1 - gamma) sum_t gamma**t Pr(s_t = s)``, i.e. the solution of
    ``(I - gamma P_pi)^T d = (1 - gamma) p0``; it sums to 1, and the policy gradient theorem reads
    ``grad J = 1/(1 - gamma) sum_s d(s) sum_a grad pi(a|s) Q(s, a)``.

    Finite horizon ``T``: the undiscounted per-time marginals ``mu[t, s] = Pr(s_t = s)`` for
    ``t = 0, ..., T-1`` (each row sums to 1); the discount then appears explicitly in the theorem,
    ``grad J = sum_t gamma**t sum_s mu[t, s] sum_a grad pi(a|s) Q[t](s, a)``.

    Args:
        mdp: the MDP.
        pi: ``[S, A]`` policy.

    Returns:
        ``[S]`` for an infinite horizon, ``[T, S]`` for horizon ``T``; differentiable with respect to ``pi``.
    """
    _check_mdp(mdp)
    pi = _check_policy(mdp, pi)
    P_pi = torch.einsum("sa,sat->st", pi, mdp.P)
    if mdp.horizon is None:
        eye = torch.eye(mdp.n_states, dtype=mdp.dtype, device=mdp.device)
        return torch.linalg.solve((eye - mdp.gamma * P_pi).T, (1 - mdp.gamma) * mdp.p0)
    mus = [mdp.p0]
    for _ in range(mdp.horizon - 1):
        mus.append(mus[-1] @ P_pi)
    return torch.stack(mus)


# ----------------------------------------------------------------------------------------------------
# trajectories: exhaustive enumeration and sampling
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Trajectories:
    """A batch of ``N`` trajectories of ``T`` steps, time-last.

    Step ``t`` of trajectory ``n`` is: in state ``states[n, t]`` take ``actions[n, t]`` and receive
    ``rewards[n, t]``. The state reached after the last step is not recorded.

    Attributes:
        states: ``[N, T]`` int64 state indices.
        actions: ``[N, T]`` int64 action indices.
        rewards: ``[N, T]`` float rewards (undiscounted).
        prob: ``[N]`` exact probability of each trajectory (from :func:`enumerate_trajectories`), or None
            for sampled trajectories, which are equally weighted.
    """

    states: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    prob: torch.Tensor | None = None

    def __post_init__(self):
        for name in ("states", "actions", "rewards"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}")
        if self.states.ndim != 2:
            raise ValueError(f"states must have shape [N, T], got {list(self.states.shape)}")
        shape = tuple(self.states.shape)
        for name in ("actions", "rewards"):
            x = getattr(self, name)
            if tuple(x.shape) != shape:
                raise ValueError(f"{name} must have shape [N, T] = {list(shape)} like states, "
                                 f"got {list(x.shape)}")
        for name in ("states", "actions"):
            if getattr(self, name).dtype != torch.long:
                raise ValueError(f"{name} must have dtype torch.long, got {getattr(self, name).dtype}")
        if not self.rewards.is_floating_point():
            raise ValueError(f"rewards must be a floating-point tensor, got dtype {self.rewards.dtype}")
        if self.prob is not None:
            if not isinstance(self.prob, torch.Tensor) or tuple(self.prob.shape) != shape[:1]:
                is_tensor = isinstance(self.prob, torch.Tensor)
                got = list(self.prob.shape) if is_tensor else type(self.prob).__name__
                raise ValueError(f"prob must be None or a tensor of shape [N] = {[shape[0]]}, got {got}")
        for name in ("actions", "rewards", "prob"):
            x = getattr(self, name)
            if x is not None and x.device != self.states.device:
                raise ValueError(f"{name} must be on the same device as states ({self.states.device}), "
                                 f"got {x.device}")

    @property
    def n(self) -> int:
        """Number of trajectories ``N``."""
        return self.states.shape[0]

    @property
    def horizon(self) -> int:
        """Number of steps ``T``."""
        return self.states.shape[1]

    def discounted_return(self, gamma: float) -> torch.Tensor:
        """``G[n] = sum_t gamma**t rewards[n, t]``, shape ``[N]``."""
        gamma = check_gamma(gamma)
        disc = gamma ** torch.arange(self.horizon, dtype=self.rewards.dtype, device=self.rewards.device)
        return self.rewards @ disc


def enumerate_trajectories(mdp: TabularMDP, pi: torch.Tensor, horizon: int | None = None, *,
                           max_trajectories: int = 2_000_000) -> Trajectories:
    """Every trajectory of length ``T``, with its exact probability.

    The ``(S * A)**T`` sequences ``(s0, a0, s1, a1, ..., s_{T-1}, a_{T-1})`` are listed in lexicographic
    order (``s0`` most significant), built by mixed-radix decoding of ``arange(N)`` -- no Python loop over
    trajectories. The probability of one is

        ``p0(s0) * prod_{t<T} pi(a_t | s_t) * prod_{t<T-1} P(s_{t+1} | s_t, a_t)``;

    the final transition to ``s_T`` sums to 1 and is left out. Zero-probability trajectories are kept
    (dropping them would also drop their gradient, which need not be zero), so the probabilities sum to 1.

    ``prob`` is a direct product of entries of ``pi``, ``P`` and ``p0`` and therefore differentiable:
    ``(traj.prob * f(traj)).sum()`` is an exact expectation whose autograd gradient with respect to
    ``pi`` (or logits behind it) is exact.

    Memory grows as ``N * T``; at the default limit with ``T = 20`` the three ``[N, T]`` tensors take
    about 1 GB.

    Args:
        mdp: the MDP.
        pi: ``[S, A]`` policy.
        horizon: number of steps ``T >= 1``; defaults to ``mdp.horizon`` and is required when that is None
            (the enumeration is then of the first ``T`` steps of the infinite process).
        max_trajectories: refuse when ``(S * A)**T`` exceeds this.

    Returns:
        :class:`Trajectories` with ``N = (S * A)**T`` and ``prob`` ``[N]``, on the MDP's device.
    """
    _check_mdp(mdp)
    pi = _check_policy(mdp, pi)
    T = _resolve_horizon(mdp, horizon)
    limit = _check_positive_int(max_trajectories, "max_trajectories")
    S, A = mdp.n_states, mdp.n_actions
    SA = S * A
    N = SA**T
    if N > limit:
        raise ValueError(f"(S*A)**T = ({S}*{A})**{T} = {N} trajectories exceeds max_trajectories={limit}; "
                         "shorten the horizon, shrink the MDP or raise max_trajectories")
    idx = torch.arange(N, dtype=torch.long, device=mdp.device)
    place = SA ** torch.arange(T - 1, -1, -1, dtype=torch.long, device=mdp.device)  # [T] radix weights
    pair = (idx[:, None] // place) % SA  # [N, T] index of (s_t, a_t)
    states, actions = pair // A, pair % A
    rewards = mdp.R[states, actions]
    prob = mdp.p0[states[:, 0]] * pi[states, actions].prod(-1)
    if T > 1:
        prob = prob * mdp.P[states[:, :-1], actions[:, :-1], states[:, 1:]].prod(-1)
    return Trajectories(states, actions, rewards, prob)


def sample_trajectories(mdp: TabularMDP, pi: torch.Tensor, n: int, *, horizon: int | None = None,
                        generator: torch.Generator | None = None, device=None) -> Trajectories:
    """Roll out ``n`` independent trajectories of ``T`` steps under ``pi``.

    Vectorised over the ``n`` rollouts; the only Python loop is over time. Each draw is a
    ``torch.multinomial`` call using ``generator``. Sampling happens on the generator's device (the MDP's
    device when ``generator`` is None, drawing from that device's global generator), and the results are
    then moved to ``device``; with a CPU generator the samples are therefore the same whatever ``device``
    is. The policy is used as data only: nothing here carries gradients.

    Args:
        mdp: the MDP.
        pi: ``[S, A]`` policy.
        n: number of trajectories, ``>= 1``.
        horizon: number of steps ``T >= 1``; defaults to ``mdp.horizon``, required when that is None.
        generator: source of randomness (seeded ``torch.Generator``), or None for the global one.
        device: where to put the results; the MDP's device when None.

    Returns:
        :class:`Trajectories` with ``states``, ``actions``, ``rewards`` of shape ``[n, T]`` and ``prob=None``.
    """
    _check_mdp(mdp)
    pi = _check_policy(mdp, pi)
    n = _check_positive_int(n, "n")
    T = _resolve_horizon(mdp, horizon)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    where = generator.device if generator is not None else mdp.device
    out = mdp.device if device is None else torch.device(device)
    P, R, p0 = (x.detach().to(where) for x in (mdp.P, mdp.R, mdp.p0))
    pi = pi.detach().to(where)
    s = torch.multinomial(p0, n, replacement=True, generator=generator)
    states, actions = [], []
    for t in range(T):
        a = torch.multinomial(pi[s], 1, generator=generator).squeeze(-1)
        states.append(s)
        actions.append(a)
        if t < T - 1:
            s = torch.multinomial(P[s, a], 1, generator=generator).squeeze(-1)
    states, actions = torch.stack(states, -1), torch.stack(actions, -1)
    rewards = R[states, actions]
    return Trajectories(states.to(out), actions.to(out), rewards.to(out), None)


def trajectory_logprob_actions(logits: torch.Tensor, traj: Trajectories) -> torch.Tensor:
    """Log-probabilities ``log pi_theta(a_t | s_t)`` of the actions taken, under the softmax policy.

    Computed as ``log_softmax(logits, -1)[states, actions]`` (stable for large logits). Summed over
    ``t`` this is the part of ``log p_theta(trajectory)`` that depends on ``theta``; the dynamics terms
    do not, which is why the score-function (REINFORCE) estimator needs only this.

    Args:
        logits: ``[S, A]`` policy parameters.
        traj: trajectories whose indices lie in ``[0, S)`` and ``[0, A)``.

    Returns:
        ``[N, T]`` tensor on ``logits``' device, differentiable with respect to ``logits``.
    """
    _check_logits(logits)
    if not isinstance(traj, Trajectories):
        raise ValueError(f"traj must be a Trajectories, got {type(traj).__name__}")
    S, A = logits.shape
    states, actions = traj.states.to(logits.device), traj.actions.to(logits.device)
    if states.numel():
        if int(states.min()) < 0 or int(states.max()) >= S:
            raise ValueError(f"traj.states must lie in [0, S) = [0, {S}) to index logits of shape {[S, A]}")
        if int(actions.min()) < 0 or int(actions.max()) >= A:
            raise ValueError(f"traj.actions must lie in [0, A) = [0, {A}) to index logits of shape {[S, A]}")
    return torch.log_softmax(logits, dim=-1)[states, actions]


def tabular_score(pi: torch.Tensor, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Closed-form score of a tabular softmax policy, for a whole batch of steps at once.

    For ``pi = softmax(theta)`` row by row,
    ``d log pi(a | s) / d theta[s', b] = [s = s'] ([a = b] - pi(b | s))``. This gives per-trajectory gradient
    estimates without one backward pass per trajectory, which is what variance computations need.

    Args:
        pi: ``[S, A]`` policy probabilities (rows sum to 1).
        states: ``[...]`` integer states in ``[0, S)``.
        actions: ``[...]`` integer actions in ``[0, A)``, same shape as ``states``.

    Returns:
        ``[..., S, A]`` tensor: the gradient of ``log pi(actions | states)`` with respect to ``theta``.
    """
    if not isinstance(pi, torch.Tensor) or pi.ndim != 2 or not pi.is_floating_point():
        raise ValueError(f"pi must be a floating-point tensor of shape [S, A], got {getattr(pi, 'shape', pi)}")
    _check_distribution_rows(pi, "pi", "rows of pi (pi[s, :] over actions)")
    if not isinstance(states, torch.Tensor) or not isinstance(actions, torch.Tensor):
        raise ValueError("states and actions must be integer tensors")
    if states.shape != actions.shape:
        raise ValueError(f"states and actions must have the same shape, got {list(states.shape)} "
                         f"and {list(actions.shape)}")
    if states.is_floating_point() or actions.is_floating_point():
        raise ValueError("states and actions must be integer tensors")
    S, A = pi.shape
    if states.numel() and (int(states.min()) < 0 or int(states.max()) >= S):
        raise ValueError(f"states must lie in [0, S) = [0, {S})")
    if actions.numel() and (int(actions.min()) < 0 or int(actions.max()) >= A):
        raise ValueError(f"actions must lie in [0, A) = [0, {A})")
    states, actions = states.to(pi.device), actions.to(pi.device)
    row = torch.nn.functional.one_hot(actions, A).to(pi.dtype) - pi[states]          # [..., A]
    return torch.nn.functional.one_hot(states, S).to(pi.dtype)[..., :, None] * row[..., None, :]
