"""A tiny causal language model, sampling from it, and the log-probabilities of its completions.

Everything the book's LLM chapters need from a "policy" lives here, small enough to train on a laptop CPU
in seconds and shaped like the real thing so the same losses run unchanged on a pretrained model:

- :class:`TinyLM` -- a GPT-style decoder: token and position embeddings, pre-LayerNorm blocks of causal
  self-attention and an MLP, a final LayerNorm and a (by default tied) output head. ``ids [B, T] -> logits
  [B, T, V]``.
- :func:`sample` -- batched ancestral sampling of completions with temperature and top-k, returning a
  :class:`Completion`: the tokens, a mask that is 1 up to and including end-of-sequence, and the
  log-probability of every sampled token under the distribution it was drawn from.
- :func:`logprobs_from_logits` -- ``log softmax(z)[y] = z_y - logsumexp(z)`` in float32, computed a chunk of
  rows at a time so that a ``[N, V]`` float32 log-softmax is never materialised (with a real vocabulary of
  150k tokens that tensor is the largest thing in the step), and with a matching chunked backward pass.
- :func:`token_logprobs` / :func:`sequence_logprobs` -- ``log pi(y_t | x, y_<t)`` of given completions under
  any module or callable that maps token ids to logits, and their masked sum ``log pi(y | x)``.
- :func:`frozen_copy` -- a frozen reference policy for KL penalties.

Conventions. Prompts are ``[B, P]`` and all rows have the same length ``P`` (the synthetic tasks make prompts
of a fixed length; no left padding, so position ``t`` means the same thing in every row). Completions are
``[B, L]`` with an explicit ``mask [B, L]`` that is 1 on real tokens (up to and including end-of-sequence) and
0 on the padding after it. Log-probabilities are float32 and exactly 0 where the mask is 0.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rl4llm import _validate as check

__all__ = [
    "TinyLMConfig",
    "TinyLM",
    "Completion",
    "sample",
    "logprobs_from_logits",
    "token_logprobs",
    "sequence_logprobs",
    "frozen_copy",
    "last_index",
]

LogitsFn = Callable[[Tensor], Tensor]
"""Anything mapping ids ``[B, T]`` to logits ``[B, T, V]`` (or to an object with a ``.logits`` attribute)."""


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TinyLMConfig:
    """Size of a :class:`TinyLM`.

    Attributes:
        vocab_size: number of token ids ``V``; ids are ``0 .. V-1``.
        n_layer: number of transformer blocks.
        n_head: attention heads per block; must divide ``d_model``.
        d_model: width of the residual stream.
        max_len: longest sequence (prompt plus completion) the position embedding covers.
        dropout: dropout probability on embeddings, attention weights and residual branches (0 = off).
        tie_weights: share the token embedding matrix with the output head.
    """

    vocab_size: int
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    max_len: int = 64
    dropout: float = 0.0
    tie_weights: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position ``t`` attends to positions ``<= t``."""

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, T, C] -> [B, T, C]``."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # [B, T, C] -> [B, n_head, T, C / n_head]
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network ``C -> 4C -> C`` with a GELU."""

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, T, C] -> [B, T, C]``."""
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, T, C] -> [B, T, C]``."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyLM(nn.Module):
    """A small GPT-style causal language model: ``ids [B, T] -> logits [B, T, V]``.

    ``logits[b, t]`` are the unnormalised scores of the token at position ``t + 1`` given ``ids[b, :t+1]``.

    Args:
        cfg: the model size; see :class:`TinyLMConfig`.

    Example:
        >>> model = TinyLM(TinyLMConfig(vocab_size=16))
        >>> model(torch.zeros(2, 5, dtype=torch.long)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the stream's variance stays put.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        """Logits of the next token at every position.

        Args:
            ids: ``[B, T]`` integer token ids in ``[0, vocab_size)``, ``1 <= T <= max_len``.

        Returns:
            ``[B, T, vocab_size]`` logits, in the parameters' dtype.

        Raises:
            ValueError: ``ids`` is not a non-empty ``[B, T]`` integer tensor within the vocabulary and length.
        """
        return self.lm_head(self.features(ids))  # [B, T, V]

    def features(self, ids: Tensor) -> Tensor:
        """The final hidden states, ``ln_f`` of the last block's output: what the heads read.

        :meth:`forward` is ``lm_head(features(ids))``; a scalar head on the same backbone
        (:class:`rl4llm.reward_model.ScalarModel`) reads the same features, so a change to the backbone reaches
        both by construction.

        Args:
            ids: ``[B, T]`` integer token ids in ``[0, vocab_size)``, ``1 <= T <= max_len``.

        Returns:
            ``[B, T, d_model]`` features, in the parameters' dtype.
        """
        cfg = self.config
        check.ids("ids", ids, vocab_size=cfg.vocab_size)
        if ids.shape[1] > cfg.max_len:
            raise ValueError(f"ids must be [B, T] with T <= max_len={cfg.max_len}, "
                             f"got shape {tuple(ids.shape)}")
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.drop(self.wte(ids) + self.wpe(pos))  # [B, T, C]
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)  # [B, T, C]


def _model_vocab_size(model) -> int | None:
    """The vocabulary size a model declares (``model.config.vocab_size``), or None for a bare callable."""
    cfg = getattr(model, "config", None)
    v = getattr(cfg, "vocab_size", None)
    return v if isinstance(v, int) else None


def _model_max_len(model) -> int | None:
    cfg = getattr(model, "config", None)
    v = getattr(cfg, "max_len", None)
    return v if isinstance(v, int) else None


def _call_logits(model: nn.Module | LogitsFn, ids: Tensor) -> Tensor:
    """Run ``model(ids)`` and return ``[B, T, V]`` logits (unwrapping a ``.logits`` attribute if present)."""
    out = model(ids)
    logits = out if isinstance(out, Tensor) else getattr(out, "logits", None)
    if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(out).__name__
        raise ValueError(f"model must map ids [B, T] = {tuple(ids.shape)} to logits [B, T, V], got {got}")
    return logits


# ----------------------------------------------------------------------------------------------------------
# Log-probabilities from logits, a chunk of rows at a time
# ----------------------------------------------------------------------------------------------------------
_CHUNK_ELEMENTS = 1 << 22
"""Default chunk size in elements: 4M float32 values = 16 MiB of scratch, whatever the vocabulary."""


def _row_views(x: Tensor, budget: int) -> list[tuple[tuple[int, ...], Tensor]]:
    """Split ``x [..., V]`` into 2-D ``[n, V]`` pieces, copying at most ``budget`` elements at a time.

    Returns ``(index, rows)`` pairs, where ``x[index]`` is the part of ``x`` that ``rows`` covers. A tensor
    that can be viewed as ``[N, V]`` gives one view; a strided slice such as ``logits[:, P-1:-1]`` gives one
    view per leading index, or, when it is no bigger than ``budget`` (one scratch buffer), a single copy.
    """
    try:
        return [((), x.view(-1, x.shape[-1]))]
    except RuntimeError:
        if x.numel() <= budget:
            return [((), x.reshape(-1, x.shape[-1]))]
        return [((i, *idx), v) for i in range(x.shape[0]) for idx, v in _row_views(x[i], budget)]


def _chunks(n: int, rows: int) -> Iterator[slice]:
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


def _buffers(rows: int, logits: Tensor, acc: torch.dtype) -> tuple[Tensor | None, Tensor]:
    """Scratch ``[rows, V]`` buffers in ``acc``: one for the upcast (None if not needed), one for results."""
    def new() -> Tensor:
        return torch.empty(rows, logits.shape[-1], dtype=acc, device=logits.device)
    return (new() if logits.dtype != acc else None), new()


class _ChunkedTokenLogProb(torch.autograd.Function):
    """``out[i] = z[i, y_i] - logsumexp(z[i])`` with a chunked forward and backward.

    Forward, per chunk of rows: copy the rows into a float32 buffer (the upcast, for bf16/fp16 logits), take
    their stable log-softmax ``z - max z - log sum exp(z - max z)`` into a second buffer, gather the target
    column. Backward: ``d out_i / d z_ij = 1[j = y_i] - softmax(z_i)_j``, recomputed chunk by chunk from the
    saved logits, so the only full-size tensor it allocates is the gradient itself (in the logits' dtype).
    The buffers are allocated once per call and reused, so the allocator is not hit once per chunk.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, rows: int) -> Tensor:
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        out = torch.empty(targets.shape, dtype=acc, device=logits.device)
        budget = rows * logits.shape[-1]
        views = _row_views(logits, budget)
        rows = min(rows, max(z.shape[0] for _, z in views))
        upcast, scratch = _buffers(rows, logits, acc)
        for idx, z in views:
            y = targets[idx].reshape(-1, 1)
            o = out[idx].view(-1)
            for s in _chunks(z.shape[0], rows):
                n = s.stop - s.start
                zs = z[s] if upcast is None else upcast[:n].copy_(z[s])
                torch.log_softmax(zs, dim=-1, out=scratch[:n])
                o[s] = scratch[:n].gather(-1, y[s]).squeeze(-1)
        ctx.save_for_backward(logits, targets)
        ctx.rows, ctx.budget = rows, budget
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, targets = ctx.saved_tensors
        rows, acc = ctx.rows, grad_out.dtype
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        upcast, scratch = _buffers(rows, logits, acc)
        for idx, z in _row_views(logits, ctx.budget):
            y = targets[idx].reshape(-1, 1)
            g_out = grad_out[idx].reshape(-1, 1)
            g = grad[idx].view(-1, z.shape[-1])
            for s in _chunks(z.shape[0], rows):
                n = s.stop - s.start
                zs = z[s] if upcast is None else upcast[:n].copy_(z[s])
                p = torch.softmax(zs, dim=-1, out=scratch[:n])  # [n, V]
                g[s] = p.mul_(-g_out[s]).scatter_add_(-1, y[s], g_out[s])  # g_out * (onehot(y) - p)
        return grad, None, None


def logprobs_from_logits(logits: Tensor, targets: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """``log softmax(logits)[target]`` in float32, without a full-size float32 log-softmax.

    Mathematically ``out = logits[..., target] - logsumexp(logits, -1)``. The naive form
    ``torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])`` allocates a float32 ``[N, V]``
    tensor (two, for bf16/fp16 logits: the upcast copy and the result); here rows are processed ``chunk_size``
    at a time -- upcast the chunk to float32, take its stable log-softmax (``z - max z - log sum exp(z - max
    z)``), gather the target column -- so the extra memory is a few ``[chunk_size, V]`` float32 buffers. The
    backward pass is chunked the same way and allocates only the gradient, in the logits' dtype.

    Args:
        logits: ``[..., V]`` floating-point scores (float32, bfloat16, float16 or float64); any strides.
        targets: ``[...]`` integer ids in ``[0, V)``, the shape of ``logits`` without its last dimension.
        chunk_size: rows (positions) per chunk. ``None`` picks ``max(1, 2**22 // V)`` rows, i.e. about 16 MiB
            of float32 scratch per buffer (27 rows at ``V = 151,936``).

    Returns:
        ``[...]`` log-probabilities, float32 (float64 if ``logits`` is float64); differentiable w.r.t.
        ``logits``.

    Raises:
        ValueError: ``logits`` is not floating point or is empty; ``targets`` has the wrong shape or dtype,
            or ids outside ``[0, V)``; ``chunk_size`` is not a positive int.
    """
    if not isinstance(logits, Tensor) or not logits.dtype.is_floating_point or logits.dim() < 1:
        got = f"dtype {logits.dtype}" if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating-point [..., V] tensor, got {got}")
    if logits.numel() == 0:
        raise ValueError(f"logits must be non-empty [..., V], got shape {tuple(logits.shape)}")
    if not isinstance(targets, Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        got = f"dtype {targets.dtype}" if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"targets must be an integer [...] tensor, got {got}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    n_vocab = logits.shape[-1]
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= n_vocab:
        raise ValueError(f"targets must hold ids in [0, V={n_vocab}), got values in [{lo}, {hi}]")
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // n_vocab)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return _ChunkedTokenLogProb.apply(logits, targets.to(device=logits.device, dtype=torch.long), chunk_size)


# ----------------------------------------------------------------------------------------------------------
# Log-probabilities of completions under a model
# ----------------------------------------------------------------------------------------------------------
def token_logprobs(model: nn.Module | LogitsFn, prompts: Tensor, completions: Tensor, mask: Tensor, *,
                   chunk_size: int | None = None, allow_empty: bool = False) -> Tensor:
    """Per-token log-probabilities ``log pi(y_t | x, y_<t)`` of completions ``y`` given prompts ``x``.

    One forward pass over ``[x, y]``: the logits at position ``P - 1 + t`` score ``y_t``. Gradients flow to
    the model's parameters (call under ``torch.no_grad()`` for a reference model).

    Args:
        model: a module or callable mapping ids ``[B, T]`` to logits ``[B, T, V]`` (or to an object with a
            ``.logits`` attribute, as Hugging Face models return). Its train/eval mode is left as it is.
        prompts: ``[B, P]`` integer ids, ``P >= 1``, all rows the same length.
        completions: ``[B, L]`` integer ids, ``L >= 1``; padding after end-of-sequence must be valid ids.
        mask: ``[B, L]`` 0/1 (bool, int or float): 1 on the tokens to score.
        chunk_size: rows per chunk for :func:`logprobs_from_logits`.
        allow_empty: accept rows whose mask is all zero (they get all-zero log-probs). Off by default, since a
            completion with no tokens is almost always a bug upstream.

    Returns:
        ``[B, L]`` float32 log-probabilities, exactly 0 where ``mask`` is 0.

    Raises:
        ValueError: ids not ``[B, P]``/``[B, L]`` integer tensors within the vocabulary, ``P = 0`` or
            ``L = 0``, batch sizes that differ, ``mask`` not ``[B, L]`` of 0/1, or an all-zero mask row
            (unless allowed).
    """
    vocab = _model_vocab_size(model)
    check.ids("prompts", prompts, vocab_size=vocab, shape="[B, P]")
    check.ids("completions", completions, vocab_size=vocab, shape="[B, L]")
    if completions.shape[0] != prompts.shape[0]:
        raise ValueError(f"completions must be [B, L] with B = prompts.shape[0] = {prompts.shape[0]}, "
                         f"got shape {tuple(completions.shape)}")
    keep = check.token_mask("mask", mask, completions.shape, "[B, L]")
    if not allow_empty and not keep.any(dim=1).all():
        rows = (~keep.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"mask [B, L] has rows with no tokens (rows {rows[:8]}); pass allow_empty=True "
                         "if empty completions are intended")
    P = prompts.shape[1]
    ids = torch.cat([prompts, completions.to(prompts.device)], dim=1)  # [B, P + L]
    logits = _call_logits(model, ids)  # [B, P + L, V]
    if vocab is None and int(ids.max()) >= logits.shape[-1]:
        raise ValueError(f"prompts/completions must hold ids in [0, V={logits.shape[-1]}), "
                         f"got max {int(ids.max())}")
    lp = logprobs_from_logits(logits[:, P - 1:-1], completions.to(logits.device), chunk_size=chunk_size)
    return torch.where(keep.to(lp.device), lp, torch.zeros((), dtype=lp.dtype, device=lp.device))


def sequence_logprobs(model: nn.Module | LogitsFn, prompts: Tensor, completions: Tensor, mask: Tensor, *,
                      chunk_size: int | None = None, allow_empty: bool = False) -> Tensor:
    """``log pi(y | x) = sum_t mask_t log pi(y_t | x, y_<t)``: the masked sum of :func:`token_logprobs`.

    Args: as for :func:`token_logprobs`.

    Returns:
        ``[B]`` float32 sequence log-probabilities.
    """
    return token_logprobs(model, prompts, completions, mask, chunk_size=chunk_size,
                          allow_empty=allow_empty).sum(dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Completion:
    """A batch of sampled completions.

    Attributes:
        prompts: ``[B, P]`` the prompts that were continued.
        tokens: ``[B, L]`` completion tokens; after end-of-sequence the row holds the pad id.
        mask: ``[B, L]`` float32, 1 for generated tokens up to and including end-of-sequence, 0 after it.
        logprobs: ``[B, L]`` float32 log-probability of each sampled token under the distribution it was drawn
            from (after temperature and top-k), 0 where ``mask`` is 0.
        finished: ``[B]`` bool, whether the row emitted end-of-sequence within the token budget.
    """

    prompts: Tensor
    tokens: Tensor
    mask: Tensor
    logprobs: Tensor
    finished: Tensor

    @property
    def sequences(self) -> Tensor:
        """``[B, P + L]`` prompts followed by completions."""
        return torch.cat([self.prompts, self.tokens], dim=1)

    @property
    def lengths(self) -> Tensor:
        """``[B]`` int64 number of generated tokens per row (including end-of-sequence)."""
        return self.mask.sum(dim=1).long()


@torch.no_grad()
def sample(model: nn.Module | LogitsFn, prompts: Tensor, max_new_tokens: int, *, eos_id: int,
           pad_id: int | None = None, temperature: float = 1.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> Completion:
    """Sample completions of equal-length prompts, stopping once every row has emitted ``eos_id``.

    At each step the next-token distribution is ``softmax(logits / temperature)`` restricted to the ``top_k``
    highest logits (renormalised; ties with the ``top_k``-th are kept). The recorded ``logprobs`` are
    log-probabilities under *that* distribution; with ``temperature=1`` and ``top_k=None`` they are the
    model's own ``log pi(y_t | x, y_<t)`` and agree with :func:`token_logprobs`. ``temperature=0`` means
    greedy decoding: the argmax is taken, and its recorded log-probability is 0 (a point mass). A module is
    put in eval mode for the call and restored afterwards. There is no KV cache: each step re-runs the
    prefix, which is fine for the short sequences used here.

    Args:
        model: a module or callable mapping ids ``[B, T]`` to logits ``[B, T, V]``.
        prompts: ``[B, P]`` integer ids, all rows the same length (no left padding), ``P >= 1``.
        max_new_tokens: the largest completion length ``L``.
        eos_id: the end-of-sequence id.
        pad_id: the id written after end-of-sequence; defaults to ``eos_id``.
        temperature: ``>= 0``; divides the logits (0 = greedy).
        top_k: keep only the ``top_k`` most likely tokens (None = all).
        generator: random generator for reproducible sampling; it may live on another device than the model.

    Returns:
        a :class:`Completion` with ``tokens``, ``mask``, ``logprobs`` of shape ``[B, L]``,
        ``L <= max_new_tokens``.

    Raises:
        ValueError: bad ``prompts`` (see :func:`token_logprobs`), ``max_new_tokens < 1`` or beyond the model's
            ``max_len``, ids out of the vocabulary, negative ``temperature`` or ``top_k < 1``.
    """
    vocab = _model_vocab_size(model)
    check.ids("prompts", prompts, vocab_size=vocab, shape="[B, P]")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    max_len = _model_max_len(model)
    if max_len is not None and prompts.shape[1] + max_new_tokens > max_len:
        raise ValueError(f"max_new_tokens={max_new_tokens} plus prompt length P={prompts.shape[1]} exceeds "
                         f"the model's max_len={max_len}")
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and (not isinstance(value, int) or value < 0 or (vocab and value >= vocab)):
            raise ValueError(f"{name} must be a token id in [0, {vocab or 'V'}), got {value!r}")
    pad_id = eos_id if pad_id is None else pad_id
    if not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a float >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")

    was_training = model.training if isinstance(model, nn.Module) else None
    if was_training:
        model.eval()
    try:
        B, device = prompts.shape[0], prompts.device
        seq = prompts
        done = torch.zeros(B, dtype=torch.bool, device=device)
        tokens, logprobs, masks = [], [], []
        for _ in range(max_new_tokens):
            logits = _call_logits(model, seq)[:, -1, :].float()  # [B, V]
            n_vocab = logits.shape[-1]
            if vocab is None and max(int(prompts.max()), eos_id, pad_id) >= n_vocab:  # a bare callable
                raise ValueError(f"prompts, eos_id and pad_id must be token ids in [0, V={n_vocab})")
            vocab = n_vocab
            if temperature == 0:
                nxt = logits.argmax(dim=-1)
                lp = torch.zeros(B, device=logits.device)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < n_vocab:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                logp = torch.log_softmax(logits, dim=-1)  # [B, V]
                on = generator.device if generator is not None else logp.device
                nxt = torch.multinomial(logp.exp().to(on), 1, generator=generator).to(logp.device).squeeze(1)
                lp = logp.gather(-1, nxt[:, None]).squeeze(1)
            nxt, lp = nxt.to(device), lp.to(device)
            live = ~done
            tokens.append(torch.where(live, nxt, torch.full_like(nxt, pad_id)))
            logprobs.append(torch.where(live, lp, torch.zeros_like(lp)))
            masks.append(live.float())
            done = done | (live & (nxt == eos_id))
            seq = torch.cat([seq, tokens[-1][:, None]], dim=1)
            if bool(done.all()):
                break
    finally:
        if was_training:
            model.train()
    return Completion(prompts=prompts, tokens=torch.stack(tokens, 1), mask=torch.stack(masks, 1),
                      logprobs=torch.stack(logprobs, 1), finished=done)


# ----------------------------------------------------------------------------------------------------------
# Reference policy
# ----------------------------------------------------------------------------------------------------------
def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every parameter's ``requires_grad`` off.

    The usual reference policy ``pi_ref`` for a KL penalty: later updates to ``model`` do not touch it.

    Args:
        model: the module to copy.

    Returns:
        the frozen copy (same device and dtype).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def last_index(keep: Tensor) -> Tensor:
    """``[B]`` index of the last True entry of each row of ``keep [B, T]`` (every row has one)."""
    T = keep.shape[-1]
    pos = torch.arange(T, device=keep.device).expand(keep.shape)
    return torch.where(keep, pos, torch.full_like(pos, -1)).max(dim=-1).values
