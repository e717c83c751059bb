r"""Reward models from preferences (chapter 11, §11.1-11.2): Bradley-Terry losses and a scalar-head model.

Under the Bradley-Terry model a rater prefers response :math:`y_1` to :math:`y_2` with probability
:math:`\sigma(r(x, y_1) - r(x, y_2))`. Read top to bottom:

1. :func:`bradley_terry_loss`, :func:`kwise_ranking_loss` -- the negative log-likelihood of the observed choices,
   and InstructGPT's version for :math:`K` ranked responses per prompt (all :math:`\binom K2` pairs, averaged per
   prompt);
2. :class:`ScalarModel` -- a :class:`~rl4llm.lm.TinyLM` backbone with a scalar head on its
   :meth:`~rl4llm.lm.TinyLM.features`; :meth:`ScalarModel.score` reads it at the last token of a completion (a
   reward model), :meth:`ScalarModel.values` at every completion position (a value model);
3. :func:`train_reward_model`, :func:`preference_accuracy` -- fitting one to
   :class:`~rl4llm.tasks.PreferencePairs`, and measuring it.

Conventions: prompts ``[B, P]`` (all rows the same length), completions ``[B, L]`` with a 0/1 ``mask [B, L]`` that
is 1 on real tokens; bfloat16/float16 inputs are accumulated in float32.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rl4llm import _validate as check
from rl4llm.lm import TinyLM, TinyLMConfig, last_index
from rl4llm.tasks import PreferencePairs

__all__ = [
    "RewardModelHistory",
    "ScalarModel",
    "bradley_terry_loss",
    "kwise_ranking_loss",
    "preference_accuracy",
    "train_reward_model",
]


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
    check.float_nonempty(chosen_rewards, "chosen_rewards", "[...]")
    check.float_nonempty(rejected_rewards, "rejected_rewards", "[...]")
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"rejected_rewards must have the shape of chosen_rewards, {tuple(chosen_rewards.shape)}, "
                         f"got {tuple(rejected_rewards.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    acc = check.accumulation_dtype(chosen_rewards, rejected_rewards)
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
        check.token_mask("mask", mask, rewards_ranked.shape, "[B, K]").to(rewards_ranked.device)
    if not bool(torch.isfinite(rewards_ranked[keep]).all()):
        raise ValueError("rewards_ranked contains NaN or infinite values")
    counts = keep.sum(dim=1)
    if bool((counts < 2).any()):
        raise ValueError("mask [B, K] must keep at least two responses in every row (a pair needs two)")
    acc = check.accumulation_dtype(rewards_ranked)
    r = rewards_ranked.to(acc)
    d = r[:, :, None] - r[:, None, :]  # [B, K, K]: d[b, i, j] = r_i - r_j
    upper = torch.ones(K, K, dtype=torch.bool, device=r.device).triu(diagonal=1)  # i < j
    pairs = upper & keep[:, :, None] & keep[:, None, :]
    nll = torch.where(pairs, 0.0 - F.logsigmoid(d), torch.zeros((), dtype=acc, device=r.device))
    n_pairs = (counts * (counts - 1) // 2).to(acc)
    return (nll.sum(dim=(1, 2)) / n_pairs).mean()


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
        return self.head(self.backbone.features(ids)).squeeze(-1).float()

    def _run(self, prompts: Tensor, completions: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        check.ids("prompts", prompts, vocab_size=self.config.vocab_size, shape="[B, P]")
        check.ids("completions", completions, vocab_size=self.config.vocab_size, shape="[B, L]")
        if completions.shape[0] != prompts.shape[0]:
            raise ValueError(f"completions must be [B, L] with B = prompts.shape[0] = {prompts.shape[0]}, "
                             f"got shape {tuple(completions.shape)}")
        keep = check.token_mask("mask", mask, completions.shape, "[B, L]").to(prompts.device)
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
        idx = prompts.shape[1] + last_index(keep)
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
    check.positive_int("batch_size", batch_size)
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
    check.positive_int("epochs", epochs)
    check.positive_int("batch_size", batch_size)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    check.nonneg_real(weight_decay, "weight_decay")
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

