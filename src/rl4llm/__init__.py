"""rl4llm: the one implementation behind *Reinforcement Learning for LLMs, Derived and Run*.

Each module holds one idea and is meant to be read top to bottom:

- :mod:`rl4llm.device`  -- choosing the device, seeding.
- :mod:`rl4llm.checks`  -- asserting symbolic identities and displaying them.
- :mod:`rl4llm.mdp`     -- finite tabular MDPs: exact evaluation, exact objectives, trajectory enumeration.
- :mod:`rl4llm.returns` -- discounted returns, reward-to-go and GAE with episode boundaries (loop and parallel scan).
- :mod:`rl4llm.pg`      -- REINFORCE gradient estimators, a policy network, a training loop.
- :mod:`rl4llm.baselines` -- baselines for policy-gradient estimators: batch mean, leave-one-out, optimal, learned.
- :mod:`rl4llm.actor_critic` -- synchronous n-step A2C with GAE on vectorised gymnasium environments.
- :mod:`rl4llm.ppo`     -- PPO's clipped and KL-penalty losses, the adaptive-KL rule, a training loop.
- :mod:`rl4llm.trpo`    -- Fisher-vector products, conjugate gradient, the trust-region step and line search.
- :mod:`rl4llm.kl`      -- the k1, k2, k3 KL estimators, numerically stable, per token with masks.
- :mod:`rl4llm.lm`      -- a tiny causal transformer policy, sampling, memory-lean token log-probabilities.
- :mod:`rl4llm.tasks`   -- synthetic verifiable tasks with exact rewards, warm start, preference pairs.
- :mod:`rl4llm.rlhf`    -- Bradley-Terry reward models, KL-shaped rewards, PPO for the tiny language model.
- :mod:`rl4llm.dpo`     -- the DPO loss, implicit rewards, the closed-form KL-regularised optimum.
- :mod:`rl4llm.grpo`    -- group advantages, GRPO/BNPO/DAPO/Dr. GRPO aggregation, GSPO ratios, a training loop.
- :mod:`rl4llm.offpolicy` -- importance weights, off-policy gradients and evaluation, V-trace and Retrace targets.

Conventions: tensors are time-last (``[..., T]``), masks are explicit arguments, and public functions
raise :class:`ValueError` naming the offending argument and the expected shape.
"""

__version__ = "0.1.0"
