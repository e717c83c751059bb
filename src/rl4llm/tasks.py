"""Synthetic tasks with exactly checkable answers, a character tokenizer, and a supervised warm start.

RL on language models needs a policy that is sometimes right and a reward that says exactly when. Here:

- :class:`CharTokenizer` -- one token per character, plus ``<pad>``, ``<bos>`` and ``<eos>``.
- :class:`AdditionTask` (``"12+34=" -> "46"``), :class:`CopyTask` (``"c1234=" -> "1234"``) and
  :class:`SortTask` (``"s3141=" -> "1134"``). Every task draws prompts from a generator, knows the reference
  answer of each prompt, keeps a held-out test split fixed by a seed, and scores completions with an exact
  reward: 1 when the completion is the answer followed by end-of-sequence, else 0.
- :func:`supervised_warmstart` -- teacher-forced cross-entropy on the answers, a few hundred steps of which
  turn a random :class:`~rl4llm.lm.TinyLM` into a policy that is right part of the time; :func:`accuracy`
  measures it.
- :func:`preference_pairs` / :func:`sample_preference_pairs` -- pairs of responses labelled by sampling from
  a Bradley-Terry model of a known reward, ``P(y1 > y2) = sigmoid(scale * (r1 - r2))``, for preference
  learning.

Token layout. A prompt is ``<bos>`` followed by its characters, ``[B, P]`` with the same ``P`` for every
prompt of a task (numbers are zero-padded). A completion is ``[B, L]`` with a mask that is 1 up to and
including ``<eos>``, as :func:`rl4llm.lm.sample` returns it.
"""

from __future__ import annotations

import hashlib
import re
import string
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rl4llm import _validate as check
from rl4llm.lm import sample, token_logprobs

__all__ = [
    "CharTokenizer",
    "Task",
    "AdditionTask",
    "CopyTask",
    "SortTask",
    "WarmstartHistory",
    "supervised_warmstart",
    "accuracy",
    "PreferencePairs",
    "preference_pairs",
    "sample_preference_pairs",
]

DEFAULT_ALPHABET = string.digits + "+=" + string.ascii_lowercase


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------
class CharTokenizer:
    """One token per character, after three special tokens.

    Ids: ``pad_id = 0``, ``bos_id = 1``, ``eos_id = 2``, then the alphabet's characters in order.

    Args:
        alphabet: the characters, each once. Defaults to digits, ``+``, ``=`` and the lowercase letters.

    Example:
        >>> tok = CharTokenizer()
        >>> tok.decode(tok.encode("12+34=", bos=True))
        '12+34='
    """

    specials = ("<pad>", "<bos>", "<eos>")
    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, alphabet: str = DEFAULT_ALPHABET):
        if not isinstance(alphabet, str) or not alphabet or len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet must be a non-empty string of distinct characters, got {alphabet!r}")
        self.alphabet = alphabet
        self._id = {ch: i + len(self.specials) for i, ch in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        """Number of ids: the specials plus the alphabet."""
        return len(self.specials) + len(self.alphabet)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of ``text``'s characters, optionally preceded by ``<bos>`` and followed by ``<eos>``.

        Raises:
            ValueError: ``text`` has a character outside the alphabet.
        """
        try:
            ids = [self._id[ch] for ch in text]
        except KeyError as exc:
            raise ValueError(f"text {text!r} has character {exc.args[0]!r} outside the alphabet "
                             f"{self.alphabet!r}") from None
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Sequence[int] | Tensor, *, stop_at_eos: bool = True) -> str:
        """The text of ``ids``: specials are dropped, and decoding stops at the first ``<eos>`` if asked.

        Raises:
            ValueError: an id is outside ``[0, vocab_size)``.
        """
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        out = []
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids must be in [0, {self.vocab_size}), got {i}")
            if i == self.eos_id and stop_at_eos:
                break
            if i >= len(self.specials):
                out.append(self.alphabet[i - len(self.specials)])
        return "".join(out)

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False,
                     device: torch.device | str | None = None) -> Tensor:
        """``[B, T]`` int64 ids of equal-length texts (no padding is added).

        Raises:
            ValueError: ``texts`` is empty or its strings differ in length.
        """
        if isinstance(texts, str) or not texts:
            raise ValueError("texts must be a non-empty sequence of strings")
        rows = [self.encode(t, bos=bos, eos=eos) for t in texts]
        if len({len(r) for r in rows}) != 1:
            lengths = sorted({len(t) for t in texts})
            raise ValueError(f"texts must all have the same length, got lengths {lengths}")
        return torch.tensor(rows, dtype=torch.long, device=device)

    def decode_batch(self, ids: Tensor, mask: Tensor | None = None) -> list[str]:
        """Decode each row of ``ids [B, T]``, keeping only positions where ``mask [B, T]`` is 1 (if given)."""
        check.ids("ids", ids, vocab_size=self.vocab_size)
        if mask is None:
            mask = torch.ones_like(ids)
        keep = check.token_mask("mask", mask, ids.shape, "[B, T]")
        ids, keep = ids.cpu(), keep.cpu()
        return [self.decode(row[k]) for row, k in zip(ids, keep, strict=True)]


# ----------------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------------
class Task(ABC):
    """A verifiable task: prompts, their reference answers, a held-out split and an exact reward.

    Subclasses define how to draw prompt strings, parse one, and answer it. Every prompt of a task has the
    same length; its ids are ``<bos>`` followed by the characters.

    The train/test split is a fixed function of the prompt text and ``split_seed``: a prompt is held out when
    a 64-bit BLAKE2 hash of ``f"{split_seed}:{prompt}"``, read as a fraction of ``2**64``, is below
    ``test_fraction``. The two splits are disjoint whatever the generator, and the same for every run (and
    machine) with the same ``split_seed``.

    Args:
        n_digits: the size of the problem (digits per operand or digits in the string).
        test_fraction: the share of all possible prompts held out for testing, in ``(0, 1)``.
        split_seed: chooses which prompts are held out.
        tokenizer: the tokenizer; its alphabet must contain the task's characters.
    """

    name: str = "task"

    def __init__(self, n_digits: int = 2, *, test_fraction: float = 0.1, split_seed: int = 0,
                 tokenizer: CharTokenizer | None = None):
        if not isinstance(n_digits, int) or isinstance(n_digits, bool) or n_digits < 1:
            raise ValueError(f"n_digits must be a positive int, got {n_digits!r}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        self.n_digits = n_digits
        self.test_fraction = float(test_fraction)
        self.split_seed = int(split_seed)
        self.tokenizer = tokenizer or CharTokenizer()
        self.tokenizer.encode(self._draw(1, torch.Generator().manual_seed(0))[0])  # alphabet check

    # -- what a task defines ------------------------------------------------------------------------------
    @abstractmethod
    def _draw(self, n: int, generator: torch.Generator | None) -> list[str]:
        """``n`` random prompt strings, ignoring the split."""

    @abstractmethod
    def answer(self, prompt: str) -> str:
        """The reference answer to ``prompt``, without ``<eos>``; ValueError for a malformed prompt."""

    @property
    @abstractmethod
    def max_answer_len(self) -> int:
        """The longest answer in characters."""

    # -- shared machinery ---------------------------------------------------------------------------------
    @property
    def prompt_len(self) -> int:
        """``P``: prompt length in tokens, ``<bos>`` included."""
        return 1 + len(self._draw(1, torch.Generator().manual_seed(0))[0])

    @property
    def max_new_tokens(self) -> int:
        """Enough tokens for the longest answer and its ``<eos>``."""
        return self.max_answer_len + 1

    def is_test(self, prompt: str) -> bool:
        """Whether ``prompt`` belongs to the held-out test split."""
        digest = hashlib.blake2b(f"{self.split_seed}:{prompt}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") < self.test_fraction * 2**64

    def sample_prompts(self, n: int, *, generator: torch.Generator | None = None,
                       split: str = "train") -> list[str]:
        """``n`` prompt strings drawn uniformly (with replacement) from one split.

        Args:
            n: how many.
            generator: a CPU generator (None: torch's global one).
            split: ``"train"``, ``"test"`` or ``"all"``.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        out: list[str] = []
        for _ in range(200):  # enough for splits holding a few percent of the prompts
            cands = self._draw(4 * (n - len(out)) + 64, generator)
            out += [p for p in cands if split == "all" or self.is_test(p) == (split == "test")]
            if len(out) >= n:
                return out[:n]
        raise ValueError(f"could not draw {n} prompts from the {split!r} split of {self!r}; it holds too few "
                         "prompts (use a larger n_digits, another split_seed or test_fraction)")

    def encode_prompts(self, prompts: Sequence[str], *, device: torch.device | str | None = None) -> Tensor:
        """``[B, P]`` ids: ``<bos>`` followed by each prompt's characters."""
        return self.tokenizer.encode_batch(prompts, bos=True, device=device)

    def decode_prompts(self, prompt_ids: Tensor) -> list[str]:
        """The prompt strings of ``prompt_ids [B, P]``."""
        return self.tokenizer.decode_batch(prompt_ids)

    def answer_tokens(self, prompts: Sequence[str], *, device: torch.device | str | None = None
                      ) -> tuple[Tensor, Tensor]:
        """Reference completions: answer ids, then ``<eos>``, right-padded with ``<pad>``.

        Returns:
            ``(tokens [B, max_new_tokens], mask [B, max_new_tokens])``, mask float32, 1 up to and including
            ``<eos>``.
        """
        L, tok = self.max_new_tokens, self.tokenizer
        rows = [tok.encode(self.answer(p), eos=True) for p in prompts]
        tokens = torch.tensor([r + [tok.pad_id] * (L - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1.0] * len(r) + [0.0] * (L - len(r)) for r in rows], device=device)
        return tokens, mask

    def reward(self, prompt_ids: Tensor, completion_tokens: Tensor, completion_mask: Tensor) -> Tensor:
        """Exact-match reward: 1.0 when the masked completion is the answer followed by ``<eos>``, else 0.0.

        The tokens where ``completion_mask`` is 1, read left to right, must be exactly ``answer + <eos>``:
        a wrong digit, a missing ``<eos>`` (the budget ran out), or anything after ``<eos>`` that is not
        masked out all score 0. An all-zero mask row is an empty response and scores 0.

        Args:
            prompt_ids: ``[B, P]`` prompt ids (``<bos>`` and the prompt characters).
            completion_tokens: ``[B, L]`` completion ids, ``L >= 1``.
            completion_mask: ``[B, L]`` 0/1, 1 on the generated tokens.

        Returns:
            ``[B]`` float32 rewards on ``completion_tokens``' device.

        Raises:
            ValueError: ids out of the vocabulary, batch sizes that differ, a mask not ``[B, L]``, or a prompt
                that is not a prompt of this task.
        """
        V = self.tokenizer.vocab_size
        check.ids("prompt_ids", prompt_ids, vocab_size=V, shape="[B, P]")
        check.ids("completion_tokens", completion_tokens, vocab_size=V, shape="[B, L]")
        if completion_tokens.shape[0] != prompt_ids.shape[0]:
            raise ValueError(f"completion_tokens must be [B, L] with B = {prompt_ids.shape[0]}, "
                             f"got {tuple(completion_tokens.shape)}")
        keep = check.token_mask("completion_mask", completion_mask, completion_tokens.shape, "[B, L]")
        prompts = self.decode_prompts(prompt_ids)
        tokens, keep = completion_tokens.cpu(), keep.cpu()
        r = [float(row[k].tolist() == self.tokenizer.encode(self.answer(p), eos=True))
             for p, row, k in zip(prompts, tokens, keep, strict=True)]
        return torch.tensor(r, dtype=torch.float32, device=completion_tokens.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_digits={self.n_digits}, test_fraction={self.test_fraction}, " \
               f"split_seed={self.split_seed})"


def _digits(n: int, k: int, generator: torch.Generator | None) -> list[str]:
    """``n`` random strings of ``k`` decimal digits."""
    d = torch.randint(0, 10, (n, k), generator=generator).tolist()
    return ["".join(map(str, row)) for row in d]


class AdditionTask(Task):
    """Add two ``n_digits``-digit numbers: ``"07+35="`` -> ``"42"``.

    Operands are zero-padded to ``n_digits``; the answer is the plain decimal sum, without leading zeros.
    """

    name = "addition"
    _pattern = re.compile(r"(\d+)\+(\d+)=")

    def _draw(self, n, generator):
        a, b = _digits(n, self.n_digits, generator), _digits(n, self.n_digits, generator)
        return [f"{x}+{y}=" for x, y in zip(a, b, strict=True)]

    def answer(self, prompt: str) -> str:
        m = self._pattern.fullmatch(prompt)
        if m is None or len(m.group(1)) != self.n_digits or len(m.group(2)) != self.n_digits:
            raise ValueError(f"prompt {prompt!r} is not an addition prompt of {self.n_digits}-digit numbers")
        return str(int(m.group(1)) + int(m.group(2)))

    @property
    def max_answer_len(self) -> int:
        return self.n_digits + 1


class CopyTask(Task):
    """Repeat a digit string: ``"c1234="`` -> ``"1234"``."""

    name = "copy"
    _tag = "c"

    def _draw(self, n, generator):
        return [f"{self._tag}{s}=" for s in _digits(n, self.n_digits, generator)]

    def _operand(self, prompt: str) -> str:
        m = re.fullmatch(rf"{self._tag}(\d{{{self.n_digits}}})=", prompt)
        if m is None:
            raise ValueError(f"prompt {prompt!r} is not a {self.name} prompt of {self.n_digits} digits")
        return m.group(1)

    def answer(self, prompt: str) -> str:
        return self._operand(prompt)

    @property
    def max_answer_len(self) -> int:
        return self.n_digits


class SortTask(CopyTask):
    """Sort a digit string ascending: ``"s3141="`` -> ``"1134"``."""

    name = "sort"
    _tag = "s"

    def answer(self, prompt: str) -> str:
        return "".join(sorted(self._operand(prompt)))


# ----------------------------------------------------------------------------------------------------------
# Supervised warm start
# ----------------------------------------------------------------------------------------------------------
@dataclass
class WarmstartHistory:
    """What :func:`supervised_warmstart` did.

    Attributes:
        loss: mean cross-entropy per answer token (nats) at each step taken.
        eval_steps: the steps after which greedy accuracy was measured (only with ``stop_at_accuracy``).
        eval_accuracy: that accuracy, on a fixed set of training-split prompts.
        seconds: wall-clock time of the whole run, evaluations included.
    """

    loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        """Number of optimiser steps taken."""
        return len(self.loss)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def supervised_warmstart(model: nn.Module, task: Task, *, steps: int, batch_size: int = 64, lr: float = 3e-3,
                         seed: int = 0, device: torch.device | str | None = None,
                         stop_at_accuracy: float | None = None, eval_every: int = 10,
                         eval_n: int = 256) -> WarmstartHistory:
    """Teacher-forced training on ``prompt + answer + <eos>``, with the loss on the answer tokens only.

    Each step draws ``batch_size`` training-split prompts and minimises the mean over answer tokens (and the
    ``<eos>``) of ``-log pi(y_t | x, y_<t)``, computed by :func:`rl4llm.lm.token_logprobs`, with AdamW at a
    constant learning rate. A few hundred steps on 2-digit addition give a policy that is right part of the
    time: a starting point for RL.

    How many steps that takes depends on the seed, because exact-match accuracy rises abruptly once the model
    learns to carry. For a policy at a chosen accuracy, pass ``stop_at_accuracy``: every ``eval_every`` steps
    the greedy accuracy on ``eval_n`` fixed training-split prompts is measured, and training stops as soon as
    it reaches the target (``steps`` is then the budget).

    Args:
        model: the policy, trained in place (left in train mode).
        task: where prompts and answers come from.
        steps: number of optimiser steps (the maximum, with ``stop_at_accuracy``).
        batch_size: prompts per step.
        lr: AdamW learning rate.
        seed: seeds the prompt generator and the evaluation prompts (the model's initialisation is the
            caller's).
        device: where to train; the model is moved there. None: where the model already is.
        stop_at_accuracy: stop once greedy training-split accuracy reaches this value, in ``(0, 1]``.
        eval_every: steps between evaluations, with ``stop_at_accuracy``.
        eval_n: prompts per evaluation.

    Returns:
        a :class:`WarmstartHistory` with the loss at each step, the evaluations and the wall-clock time.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("eval_every", eval_every),
                        ("eval_n", eval_n)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if stop_at_accuracy is not None and not 0 < stop_at_accuracy <= 1:
        raise ValueError(f"stop_at_accuracy must be in (0, 1] or None, got {stop_at_accuracy!r}")
    device = torch.device(device) if device is not None else _model_device(model)
    model.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    history = WarmstartHistory()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        prompts = task.sample_prompts(batch_size, generator=gen)
        x = task.encode_prompts(prompts, device=device)
        y, mask = task.answer_tokens(prompts, device=device)
        logp = token_logprobs(model, x, y, mask)  # [B, L]
        loss = -(logp.sum() / mask.sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.loss.append(loss.item())
        if stop_at_accuracy is not None and step % eval_every == 0:
            acc = accuracy(model, task, n=eval_n, seed=seed + 1, split="train", device=device)
            history.eval_steps.append(step)
            history.eval_accuracy.append(acc)
            if acc >= stop_at_accuracy:
                break
    history.seconds = time.perf_counter() - start
    return history


@torch.no_grad()
def accuracy(model: nn.Module | Callable[[Tensor], Tensor], task: Task, *, n: int = 500, seed: int = 0,
             greedy: bool = True, split: str = "test", device: torch.device | str | None = None) -> float:
    """Share of ``n`` prompts from ``split`` that the model answers exactly (mean :meth:`Task.reward`).

    Args:
        model: the policy (module or callable ids -> logits).
        task: the task.
        n: number of prompts, drawn with a generator seeded by ``seed``.
        seed: fixes both the prompts and, when sampling, the completions.
        greedy: decode with argmax (temperature 0); otherwise sample at temperature 1.
        split: ``"test"`` (held out, default), ``"train"`` or ``"all"``.
        device: where the prompts go; None: the model's device (CPU for a bare callable).

    Returns:
        exact-match accuracy in ``[0, 1]``.
    """
    gen = torch.Generator().manual_seed(seed)
    if device is None:
        device = _model_device(model) if isinstance(model, nn.Module) else torch.device("cpu")
    x = task.encode_prompts(task.sample_prompts(n, generator=gen, split=split), device=device)
    tok = task.tokenizer
    out = sample(model, x, task.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
                 temperature=0.0 if greedy else 1.0, generator=gen)
    return task.reward(x, out.tokens, out.mask).mean().item()


# ----------------------------------------------------------------------------------------------------------
# Preference data from a Bradley-Terry model of a known reward
# ----------------------------------------------------------------------------------------------------------
RewardFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``reward_fn(prompt_ids [B, P], tokens [B, L], mask [B, L]) -> [B]``, e.g. :meth:`Task.reward`."""


@dataclass
class PreferencePairs:
    """Labelled response pairs for preference learning.

    Attributes:
        prompts: ``[B, P]`` prompt ids.
        chosen, rejected: ``[B, L]`` response ids (padding after ``<eos>``).
        chosen_mask, rejected_mask: ``[B, L]`` float32, 1 on the response tokens.
        chosen_reward, rejected_reward: ``[B]`` float32 the known rewards of the two responses.
        first_preferred: ``[B]`` bool, whether the first response given was chosen.
        prob_first: ``[B]`` float32, the Bradley-Terry probability that the first response is preferred.
    """

    prompts: Tensor
    chosen: Tensor
    chosen_mask: Tensor
    rejected: Tensor
    rejected_mask: Tensor
    chosen_reward: Tensor
    rejected_reward: Tensor
    first_preferred: Tensor
    prob_first: Tensor


def preference_pairs(reward_fn: RewardFn, prompts: Tensor, first: Tensor, first_mask: Tensor, second: Tensor,
                     second_mask: Tensor, *, scale: float = 1.0,
                     generator: torch.Generator | None = None) -> PreferencePairs:
    """Label two responses per prompt by sampling a Bradley-Terry preference of a known reward.

    With ``r1 = reward_fn(prompts, first, first_mask)`` and ``r2`` likewise, the first response is chosen with
    probability ``P(y1 > y2) = sigmoid(scale * (r1 - r2))``, independently per row. ``scale`` is an inverse
    temperature: 0 gives coin flips, large values always prefer the higher reward; equal rewards give 1/2.

    Args:
        reward_fn: the known reward, ``(prompts [B, P], tokens [B, L], mask [B, L]) -> [B]``.
        prompts: ``[B, P]`` prompt ids.
        first, second: ``[B, L]`` the two responses (same ``L``; pad the shorter one).
        first_mask, second_mask: ``[B, L]`` 0/1 masks of the responses; no row may be empty.
        scale: ``>= 0``, multiplies the reward difference.
        generator: CPU generator for the labels (None: torch's global one).

    Returns:
        the labelled :class:`PreferencePairs`.

    Raises:
        ValueError: shapes that do not match ``[B, P]`` / ``[B, L]``, an empty response, a negative ``scale``.
    """
    check.ids("prompts", prompts, shape="[B, P]")
    B = prompts.shape[0]
    masks = []
    for name, ids, mask in (("first", first, first_mask), ("second", second, second_mask)):
        check.ids(name, ids, shape="[B, L]")
        if ids.shape != first.shape or ids.shape[0] != B:
            raise ValueError(f"{name} must be [B, L] = ({B}, {first.shape[1]}), got {tuple(ids.shape)}")
        keep = check.token_mask(f"{name}_mask", mask, ids.shape, "[B, L]")
        if not keep.any(dim=1).all():
            raise ValueError(f"{name}_mask [B, L] has an all-zero row; every response needs a token")
        masks.append(keep.float())
    if not scale >= 0:
        raise ValueError(f"scale must be >= 0, got {scale!r}")
    r1 = reward_fn(prompts, first, masks[0]).float()
    r2 = reward_fn(prompts, second, masks[1]).float()
    if r1.shape != (B,) or r2.shape != (B,):
        raise ValueError(f"reward_fn must return [B] = ({B},), got {tuple(r1.shape)} and {tuple(r2.shape)}")
    p1 = torch.sigmoid(scale * (r1 - r2))
    u = torch.rand(B, generator=generator, device=generator.device if generator is not None else "cpu")
    win = u.to(p1.device) < p1  # [B] first response preferred
    w = win[:, None]
    return PreferencePairs(
        prompts=prompts,
        chosen=torch.where(w, first, second), chosen_mask=torch.where(w, masks[0], masks[1]),
        rejected=torch.where(w, second, first), rejected_mask=torch.where(w, masks[1], masks[0]),
        chosen_reward=torch.where(win, r1, r2), rejected_reward=torch.where(win, r2, r1),
        first_preferred=win, prob_first=p1,
    )


@torch.no_grad()
def sample_preference_pairs(policy: nn.Module | Callable[[Tensor], Tensor], task: Task, n: int, *,
                            scale: float = 1.0, temperature: float = 1.0,
                            generator: torch.Generator | None = None, split: str = "train",
                            device: torch.device | str | None = None) -> PreferencePairs:
    """Draw ``n`` prompts, sample two responses to each from ``policy``, label them with :meth:`Task.reward`.

    Both responses come from one batched :func:`rl4llm.lm.sample` call, so they share a length ``L``.

    Args:
        policy: the model to sample from.
        task: gives prompts and the known reward.
        n: number of pairs.
        scale: Bradley-Terry inverse temperature; see :func:`preference_pairs`.
        temperature: sampling temperature of the policy.
        generator: CPU generator for prompts, responses and labels.
        split: which prompts to draw.
        device: where the tensors go; None: the policy's device (CPU for a bare callable).

    Returns:
        the labelled :class:`PreferencePairs`.
    """
    if device is None:
        device = _model_device(policy) if isinstance(policy, nn.Module) else torch.device("cpu")
    x = task.encode_prompts(task.sample_prompts(n, generator=generator, split=split), device=device)
    tok = task.tokenizer
    out = sample(policy, x.repeat(2, 1), task.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
                 temperature=temperature, generator=generator)
    return preference_pairs(task.reward, x, out.tokens[:n], out.mask[:n], out.tokens[n:], out.mask[n:],
                            scale=scale, generator=generator)
