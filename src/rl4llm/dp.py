"""Dynamic programming on finite MDPs: Bellman operators, value iteration, policy iteration, brute force.

Chapter 2 derives everything here; this module is the code those derivations check. All functions take a
:class:`rl4llm.mdp.TabularMDP` and work on whole tables at once (no loop over states).

- :func:`q_from_v`, :func:`bellman_operator`, :func:`bellman_optimality`, :func:`q_bellman_operator`,
  :func:`q_bellman_optimality` -- the operators ``T^pi`` and ``T*`` on ``V [S]`` and on ``Q [S, A]``
  (chapter 2, "Bellman operators").
- :func:`greedy`, :func:`deterministic_policy` -- one-hot policies ``[S, A]``.
- :func:`value_iteration` -- ``V_{k+1} = T* V_k`` with its history and the a-posteriori stopping bound
  ``||V_{k+1} - V*|| <= gamma / (1 - gamma) ||V_{k+1} - V_k||`` (sup norm).
- :func:`policy_iteration` -- exact evaluation plus greedy improvement until the policy is stable.
- :func:`brute_force` -- every deterministic stationary policy of a tiny MDP, each solved exactly.
- :func:`backward_induction` -- the optimal values and (time-dependent) policy of a finite-horizon problem.
- :func:`from_toy_text` -- a gymnasium toy-text environment's table ``env.unwrapped.P`` as a ``TabularMDP``
  with one absorbing terminal state.

How ``gamma = 1`` is handled (decided once, for the whole package). The contraction results and the linear
solve ``(I - gamma P_pi)^{-1}`` need ``gamma < 1``. An episodic problem with ``gamma = 1`` is solved as a
finite-horizon problem: a ``TabularMDP`` with ``horizon = T`` and an absorbing, zero-reward terminal state,
by backward induction (:func:`rl4llm.mdp.evaluate_policy` for a fixed policy, :func:`backward_induction`
for the optimum). That is exact whenever every episode ends within ``T`` steps (the token tree of chapter 1,
``T = L``) and is the right problem when ``T`` is a time limit (FrozenLake's 100 steps). The infinite-horizon
functions here (:func:`value_iteration`, :func:`policy_iteration`, :func:`brute_force`) therefore require
``horizon=None`` and ``gamma < 1``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from rl4llm.mdp import TabularMDP, evaluate_policy

__all__ = [
    "BruteForce",
    "PolicyIterationResult",
    "ValueIterationResult",
    "backward_induction",
    "bellman_operator",
    "bellman_optimality",
    "brute_force",
    "deterministic_policy",
    "from_toy_text",
    "greedy",
    "policy_iteration",
    "q_bellman_operator",
    "q_bellman_optimality",
    "q_from_v",
    "value_iteration",
]


# ----------------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------------


def _check_mdp(mdp) -> TabularMDP:
    if not isinstance(mdp, TabularMDP):
        raise TypeError(f"mdp must be a TabularMDP, got {type(mdp).__name__}")
    return mdp


def _check_discounted(mdp: TabularMDP, what: str) -> None:
    if mdp.horizon is not None or mdp.gamma >= 1.0:
        raise ValueError(f"{what} needs an infinite-horizon MDP with gamma < 1 (got gamma={mdp.gamma}, "
                         f"horizon={mdp.horizon}); solve a finite-horizon or gamma = 1 problem with "
                         "backward_induction")


def _check_table(mdp: TabularMDP, x, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {list(shape)}, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if not bool(torch.isfinite(x.detach()).all()):
        raise ValueError(f"{name} must be finite, found NaN or inf")
    return x.to(device=mdp.device, dtype=mdp.dtype)


def _check_v(mdp: TabularMDP, V, name: str = "V") -> torch.Tensor:
    return _check_table(mdp, V, name, (mdp.n_states,))


def _check_q(mdp: TabularMDP, Q, name: str = "Q") -> torch.Tensor:
    return _check_table(mdp, Q, name, (mdp.n_states, mdp.n_actions))


def _check_pi(mdp: TabularMDP, pi, name: str = "pi") -> torch.Tensor:
    pi = _check_table(mdp, pi, name, (mdp.n_states, mdp.n_actions))
    if bool((pi < 0).any()) or float((pi.sum(-1) - 1).abs().max()) > 1e-9:
        raise ValueError(f"rows of {name} must be probability distributions over actions "
                         "(nonnegative, summing to 1)")
    return pi


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------
# Bellman operators
# ----------------------------------------------------------------------------------------------------


def q_from_v(mdp: TabularMDP, V: torch.Tensor) -> torch.Tensor:
    """One-step look-ahead ``Q[s, a] = R[s, a] + gamma sum_s' P[s, a, s'] V[s']``.

    Args:
        mdp: the MDP.
        V: ``[S]`` values.

    Returns:
        ``[S, A]``.
    """
    _check_mdp(mdp)
    V = _check_v(mdp, V)
    return mdp.R + mdp.gamma * torch.einsum("sat,t->sa", mdp.P, V)


def bellman_operator(mdp: TabularMDP, pi: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``(T^pi V)[s] = sum_a pi[s, a] (R[s, a] + gamma sum_s' P[s, a, s'] V[s'])``, i.e. ``r_pi + gamma P_pi V``.

    Args:
        mdp: the MDP.
        pi: ``[S, A]`` policy.
        V: ``[S]`` values.

    Returns:
        ``[S]``.
    """
    _check_mdp(mdp)
    pi = _check_pi(mdp, pi)
    return (pi * q_from_v(mdp, V)).sum(-1)


def bellman_optimality(mdp: TabularMDP, V: torch.Tensor) -> torch.Tensor:
    """``(T* V)[s] = max_a (R[s, a] + gamma sum_s' P[s, a, s'] V[s'])``.

    Args:
        mdp: the MDP.
        V: ``[S]`` values.

    Returns:
        ``[S]``.
    """
    return q_from_v(mdp, V).amax(-1)


def q_bellman_operator(mdp: TabularMDP, pi: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``(T^pi Q)[s, a] = R[s, a] + gamma sum_s' P[s, a, s'] sum_a' pi[s', a'] Q[s', a']``.

    Args:
        mdp: the MDP.
        pi: ``[S, A]`` policy.
        Q: ``[S, A]`` action values.

    Returns:
        ``[S, A]``.
    """
    _check_mdp(mdp)
    pi = _check_pi(mdp, pi)
    Q = _check_q(mdp, Q)
    return q_from_v(mdp, (pi * Q).sum(-1))


def q_bellman_optimality(mdp: TabularMDP, Q: torch.Tensor) -> torch.Tensor:
    """``(T* Q)[s, a] = R[s, a] + gamma sum_s' P[s, a, s'] max_a' Q[s', a']``.

    Args:
        mdp: the MDP.
        Q: ``[S, A]`` action values.

    Returns:
        ``[S, A]``.
    """
    _check_mdp(mdp)
    Q = _check_q(mdp, Q)
    return q_from_v(mdp, Q.amax(-1))


# ----------------------------------------------------------------------------------------------------
# policies
# ----------------------------------------------------------------------------------------------------


def deterministic_policy(actions: torch.Tensor, n_actions: int, *, dtype: torch.dtype = torch.float64
                         ) -> torch.Tensor:
    """The one-hot policy table of a deterministic policy ``s -> actions[s]``.

    Args:
        actions: ``[S]`` integer actions in ``[0, n_actions)``.
        n_actions: ``A``.
        dtype: floating dtype of the result.

    Returns:
        ``[S, A]`` with ``pi[s, actions[s]] = 1``.
    """
    A = _check_count(n_actions, "n_actions")
    if not isinstance(actions, torch.Tensor) or actions.ndim != 1 or actions.is_floating_point():
        raise ValueError("actions must be a 1-D integer tensor [S]")
    if actions.numel() and (int(actions.min()) < 0 or int(actions.max()) >= A):
        raise ValueError(f"actions must lie in [0, n_actions) = [0, {A})")
    return torch.nn.functional.one_hot(actions.long(), A).to(dtype)


def greedy(mdp: TabularMDP, V: torch.Tensor | None = None, *, Q: torch.Tensor | None = None,
           rtol: float = 1e-12) -> torch.Tensor:
    """A deterministic policy greedy with respect to ``V`` (through :func:`q_from_v`) or directly to ``Q``.

    Ties are broken towards the lowest action index among those within ``rtol * (1 + |max_a Q[s, a]|)`` of
    the maximum, so that rounding does not pick between actions that are equal in exact arithmetic.

    Args:
        mdp: the MDP.
        V: ``[S]`` values (exactly one of ``V`` and ``Q``).
        Q: ``[S, A]`` action values.
        rtol: relative tolerance for ties, ``>= 0``.

    Returns:
        ``[S, A]`` one-hot policy in the MDP's dtype.
    """
    _check_mdp(mdp)
    if (V is None) == (Q is None):
        raise ValueError("pass exactly one of V [S] and Q [S, A]")
    if not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and rtol >= 0):
        raise ValueError(f"rtol must be a finite number >= 0, got {rtol!r}")
    Q = q_from_v(mdp, V) if Q is None else _check_q(mdp, Q)
    best = Q.amax(-1, keepdim=True)
    near = Q >= best - rtol * (1 + best.abs())
    actions = near.to(torch.int8).argmax(-1)  # first True
    return deterministic_policy(actions, mdp.n_actions, dtype=mdp.dtype).to(mdp.device)


# ----------------------------------------------------------------------------------------------------
# value iteration and policy iteration (gamma < 1, infinite horizon)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ValueIterationResult:
    """What :func:`value_iteration` returns.

    Attributes:
        V: ``[S]`` the last iterate ``V_K``.
        pi: ``[S, A]`` the greedy policy of ``V_K``.
        n_iter: ``K``, the number of applications of ``T*``.
        history: ``[K + 1, S]`` the iterates ``V_0, ..., V_K``.
        bound: ``gamma / (1 - gamma) * ||V_K - V_{K-1}||_inf``, a guaranteed upper bound on
            ``||V_K - V*||_inf`` (``inf`` when ``K = 0``).
    """

    V: torch.Tensor
    pi: torch.Tensor
    n_iter: int
    history: torch.Tensor
    bound: float


def value_iteration(mdp: TabularMDP, *, V0: torch.Tensor | None = None, tol: float | None = 1e-10,
                    n_iter: int | None = None, max_iter: int = 100_000) -> ValueIterationResult:
    """``V_{k+1} = T* V_k`` from ``V0`` (zeros by default).

    Stops after exactly ``n_iter`` sweeps if given; otherwise at the first ``K`` whose a-posteriori bound
    ``gamma / (1 - gamma) ||V_K - V_{K-1}||_inf`` is ``<= tol``, which guarantees ``||V_K - V*||_inf <= tol``
    (chapter 2, "Stopping value iteration").

    Args:
        mdp: infinite-horizon MDP with ``gamma < 1``.
        V0: ``[S]`` starting values.
        tol: target sup-norm error, ``> 0`` (ignored when ``n_iter`` is given).
        n_iter: a fixed number of sweeps ``>= 1``, or None.
        max_iter: give up (``RuntimeError``) if ``tol`` is not reached in this many sweeps.

    Returns:
        :class:`ValueIterationResult`.
    """
    _check_mdp(mdp)
    _check_discounted(mdp, "value_iteration")
    V = torch.zeros(mdp.n_states, dtype=mdp.dtype, device=mdp.device) if V0 is None else _check_v(mdp, V0, "V0")
    if n_iter is not None:
        n_iter = _check_count(n_iter, "n_iter")
    elif not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite number > 0 when n_iter is None, got {tol!r}")
    max_iter = _check_count(max_iter, "max_iter")
    g = mdp.gamma
    history = [V]
    bound = math.inf
    while True:
        V_new = bellman_optimality(mdp, history[-1])
        bound = g / (1 - g) * float((V_new - history[-1]).abs().max())
        history.append(V_new)
        k = len(history) - 1
        if (n_iter is not None and k >= n_iter) or (n_iter is None and bound <= tol):
            break
        if k >= max_iter:
            raise RuntimeError(f"value_iteration did not reach tol={tol} in max_iter={max_iter} sweeps "
                               f"(bound {bound:.3g})")
    V = history[-1]
    return ValueIterationResult(V, greedy(mdp, V), len(history) - 1, torch.stack(history), bound)


@dataclass(frozen=True, eq=False)
class PolicyIterationResult:
    """What :func:`policy_iteration` returns.

    Attributes:
        pi: ``[S, A]`` the final (deterministic) policy.
        V: ``[S]`` its exact value.
        n_iter: number of improvement steps that changed the policy, plus the final one that did not.
        values: ``[n_iter, S]`` the value of each evaluated policy, ``V^{pi_0}, V^{pi_1}, ...``.
    """

    pi: torch.Tensor
    V: torch.Tensor
    n_iter: int
    values: torch.Tensor


def policy_iteration(mdp: TabularMDP, *, pi0: torch.Tensor | None = None, max_iter: int = 10_000,
                     rtol: float = 1e-12) -> PolicyIterationResult:
    """Policy iteration: ``V_k = V^{pi_k}`` exactly, then ``pi_{k+1} = greedy(V_k)``, from ``k = 0``.

    The improvement keeps ``pi_k``'s action in every state where that action is still (within ``rtol``)
    greedy, so the loop cannot cycle between tied policies; it stops when no state changes. It terminates
    in at most ``A**S`` iterations because each policy is strictly better than the last until it stops
    (chapter 2, the policy-iteration theorem).

    Args:
        mdp: infinite-horizon MDP with ``gamma < 1``.
        pi0: ``[S, A]`` a deterministic starting policy (default: action 0 everywhere).
        max_iter: safety limit; exceeding it raises ``RuntimeError``.
        rtol: tie tolerance, as in :func:`greedy`.

    Returns:
        :class:`PolicyIterationResult`.
    """
    _check_mdp(mdp)
    _check_discounted(mdp, "policy_iteration")
    max_iter = _check_count(max_iter, "max_iter")
    S, A = mdp.n_states, mdp.n_actions
    if pi0 is None:
        actions = torch.zeros(S, dtype=torch.long, device=mdp.device)
    else:
        pi0 = _check_pi(mdp, pi0, "pi0")
        if not bool(((pi0 == 0) | (pi0 == 1)).all()):
            raise ValueError("pi0 must be a deterministic (one-hot) policy")
        actions = pi0.argmax(-1)
    values = []
    for _ in range(max_iter):
        pi = deterministic_policy(actions, A, dtype=mdp.dtype).to(mdp.device)
        V, Q = evaluate_policy(mdp, pi)
        values.append(V)
        best = Q.amax(-1)
        keep = Q.gather(1, actions[:, None]).squeeze(1) >= best - rtol * (1 + best.abs())
        new = torch.where(keep, actions, greedy(mdp, Q=Q, rtol=rtol).argmax(-1))
        if bool((new == actions).all()):
            return PolicyIterationResult(pi, V, len(values), torch.stack(values))
        actions = new
    raise RuntimeError(f"policy_iteration did not stabilise in max_iter={max_iter} iterations")


# ----------------------------------------------------------------------------------------------------
# brute force and finite horizons
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BruteForce:
    """Every deterministic stationary policy of a tiny MDP, each evaluated exactly.

    Attributes:
        actions: ``[N, S]`` the policies, ``N = A**S``, in lexicographic order.
        values: ``[N, S]`` ``V^pi`` of each.
        V_max: ``[S]`` the state-wise maximum ``max_pi V^pi(s)`` over the ``N`` policies.
        uniformly_optimal: ``[M]`` indices of the policies that attain ``V_max`` in every state at once (to
            ``atol``); the existence theorem says ``M >= 1``.
    """

    actions: torch.Tensor
    values: torch.Tensor
    V_max: torch.Tensor
    uniformly_optimal: torch.Tensor


def brute_force(mdp: TabularMDP, *, max_policies: int = 100_000, atol: float = 1e-10) -> BruteForce:
    """Evaluate all ``A**S`` deterministic stationary policies by one batched linear solve.

    Args:
        mdp: infinite-horizon MDP with ``gamma < 1``.
        max_policies: refuse (``ValueError``) when ``A**S`` is larger.
        atol: tolerance for "attains the maximum".

    Returns:
        :class:`BruteForce`.
    """
    _check_mdp(mdp)
    _check_discounted(mdp, "brute_force")
    S, A = mdp.n_states, mdp.n_actions
    limit = _check_count(max_policies, "max_policies")
    if A**S > limit:
        raise ValueError(f"A**S = {A}**{S} = {A**S} policies exceeds max_policies={limit}")
    actions = torch.tensor(list(itertools.product(range(A), repeat=S)), dtype=torch.long, device=mdp.device)
    s = torch.arange(S, device=mdp.device)
    P_pi = mdp.P[s, actions]                       # [N, S, S]
    r_pi = mdp.R[s, actions]                       # [N, S]
    eye = torch.eye(S, dtype=mdp.dtype, device=mdp.device)
    values = torch.linalg.solve(eye - mdp.gamma * P_pi, r_pi)
    V_max = values.amax(0)
    uniform = torch.nonzero(((V_max - values) <= atol).all(-1)).squeeze(-1)
    return BruteForce(actions, values, V_max, uniform)


def backward_induction(mdp: TabularMDP, horizon: int | None = None, *, rtol: float = 1e-12
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal values and policy of the ``T``-step problem: ``V[T] = 0``, ``V[t] = T* V[t+1]``.

    ``V[t][s]`` is ``max`` over all policies of ``E[sum_{k=t}^{T-1} gamma**(k-t) r_k | s_t = s]``; the optimal
    policy depends on the time, ``pi[t] = greedy(V[t+1])``. Works for any ``gamma`` in ``(0, 1]``; this is how
    the package solves ``gamma = 1`` episodic problems.

    Args:
        mdp: the MDP.
        horizon: ``T >= 1``; defaults to ``mdp.horizon`` (required when that is None).
        rtol: tie tolerance, as in :func:`greedy`.

    Returns:
        ``(V, pi)``: ``[T + 1, S]`` values and ``[T, S, A]`` one-hot policies.
    """
    _check_mdp(mdp)
    T = mdp.horizon if horizon is None else _check_count(horizon, "horizon")
    if T is None:
        raise ValueError("horizon is required (an int >= 1) because the MDP has an infinite horizon")
    V = [torch.zeros(mdp.n_states, dtype=mdp.dtype, device=mdp.device)]
    pis = []
    for _ in range(T):
        Q = q_from_v(mdp, V[-1])
        pis.append(greedy(mdp, Q=Q, rtol=rtol))
        V.append(Q.amax(-1))
    return torch.stack(V[::-1]), torch.stack(pis[::-1])


# ----------------------------------------------------------------------------------------------------
# gymnasium toy-text tables
# ----------------------------------------------------------------------------------------------------


def from_toy_text(env, *, gamma: float, horizon: int | None = None, dtype: torch.dtype = torch.float64
                  ) -> TabularMDP:
    """A gymnasium toy-text environment (FrozenLake, Taxi, CliffWalking, ...) as a :class:`TabularMDP`.

    Reads ``env.unwrapped.P[s][a]``, a list of ``(prob, next_state, reward, terminated)``, and the initial
    distribution ``env.unwrapped.initial_state_distrib``. One absorbing state with index ``S`` (the
    environment's ``S`` states are ``0, ..., S-1``) is added: a transition flagged ``terminated`` goes there
    instead of to ``next_state``, and the terminal state loops to itself with reward 0 under every action.
    Rewards become their expectations, ``R[s, a] = sum prob * reward``, which leaves every value and every
    optimal policy unchanged (values are expectations).

    The environment's time limit is not part of the table: pass it as ``horizon`` (with ``gamma = 1`` for
    "probability of success within the limit" questions) or leave ``horizon=None`` with ``gamma < 1``.

    Args:
        env: a gymnasium environment whose ``unwrapped`` has ``P`` and ``initial_state_distrib``.
        gamma: discount in ``(0, 1]``.
        horizon: None or a number of steps.
        dtype: float64 (default) or float32.

    Returns:
        A :class:`TabularMDP` with ``S + 1`` states, on the CPU.
    """
    base = getattr(env, "unwrapped", env)
    table = getattr(base, "P", None)
    if not isinstance(table, dict) or not table:
        raise ValueError("env.unwrapped.P must be a non-empty dict {state: {action: [(p, s', r, done), ...]}}")
    S = len(table)
    if sorted(table) != list(range(S)):
        raise ValueError("env.unwrapped.P must have the states 0, ..., S-1 as keys")
    A = len(table[0])
    P = torch.zeros(S + 1, A, S + 1, dtype=torch.float64)
    R = torch.zeros(S + 1, A, dtype=torch.float64)
    for s in range(S):
        if sorted(table[s]) != list(range(A)):
            raise ValueError(f"env.unwrapped.P[{s}] must have the actions 0, ..., {A - 1} as keys")
        for a in range(A):
            for prob, nxt, reward, done in table[s][a]:
                if not 0 <= nxt < S:
                    raise ValueError(f"env.unwrapped.P[{s}][{a}] has next state {nxt} outside [0, {S})")
                P[s, a, S if done else nxt] += prob
                R[s, a] += prob * reward
    P[S, :, S] = 1.0
    p0 = getattr(base, "initial_state_distrib", None)
    if p0 is None:
        raise ValueError("env.unwrapped has no initial_state_distrib")
    p0 = torch.as_tensor(p0, dtype=torch.float64).reshape(-1)
    if p0.shape != (S,):
        raise ValueError(f"initial_state_distrib must have {S} entries, got {p0.numel()}")
    p0 = torch.cat([p0 / p0.sum(), torch.zeros(1, dtype=torch.float64)])
    P = P / P.sum(-1, keepdim=True)  # the tables' probabilities are floats like 1/3
    return TabularMDP(P.to(dtype), R.to(dtype), p0.to(dtype), gamma, horizon)
