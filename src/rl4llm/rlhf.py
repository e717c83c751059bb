r"""KL-shaped rewards, the shared toy setting, and PPO for a language model (RLHF, chapter 11).

The pipeline of Stiennon et al. and InstructGPT, small enough to run on a CPU in seconds:

1. **Preferences -> a reward model.** :mod:`rl4llm.reward_model` (Bradley-Terry losses,
   :class:`~rl4llm.reward_model.ScalarModel`, :func:`~rl4llm.reward_model.train_reward_model`).
2. **A KL-shaped reward.** RLHF maximises :math:`\mathbb E_{y \sim \pi}[r(x, y)] - \beta\,\mathrm{KL}(\pi \,\|\,
   \pi_\mathrm{ref})`. :func:`kl_shaped_rewards` spreads the sequence-level reward :math:`R = r - \beta \log
   \pi(y \mid x) / \pi_\mathrm{ref}(y \mid x)` over the tokens: :math:`-\beta \log(\pi/\pi_\mathrm{ref})` at every
   token and the reward-model score added at the last one. With :math:`\gamma = 1` the per-token rewards sum to
   :math:`R` exactly (:func:`sequence_kl_shaped_reward`).
3. **PPO.** :func:`ppo_lm` samples completions with :func:`rl4llm.lm.sample`, shapes the rewards, computes GAE
   (:func:`rl4llm.returns.gae`, :math:`\gamma = 1`, padded positions masked) with a separate value model, and takes
   several epochs of clipped policy and value updates (:mod:`rl4llm.surrogate`) against a frozen reference.

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
from torch import Tensor, nn

from rl4llm import _validate as check
from rl4llm.kl import ESTIMATORS, per_token_kl
from rl4llm.lm import TinyLM, TinyLMConfig, last_index, sample, token_logprobs
from rl4llm.returns import gae
from rl4llm.reward_model import ScalarModel
from rl4llm.surrogate import normalize_advantages, policy_loss, value_loss
from rl4llm.tasks import CopyTask, PreferencePairs, Task, preference_pairs, supervised_warmstart

__all__ = [
    "kl_shaped_rewards",
    "sequence_kl_shaped_reward",
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
# KL-shaped rewards
# ----------------------------------------------------------------------------------------------------------


def _check_shaping_inputs(scores, logp, logp_ref, mask, beta) -> tuple[Tensor, float]:
    check.float_nonempty(logp, "logp", "[B, T]", dim=2)
    check.float_nonempty(logp_ref, "logp_ref", "[B, T]", dim=2)
    if logp_ref.shape != logp.shape:
        raise ValueError(f"logp_ref must have the shape of logp, {tuple(logp.shape)}, got {tuple(logp_ref.shape)}")
    check.float_nonempty(scores, "scores", "[B]", dim=1)
    if scores.shape[0] != logp.shape[0]:
        raise ValueError(f"scores must be [B] = ({logp.shape[0]},), got {tuple(scores.shape)}")
    keep = check.token_mask("mask", mask, logp.shape, "[B, T]").to(logp.device)
    if not bool(keep.any(dim=1).all()):
        rows = (~keep.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"mask [B, T] has rows with no tokens (rows {rows[:8]}): a reward needs a last token")
    return keep, check.nonneg_real(beta, "beta")


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
    acc = check.accumulation_dtype(scores, logp, logp_ref)
    kl_t = per_token_kl(logp.to(acc), logp_ref.to(acc), keep, estimator=estimator)  # [B, T], 0 on padding
    rewards = torch.where(keep, -beta * kl_t, torch.zeros((), dtype=kl_t.dtype, device=kl_t.device))
    last = last_index(keep)
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
    acc = check.accumulation_dtype(scores, logp, logp_ref)
    zero = torch.zeros((), dtype=acc, device=logp.device)
    log_ratio = torch.where(keep, logp.to(acc) - logp_ref.to(acc), zero).sum(dim=1)
    return scores.to(device=logp.device, dtype=acc) - beta * log_ratio


# ----------------------------------------------------------------------------------------------------------
# A transformer with a scalar head: reward model and value model
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# Training a reward model on preference pairs
# ----------------------------------------------------------------------------------------------------------


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
        check.ids("prompt_ids", prompt_ids, vocab_size=V, shape="[B, P]")
        check.ids("completion_tokens", completion_tokens, vocab_size=V, shape="[B, L]")
        if completion_tokens.shape[0] != prompt_ids.shape[0]:
            raise ValueError(f"completion_tokens must be [B, L] with B = {prompt_ids.shape[0]}, "
                             f"got {tuple(completion_tokens.shape)}")
        keep = check.token_mask("completion_mask", completion_mask, completion_tokens.shape, "[B, L]")
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
    check.positive_int("warmstart_steps", warmstart_steps)
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
    check.positive_int("n", n)
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
    check.positive_int("n", n)
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
       (:func:`rl4llm.surrogate.policy_loss`, a flat mean over tokens, on whitened advantages) and the (clipped) value
       loss, each with its own Adam optimiser.

    The value model is separate from the policy (no shared trunk), so the value loss never moves the policy and
    the policy stays a plain :class:`~rl4llm.lm.TinyLM` whose KL to the reference is comparable with any other
    policy's (e.g. DPO's in chapter 12).

    Args:
        policy: the policy, trained in place.
        reference: the reference policy (only read; pass :func:`rl4llm.lm.frozen_copy` of the start).
        reward_fn: ``(prompts, tokens, mask) -> [B]``, e.g. a reward model's
            :meth:`~rl4llm.reward_model.ScalarModel.score`.
        task: gives the prompts and ``max_new_tokens``.
        beta: KL coefficient, ``>= 0``.
        value_model: the critic, trained in place; None: :meth:`~rl4llm.reward_model.ScalarModel.from_lm` of the
            policy (zero head).
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
    beta = check.nonneg_real(beta, "beta")
    for name, value in (("iterations", iterations), ("batch_size", batch_size), ("epochs", epochs),
                        ("minibatches", minibatches)):
        check.positive_int(name, value)
    if batch_size % minibatches:
        raise ValueError(f"minibatches={minibatches} must divide batch_size={batch_size}")
    for name, value in (("lr", lr), ("value_lr", value_lr)):
        if not (isinstance(value, Real) and value > 0):
            raise ValueError(f"{name} must be positive, got {value!r}")
    check.nonneg_real(clip_eps, "clip_eps")
    if value_clip is not None:
        check.nonneg_real(value_clip, "value_clip")
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

