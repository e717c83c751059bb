r"""Policy evaluation by temporal differences: targets, tabular estimators and the exact linear fixed points.

Chapter 3 derives what each estimator of :math:`V^\pi` converges to. This module holds the pieces, read in order:

- **Targets** (tensors, time-last ``[..., T]``): :func:`td_targets` (one step, with an explicit stop-gradient),
  :func:`td_loss` (the semi-gradient loss, or the full-gradient "residual" loss when asked), :func:`n_step_targets`
  and :func:`lambda_targets` (the :math:`\lambda`-return, which is :func:`rl4llm.returns.gae` plus the values).
  Episode boundaries follow :func:`rl4llm.returns.gae`: ``terminated`` stops bootstrapping, ``truncated`` (a time
  limit) bootstraps from ``next_values``, the value of the observation the episode was cut at.
- **Tabular estimators**: :func:`tabular_evaluate` (offline MC, TD(0), n-step and TD(:math:`\lambda`) over padded
  episodes, vectorised over independent runs), :func:`batch_mc`, :func:`batch_td0` and
  :func:`certainty_equivalence` (what batch MC and batch TD(0) converge to on a fixed data set).
- **Linear TD, exactly**: :func:`td_matrices` and :func:`td_fixed_point` (the TD(:math:`\lambda`) fixed point),
  :func:`projection`, :func:`msve`, :func:`mspbe`, :func:`residual_gradient_fixed_point`,
  :func:`baird_counterexample`, and :func:`sample_linear_td` (sampled TD(0) on many independent chains).

Linear quantities refer to a Markov reward process: ``P [S, S]`` (the chain of the evaluated policy), ``r [S]``
(expected reward in each state), features ``Phi [S, K]`` and a state weighting ``d [S]`` (non-negative, summing to
1). Everything here is float64-friendly and stays on the inputs' device.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

from rl4llm.returns import accumulation_dtype, check_dones, check_gamma, check_lam, gae, gae_inputs

__all__ = [
    "baird_counterexample",
    "batch_mc",
    "batch_td0",
    "certainty_equivalence",
    "lambda_targets",
    "msve",
    "mspbe",
    "n_step_targets",
    "projection",
    "residual_gradient_fixed_point",
    "sample_linear_td",
    "tabular_evaluate",
    "td_fixed_point",
    "td_loss",
    "td_matrices",
    "td_targets",
]


# ----------------------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------------------


def _float(x, name: str, shape: tuple[int, ...] | None = None, ndim: int | None = None, *,
           what: str = "") -> Tensor:
    """A finite floating-point tensor with the given shape (or number of dims), else ``ValueError``."""
    expected = what or (str(list(shape)) if shape is not None else f"{ndim} dims")
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {expected}, got {list(x.shape)} (no broadcasting is done)")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have shape {expected}, got {list(x.shape)}")
    if x.numel() and not bool(torch.isfinite(x.detach()).all()):
        raise ValueError(f"{name} must be finite, found NaN or inf")
    return x


def _index(x, name: str, shape: tuple[int, ...], n_states: int) -> Tensor:
    """An integer tensor of state indices in ``[0, n_states)`` with the given shape."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of state indices, got {type(x).__name__}")
    if x.is_floating_point() or x.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer state indices, got dtype {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= n_states):
        raise ValueError(f"{name} must hold state indices in [0, {n_states}), got values in "
                         f"[{int(x.min())}, {int(x.max())}]")
    return x.long()


def _pos_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _pos_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_mrp(P, r, Phi=None, d=None) -> None:
    """Shapes and values of a Markov reward process ``(P, r)``, features ``Phi`` and weighting ``d``."""
    P = _float(P, "P", what="[S, S]")
    if P.dim() != 2 or P.shape[0] != P.shape[1] or P.shape[0] < 1:
        raise ValueError(f"P must have shape [S, S], got {list(P.shape)}")
    S = P.shape[0]
    tol = 1e-9 if P.dtype == torch.float64 else 1e-5
    if bool((P < 0).any()) or bool(((P.sum(-1) - 1).abs() > tol).any()):
        raise ValueError("P must be a stochastic matrix: non-negative entries, rows summing to 1")
    _float(r, "r", (S,))
    if Phi is not None:
        Phi = _float(Phi, "Phi", what=f"[S, K] with S = {S}")
        if Phi.dim() != 2 or Phi.shape[0] != S or Phi.shape[1] < 1:
            raise ValueError(f"Phi must have shape [S, K] with S = {S}, got {list(Phi.shape)}")
    if d is not None:
        d = _float(d, "d", (S,))
        if bool((d < 0).any()) or abs(float(d.sum()) - 1) > tol:
            raise ValueError("d must be a distribution over states: non-negative, summing to 1")
    for name, x in (("r", r), ("Phi", Phi), ("d", d)):
        if x is not None and (x.dtype != P.dtype or x.device != P.device):
            raise ValueError(f"{name} must have P's dtype and device ({P.dtype}, {P.device}), "
                             f"got {x.dtype}, {x.device}")


def _check_full_rank(Phi: Tensor, d: Tensor) -> Tensor:
    """The Gram matrix ``Phi^T D Phi``, or ``ValueError`` when it is singular (features dependent under d)."""
    G = Phi.T @ (d[:, None] * Phi)
    if int(torch.linalg.matrix_rank(G)) < Phi.shape[1]:
        raise ValueError("Phi^T D Phi is singular: the features are linearly dependent on the states d weights "
                         "(drop a feature, or give every state weight)")
    return G


# ----------------------------------------------------------------------------------------------------------
# targets (chapter 3, section 3.1 and 3.3)
# ----------------------------------------------------------------------------------------------------------


def td_targets(rewards: Tensor, next_values: Tensor, *, gamma, terminated: Tensor | None = None) -> Tensor:
    r"""One-step TD targets :math:`y_t = r_t + \gamma (1 - \mathrm{term}_t)\, \mathrm{sg}[V(s_{t+1})]`.

    The stop-gradient is explicit: the result is detached, so a loss :math:`\tfrac12 (V(s_t) - y_t)^2` has the
    semi-gradient :math:`-\delta_t \nabla V(s_t)` (chapter 3, §3.1). A truncated step keeps its bootstrap: pass
    the value of the observation the time limit cut the episode at in ``next_values`` and leave ``terminated``
    False there.

    Args:
        rewards: ``[...]`` finite rewards.
        next_values: ``[...]`` values of the next observations, the same shape (a ``[B, 1]`` against ``[B]``
            is refused rather than broadcast).
        gamma: discount in (0, 1].
        terminated: optional ``[...]`` bool (or 0/1): the episode reached a terminal state, whose value is 0.

    Returns:
        ``[...]`` detached targets in the promoted dtype of the inputs.
    """
    rewards = _float(rewards, "rewards")
    next_values = _float(next_values, "next_values", tuple(rewards.shape))
    gamma = check_gamma(gamma)
    nv = next_values.detach()
    if terminated is not None:
        terminated = check_dones(terminated, rewards, "terminated")
        nv = nv.masked_fill(terminated, 0.0)
    return (rewards.detach() + gamma * nv).detach()


def td_loss(values: Tensor, rewards: Tensor, next_values: Tensor, *, gamma, terminated: Tensor | None = None,
            mask: Tensor | None = None, semi_gradient: bool = True) -> Tensor:
    r"""Mean of :math:`\tfrac12 (V(s_t) - r_t - \gamma V(s_{t+1}))^2` over the valid steps.

    With ``semi_gradient=True`` (the TD update) the target is :func:`td_targets`, detached, and the gradient is
    :math:`-\delta_t \nabla V(s_t)`. With ``semi_gradient=False`` the target keeps its graph and the gradient is
    the *full* (residual) gradient :math:`-\delta_t (\nabla V(s_t) - \gamma \nabla V(s_{t+1}))`, the one naive
    code gets when it forgets the stop-gradient (chapter 3, §3.1 derives both and §3.4 shows where each goes).

    Args:
        values: ``[...]`` :math:`V(s_t)`, with gradient.
        rewards, next_values, terminated: as in :func:`td_targets`, all of ``values``' shape.
        mask: optional ``[...]`` bool, True on the steps that count; at least one must be True.
        semi_gradient: detach the target (default) or not.

    Returns:
        Scalar loss.
    """
    values = _float(values, "values")
    rewards = _float(rewards, "rewards", tuple(values.shape))
    next_values = _float(next_values, "next_values", tuple(values.shape))
    if not isinstance(semi_gradient, bool):
        raise TypeError(f"semi_gradient must be a bool, got {type(semi_gradient).__name__}")
    gamma = check_gamma(gamma)
    if semi_gradient:
        target = td_targets(rewards, next_values, gamma=gamma, terminated=terminated)
    else:
        nv = next_values
        if terminated is not None:
            nv = nv.masked_fill(check_dones(terminated, values, "terminated", "values"), 0.0)
        target = rewards + gamma * nv
    sq = 0.5 * (values - target) ** 2
    if mask is None:
        return sq.mean()
    mask = check_dones(mask, values, "mask", "values")
    n = int(mask.sum())
    if n == 0:
        raise ValueError("mask selects no step: the loss of an empty batch is undefined")
    return sq.masked_fill(~mask, 0.0).sum() / n


def n_step_targets(rewards: Tensor, values: Tensor, next_values: Tensor | None = None, *, n: int, gamma,
                   terminated: Tensor | None = None, truncated: Tensor | None = None,
                   mask: Tensor | None = None, bootstrap=None) -> Tensor:
    r"""n-step returns :math:`G^{(n)}_t = \sum_{i<m} \gamma^i r_{t+i} + \gamma^m V(s_{t+m})`, detached.

    :math:`m = n`, or fewer steps when the episode ends first: after a terminal step the bootstrap is 0, after a
    truncated step it is ``next_values`` there, at the end of the row it is ``bootstrap``. Computed as
    :math:`V(s_t) + \sum_{l<m} \gamma^l \delta_{t+l}` from the residuals of :func:`rl4llm.returns.gae_inputs`
    (the same boundary conventions as GAE). ``n = 1`` is :func:`td_targets`; ``n >= T`` is the return to the
    episode's end (Monte Carlo, plus the bootstrap of a cut episode). At padded steps the target equals the value,
    so the error there is 0.

    Args:
        rewards: ``[..., T]`` rewards.
        values: ``[..., T]`` :math:`V(s_t)`.
        next_values: optional ``[..., T]`` values of the observation after each step (needed for truncation inside
            a row); ``None``: ``values`` shifted by one step, see :func:`rl4llm.returns.gae`. Inside an episode
            ``next_values[..., t]`` must be ``values[..., t + 1]`` (the same observation), as it is when both are
            read from one table or one network.
        n: number of rewards before the bootstrap, ``>= 1``.
        gamma: discount in (0, 1].
        terminated, truncated, mask, bootstrap: as in :func:`rl4llm.returns.gae`.

    Returns:
        ``[..., T]`` detached targets.
    """
    n = _pos_int(n, "n")
    values = values.detach() if isinstance(values, Tensor) else values
    next_values = next_values.detach() if isinstance(next_values, Tensor) else next_values
    deltas, decay, _ = gae_inputs(rewards, values, next_values, gamma=gamma, lam=1.0, terminated=terminated,
                                  truncated=truncated, mask=mask, bootstrap=bootstrap)
    T = deltas.shape[-1]
    out = deltas.clone()
    coef = torch.ones_like(deltas)
    for ell in range(1, min(n, T)):
        coef = coef[..., : T - ell] * decay[..., ell - 1: T - 1]
        out[..., : T - ell] += coef * deltas[..., ell:]
    return (values.to(out.dtype) + out).to(torch.promote_types(rewards.dtype, values.dtype)).detach()


def lambda_targets(rewards: Tensor, values: Tensor, next_values: Tensor | None = None, *, gamma, lam,
                   terminated: Tensor | None = None, truncated: Tensor | None = None, mask: Tensor | None = None,
                   bootstrap=None) -> Tensor:
    r"""The :math:`\lambda`-return :math:`G^\lambda_t = (1-\lambda)\sum_{n \ge 1} \lambda^{n-1} G^{(n)}_t`, detached.

    It equals :math:`V(s_t) + \hat A^{\mathrm{GAE}(\gamma, \lambda)}_t` (chapter 7), so it is computed by
    :func:`rl4llm.returns.gae`; in an episode that ends, the tail weight goes to the full return. ``lam = 0``
    gives :func:`td_targets`, ``lam = 1`` the Monte Carlo return (plus the bootstrap of a cut episode). Arguments
    as in :func:`n_step_targets`, with ``lam`` in [0, 1] instead of ``n``.
    """
    check_lam(lam)
    values = values.detach() if isinstance(values, Tensor) else values
    next_values = next_values.detach() if isinstance(next_values, Tensor) else next_values
    adv = gae(rewards, values, next_values, gamma=gamma, lam=lam, terminated=terminated, truncated=truncated,
              mask=mask, bootstrap=bootstrap)
    return (values.to(adv.dtype) + adv).detach()


# ----------------------------------------------------------------------------------------------------------
# tabular estimators (chapter 3, sections 3.3 and 3.6)
# ----------------------------------------------------------------------------------------------------------


def tabular_evaluate(V0: Tensor, states: Tensor, rewards: Tensor, next_states: Tensor, *, gamma, alpha: float,
                     lam: float | None = None, n: int | None = None, terminated: Tensor | None = None,
                     truncated: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    r"""Offline tabular evaluation over a sequence of episodes, for many independent runs at once.

    Run ``k`` sees episodes ``e = 0, 1, ...`` in order. For each episode the targets of all its steps are computed
    with the table as it was when the episode began (:func:`lambda_targets` or :func:`n_step_targets`), then every
    visited state moves towards its targets: :math:`V(s_t) \mathrel{+}= \alpha\,(y_t - V(s_t))`, summed over the
    visits of the episode. ``lam = 1`` is every-visit constant-:math:`\alpha` Monte Carlo, ``lam = 0`` (or
    ``n = 1``) TD(0), ``n`` the n-step method, and ``lam`` in between the offline :math:`\lambda`-return algorithm,
    which equals offline TD(:math:`\lambda`) with accumulating traces (Sutton and Barto, §12.1).

    Args:
        V0: ``[S]`` or ``[R, S]`` initial values (a ``[S]`` table is copied to every run).
        states, next_states: ``[R, E, T]`` integer states; ``next_states[k, e, t]`` is the observation after step
            ``t`` (at a truncation: the one the episode was cut at).
        rewards: ``[R, E, T]`` rewards.
        gamma: discount in (0, 1].
        alpha: step size > 0.
        lam, n: exactly one of them.
        terminated, truncated, mask: optional ``[R, E, T]`` flags with the meaning of :func:`rl4llm.returns.gae`.

    Returns:
        ``[E + 1, R, S]``: the tables before the first episode and after each one.
    """
    if (lam is None) == (n is None):
        raise ValueError("give exactly one of lam (TD(lambda), lam=1 is Monte Carlo) and n (n-step)")
    V0 = _float(V0, "V0")
    rewards = _float(rewards, "rewards", ndim=3, what="[R, E, T]")
    R, E, T = rewards.shape
    if V0.dim() == 1:
        V0 = V0.expand(R, -1)
    if V0.dim() != 2 or V0.shape[0] != R:
        raise ValueError(f"V0 must have shape [S] or [R, S] = [{R}, S], got {list(V0.shape)}")
    S = V0.shape[1]
    states = _index(states, "states", (R, E, T), S)
    next_states = _index(next_states, "next_states", (R, E, T), S)
    alpha = _pos_float(alpha, "alpha")
    flags = {}
    for name, f in (("terminated", terminated), ("truncated", truncated), ("mask", mask)):
        flags[name] = check_dones(f, rewards, name)
    V = V0.detach().clone().to(torch.promote_types(V0.dtype, rewards.dtype))
    out = [V.clone()]
    for e in range(E):
        s, s2 = states[:, e], next_states[:, e]
        v, nv = V.gather(1, s), V.gather(1, s2)
        fl = {k: (None if f is None else f[:, e]) for k, f in flags.items()}
        if n is not None:
            y = n_step_targets(rewards[:, e], v, nv, n=n, gamma=gamma, **fl)
        else:
            y = lambda_targets(rewards[:, e], v, nv, gamma=gamma, lam=lam, **fl)
        step = alpha * (y - v)
        if fl["mask"] is not None:
            step = step.masked_fill(~fl["mask"], 0.0)
        V = V.scatter_add(1, s, step)
        if not bool(torch.isfinite(V).all()):
            raise ValueError(f"values became non-finite after episode {e} (alpha = {alpha} too large?)")
        out.append(V.clone())
    return torch.stack(out)


def _transitions(states, rewards, next_states, terminated, n_states):
    rewards = _float(rewards, "rewards", ndim=1, what="[M]")
    M = rewards.shape[0]
    if M == 0:
        raise ValueError("rewards is empty: no transitions to learn from")
    n_states = _pos_int(n_states, "n_states")
    states = _index(states, "states", (M,), n_states)
    next_states = _index(next_states, "next_states", (M,), n_states)
    terminated = check_dones(terminated, rewards, "terminated")
    if terminated is None:
        terminated = torch.zeros(M, dtype=torch.bool, device=rewards.device)
    return states, rewards, next_states, terminated, n_states


def certainty_equivalence(states: Tensor, rewards: Tensor, next_states: Tensor, *, n_states: int, gamma,
                          terminated: Tensor | None = None) -> Tensor:
    r"""The value function of the empirical (maximum-likelihood) Markov reward process of a batch of transitions.

    With :math:`N(s)` visits of ``s``, :math:`\hat r(s)` the mean reward and :math:`\hat P(s' \mid s)` the fraction
    of visits that continued to ``s'`` (a terminated transition goes to a terminal state of value 0), solve
    :math:`V = \hat r + \gamma \hat P V` on the visited states. This is the fixed point of batch TD(0)
    (chapter 3, §3.6). A truncated transition is an ordinary transition to the observation it was cut at.

    Args:
        states, next_states: ``[M]`` integer states of the transitions.
        rewards: ``[M]`` rewards.
        n_states: ``S``.
        gamma: discount in (0, 1].
        terminated: optional ``[M]`` bool.

    Returns:
        ``[S]`` values; NaN at states never visited (the data say nothing about them).

    Raises:
        ValueError: bad shapes, or :math:`I - \gamma \hat P` singular (with ``gamma = 1``, data that never reach
            termination from some visited state).
    """
    states, rewards, next_states, terminated, S = _transitions(states, rewards, next_states, terminated, n_states)
    gamma = check_gamma(gamma)
    dt = accumulation_dtype(rewards.dtype)
    N = torch.zeros(S, dtype=dt, device=rewards.device).index_add_(0, states, torch.ones_like(rewards, dtype=dt))
    visited = N > 0
    if bool((~visited[next_states[~terminated]]).any()):
        raise ValueError("a transition continues to a state that is never visited as a start state; its value "
                             "is unknown (mark the transition terminated, or include that state's transitions)")
    r_hat = torch.zeros(S, dtype=dt, device=rewards.device).index_add_(0, states, rewards.to(dt))
    C = torch.zeros(S, S, dtype=dt, device=rewards.device)
    cont = ~terminated
    C.index_put_((states[cont], next_states[cont]), torch.ones(int(cont.sum()), dtype=dt, device=rewards.device),
                 accumulate=True)
    idx = visited.nonzero().squeeze(-1)
    Nv = N[idx]
    A = torch.eye(len(idx), dtype=dt, device=rewards.device) - gamma * C[idx][:, idx] / Nv[:, None]
    b = r_hat[idx] / Nv
    if int(torch.linalg.matrix_rank(A)) < len(idx):
        raise ValueError("I - gamma P_hat is singular: with gamma = 1 some visited state never reaches "
                         "termination in the data")
    V = torch.full((S,), float("nan"), dtype=dt, device=rewards.device)
    V[idx] = torch.linalg.solve(A, b)
    return V.to(rewards.dtype)


def batch_td0(states: Tensor, rewards: Tensor, next_states: Tensor, *, n_states: int, gamma,
              terminated: Tensor | None = None, alpha: float | None = None, tol: float = 1e-12,
              max_iters: int = 100_000) -> Tensor:
    r"""Batch TD(0): sweep the same transitions until the summed TD(0) increments vanish.

    Each sweep computes :math:`\delta_m = r_m + \gamma (1 - \mathrm{term}_m) V(s'_m) - V(s_m)` for every transition
    with the current table and applies :math:`V(s) \mathrel{+}= \alpha \sum_{m: s_m = s} \delta_m` (Sutton and Barto,
    §6.3). The sum vanishes exactly at :func:`certainty_equivalence`.

    Args:
        states, rewards, next_states, n_states, gamma, terminated: as in :func:`certainty_equivalence`.
        alpha: step size; default ``1 / max_s N(s)``, with which each sweep is a convex combination of the table and
            its empirical Bellman update (a contraction when ``gamma < 1`` or every state reaches termination).
        tol: stop when the largest increment is below ``tol``.
        max_iters: ``ValueError`` if not converged after this many sweeps.

    Returns:
        ``[S]`` values; NaN at states never visited.
    """
    states, rewards, next_states, terminated, S = _transitions(states, rewards, next_states, terminated, n_states)
    gamma = check_gamma(gamma)
    max_iters = _pos_int(max_iters, "max_iters")
    tol = _pos_float(tol, "tol")
    dt = accumulation_dtype(rewards.dtype)
    N = torch.zeros(S, dtype=dt, device=rewards.device).index_add_(0, states, torch.ones_like(rewards, dtype=dt))
    alpha = 1.0 / float(N.max()) if alpha is None else _pos_float(alpha, "alpha")
    V = torch.zeros(S, dtype=dt, device=rewards.device)
    r = rewards.to(dt)
    cont = (~terminated).to(dt)
    for _ in range(max_iters):
        delta = r + gamma * cont * V[next_states] - V[states]
        inc = alpha * torch.zeros_like(V).index_add_(0, states, delta)
        V = V + inc
        if not bool(torch.isfinite(V).all()):
            raise ValueError(f"batch TD(0) diverged (alpha = {alpha} too large)")
        if float(inc.abs().max()) < tol:
            break
    else:
        raise ValueError(f"batch TD(0) did not converge in {max_iters} sweeps (tol = {tol})")
    return V.masked_fill(N == 0, float("nan")).to(rewards.dtype)


def batch_mc(states: Tensor, returns: Tensor, *, n_states: int) -> Tensor:
    r"""Batch Monte Carlo: the mean of the observed returns from each state (every visit counts).

    This is the least-squares fit of a table to the returns, the fixed point of constant-:math:`\alpha` MC swept
    over the same batch (chapter 3, §3.6).

    Args:
        states: ``[M]`` integer states.
        returns: ``[M]`` the return observed from each of those visits.
        n_states: ``S``.

    Returns:
        ``[S]`` per-state means; NaN at states never visited.
    """
    returns = _float(returns, "returns", ndim=1, what="[M]")
    n_states = _pos_int(n_states, "n_states")
    states = _index(states, "states", tuple(returns.shape), n_states)
    if returns.numel() == 0:
        raise ValueError("returns is empty")
    dt = accumulation_dtype(returns.dtype)
    tot = torch.zeros(n_states, dtype=dt, device=returns.device).index_add_(0, states, returns.to(dt))
    N = torch.zeros(n_states, dtype=dt, device=returns.device).index_add_(0, states, torch.ones_like(tot[states]))
    return (tot / N).to(returns.dtype)  # 0/0 = NaN at unvisited states


# ----------------------------------------------------------------------------------------------------------
# linear TD, exactly (chapter 3, sections 3.4 and 3.5)
# ----------------------------------------------------------------------------------------------------------


def projection(Phi: Tensor, d: Tensor) -> Tensor:
    r"""The :math:`D`-weighted least-squares projection :math:`\Pi = \Phi (\Phi^\top D \Phi)^{-1} \Phi^\top D`.

    :math:`\Pi v` is the closest vector to ``v`` in the span of the features in :math:`\|x\|_D^2 = \sum_s d(s)
    x(s)^2`. Args: ``Phi [S, K]`` (columns independent under ``d``), ``d [S]`` a distribution. Returns ``[S, S]``.
    """
    Phi = _float(Phi, "Phi", ndim=2, what="[S, K]")
    d = _float(d, "d", (Phi.shape[0],))
    if bool((d < 0).any()):
        raise ValueError("d must be non-negative")
    G = _check_full_rank(Phi, d)
    return Phi @ torch.linalg.solve(G, Phi.T * d)


def td_matrices(P: Tensor, r: Tensor, Phi: Tensor, d: Tensor, *, gamma, lam=0.0) -> tuple[Tensor, Tensor]:
    r"""The expected linear TD(:math:`\lambda`) update :math:`\mathbb E[\Delta\theta] = \alpha (b - A\theta)`.

    .. math::
        A = \Phi^\top D (I - \gamma\lambda P)^{-1} (I - \gamma P) \Phi, \qquad
        b = \Phi^\top D (I - \gamma\lambda P)^{-1} r,

    for states weighted by ``d`` (the on-policy stationary distribution in the theorem of Tsitsiklis and Van Roy;
    any ``d`` for off-policy weighting). The expected iteration converges for small steps iff every eigenvalue of
    :math:`A` has positive real part (chapter 3, §3.5, Baird's counterexample).

    Args:
        P: ``[S, S]`` transition matrix of the evaluated policy.
        r: ``[S]`` expected reward in each state.
        Phi: ``[S, K]`` features.
        d: ``[S]`` state weighting.
        gamma: discount in (0, 1]; with ``gamma = 1`` the caller is responsible for :math:`I - \gamma P` being
            meaningful (the solve raises when :math:`I - \gamma\lambda P` is singular).
        lam: :math:`\lambda` in [0, 1].

    Returns:
        ``(A, b)``: ``[K, K]`` and ``[K]``.
    """
    _check_mrp(P, r, Phi, d)
    gamma = check_gamma(gamma)
    lam = check_lam(lam)
    eye = torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
    M = eye - gamma * lam * P
    if int(torch.linalg.matrix_rank(M)) < P.shape[0]:
        raise ValueError("I - gamma lam P is singular (gamma lam = 1 on a chain with a closed class)")
    W = Phi.T * d                                   # Phi^T D
    left = torch.linalg.solve(M.T, W.T).T           # Phi^T D (I - gamma lam P)^{-1}
    return left @ (eye - gamma * P) @ Phi, left @ r


def td_fixed_point(P: Tensor, r: Tensor, Phi: Tensor, d: Tensor, *, gamma, lam=0.0) -> Tensor:
    r"""The linear TD(:math:`\lambda`) fixed point :math:`\theta_\mathrm{TD} = A^{-1} b` of :func:`td_matrices`.

    For :math:`\lambda = 0` it is the fixed point of the projected Bellman operator, :math:`\Phi\theta = \Pi T^\pi
    \Phi\theta`; for :math:`\lambda = 1` it is the projection :math:`\Pi V^\pi` (chapter 3, §3.4). Returns ``[K]``.

    Raises:
        ValueError: :math:`A` singular (no unique fixed point), or the checks of :func:`td_matrices`.
    """
    A, b = td_matrices(P, r, Phi, d, gamma=gamma, lam=lam)
    if int(torch.linalg.matrix_rank(A)) < A.shape[0]:
        raise ValueError("the TD matrix A is singular: no unique TD fixed point for these features and d")
    return torch.linalg.solve(A, b)


def msve(values: Tensor, v_true: Tensor, d: Tensor) -> Tensor:
    r"""Mean squared value error :math:`\overline{\mathrm{VE}} = \sum_s d(s) (v(s) - V^\pi(s))^2`. Shapes ``[S]``."""
    values = _float(values, "values", ndim=1, what="[S]")
    v_true = _float(v_true, "v_true", tuple(values.shape))
    d = _float(d, "d", tuple(values.shape))
    return (d * (values - v_true) ** 2).sum()


def mspbe(theta: Tensor, P: Tensor, r: Tensor, Phi: Tensor, d: Tensor, *, gamma) -> Tensor:
    r"""Mean squared projected Bellman error :math:`\|\Pi T^\pi \Phi\theta - \Phi\theta\|_D^2`, 0 at the TD fixed
    point. ``theta [K]``, the rest as in :func:`td_matrices`."""
    _check_mrp(P, r, Phi, d)
    theta = _float(theta, "theta", (Phi.shape[1],))
    gamma = check_gamma(gamma)
    v = Phi @ theta
    err = projection(Phi, d) @ (r + gamma * P @ v) - v
    return (d * err ** 2).sum()


def residual_gradient_fixed_point(P: Tensor, r: Tensor, Phi: Tensor, d: Tensor, *, gamma,
                                  double_sampling: bool = False) -> Tensor:
    r"""Where the expected residual-gradient update :math:`\delta (\phi(s) - \gamma\phi(s'))` comes to rest.

    With one sampled next state (``double_sampling=False``, what the naive full-gradient loss of :func:`td_loss`
    does) it minimises the mean squared TD error :math:`\mathbb E_d[\delta^2]`, whose normal equations are

    .. math::
        \big(\Phi^\top D\Phi - \gamma\Phi^\top D P\Phi - \gamma\Phi^\top P^\top D\Phi
        + \gamma^2 \Phi^\top \mathrm{diag}(P^\top d)\Phi\big)\theta = \Phi^\top D r - \gamma \Phi^\top P^\top D r.

    With two independent next states (``double_sampling=True``) the last term of the matrix becomes
    :math:`\gamma^2\Phi^\top P^\top D P \Phi` and the minimiser is that of the Bellman error
    :math:`\|T^\pi\Phi\theta - \Phi\theta\|_D^2`. The rewards are assumed to depend on the state only (``r [S]``);
    on deterministic transitions both coincide (chapter 3, §3.5).

    Returns:
        ``[K]`` parameters.
    """
    _check_mrp(P, r, Phi, d)
    gamma = check_gamma(gamma)
    if not isinstance(double_sampling, bool):
        raise TypeError(f"double_sampling must be a bool, got {type(double_sampling).__name__}")
    D = torch.diag(d)
    if double_sampling:
        second = P.T @ D @ P
    else:
        second = torch.diag(P.T @ d)
    M = Phi.T @ (D - gamma * D @ P - gamma * P.T @ D + gamma ** 2 * second) @ Phi
    b = Phi.T @ (D @ r - gamma * P.T @ D @ r)
    if int(torch.linalg.matrix_rank(M)) < M.shape[0]:
        raise ValueError("the residual-gradient normal equations are singular for these features and d")
    return torch.linalg.solve(M, b)


def baird_counterexample(gamma: float = 0.99, *, dtype: torch.dtype = torch.float64
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Baird's seven-state counterexample (Sutton and Barto, Figure 11.1), as a Markov reward process.

    The target policy always takes the "solid" action, which moves every state to state 7 (index 6); all rewards
    are 0, so :math:`V^\pi = 0` and is representable (:math:`\theta = 0`). Features: state :math:`i < 7` has value
    :math:`2\theta_i + \theta_8`, state 7 has :math:`\theta_7 + 2\theta_8`. The behaviour policy visits the seven
    states uniformly.

    Returns:
        ``(P, r, Phi, d_behaviour)``: ``[7, 7]``, ``[7]``, ``[7, 8]``, ``[7]``.
    """
    gamma = check_gamma(gamma)
    P = torch.zeros(7, 7, dtype=dtype)
    P[:, 6] = 1.0
    Phi = torch.zeros(7, 8, dtype=dtype)
    for i in range(6):
        Phi[i, i], Phi[i, 7] = 2.0, 1.0
    Phi[6, 6], Phi[6, 7] = 1.0, 2.0
    return P, torch.zeros(7, dtype=dtype), Phi, torch.full((7,), 1 / 7, dtype=dtype)


def sample_linear_td(P: Tensor, r: Tensor, Phi: Tensor, *, gamma, n_chains: int, n_steps: int,
                     alpha0: float = 0.1, decay: float = 0.7, tau: float = 100.0, theta0: Tensor | None = None,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    r"""Sampled on-policy linear TD(0) on ``n_chains`` independent chains, vectorised (the loop is over time).

    Each chain starts from a state drawn from the stationary distribution of ``P`` (given as the left Perron
    vector, computed here) and follows ``P``; at step ``t`` it updates
    :math:`\theta \mathrel{+}= \alpha_t \delta_t \phi(s_t)` with :math:`\alpha_t = \alpha_0 / (1 + t/\tau)^{\kappa}`
    (``kappa = decay`` in (1/2, 1]: the Robbins-Monro conditions hold) and rewards ``r[s_t]``. The second output is
    the Polyak-Ruppert average of the iterates over the second half of the run, whose spread across chains is what
    a central-limit band is built from (chapter 3, §3.4).

    Returns:
        ``(theta_last, theta_avg)``: both ``[n_chains, K]``.
    """
    _check_mrp(P, r, Phi)
    gamma = check_gamma(gamma)
    n_chains, n_steps = _pos_int(n_chains, "n_chains"), _pos_int(n_steps, "n_steps")
    alpha0, tau = _pos_float(alpha0, "alpha0"), _pos_float(tau, "tau")
    if isinstance(decay, bool) or not isinstance(decay, Real) or not (0.5 < decay <= 1.0):
        raise ValueError(f"decay must be in (0.5, 1] (Robbins-Monro step sizes), got {decay!r}")
    K = Phi.shape[1]
    theta = torch.zeros(n_chains, K, dtype=P.dtype, device=P.device)
    if theta0 is not None:
        theta = theta + _float(theta0, "theta0", (K,)).to(P.dtype)
    evals, evecs = torch.linalg.eig(P.T)
    d = evecs[:, torch.argmin((evals - 1).abs())].real
    d = (d / d.sum()).clamp_min(0)
    s = torch.multinomial(d / d.sum(), n_chains, replacement=True, generator=generator)
    avg = torch.zeros_like(theta)
    start = n_steps // 2
    for t in range(n_steps):
        s2 = torch.multinomial(P[s], 1, generator=generator).squeeze(-1)
        phi, phi2 = Phi[s], Phi[s2]
        delta = r[s] + gamma * (phi2 * theta).sum(-1) - (phi * theta).sum(-1)
        theta = theta + alpha0 / (1 + t / tau) ** decay * delta[:, None] * phi
        if t >= start:
            avg += theta
        s = s2
    if not bool(torch.isfinite(theta).all()):
        raise ValueError("linear TD diverged (non-finite parameters): reduce alpha0")
    return theta, avg / (n_steps - start)
