r"""Reward models from preferences, KL-shaped rewards, and PPO for a language model (RLHF).

The pipeline of Stiennon et al. and InstructGPT, small enough to run on a CPU in seconds:

1. **Preferences -> a reward model.** Under the Bradley-Terry model a rater prefers response :math:`y_1` to
   :math:`y_2` with probability :math:`\sigma(r(x, y_1) - r(x, y_2))`. :func:`bradley_terry_loss` is the negative
   log-likelihood of the observed choices, :func:`kwise_ranking_loss` InstructGPT's version for :math:`K` ranked
   responses per prompt (all :math:`\binom K2` pairs, averaged per prompt). :class:`ScalarModel` is a
   :class:`~rl4llm.lm.TinyLM` backbone with a scalar head; :meth:`ScalarModel.score` reads it at the last token of
   a completion (a reward model), :meth:`ScalarModel.values` at every completion position (a value model).
   :func:`train_reward_model` fits one to :class:`~rl4llm.tasks.PreferencePairs`.
2. **A KL-shaped reward.** RLHF maximises :math:`\mathbb E_{y \sim \pi}[r(x, y)] - \beta\,\mathrm{KL}(\pi \,\|\,
   \pi_\mathrm{ref})`. :func:`kl_shaped_rewards` spreads the sequence-level reward :math:`R = r - \beta \log
   \pi(y \mid x) / \pi_\mathrm{ref}(y \mid x)` over the tokens: :math:`-\beta \log(\pi/\pi_\mathrm{ref})` at every
   token and the reward-model score added at the last one. With :math:`\gamma = 1` the per-token rewards sum to
   :math:`R` exactly (:func:`sequence_kl_shaped_reward`).
3. **PPO.** :func:`ppo_lm` samples completions with :func:`rl4llm.lm.sample`, shapes the rewards, computes GAE
   (:func:`rl4llm.returns.gae`, :math:`\gamma = 1`, padded positions masked) with a separate value model, and takes
   several epochs of clipped policy and value updates (:mod:`rl4llm.ppo`) against a frozen reference.

The shared toy setting (:func:`make_setting`): prompts ask to copy four digits (:class:`~rl4llm.tasks.CopyTask`),
the reference policy is warm-started to copy them (imperfectly), and a hidden "true" reward :class:`DigitGain`
prefers answers whose digits are *larger* than the prompt's: a taste the supervised data never showed, so the
policy has to move away from the reference to satisfy it, and the KL penalty decides how far. Preferences are
Bradley-Terry samples of that reward, so a reward model can recover it up to a per-prompt shift, and PPO and DPO
(chapter 12) target the same KL-regularised optimum :math:`\pi^* \propto \pi_\mathrm{ref} e^{r/\beta}`.
:func:`evaluate_policy` measures any policy's true reward and
:math:`\mathrm{KL}(\pi \,\|\, \pi_\mathrm{ref})` the same way.

Conventions: prompts ``[B, P]`` (all rows the same length), completions ``[B, L]`` with a 0/1 ``mask [B, L]`` that
is 1 on real tokens; per-token tensors are time-last and exactly 0 on padding; bfloat16/float16 inputs are
accumulated in float32.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rl4llm.kl import ESTIMATORS, per_token_kl
from rl4llm.lm import TinyLM, TinyLMConfig, _check_ids, _check_mask, sample, token_logprobs
from rl4llm.ppo import normalize_advantages, policy_loss, value_loss
from rl4llm.returns import gae
from rl4llm.tasks import CopyTask, PreferencePairs, Task, preference_pairs, supervised_warmstart

__all__ = [
    "bradley_terry_loss",
    "kwise_ranking_loss",
    "kl_shaped_rewards",
    "sequence_kl_shaped_reward",
    "ScalarModel",
    "RewardModelHistory",
    "train_reward_model",
    "preference_accuracy",
    "DigitGain",
    "RLHFSetting",
    "REFERENCE_CONFIG",
    "make_setting",
    "preference_data",
    "PolicyEval",
    "evaluate_policy",
    "PPOHistory",
    "ppo_lm",
]

RewardFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``reward_fn(prompts [B, P], completions [B, L], mask [B, L]) -> [B]``."""


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------
def _acc_dtype(*xs: Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _check_float(name: str, x, shape: str, dim: int | None = None) -> Tensor:
    """Raise ValueError unless ``x`` is a non-empty, finite floating-point tensor (with ``dim`` dims)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point {shape} tensor, got {got}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must be a {shape} tensor, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty {shape} tensor, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _check_nonneg(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not (0.0 <= float(value) < math.inf):
        raise ValueError(f"{name} must be a finite real number >= 0, got {value!r}")
    return float(value)


def _check_pos_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------
# Bradley-Terry losses
# ----------------------------------------------------------------------------------------------------------
def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, *, reduction: str = "mean") -> Tensor:
    r"""Negative log-likelihood of preferences under the Bradley-Terry model, :math:`-\log \sigma(r_w - r_l)`.

    With :math:`d = r(x, y_w) - r(x, y_l)`, the loss is :math:`-\log\sigma(d) = \log(1 + e^{-d})`, computed as
    ``-logsigmoid(d)``: finite for any finite ``d`` (about ``|d|`` for ``d`` very negative, about ``e^{-d}`` for
    ``d`` very positive) where ``log(sigmoid(d))`` would return ``-inf``. Its derivative in ``d`` is
    :math:`-\sigma(-d)`. Adding the same number to both rewards of a pair (a per-prompt shift) changes nothing.

    Args:
        chosen_rewards: ``[...]`` rewards of the preferred responses (any float dtype; 16-bit is upcast).
        rejected_rewards: ``[...]`` rewards of the other responses, same shape.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (the per-pair losses).

    Returns:
        the loss, float32 (float64 for float64 inputs): a scalar, or ``[...]`` for ``reduction="none"``.

    Raises:
        ValueError: non-float, empty or non-finite inputs, shapes that differ, an unknown ``reduction``.
    """
    _check_float("chosen_rewards", chosen_rewards, "[...]")
    _check_float("rejected_rewards", rejected_rewards, "[...]")
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"rejected_rewards must have the shape of chosen_rewards, {tuple(chosen_rewards.shape)}, "
                         f"got {tuple(rejected_rewards.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    acc = _acc_dtype(chosen_rewards, rejected_rewards)
    losses = 0.0 - F.logsigmoid(chosen_rewards.to(acc) - rejected_rewards.to(acc))  # 0.0 - x: +0, never -0
    if reduction == "none":
        return losses
    return losses.mean() if reduction == "mean" else losses.sum()


def kwise_ranking_loss(rewards_ranked: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""InstructGPT's reward-model loss for ``K`` ranked responses per prompt.

    Row ``b`` holds the rewards of ``K`` responses to one prompt, best first: ``rewards_ranked[b, i]`` is preferred
    to ``rewards_ranked[b, j]`` whenever ``i < j``. The loss of a prompt is the mean Bradley-Terry loss over its
    :math:`\binom{K}{2}` pairs,

    .. math:: \ell_b = -\binom{K}{2}^{-1} \sum_{i < j} \log \sigma(r_{b,i} - r_{b,j}),

    and the result is the mean of :math:`\ell_b` over prompts: every prompt weighs the same, however many pairs
    it contributes (InstructGPT puts all pairs of a prompt in one batch element for this reason: treated as
    independent samples, the correlated pairs of one prompt overfit).

    Args:
        rewards_ranked: ``[B, K]`` rewards, ``K >= 2``, each row sorted from most to least preferred.
        mask: optional ``[B, K]`` 0/1; 0 marks a missing response (prompts with fewer than ``K``). Row ``b`` then
            uses its ``K_b`` valid responses, in their order, and is normalised by :math:`\binom{K_b}{2}`;
            every row needs at least two.

    Returns:
        scalar loss, float32 (float64 for float64 inputs).

    Raises:
        ValueError: bad shapes, non-finite values (at valid positions), a mask not 0/1 or with a row of fewer
            than two responses.
    """
    if not isinstance(rewards_ranked, Tensor) or not rewards_ranked.is_floating_point() or rewards_ranked.dim() != 2:
        got = tuple(rewards_ranked.shape) if isinstance(rewards_ranked, Tensor) else type(rewards_ranked).__name__
        raise ValueError(f"rewards_ranked must be a floating-point [B, K] tensor, got {got}")
    B, K = rewards_ranked.shape
    if B == 0 or K < 2:
        raise ValueError(f"rewards_ranked must be [B, K] with B >= 1 and K >= 2, got {(B, K)}")
    keep = torch.ones(B, K, dtype=torch.bool, device=rewards_ranked.device) if mask is None else \
        _check_mask("mask", mask, rewards_ranked.shape, "[B, K]").to(rewards_ranked.device)
    if not bool(torch.isfinite(rewards_ranked[keep]).all()):
        raise ValueError("rewards_ranked contains NaN or infinite values")
    counts = keep.sum(dim=1)
    if bool((counts < 2).any()):
        raise ValueError("mask [B, K] must keep at least two responses in every row (a pair needs two)")
    acc = _acc_dtype(rewards_ranked)
    r = rewards_ranked.to(acc)
    d = r[:, :, None] - r[:, None, :]  # [B, K, K]: d[b, i, j] = r_i - r_j
    upper = torch.ones(K, K, dtype=torch.bool, device=r.device).triu(diagonal=1)  # i < j
    pairs = upper & keep[:, :, None] & keep[:, None, :]
    nll = torch.where(pairs, 0.0 - F.logsigmoid(d), torch.zeros((), dtype=acc, device=r.device))
    n_pairs = (counts * (counts - 1) // 2).to(acc)
    return (nll.sum(dim=(1, 2)) / n_pairs).mean()


# ----------------------------------------------------------------------------------------------------------
# KL-shaped rewards
# ----------------------------------------------------------------------------------------------------------
def _last_index(keep: Tensor) -> Tensor:
    """``[B]`` index of the last True entry of each row of ``keep [B, T]`` (every row has one)."""
    T = keep.shape[-1]
    pos = torch.arange(T, device=keep.device).expand(keep.shape)
    return torch.where(keep, pos, torch.full_like(pos, -1)).max(dim=-1).values


def _check_shaping_inputs(scores, logp, logp_ref, mask, beta) -> tuple[Tensor, float]:
    _check_float("logp", logp, "[B, T]", dim=2)
    _check_float("logp_ref", logp_ref, "[B, T]", dim=2)
    if logp_ref.shape != logp.shape:
        raise ValueError(f"logp_ref must have the shape of logp, {tuple(logp.shape)}, got {tuple(logp_ref.shape)}")
    _check_float("scores", scores, "[B]", dim=1)
    if scores.shape[0] != logp.shape[0]:
        raise ValueError(f"scores must be [B] = ({logp.shape[0]},), got {tuple(scores.shape)}")
    keep = _check_mask("mask", mask, logp.shape, "[B, T]").to(logp.device)
    if not bool(keep.any(dim=1).all()):
        rows = (~keep.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"mask [B, T] has rows with no tokens (rows {rows[:8]}): a reward needs a last token")
    return keep, _check_nonneg("beta", beta)


def kl_shaped_rewards(scores: Tensor, logp: Tensor, logp_ref: Tensor, mask: Tensor, *, beta: float,
                      estimator: str = "k1") -> Tensor:
    r"""Per-token rewards of RLHF: a KL penalty at every token, the reward-model score at the last one.

    .. math:: r_t = -\beta\, k_t + [t = t_\mathrm{last}]\; r_\phi(x, y),

    where :math:`k_t` is the per-token KL estimate of :func:`rl4llm.kl.per_token_kl`; with the default
    ``estimator="k1"``, :math:`k_t = \log \pi(y_t \mid x, y_{<t}) - \log \pi_\mathrm{ref}(y_t \mid x, y_{<t})`,
    and the undiscounted sum of the :math:`r_t` is exactly the sequence-level reward
    :math:`r_\phi - \beta \log \pi(y \mid x) / \pi_\mathrm{ref}(y \mid x)` (:func:`sequence_kl_shaped_reward`).
    The score is the reward model's verdict on the whole completion, so it is given once, at the last valid
    token, not at every token.

    Args:
        scores: ``[B]`` reward-model scores of the completions.
        logp: ``[B, T]`` log-probabilities of the completion tokens under the policy that sampled them.
        logp_ref: ``[B, T]`` the same under the reference policy.
        mask: ``[B, T]`` 0/1, 1 on real tokens; every row needs at least one.
        beta: KL coefficient, ``>= 0``.
        estimator: ``"k1"`` (default; the log-ratio, as in InstructGPT), ``"k2"`` or ``"k3"``.

    Returns:
        ``[B, T]`` rewards, float32 (float64 for float64 inputs), exactly 0 on padding.

    Raises:
        ValueError: bad shapes or dtypes, NaN/inf in an input, a mask not 0/1 or with an empty row,
            ``beta < 0`` or not finite, an unknown ``estimator``.
    """
    keep, beta = _check_shaping_inputs(scores, logp, logp_ref, mask, beta)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {estimator!r}")
    acc = _acc_dtype(scores, logp, logp_ref)
    kl_t = per_token_kl(logp.to(acc), logp_ref.to(acc), keep, estimator=estimator)  # [B, T], 0 on padding
    rewards = torch.where(keep, -beta * kl_t, torch.zeros((), dtype=kl_t.dtype, device=kl_t.device))
    last = _last_index(keep)
    return rewards.scatter_add(1, last[:, None], scores.to(device=rewards.device, dtype=acc)[:, None])


def sequence_kl_shaped_reward(scores: Tensor, logp: Tensor, logp_ref: Tensor, mask: Tensor, *,
                              beta: float) -> Tensor:
    r"""The sequence-level RLHF reward :math:`R = r_\phi(x, y) - \beta \log \pi(y \mid x) / \pi_\mathrm{ref}(y \mid x)`.

    :math:`\log \pi(y \mid x) = \sum_t \log \pi(y_t \mid x, y_{<t})` over the masked tokens, likewise for the
    reference. Its mean over completions sampled from :math:`\pi` estimates :math:`\mathbb E_\pi[r_\phi] - \beta\,
    \mathrm{KL}(\pi \,\|\, \pi_\mathrm{ref})`.

    Args: as for :func:`kl_shaped_rewards`.

    Returns:
        ``[B]`` rewards, float32 (float64 for float64 inputs).
    """
    keep, beta = _check_shaping_inputs(scores, logp, logp_ref, mask, beta)
    acc = _acc_dtype(scores, logp, logp_ref)
    zero = torch.zeros((), dtype=acc, device=logp.device)
    log_ratio = torch.where(keep, logp.to(acc) - logp_ref.to(acc), zero).sum(dim=1)
    return scores.to(device=logp.device, dtype=acc) - beta * log_ratio


# ----------------------------------------------------------------------------------------------------------
# A transformer with a scalar head: reward model and value model
# ----------------------------------------------------------------------------------------------------------
class ScalarModel(nn.Module):
    """A :class:`~rl4llm.lm.TinyLM` backbone with a linear scalar head: ``ids [B, T] -> [B, T]``.

    ``forward(ids)[b, t]`` is a number computed from ``ids[b, :t+1]`` (causal attention). Used two ways:

    - as a **reward model**, :meth:`score` reads it at the last valid token of each completion;
    - as a **value model**, :meth:`values` reads it at the position before each completion token, i.e. on the
      state :math:`s_t = (x, y_{<t})` in which token :math:`y_t` is chosen.

    The backbone's output head (``lm_head``) is not used. :meth:`from_lm` copies the weights of a trained
    :class:`~rl4llm.lm.TinyLM`, which is how InstructGPT initialises its reward model (from the supervised model)
    and Stiennon et al. their value model (from the reward model).

    Args:
        cfg: the size of the backbone.
    """

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.config = cfg
        self.backbone = TinyLM(cfg)
        self.head = nn.Linear(cfg.d_model, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_lm(cls, lm: nn.Module) -> ScalarModel:
        """A new model whose backbone is a copy of ``lm``'s weights (a :class:`TinyLM` or a :class:`ScalarModel`).

        The head is copied too from a :class:`ScalarModel`, and starts at zero (every output 0) from a TinyLM.
        """
        src = lm.backbone if isinstance(lm, ScalarModel) else lm
        if not isinstance(src, TinyLM):
            raise ValueError(f"lm must be a TinyLM or a ScalarModel, got {type(lm).__name__}")
        p = next(src.parameters())
        model = cls(src.config).to(device=p.device, dtype=p.dtype)
        model.backbone.load_state_dict(src.state_dict())
        if isinstance(lm, ScalarModel):
            model.head.load_state_dict(lm.head.state_dict())
        return model

    def forward(self, ids: Tensor) -> Tensor:
        """Scalar outputs at every position.

        Args:
            ids: ``[B, T]`` token ids.

        Returns:
            ``[B, T]`` float32 outputs (``ids[b, :t+1]`` determines entry ``t``).
        """
        bb, cfg = self.backbone, self.config
        _check_ids("ids", ids, vocab_size=cfg.vocab_size)
        if ids.shape[1] > cfg.max_len:
            raise ValueError(f"ids must be [B, T] with T <= max_len={cfg.max_len}, got shape {tuple(ids.shape)}")
        x = bb.drop(bb.wte(ids) + bb.wpe(torch.arange(ids.shape[1], device=ids.device)))
        for block in bb.blocks:
            x = block(x)
        return self.head(bb.ln_f(x)).squeeze(-1).float()

    def _run(self, prompts: Tensor, completions: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        _check_ids("prompts", prompts, vocab_size=self.config.vocab_size, shape="[B, P]")
        _check_ids("completions", completions, vocab_size=self.config.vocab_size, shape="[B, L]")
        if completions.shape[0] != prompts.shape[0]:
            raise ValueError(f"completions must be [B, L] with B = prompts.shape[0] = {prompts.shape[0]}, "
                             f"got shape {tuple(completions.shape)}")
        keep = _check_mask("mask", mask, completions.shape, "[B, L]").to(prompts.device)
        if not bool(keep.any(dim=1).all()):
            raise ValueError("mask [B, L] has an all-zero row: every completion needs a token")
        out = self(torch.cat([prompts, completions.to(prompts.device)], dim=1))  # [B, P + L]
        return out, keep

    def score(self, prompts: Tensor, completions: Tensor, mask: Tensor) -> Tensor:
        """Reward-model score of each completion: the output at its last valid token.

        Args:
            prompts: ``[B, P]`` prompt ids.
            completions: ``[B, L]`` completion ids (right-padded).
            mask: ``[B, L]`` 0/1, 1 on the completion's tokens; no empty rows.

        Returns:
            ``[B]`` float32 scores (differentiable).
        """
        out, keep = self._run(prompts, completions, mask)
        idx = prompts.shape[1] + _last_index(keep)
        return out.gather(1, idx[:, None]).squeeze(1)

    def values(self, prompts: Tensor, completions: Tensor, mask: Tensor) -> Tensor:
        r"""Value of the state before each completion token, :math:`V(x, y_{<t})`, 0 on padding.

        Args: as for :meth:`score`.

        Returns:
            ``[B, L]`` float32 values (differentiable), exactly 0 where ``mask`` is 0.
        """
        out, keep = self._run(prompts, completions, mask)
        P, L = prompts.shape[1], completions.shape[1]
        v = out[:, P - 1:P - 1 + L]
        return torch.where(keep, v, torch.zeros((), dtype=v.dtype, device=v.device))


# ----------------------------------------------------------------------------------------------------------
# Training a reward model on preference pairs
# ----------------------------------------------------------------------------------------------------------
@dataclass
class RewardModelHistory:
    """What :func:`train_reward_model` did.

    Attributes:
        loss: mean Bradley-Terry loss of each minibatch step.
        train_accuracy: share of training pairs ordered correctly after each epoch.
        seconds: wall-clock time.
    """

    loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _pair_scores(rm: ScalarModel, pairs: PreferencePairs, idx: Tensor | slice) -> tuple[Tensor, Tensor]:
    """Scores of the chosen and rejected responses of the pairs ``idx``, in one forward pass."""
    x = pairs.prompts[idx]
    ids = torch.cat([pairs.chosen[idx], pairs.rejected[idx]])
    masks = torch.cat([pairs.chosen_mask[idx], pairs.rejected_mask[idx]])
    s = rm.score(x.repeat(2, 1), ids, masks)
    n = x.shape[0]
    return s[:n], s[n:]


@torch.no_grad()
def preference_accuracy(rm: ScalarModel, pairs: PreferencePairs, *, batch_size: int = 1024) -> float:
    """Share of pairs whose chosen response the reward model scores higher (ties count one half).

    Args:
        rm: the reward model.
        pairs: labelled pairs.
        batch_size: pairs per forward pass.

    Returns:
        accuracy in ``[0, 1]``.
    """
    _check_pos_int("batch_size", batch_size)
    n, correct = pairs.prompts.shape[0], 0.0
    for start in range(0, n, batch_size):
        c, r = _pair_scores(rm, pairs, slice(start, start + batch_size))
        correct += float((c > r).sum()) + 0.5 * float((c == r).sum())
    return correct / n


def train_reward_model(rm: ScalarModel, pairs: PreferencePairs, *, epochs: int = 4, batch_size: int = 64,
                       lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0) -> RewardModelHistory:
    """Fit a reward model to preference pairs by minimising :func:`bradley_terry_loss` with AdamW.

    Each epoch visits the pairs in a fresh random order (from ``seed``), ``batch_size`` at a time; the chosen and
    rejected responses of a minibatch go through the model in one batch.

    Args:
        rm: the model, trained in place (on the device of its parameters; ``pairs`` must be there too).
        pairs: :class:`~rl4llm.tasks.PreferencePairs`.
        epochs: passes over the data.
        batch_size: pairs per step.
        lr: learning rate.
        weight_decay: AdamW weight decay.
        seed: seeds the order of the pairs.

    Returns:
        a :class:`RewardModelHistory`.
    """
    _check_pos_int("epochs", epochs)
    _check_pos_int("batch_size", batch_size)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    _check_nonneg("weight_decay", weight_decay)
    if not isinstance(pairs, PreferencePairs):
        raise ValueError(f"pairs must be PreferencePairs, got {type(pairs).__name__}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(rm.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
    history = RewardModelHistory()
    start = time.perf_counter()
    n = pairs.prompts.shape[0]
    rm.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(pairs.prompts.device)
        for b in range(0, n, batch_size):
            c, r = _pair_scores(rm, pairs, order[b:b + batch_size])
            loss = bradley_terry_loss(c, r)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.loss.append(loss.item())
        history.train_accuracy.append(preference_accuracy(rm, pairs))
    rm.eval()
    history.seconds = time.perf_counter() - start
    return history


# ----------------------------------------------------------------------------------------------------------
# The shared toy setting: copy four digits, judged by a rater who likes large digits
# ----------------------------------------------------------------------------------------------------------
class DigitGain:
    r"""The hidden "true" reward of the toy setting: how much the answer raises the prompt's digits.

    For a prompt with digits :math:`x_1 \dots x_n` and a completion :math:`y`,

    .. math:: r(x, y) = \frac{1}{s} \Big( \sum_{j=1}^{n} v(y_j) - \sum_{j=1}^{n} x_j \Big),

    where :math:`v(y_j)` is the value of the completion's :math:`j`-th token if it is a digit and 0 otherwise
    (``<eos>``, a letter, padding), and only the first :math:`n` completion positions count. An exact copy scores
    0, each digit raised by one scores :math:`1/s` more. The prompt term :math:`-\sum_j x_j / s` depends on the
    prompt alone: preferences between two answers to the same prompt carry no information about it (the
    Bradley-Terry invariance), which makes this reward a clean test of "recovered up to a per-prompt shift".

    Args:
        task: a task whose prompts are a one-character tag, ``n_digits`` digits and ``=`` (e.g.
            :class:`~rl4llm.tasks.CopyTask`).
        scale: :math:`s`, the digit sum that is worth one unit of reward (and of Bradley-Terry log-odds).
    """

    def __init__(self, task: Task, scale: float = 4.5):
        if not isinstance(task, Task):
            raise ValueError(f"task must be a rl4llm.tasks.Task, got {type(task).__name__}")
        if isinstance(scale, bool) or not isinstance(scale, Real) or not 0 < float(scale) < math.inf:
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        self.task, self.scale = task, float(scale)
        tok = task.tokenizer
        self._value = torch.zeros(tok.vocab_size)  # value of each token id: its digit, or 0
        for d in range(10):
            self._value[tok.encode(str(d))[0]] = float(d)

    @property
    def n(self) -> int:
        """Digits per prompt (and completion positions that count)."""
        return self.task.n_digits

    def __call__(self, prompt_ids: Tensor, completion_tokens: Tensor, completion_mask: Tensor) -> Tensor:
        """Rewards ``[B]`` (float32) of completions ``[B, L]`` with masks ``[B, L]`` to prompts ``[B, P]``.

        Raises:
            ValueError: ids out of the vocabulary, batch sizes that differ, a mask not ``[B, L]`` of 0/1, prompts
                not of the form tag, ``n`` digits, ``=``.
        """
        V = self.task.tokenizer.vocab_size
        _check_ids("prompt_ids", prompt_ids, vocab_size=V, shape="[B, P]")
        _check_ids("completion_tokens", completion_tokens, vocab_size=V, shape="[B, L]")
        if completion_tokens.shape[0] != prompt_ids.shape[0]:
            raise ValueError(f"completion_tokens must be [B, L] with B = {prompt_ids.shape[0]}, "
                             f"got {tuple(completion_tokens.shape)}")
        keep = _check_mask("completion_mask", completion_mask, completion_tokens.shape, "[B, L]")
        n = self.n
        if prompt_ids.shape[1] != n + 3:
            raise ValueError(f"prompt_ids must be [B, {n + 3}] (<bos>, a tag, {n} digits, '='), "
                             f"got {tuple(prompt_ids.shape)}")
        value = self._value.to(completion_tokens.device)
        x = value[prompt_ids[:, 2:2 + n].to(completion_tokens.device)].sum(dim=1)
        k = min(n, completion_tokens.shape[1])
        y = (value[completion_tokens[:, :k]] * keep[:, :k].to(value.device)).sum(dim=1)
        return (y - x) / self.scale

    def __repr__(self) -> str:
        return f"DigitGain({self.task!r}, scale={self.scale})"


@dataclass
class RLHFSetting:
    """The toy RLHF problem shared by chapters 11 and 12 (see :func:`make_setting`).

    Attributes:
        task: the copy task (the prompts).
        true_reward: the hidden reward, a :class:`DigitGain`.
        reference: the warm-started policy (eval mode, trainable). Copy it before training:
            ``policy = copy.deepcopy(setting.reference)``, ``ref = rl4llm.lm.frozen_copy(setting.reference)``.
        seed: the seed it was built from.
    """

    task: CopyTask
    true_reward: DigitGain
    reference: TinyLM
    seed: int


REFERENCE_CONFIG = dict(n_layer=2, n_head=2, d_model=32, max_len=16)
"""Size of the reference policy (and so of the reward and value models copied from it)."""


def make_setting(seed: int = 0, *, n_digits: int = 4, warmstart_steps: int = 120,
                 device: torch.device | str | None = None) -> RLHFSetting:
    """Build the shared toy setting deterministically from ``seed`` (a few seconds on one CPU thread).

    A :class:`~rl4llm.lm.TinyLM` of size :data:`REFERENCE_CONFIG`, initialised with ``torch.manual_seed(seed)``,
    is trained by :func:`rl4llm.tasks.supervised_warmstart` on :class:`~rl4llm.tasks.CopyTask` for
    ``warmstart_steps`` steps (batch 64, learning rate 3e-3): long enough to produce well-formed answers that
    mostly copy the prompt, short enough that its samples still vary, so that pairs of them differ and a
    preference between them carries information.

    Args:
        seed: seeds the initialisation and the warm start.
        n_digits: digits to copy.
        warmstart_steps: supervised steps.
        device: where to put the model (None: CPU).

    Returns:
        an :class:`RLHFSetting`.
    """
    _check_pos_int("warmstart_steps", warmstart_steps)
    task = CopyTask(n_digits)
    cfg = TinyLMConfig(vocab_size=task.tokenizer.vocab_size, **REFERENCE_CONFIG)
    if task.prompt_len + task.max_new_tokens > cfg.max_len:
        raise ValueError(f"n_digits={n_digits} is too large for max_len={cfg.max_len}")
    torch.manual_seed(seed)
    model = TinyLM(cfg)
    supervised_warmstart(model, task, steps=warmstart_steps, batch_size=64, lr=3e-3, seed=seed,
                         device=device if device is not None else "cpu")
    return RLHFSetting(task=task, true_reward=DigitGain(task), reference=model.eval(), seed=seed)


@torch.no_grad()
def preference_data(setting: RLHFSetting, n: int, *, seed: int, split: str = "train",
                    scale: float = 1.0) -> PreferencePairs:
    """``n`` preference pairs on ``setting``: two completions of the reference per prompt, labelled by a
    Bradley-Terry sample of the true reward, ``P(first preferred) = sigmoid(scale * (r1 - r2))``.

    Like :func:`rl4llm.tasks.sample_preference_pairs`, but labelled with ``setting.true_reward`` (a
    :class:`DigitGain`) instead of the task's exact-match reward. One generator, seeded by ``seed``, draws the
    prompts, then both completions (one batched :func:`rl4llm.lm.sample` call), then the labels.

    Args:
        setting: the :class:`RLHFSetting`.
        n: number of pairs.
        seed: seeds everything random.
        split: which prompts.
        scale: Bradley-Terry inverse temperature (1: the reward is in Bradley-Terry units).

    Returns:
        :class:`~rl4llm.tasks.PreferencePairs` on the reference's device.
    """
    _check_pos_int("n", n)
    task, ref = setting.task, setting.reference
    gen = torch.Generator().manual_seed(seed)
    x = task.encode_prompts(task.sample_prompts(n, generator=gen, split=split), device=_model_device(ref))
    tok = task.tokenizer
    out = sample(ref, x.repeat(2, 1), task.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id, generator=gen)
    return preference_pairs(setting.true_reward, x, out.tokens[:n], out.mask[:n], out.tokens[n:], out.mask[n:],
                            scale=scale, generator=gen)


# ----------------------------------------------------------------------------------------------------------
# Evaluating a policy: true reward and KL to the reference
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyEval:
    """Mean true reward and KL to the reference of a policy, from ``n`` sampled completions.

    Attributes:
        reward: mean true reward.
        kl: estimate of :math:`\\mathrm{KL}(\\pi \\,\\|\\, \\pi_\\mathrm{ref})` per completion, in nats (mean over
            completions of the sum of per-token estimates).
        reward_se: standard error of ``reward``.
        kl_se: standard error of ``kl``.
        n: number of completions.
    """

    reward: float
    kl: float
    reward_se: float
    kl_se: float
    n: int


def _model_device(model) -> torch.device:
    p = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate_policy(policy: nn.Module, reference: nn.Module, task: Task, true_reward: RewardFn, *,
                    n: int = 1024, seed: int = 0, split: str = "test", estimator: str = "k3",
                    device: torch.device | str | None = None) -> PolicyEval:
    r"""Sample one completion for each of ``n`` prompts from ``policy``; return its mean true reward and KL.

    The KL is :math:`\frac1n \sum_i \sum_t k_{i,t}` with the per-token estimates of
    :func:`rl4llm.kl.per_token_kl` (``estimator``, default ``"k3"``), an unbiased estimate of the sequence-level
    :math:`\mathrm{KL}(\pi \,\|\, \pi_\mathrm{ref})` because the completions are sampled from ``policy`` at
    temperature 1. Prompts and samples come from ``torch.Generator().manual_seed(seed)``, so two policies
    evaluated with the same seed see the same prompts.

    Args:
        policy: the policy to evaluate.
        reference: the reference policy.
        task: gives prompts (from ``split``) and ``max_new_tokens``.
        true_reward: ``(prompts, tokens, mask) -> [B]``.
        n: number of prompts (one completion each).
        seed: fixes prompts and samples.
        split: ``"test"`` (default), ``"train"`` or ``"all"``.
        estimator: per-token KL estimator, ``"k1"`` or ``"k3"`` (``"k2"`` is biased and refused).
        device: where to run (None: the policy's device).

    Returns:
        a :class:`PolicyEval`.
    """
    _check_pos_int("n", n)
    if n < 2:
        raise ValueError(f"n must be >= 2 for a standard error, got {n}")
    if estimator not in ("k1", "k3"):
        raise ValueError(f"estimator must be 'k1' or 'k3' (unbiased), got {estimator!r}")
    device = torch.device(device) if device is not None else _model_device(policy)
    gen = torch.Generator().manual_seed(seed)
    x = task.encode_prompts(task.sample_prompts(n, generator=gen, split=split), device=device)
    tok = task.tokenizer
    out = sample(policy, x, task.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id, generator=gen)
    lp = token_logprobs(policy, x, out.tokens, out.mask)
    lp_ref = token_logprobs(reference, x, out.tokens, out.mask)
    kl = per_token_kl(lp, lp_ref, out.mask, estimator=estimator).sum(dim=1).double()
    r = true_reward(x, out.tokens, out.mask).double()
    return PolicyEval(reward=r.mean().item(), kl=kl.mean().item(), reward_se=(r.std() / math.sqrt(n)).item(),
                      kl_se=(kl.std() / math.sqrt(n)).item(), n=n)


# ----------------------------------------------------------------------------------------------------------
# PPO for a language model
# ----------------------------------------------------------------------------------------------------------
@dataclass
class PPOHistory:
    """Per-iteration statistics of :func:`ppo_lm`, measured on that iteration's rollouts (before its updates).

    Attributes:
        true_reward: mean true reward (NaN when no ``true_reward`` was given).
        score: mean ``reward_fn`` score (the reward the policy is trained on).
        kl: mean over rollouts of :math:`\\sum_t k_3`, an unbiased estimate of :math:`\\mathrm{KL}(\\pi \\,\\|\\,
            \\pi_\\mathrm{ref})` per completion (the estimator :func:`evaluate_policy` uses).
        objective: mean KL-shaped return :math:`r - \\beta \\log \\pi(y|x)/\\pi_\\mathrm{ref}(y|x)`.
        clip_fraction: mean share of tokens whose gradient the clip zeroed, over the iteration's minibatches.
        approx_kl_old: :math:`k_3` estimate of :math:`\\mathrm{KL}(\\pi_\\mathrm{old} \\| \\pi_\\theta)` per token
            on the last minibatch of the iteration (how far one iteration moved the policy).
        value_loss: mean value loss over the iteration's minibatches.
        length: mean completion length in tokens (``<eos>`` included).
        seconds: wall-clock time of the whole run.
    """

    true_reward: list[float] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    objective: list[float] = field(default_factory=list)
    clip_fraction: list[float] = field(default_factory=list)
    approx_kl_old: list[float] = field(default_factory=list)
    value_loss: list[float] = field(default_factory=list)
    length: list[float] = field(default_factory=list)
    seconds: float = 0.0


def ppo_lm(policy: TinyLM, reference: nn.Module, reward_fn: RewardFn, task: Task, *, beta: float,
           value_model: ScalarModel | None = None, true_reward: RewardFn | None = None, iterations: int = 60,
           batch_size: int = 64, epochs: int = 4, minibatches: int = 2, lr: float = 1e-3, value_lr: float = 1e-3,
           clip_eps: float = 0.2, value_clip: float | None = 0.2, lam: float = 0.95, kl_estimator: str = "k1",
           whiten_advantages: bool = True, max_grad_norm: float | None = 1.0, seed: int = 0,
           device: torch.device | str | None = None) -> PPOHistory:
    r"""PPO with a KL-shaped reward for a language model, against a frozen reference (InstructGPT-style).

    Each iteration:

    1. draws ``batch_size`` training prompts and samples one completion each from ``policy`` (temperature 1);
    2. scores them with ``reward_fn`` and computes the per-token rewards of :func:`kl_shaped_rewards` (the KL
       penalty is part of the *reward*, so it enters the advantages; the loss has no separate KL term);
    3. computes advantages with :func:`rl4llm.returns.gae` (:math:`\gamma = 1`, the completion mask) from the
       value model's :math:`V(x, y_{<t})`, and value targets ``advantages + values``;
    4. takes ``epochs`` passes of ``minibatches`` minibatches each: the clipped policy loss
       (:func:`rl4llm.ppo.policy_loss`, a flat mean over tokens, on whitened advantages) and the (clipped) value
       loss, each with its own Adam optimiser.

    The value model is separate from the policy (no shared trunk), so the value loss never moves the policy and
    the policy stays a plain :class:`~rl4llm.lm.TinyLM` whose KL to the reference is comparable with any other
    policy's (e.g. DPO's in chapter 12).

    Args:
        policy: the policy, trained in place.
        reference: the reference policy (only read; pass :func:`rl4llm.lm.frozen_copy` of the start).
        reward_fn: ``(prompts, tokens, mask) -> [B]``, e.g. a reward model's :meth:`ScalarModel.score`.
        task: gives the prompts and ``max_new_tokens``.
        beta: KL coefficient, ``>= 0``.
        value_model: the critic, trained in place; None: :meth:`ScalarModel.from_lm` of the policy (zero head).
        true_reward: optional hidden reward, only measured (for :attr:`PPOHistory.true_reward`).
        iterations: rollout-and-update rounds.
        batch_size: completions per iteration.
        epochs: passes over each batch.
        minibatches: minibatches per pass (must divide ``batch_size``).
        lr, value_lr: Adam learning rates of the policy and the value model.
        clip_eps: PPO clip range.
        value_clip: clip range of the value change (PPO2's clipped value loss), or None for the plain loss.
        lam: GAE :math:`\lambda`.
        kl_estimator: per-token estimator in the reward (``"k1"``: the log-ratio).
        whiten_advantages: normalise advantages over the batch's tokens.
        max_grad_norm: clip each model's gradient norm (None: no clipping).
        seed: seeds prompts, samples and minibatch order.
        device: where to run (None: the policy's device).

    Returns:
        a :class:`PPOHistory`.
    """
    beta = _check_nonneg("beta", beta)
    for name, value in (("iterations", iterations), ("batch_size", batch_size), ("epochs", epochs),
                        ("minibatches", minibatches)):
        _check_pos_int(name, value)
    if batch_size % minibatches:
        raise ValueError(f"minibatches={minibatches} must divide batch_size={batch_size}")
    for name, value in (("lr", lr), ("value_lr", value_lr)):
        if not (isinstance(value, Real) and value > 0):
            raise ValueError(f"{name} must be positive, got {value!r}")
    _check_nonneg("clip_eps", clip_eps)
    if value_clip is not None:
        _check_nonneg("value_clip", value_clip)
    if max_grad_norm is not None and not (isinstance(max_grad_norm, Real) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm!r}")
    if kl_estimator not in ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {sorted(ESTIMATORS)}, got {kl_estimator!r}")
    device = torch.device(device) if device is not None else _model_device(policy)
    policy.to(device).train()
    reference.to(device)
    if value_model is None:
        value_model = ScalarModel.from_lm(policy)
    value_model.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(policy.parameters(), lr=lr, foreach=True)
    vopt = torch.optim.Adam(value_model.parameters(), lr=value_lr, foreach=True)
    tok = task.tokenizer
    mb_size = batch_size // minibatches
    history = PPOHistory()
    start = time.perf_counter()
    for _ in range(iterations):
        # 1-3: rollouts, rewards, advantages (no gradients)
        with torch.no_grad():
            x = task.encode_prompts(task.sample_prompts(batch_size, generator=gen, split="train"), device=device)
            out = sample(policy, x, task.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id, generator=gen)
            y, mask = out.tokens, out.mask
            logp_old = token_logprobs(policy, x, y, mask)
            logp_ref = token_logprobs(reference, x, y, mask)
            scores = reward_fn(x, y, mask).float()
            values_old = value_model.values(x, y, mask)
            rewards = kl_shaped_rewards(scores, logp_old, logp_ref, mask, beta=beta, estimator=kl_estimator)
            adv = gae(rewards, values_old, gamma=1.0, lam=lam, mask=mask)
            returns = adv + values_old
            if whiten_advantages:
                adv = normalize_advantages(adv, mask)
            history.score.append(scores.mean().item())
            history.true_reward.append(true_reward(x, y, mask).float().mean().item() if true_reward is not None
                                       else float("nan"))
            history.kl.append(per_token_kl(logp_old, logp_ref, mask, estimator="k3").sum(1).mean().item())
            history.objective.append(sequence_kl_shaped_reward(scores, logp_old, logp_ref, mask, beta=beta)
                                     .mean().item())
            history.length.append(mask.sum(1).mean().item())
        # 4: epochs of minibatch updates
        clip_fracs, vlosses = [], []
        for _ in range(epochs):
            order = torch.randperm(batch_size, generator=gen).to(device)
            for b in range(0, batch_size, mb_size):
                i = order[b:b + mb_size]
                logp = token_logprobs(policy, x[i], y[i], mask[i])
                loss, stats = policy_loss(logp, logp_old[i], adv[i], clip_eps=clip_eps, mask=mask[i])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm is not None:
                    nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
                opt.step()
                v = value_model.values(x[i], y[i], mask[i])
                vloss = value_loss(v, returns[i], old_values=values_old[i] if value_clip is not None else None,
                                   clip_eps=value_clip, mask=mask[i])
                vopt.zero_grad(set_to_none=True)
                vloss.backward()
                if max_grad_norm is not None:
                    nn.utils.clip_grad_norm_(value_model.parameters(), max_grad_norm)
                vopt.step()
                clip_fracs.append(stats.clip_fraction)
                vlosses.append(vloss.item())
        history.clip_fraction.append(sum(clip_fracs) / len(clip_fracs))
        history.value_loss.append(sum(vlosses) / len(vlosses))
        history.approx_kl_old.append(stats.approx_kl_k3)
    history.seconds = time.perf_counter() - start
    return history

