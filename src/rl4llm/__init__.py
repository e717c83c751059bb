"""rl4llm: the one implementation behind *Reinforcement Learning for LLMs, Derived and Run*.

Each module holds one idea and is meant to be read top to bottom. The modules form three tiers, and a module
imports only from a lower tier or from an earlier module of its own tier (``tests/test_layering.py`` checks it):

Tier 0, shared, no RL idea:

- :mod:`rl4llm._validate` -- the input checks every public function uses (private).
- :mod:`rl4llm.device`  -- choosing the device, seeding.
- :mod:`rl4llm.checks`  -- asserting symbolic identities, and the SymPy helpers the notebooks share.
- :mod:`rl4llm.stored`  -- the stored benchmark results the chapters display, shipped with the package.

Tier 1, networks, environments and pure math:

- :mod:`rl4llm.nets`    -- the tanh MLP, a categorical policy, a state-value critic.
- :mod:`rl4llm.envs`    -- vector environments, the env check, episodes, rollouts, evaluation, a replay buffer.
- :mod:`rl4llm.returns` -- discounted returns, reward-to-go, GAE (loop and parallel scan), batch-mean baselines.
- :mod:`rl4llm.kl`      -- the k1, k2, k3 KL estimators, per token with masks, and the exact categorical KL.
- :mod:`rl4llm.surrogate` -- the clipped surrogate, the value loss, masked means, advantage normalisation.
- :mod:`rl4llm.mdp`     -- finite tabular MDPs: exact evaluation, exact objectives, trajectory enumeration.
- :mod:`rl4llm.dp`      -- Bellman operators, value and policy iteration, brute force, toy-text tables (chapter 2).
- :mod:`rl4llm.token_mdp` -- the prefix-tree MDP of a language model over a tiny vocabulary, built exactly.
- :mod:`rl4llm.lm`      -- a tiny causal transformer policy, sampling, memory-lean token log-probabilities.

Tier 2, one algorithm per module (pure functions first, its training loop last):

- :mod:`rl4llm.td`      -- TD, n-step and lambda targets, tabular MC/TD, batch TD, exact linear-TD fixed points (ch. 3).
- :mod:`rl4llm.pg`      -- REINFORCE gradient weights, the surrogate, a training loop (chapter 5).
- :mod:`rl4llm.baselines` -- control variates, the optimal baseline, exact moments, learned baselines (chapter 6).
- :mod:`rl4llm.actor_critic` -- synchronous n-step A2C with GAE on vectorised gymnasium environments (chapter 7).
- :mod:`rl4llm.ppo`     -- PPO's KL-penalty variant, the adaptive-KL rule, the training loop (chapter 8).
- :mod:`rl4llm.trpo`    -- Fisher-vector products, conjugate gradient, the trust-region step, line search (ch. 8).
- :mod:`rl4llm.dqn`     -- DQN and Double DQN targets, dueling heads, tabular Q-learning and SARSA, DQN (ch. 4).
- :mod:`rl4llm.tasks`   -- synthetic verifiable tasks with exact rewards, warm start, preference pairs.
- :mod:`rl4llm.reward_model` -- Bradley-Terry losses, a scalar-head reward/value model, its training (chapter 11).
- :mod:`rl4llm.rlhf`    -- KL-shaped rewards, the shared toy setting, PPO for the tiny language model (chapter 11).
- :mod:`rl4llm.dpo`     -- the DPO loss, implicit rewards, the closed-form KL-regularised optimum (chapter 12).
- :mod:`rl4llm.grpo`    -- group advantages, GRPO/BNPO/DAPO/Dr. GRPO aggregation, GSPO ratios, a training loop (ch. 13).
- :mod:`rl4llm.offpolicy` -- importance weights, off-policy gradients and evaluation, V-trace, Retrace (app. A).

Submodules load on first use: after ``import rl4llm``, ``rl4llm.grpo`` imports :mod:`rl4llm.grpo` (and nothing from
the gymnasium half of the package).

Conventions: tensors are time-last (``[..., T]``), masks are explicit arguments, and public functions
raise :class:`ValueError` naming the offending argument and the expected shape.
"""

import importlib

__version__ = "0.1.0"

SUBMODULES = (
    "device", "checks", "stored",
    "nets", "envs", "returns", "kl", "surrogate", "mdp", "dp", "token_mdp", "lm",
    "td", "pg", "baselines", "actor_critic", "ppo", "trpo", "dqn", "tasks", "reward_model", "rlhf", "dpo", "grpo",
    "offpolicy", "sac",
)
"""The public modules, tier by tier, each in the order its tier allows imports."""

__all__ = ["SUBMODULES", "__version__", *SUBMODULES]


def __getattr__(name: str):
    if name in SUBMODULES:
        return importlib.import_module(f"rl4llm.{name}")
    raise AttributeError(f"module 'rl4llm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(SUBMODULES))
