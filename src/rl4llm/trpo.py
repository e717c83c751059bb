r"""Trust region policy optimisation: the natural-gradient step under a KL constraint.

TRPO maximises the surrogate :math:`L(\theta) = \hat{\mathbb E}[\rho_\theta \hat A]`, :math:`\rho_\theta =
\pi_\theta(a \mid s) / \pi_{\theta_\mathrm{old}}(a \mid s)`, subject to a bound on the mean divergence
:math:`\bar D(\theta) = \hat{\mathbb E}_s[\mathrm{KL}(\pi_{\theta_\mathrm{old}}(\cdot \mid s) \,\|\,
\pi_\theta(\cdot \mid s))] \le \delta`. Near :math:`\theta_\mathrm{old}` the surrogate is linear,
:math:`L \approx g^\top \Delta`, and the divergence quadratic, :math:`\bar D \approx \tfrac12 \Delta^\top F \Delta`
with :math:`F` the Fisher information matrix (the Hessian of :math:`\bar D` at :math:`\theta_\mathrm{old}`). The
solution of that model problem is the natural-gradient step

.. math:: \Delta^* = \sqrt{\frac{2\delta}{g^\top F^{-1} g}}\; F^{-1} g .

The module, read top to bottom:

1. :func:`flat_grad`, :func:`conjugate_gradient`, :func:`fisher_vector_product` -- :math:`F^{-1} g` without ever
   forming :math:`F`: conjugate gradient needs only products :math:`F v`, and each is one double backward pass
   through the divergence;
2. :func:`natural_step` -- the scaled step :math:`\Delta^*` and its predicted improvement;
3. :func:`backtracking_line_search` -- shrink the step by :math:`\alpha^j`, :math:`j = 0, 1, \dots`, until the
   *exact* divergence is within :math:`\delta` **and** the exact surrogate improved;
4. :func:`trpo_update`, :func:`trpo` -- one TRPO update of a categorical policy network, and the training loop
   on a gymnasium environment (rollouts and advantages from :mod:`rl4llm.actor_critic`).

Parameters are handled as flat vectors (all of a policy's parameters concatenated in the order of
``policy.parameters()``), which is what the linear algebra needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real

import numpy as np
import torch
from torch import Tensor, nn

from rl4llm.actor_critic import rollout_advantages
from rl4llm.device import get_device, seed_everything
from rl4llm.envs import RolloutCollector, check_env, make_vector_env
from rl4llm.kl import categorical_kl
from rl4llm.nets import PolicyNet, ValueNet
from rl4llm.returns import check_gamma
from rl4llm.surrogate import normalize_advantages, value_loss

__all__ = [
    "LineSearchResult",
    "TRPOStats",
    "backtracking_line_search",
    "conjugate_gradient",
    "fisher_vector_product",
    "flat_grad",
    "natural_step",
    "trpo",
    "trpo_update",
]


def _positive_real(name: str, value, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_vector(x, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 1 or not x.is_floating_point():
        got = f"shape {list(x.shape)}, dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 1-D floating-point tensor, got {got}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


# ----------------------------------------------------------------------------------------------------------
# 1. Solving F x = g with Fisher-vector products
# ----------------------------------------------------------------------------------------------------------


def flat_grad(output: Tensor, params: Sequence[Tensor], *, create_graph: bool = False,
              retain_graph: bool | None = None) -> Tensor:
    """The gradient of a scalar ``output`` with respect to ``params``, flattened into one vector ``[P]``.

    Parameters that ``output`` does not depend on get zeros.
    """
    if not isinstance(output, Tensor) or output.numel() != 1:
        raise ValueError("output must be a scalar tensor")
    params = list(params)
    grads = torch.autograd.grad(output, params, create_graph=create_graph, retain_graph=retain_graph,
                                allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads,
                                                                                          strict=True)])


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, *, iters: int = 10,
                       tol: float = 1e-10) -> Tensor:
    r"""Approximately solve :math:`A x = b` for a symmetric positive-definite :math:`A` given only ``matvec``.

    Conjugate gradient starting from :math:`x = 0`. In exact arithmetic it finds the solution in at most
    ``n`` iterations for ``b`` of size ``n``; it stops earlier once the squared residual norm
    :math:`\|b - A x\|^2` falls below ``tol``.

    Args:
        matvec: ``v -> A v`` for vectors ``[n]``.
        b: ``[n]`` right-hand side.
        iters: maximum number of iterations, >= 1.
        tol: stopping threshold for the squared residual norm, >= 0.

    Returns:
        ``[n]`` the approximate solution.

    Raises:
        ValueError: bad arguments, or a direction with :math:`p^\top A p \le 0` (``A`` is not positive definite).
    """
    b = _check_vector(b, "b")
    _positive_int("iters", iters)
    tol = _positive_real("tol", tol, allow_zero=True)
    x = torch.zeros_like(b)
    r = b.clone()              # residual b - A x
    p = b.clone()              # search direction
    rr = r @ r
    for _ in range(iters):
        if rr <= tol:
            break
        Ap = matvec(p)
        if not isinstance(Ap, Tensor) or Ap.shape != b.shape:
            raise ValueError(f"matvec must return a tensor of shape {list(b.shape)}")
        pAp = p @ Ap
        if pAp <= 0:
            raise ValueError(f"the matrix is not positive definite along a search direction (p^T A p = {pAp:.3g})")
        alpha = rr / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def fisher_vector_product(kl: Tensor, params: Sequence[Tensor], *, damping: float = 0.0) -> Callable[[Tensor], Tensor]:
    r"""Products with the Hessian of a divergence, :math:`v \mapsto (H + \text{damping}\, I)\, v`.

    ``kl`` must be the mean divergence :math:`\bar D(\theta) = \hat{\mathbb E}_s[\mathrm{KL}(\pi_{\theta_\mathrm{old}}
    (\cdot \mid s) \,\|\, \pi_\theta(\cdot \mid s))]` built from ``params`` with the old distribution detached,
    evaluated at :math:`\theta = \theta_\mathrm{old}`; there its Hessian :math:`H` is the Fisher information
    matrix of the policy (averaged over the states). Each product is the gradient of
    :math:`\nabla \bar D \cdot v`: one double backward pass, and :math:`H` is never formed.

    Args:
        kl: scalar tensor with a graph to ``params``.
        params: the parameters (tensors requiring grad).
        damping: added multiple of the identity, >= 0 (keeps conjugate gradient stable when :math:`F` is
            singular or poorly estimated).

    Returns:
        A function ``v [P] -> [P]``, ``P`` the total number of parameters.
    """
    damping = _positive_real("damping", damping, allow_zero=True)
    params = list(params)
    grad_kl = flat_grad(kl, params, create_graph=True)

    def fvp(v: Tensor) -> Tensor:
        v = _check_vector(v, "v")
        if v.shape != grad_kl.shape:
            raise ValueError(f"v must have shape [{grad_kl.numel()}] (the number of parameters), got {list(v.shape)}")
        hv = flat_grad(grad_kl @ v.detach(), params, retain_graph=True)
        return hv + damping * v

    return fvp


# ----------------------------------------------------------------------------------------------------------
# 2. The natural-gradient step
# ----------------------------------------------------------------------------------------------------------


def natural_step(g: Tensor, fvp: Callable[[Tensor], Tensor], *, max_kl: float, cg_iters: int = 10,
                 cg_tol: float = 1e-10) -> tuple[Tensor, float]:
    r"""The step :math:`\Delta^* = \sqrt{2\delta / (g^\top F^{-1} g)}\, F^{-1} g` that maximises the linear
    model :math:`g^\top \Delta` subject to :math:`\tfrac12 \Delta^\top F \Delta \le \delta`.

    :math:`x \approx F^{-1} g` comes from :func:`conjugate_gradient` and :math:`g^\top F^{-1} g` is computed as
    :math:`x^\top F x` (one more product), which is what the step actually satisfies:
    :math:`\tfrac12 \Delta^{*\top} F \Delta^* = \delta` for the ``x`` found, even if CG stopped early.

    Args:
        g: ``[P]`` gradient of the surrogate at :math:`\theta_\mathrm{old}`.
        fvp: ``v -> F v`` (:func:`fisher_vector_product`).
        max_kl: :math:`\delta > 0`.
        cg_iters: conjugate-gradient iterations.
        cg_tol: conjugate gradient stops once the squared residual norm is below this.

    Returns:
        ``(step, predicted_improvement)``: the step ``[P]`` and :math:`g^\top \Delta^*` (a float). A zero
        gradient gives a zero step.
    """
    g = _check_vector(g, "g")
    max_kl = _positive_real("max_kl", max_kl)
    if not bool(g.any()):
        return torch.zeros_like(g), 0.0
    x = conjugate_gradient(fvp, g, iters=cg_iters, tol=cg_tol)
    xFx = float(x @ fvp(x))
    if not xFx > 0:
        raise ValueError(f"x^T F x must be > 0, got {xFx} (is F positive definite?)")
    step = math.sqrt(2.0 * max_kl / xFx) * x
    return step, float(g @ step)


# ----------------------------------------------------------------------------------------------------------
# 3. The line search
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LineSearchResult:
    """The outcome of :func:`backtracking_line_search`.

    Attributes:
        accepted: whether some shrunken step passed both tests.
        index: the accepted :math:`j` (0 = the full step), or -1 if none was accepted.
        fraction: :math:`\\alpha^j` of the accepted step (0.0 if none).
        improvement: surrogate improvement of the accepted step (0.0 if none).
        kl: divergence of the accepted step (0.0 if none).
        tried: ``(j, improvement, kl)`` for every step evaluated, in order.
    """

    accepted: bool
    index: int
    fraction: float
    improvement: float
    kl: float
    tried: tuple[tuple[int, float, float], ...]


def backtracking_line_search(surrogate: Callable[[Tensor], float], kl: Callable[[Tensor], float], x0: Tensor,
                             full_step: Tensor, *, max_kl: float, backtrack: float = 0.5,
                             max_backtracks: int = 10,
                             require_improvement: bool = True) -> tuple[Tensor, LineSearchResult]:
    r"""Take the largest step :math:`x_0 + \alpha^j \Delta`, :math:`j = 0, 1, \dots`, that keeps the exact
    divergence within the bound and improves the exact surrogate.

    The natural step comes from a quadratic model of the divergence and a linear model of the surrogate; the
    line search checks both on the real functions. :math:`j` starts at 0, so the full step is tried first; a
    step is accepted if ``kl(x) <= max_kl`` and ``surrogate(x) > surrogate(x0)``. If no step passes, the
    parameters stay at ``x0``. ``require_improvement=False`` drops the second test (only to show why it is
    needed).

    Args:
        surrogate: ``x [P] -> float``, the surrogate at flat parameters ``x``.
        kl: ``x [P] -> float``, the mean divergence from the old policy at ``x``.
        x0: ``[P]`` the old parameters.
        full_step: ``[P]`` the proposed step :math:`\Delta`.
        max_kl: :math:`\delta > 0`.
        backtrack: :math:`\alpha \in (0, 1)`.
        max_backtracks: number of step sizes tried (:math:`j < ` ``max_backtracks``).
        require_improvement: demand a surrogate improvement as well as the KL bound.

    Returns:
        ``(x, result)``: the new parameters ``[P]`` and a :class:`LineSearchResult`.
    """
    x0 = _check_vector(x0, "x0")
    full_step = _check_vector(full_step, "full_step")
    if full_step.shape != x0.shape:
        raise ValueError(f"full_step must have x0's shape {list(x0.shape)}, got {list(full_step.shape)}")
    max_kl = _positive_real("max_kl", max_kl)
    if isinstance(backtrack, bool) or not isinstance(backtrack, Real) or not 0 < backtrack < 1:
        raise ValueError(f"backtrack must be a number in (0, 1), got {backtrack!r}")
    _positive_int("max_backtracks", max_backtracks)
    base = float(surrogate(x0))
    tried = []
    for j in range(max_backtracks):
        frac = float(backtrack) ** j
        x = x0 + frac * full_step
        improvement, d = float(surrogate(x)) - base, float(kl(x))
        tried.append((j, improvement, d))
        if d <= max_kl and (improvement > 0 or not require_improvement):
            return x, LineSearchResult(True, j, frac, improvement, d, tuple(tried))
    return x0.clone(), LineSearchResult(False, -1, 0.0, 0.0, 0.0, tuple(tried))


# ----------------------------------------------------------------------------------------------------------
# 4. TRPO for a categorical policy network, and the training loop
# ----------------------------------------------------------------------------------------------------------


def _categorical_kl_logits(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """:func:`rl4llm.kl.categorical_kl` of the categoricals with logits ``[..., A]``."""
    return categorical_kl(torch.log_softmax(logits_p, -1), torch.log_softmax(logits_q, -1))


@dataclass(frozen=True)
class TRPOStats:
    """Diagnostics of one :func:`trpo_update`.

    Attributes:
        predicted_improvement: :math:`g^\\top \\Delta^*` of the full step (linear model).
        line_search: the :class:`LineSearchResult`.
        kl_exact: mean exact :math:`\\mathrm{KL}(\\pi_\\mathrm{old} \\| \\pi_\\theta)` after the update.
        approx_kl_k1, approx_kl_k3: its k1 and k3 estimates from the sampled actions.
        grad_norm: :math:`\\|g\\|`.
    """

    predicted_improvement: float
    line_search: LineSearchResult
    kl_exact: float
    approx_kl_k1: float
    approx_kl_k3: float
    grad_norm: float


def trpo_update(policy: nn.Module, obs: Tensor, actions: Tensor, advantages: Tensor, *, max_kl: float = 0.01,
                damping: float = 0.1, cg_iters: int = 10, backtrack: float = 0.8,
                max_backtracks: int = 10) -> TRPOStats:
    r"""One TRPO update of a categorical policy on a batch, in place.

    The surrogate is :math:`L(\theta) = \mathrm{mean}(\rho_\theta \hat A)` and the constraint the mean over the
    batch's states of the exact :math:`\mathrm{KL}(\pi_\mathrm{old}(\cdot \mid s) \,\|\, \pi_\theta(\cdot \mid
    s))`. The step is :func:`natural_step` with Fisher-vector products of that mean KL (plus ``damping``),
    followed by :func:`backtracking_line_search`.

    Args:
        policy: a module mapping observations ``[M, obs_dim]`` to logits ``[M, A]``
            (:class:`~rl4llm.nets.PolicyNet`); it must be the policy that sampled the batch.
        obs: ``[M, obs_dim]`` observations.
        actions: ``[M]`` integer actions.
        advantages: ``[M]`` advantage estimates (normalise them beforehand if wanted).
        max_kl: :math:`\delta`.
        damping: Fisher damping.
        cg_iters: conjugate-gradient iterations.
        backtrack: line-search shrink factor :math:`\alpha`.
        max_backtracks: step sizes tried.

    Returns:
        :class:`TRPOStats`.
    """
    if not isinstance(obs, Tensor) or obs.dim() != 2:
        raise ValueError(f"obs must be a [M, obs_dim] tensor, got {getattr(obs, 'shape', type(obs).__name__)}")
    m = obs.shape[0]
    if not isinstance(actions, Tensor) or actions.shape != (m,) or actions.is_floating_point():
        raise ValueError(f"actions must be an integer tensor of shape [{m}]")
    if not isinstance(advantages, Tensor) or advantages.shape != (m,) or not advantages.is_floating_point():
        raise ValueError(f"advantages must be a floating-point tensor of shape [{m}]")
    params = [p for p in policy.parameters() if p.requires_grad]
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in params]
    x0 = torch.cat([p.detach().reshape(-1) for p in params])
    adv = advantages.detach().to(x0.dtype)
    with torch.no_grad():
        logits_old = policy(obs)
        logp_old = torch.log_softmax(logits_old, -1).gather(-1, actions[:, None]).squeeze(-1)

    def unflatten(x: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = math.prod(s)
            out[n] = x[i:i + k].view(s)
            i += k
        return out

    def logits_at(x: Tensor) -> Tensor:
        return torch.func.functional_call(policy, unflatten(x), (obs,))

    def surrogate_at(x: Tensor) -> float:
        with torch.no_grad():
            logp = torch.log_softmax(logits_at(x), -1).gather(-1, actions[:, None]).squeeze(-1)
            return float((torch.exp(logp - logp_old) * adv).mean())

    def kl_at(x: Tensor) -> float:
        with torch.no_grad():
            return float(_categorical_kl_logits(logits_old, logits_at(x)).mean())

    logits = policy(obs)
    logp = torch.log_softmax(logits, -1).gather(-1, actions[:, None]).squeeze(-1)
    g = flat_grad((torch.exp(logp - logp_old) * adv).mean(), params, retain_graph=True)
    fvp = fisher_vector_product(_categorical_kl_logits(logits_old, logits).mean(), params, damping=damping)
    step, predicted = natural_step(g, fvp, max_kl=max_kl, cg_iters=cg_iters)
    x, result = backtracking_line_search(surrogate_at, kl_at, x0, step, max_kl=max_kl, backtrack=backtrack,
                                         max_backtracks=max_backtracks)
    with torch.no_grad():
        named = dict(policy.named_parameters())
        for n, v in unflatten(x).items():
            named[n].copy_(v)
        logits_new = policy(obs)
        logp_new = torch.log_softmax(logits_new, -1).gather(-1, actions[:, None]).squeeze(-1)
        log_r = logp_new - logp_old
        kl_exact = float(_categorical_kl_logits(logits_old, logits_new).mean())
    return TRPOStats(predicted_improvement=predicted, line_search=result, kl_exact=kl_exact,
                     approx_kl_k1=float((-log_r).mean()), approx_kl_k3=float((torch.expm1(log_r) - log_r).mean()),
                     grad_norm=float(g.norm()))


def trpo(env_id: str = "CartPole-v1", *, num_envs: int = 8, num_steps: int = 256, total_steps: int = 100_000,
         max_kl: float = 0.01, damping: float = 0.1, cg_iters: int = 10, backtrack: float = 0.8,
         max_backtracks: int = 10, gamma: float = 0.99, lam: float = 0.95, value_lr: float = 2.5e-3,
         value_epochs: int = 5, value_minibatches: int = 4, hidden: int | tuple[int, ...] = 64, seed: int = 0,
         device: str | torch.device | None = None, log_every: int | None = None) -> dict:
    r"""Train a :class:`~rl4llm.nets.PolicyNet` with TRPO and a :class:`~rl4llm.nets.ValueNet` critic.

    Each iteration collects ``num_steps`` steps of ``num_envs`` environments
    (:class:`~rl4llm.envs.RolloutCollector`), computes GAE advantages with the current critic
    (:func:`~rl4llm.actor_critic.rollout_advantages`), normalises them over the batch, takes one :func:`trpo_update`
    of the policy on the whole batch, and then fits the critic to the :math:`\lambda`-returns with
    ``value_epochs`` passes of Adam in ``value_minibatches`` minibatches.

    Args:
        env_id: gymnasium id with a 1-D Box observation space and Discrete actions.
        num_envs, num_steps: rollout shape per iteration.
        total_steps: environment-step budget.
        max_kl, damping, cg_iters, backtrack, max_backtracks: as for :func:`trpo_update`.
        gamma: discount in (0, 1].
        lam: GAE :math:`\lambda`.
        value_lr, value_epochs, value_minibatches: the critic's regression.
        hidden: hidden width(s) of both networks.
        seed: non-negative int.
        device: ``None``: :func:`~rl4llm.device.get_device`.
        log_every: print a progress line every this many iterations.

    Returns:
        A dict of per-iteration lists ``"iteration"``, ``"env_steps"``, ``"mean_return"`` (training episodes
        that ended in the iteration, NaN if none), ``"kl_exact"``, ``"approx_kl_k1"``, ``"approx_kl_k3"``,
        ``"line_search_index"`` (-1: no step accepted), ``"predicted_improvement"``, ``"actual_improvement"``;
        and the trained ``"policy"`` and ``"value"``.
    """
    if not isinstance(env_id, str):
        raise ValueError(f"env_id must be a gymnasium environment id (str), got {env_id!r}")
    for name, v in (("num_envs", num_envs), ("num_steps", num_steps), ("total_steps", total_steps),
                    ("value_epochs", value_epochs), ("value_minibatches", value_minibatches)):
        _positive_int(name, v)
    iterations = total_steps // (num_envs * num_steps)
    if iterations < 1:
        raise ValueError(f"total_steps ({total_steps}) must be at least num_envs * num_steps "
                         f"({num_envs * num_steps})")
    _positive_real("max_kl", max_kl)
    value_lr = _positive_real("value_lr", value_lr)
    gamma = check_gamma(gamma)
    if isinstance(lam, bool) or not isinstance(lam, Real) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam (the GAE lambda) must be a real number in [0, 1], got {lam!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if log_every is not None:
        _positive_int("log_every", log_every)
    device = get_device(None if device is None else str(device))

    seed_everything(seed)
    env = make_vector_env(env_id, num_envs)
    try:
        obs_dim, n_actions, _ = check_env(env)
        policy = PolicyNet(obs_dim, n_actions, hidden).to(device)
        value = ValueNet(obs_dim, hidden).to(device)
        value_opt = torch.optim.Adam(value.parameters(), lr=value_lr, eps=1e-5)
        generator = torch.Generator(device=device).manual_seed(seed)
        collector = RolloutCollector(env, seed=seed)
        keys = ("iteration", "env_steps", "mean_return", "kl_exact", "approx_kl_k1", "approx_kl_k3",
                "line_search_index", "predicted_improvement", "actual_improvement")
        history: dict = {k: [] for k in keys}
        for it in range(iterations):
            ro, episodes = collector.collect(policy, num_steps, generator=generator)
            with torch.no_grad():
                _, adv, ret = rollout_advantages(ro, value, gamma=gamma, lam=lam)
            mask = ro.mask
            obs, actions, adv, ret = ro.obs[mask], ro.actions[mask], adv[mask], ret[mask]
            stats = trpo_update(policy, obs, actions, normalize_advantages(adv), max_kl=max_kl, damping=damping,
                                cg_iters=cg_iters, backtrack=backtrack, max_backtracks=max_backtracks)
            n = obs.shape[0]
            for _ in range(value_epochs):
                for idx in torch.randperm(n, generator=generator, device=device).tensor_split(value_minibatches):
                    if idx.numel() == 0:
                        continue
                    loss = value_loss(value(obs[idx]), ret[idx])
                    value_opt.zero_grad(set_to_none=True)
                    loss.backward()
                    value_opt.step()
            env_steps = (it + 1) * num_envs * num_steps
            mean_return = float(np.mean([r for r, _ in episodes])) if episodes else math.nan
            history["iteration"].append(it)
            history["env_steps"].append(env_steps)
            history["mean_return"].append(mean_return)
            history["kl_exact"].append(stats.kl_exact)
            history["approx_kl_k1"].append(stats.approx_kl_k1)
            history["approx_kl_k3"].append(stats.approx_kl_k3)
            history["line_search_index"].append(stats.line_search.index)
            history["predicted_improvement"].append(stats.predicted_improvement)
            history["actual_improvement"].append(stats.line_search.improvement)
            if log_every is not None and (it % log_every == 0 or it == iterations - 1):
                print(f"iteration {it:4d}  env steps {env_steps:7d}  mean return {mean_return:6.1f}  "
                      f"kl {stats.kl_exact:.4f}  line search j = {stats.line_search.index}")
    finally:
        env.close()
    history["policy"], history["value"] = policy, value
    return history
