"""The MDP of a language model, written out exactly for a tiny vocabulary.

Chapter 1 ("The MDP of a language model") builds it: the state is the prompt plus the tokens generated so
far, an action is the next token, the transition appends it (deterministically), and the episode ends at
``eos`` or when the response reaches ``max_len`` tokens. The reward arrives on the transition that ends the
episode and depends on the whole response. With ``gamma = 1`` the value of the root is the expected reward
of a response, ``sum_y pi(y) r(y)``.

- :class:`TokenTree` -- the prefix tree as a :class:`rl4llm.mdp.TabularMDP` (``horizon = max_len``,
  ``gamma = 1``), with the map between prefixes and state indices.
- :func:`token_tree` -- builds it from a vocabulary size, ``eos`` and a reward function on responses.
- :meth:`TokenTree.responses`, :meth:`TokenTree.response_prob` -- every complete response and its exact
  probability under a policy table, for brute-force sums.

States. The non-terminal states are the prefixes of non-``eos`` tokens of length ``0, ..., max_len - 1``,
``sum_{i < L} (V - 1)**i`` of them, in order of length then lexicographically (the empty prefix is state 0);
the last state is the absorbing terminal. Because the length is part of the state, the cut at ``max_len``
is a true terminal: the process after it is known (nothing happens), so nothing is bootstrapped.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rl4llm.mdp import TabularMDP

__all__ = ["TokenTree", "token_tree"]

Response = tuple[int, ...]


@dataclass(frozen=True, eq=False)
class TokenTree:
    """The prefix-tree MDP of responses over a vocabulary of ``n_tokens`` tokens.

    Attributes:
        mdp: the :class:`TabularMDP`; ``S = len(prefixes) + 1`` states, ``A = n_tokens`` actions.
        prefixes: the non-terminal states' prefixes (tuples of token ids), ``prefixes[0] == ()``.
        index: ``{prefix: state}``.
        eos: the end-of-sequence token id.
        max_len: the longest response ``L``, ``eos`` included.
    """

    mdp: TabularMDP
    prefixes: tuple[Response, ...]
    index: dict[Response, int]
    eos: int
    max_len: int

    @property
    def terminal(self) -> int:
        """Index of the absorbing terminal state (the last one)."""
        return len(self.prefixes)

    def responses(self) -> list[Response]:
        """Every complete response: ``prefix + (eos,)`` for each prefix, and each cut prefix of length ``L``.

        There are ``sum_{k=1}^{L} (V-1)**(k-1) + (V-1)**L`` of them.
        """
        out = [p + (self.eos,) for p in self.prefixes]
        out += [p + (a,) for p in self.prefixes if len(p) == self.max_len - 1
                for a in range(self.mdp.n_actions) if a != self.eos]
        return out

    def response_prob(self, pi: torch.Tensor, y: Response) -> torch.Tensor:
        """``pi(y) = prod_t pi[state(y_<t), y_t]``, the chain rule along the path of ``y``.

        Args:
            pi: ``[S, A]`` policy table of ``mdp``.
            y: a complete response.

        Returns:
            scalar tensor.
        """
        if not isinstance(pi, torch.Tensor) or tuple(pi.shape) != (self.mdp.n_states, self.mdp.n_actions):
            raise ValueError(f"pi must be a tensor of shape {[self.mdp.n_states, self.mdp.n_actions]}")
        y = tuple(int(t) for t in y)
        ends = (len(y) >= 1 and y[-1] == self.eos) or len(y) == self.max_len
        if not ends or len(y) > self.max_len or self.eos in y[:-1]:
            raise ValueError(f"y={y} is not a complete response (ends in eos={self.eos} or has length "
                             f"{self.max_len}, no eos before its end)")
        states = [self.index[y[:t]] for t in range(len(y))]
        return pi[states, list(y)].prod()


def token_tree(n_tokens: int, max_len: int, *, eos: int, reward: Callable[[Response], float],
               dtype: torch.dtype = torch.float64) -> TokenTree:
    """Build the prefix-tree MDP.

    From a prefix ``p`` (a state) the action ``a`` moves to ``p + (a,)`` unless ``a == eos`` or
    ``len(p) + 1 == max_len``, in which case it moves to the terminal state and pays ``reward(p + (a,))``;
    all other rewards are 0. The terminal state loops to itself with reward 0.

    Args:
        n_tokens: vocabulary size ``V >= 2`` (``eos`` included).
        max_len: ``L >= 1``, the longest response, ``eos`` included.
        eos: the end-of-sequence id in ``[0, V)``.
        reward: a finite number for every complete response (a tuple of ids).
        dtype: float64 (default) or float32.

    Returns:
        a :class:`TokenTree` whose ``mdp`` has ``gamma = 1``, ``horizon = max_len`` and starts at the
        empty prefix.
    """
    for name, value, low in (("n_tokens", n_tokens, 2), ("max_len", max_len, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < n_tokens:
        raise ValueError(f"eos must be an int in [0, n_tokens) = [0, {n_tokens}), got {eos!r}")
    if not callable(reward):
        raise TypeError("reward must be callable on a response (tuple of ids)")
    words = [a for a in range(n_tokens) if a != eos]
    prefixes = tuple(p for k in range(max_len) for p in itertools.product(words, repeat=k))
    index = {p: i for i, p in enumerate(prefixes)}
    S, A, term = len(prefixes) + 1, n_tokens, len(prefixes)
    P = torch.zeros(S, A, S, dtype=torch.float64)
    R = torch.zeros(S, A, dtype=torch.float64)
    for p, s in index.items():
        for a in range(A):
            y = p + (a,)
            if a == eos or len(y) == max_len:
                P[s, a, term] = 1.0
                r = float(reward(y))
                if r != r or abs(r) == float("inf"):
                    raise ValueError(f"reward({y}) = {r} is not finite")
                R[s, a] = r
            else:
                P[s, a, index[y]] = 1.0
    P[term, :, term] = 1.0
    p0 = torch.zeros(S, dtype=torch.float64)
    p0[0] = 1.0
    mdp = TabularMDP(P.to(dtype), R.to(dtype), p0.to(dtype), 1.0, max_len)
    return TokenTree(mdp, prefixes, index, eos, max_len)
