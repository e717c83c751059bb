"""Tests for rl4llm.actor_critic: rollout bookkeeping in both autoreset modes, advantages at episode ends, the
loss, a short training run, and input validation."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from rl4llm import actor_critic as AC
from rl4llm import envs as EV
from rl4llm.nets import PolicyNet, ValueNet

pytestmark = pytest.mark.usefixtures("one_thread")

GAMMA, LAM = 0.9, 0.8


def collect(mode: str, steps: int = 40, limit: int = 5, num_envs: int = 3):
    env = EV.make_vector_env("CartPole-v1", num_envs, autoreset=mode, max_episode_steps=limit)
    torch.manual_seed(0)
    policy = PolicyNet(4, 2, 8)
    try:
        collector = EV.RolloutCollector(env, seed=0)
        first = collector.collect(policy, steps // 2, generator=torch.Generator().manual_seed(0))
        second = collector.collect(policy, steps - steps // 2, generator=torch.Generator().manual_seed(1))
    finally:
        env.close()
    return first, second


@pytest.mark.parametrize("mode", EV.AUTORESET_MODES)
def test_rollout_records_the_observation_that_followed_each_step(mode):
    (r1, ep1), (r2, ep2) = collect(mode)
    for r in (r1, r2):
        same = (r.next_obs[:, :-1] == r.obs[:, 1:]).all(-1)
        ended = r.dones[:, :-1]
        if mode == "next_step":
            # the reset step after an episode end acts in the final observation, and is masked out
            assert same.all() and torch.equal(~r.mask[:, 1:], ended)
        else:
            assert torch.equal(~same, ended) and r.mask.all()
        assert not (r.terminated & r.truncated).any()
        assert (r.rewards[~r.mask] == 0).all() and (r.rewards[r.mask] == 1).all()
    # the two rollouts continue each other
    assert torch.equal(r1.next_obs[:, -1], r2.obs[:, 0]) or mode == "same_step"
    if mode == "same_step":
        cont = ~r1.dones[:, -1]
        assert torch.equal(r1.next_obs[cont, -1], r2.obs[cont, 0])
    # with a time limit of 5 steps every episode lasts at most 5 steps, and truncated ones exactly 5
    episodes = ep1 + ep2
    assert episodes and all(1 <= length <= 5 and ret == length for ret, length in episodes)
    assert sum(length == 5 for _, length in episodes) == int(r1.truncated.sum() + r2.truncated.sum())


class TableValue(nn.Module):
    """V(obs) = obs[..., 0]: a critic whose value we can set through the observation."""

    def forward(self, obs):
        return obs[..., 0]


def hand_rollout():
    """One environment, 6 steps: terminated at t = 1, truncated at t = 4, rollout cut after t = 5."""
    T = 6
    obs = torch.zeros(1, T, 4)
    obs[0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])            # V(s_t)
    next_obs = torch.zeros(1, T, 4)
    next_obs[0, :, 0] = torch.tensor([2.0, 99.0, 4.0, 5.0, 50.0, 7.0])     # 99: terminal obs, 50: final obs of the cut
    terminated = torch.tensor([[False, True, False, False, False, False]])
    truncated = torch.tensor([[False, False, False, False, True, False]])
    return EV.Rollout(obs=obs, actions=torch.zeros(1, T, dtype=torch.long), rewards=torch.ones(1, T),
                      terminated=terminated, truncated=truncated, next_obs=next_obs,
                      mask=torch.ones(1, T, dtype=torch.bool))


def test_advantages_bootstrap_at_truncation_and_rollout_end_but_not_at_termination():
    rollout = hand_rollout()
    values, adv, targets = AC.rollout_advantages(rollout, TableValue(), gamma=GAMMA, lam=LAM)
    g, c = GAMMA, GAMMA * LAM
    delta = [1 + g * 2 - 1, 1 - 2, 1 + g * 4 - 3, 1 + g * 5 - 4, 1 + g * 50 - 5, 1 + g * 7 - 6]
    want = [delta[0] + c * delta[1], delta[1], delta[2] + c * delta[3] + c**2 * delta[4], delta[3] + c * delta[4],
            delta[4], delta[5]]
    torch.testing.assert_close(adv, torch.tensor([want]))
    torch.testing.assert_close(targets, adv + values)
    assert not targets.requires_grad
    _, wrong, _ = AC.rollout_advantages(rollout, TableValue(), gamma=GAMMA, lam=LAM, truncation_as_termination=True)
    torch.testing.assert_close(wrong - adv, torch.tensor([[0, 0, -g * 50 * c**2, -g * 50 * c, -g * 50, 0]]))


def test_loss_ignores_masked_steps_and_has_the_policy_gradient():
    torch.manual_seed(0)
    policy = PolicyNet(4, 2, 8)
    rollout = hand_rollout()
    rollout.obs[..., 1:] = torch.randn(1, 6, 3)
    rollout.mask[0, 2] = False
    values = torch.randn(1, 6, requires_grad=True)
    adv, targets = torch.randn(1, 6), torch.randn(1, 6)
    loss, stats = AC.a2c_loss(policy, rollout, values, adv, targets, value_coef=0.5, entropy_coef=0.0)
    adv2, targets2 = adv.clone(), targets.clone()
    adv2[0, 2], targets2[0, 2] = 1e6, -1e6
    loss2, _ = AC.a2c_loss(policy, rollout, values, adv2, targets2, value_coef=0.5, entropy_coef=0.0)
    torch.testing.assert_close(loss, loss2)
    m = rollout.mask
    logp = policy.log_prob(rollout.obs, rollout.actions)
    want = -(adv * logp)[m].mean() + 0.5 * (values - targets)[m].square().mean()
    torch.testing.assert_close(loss, want)
    g = torch.autograd.grad(loss, list(policy.parameters()))
    g_want = torch.autograd.grad(-(adv * logp)[m].mean(), list(policy.parameters()))
    for a, b in zip(g, g_want, strict=True):
        torch.testing.assert_close(a, b)
    assert set(stats) == {"policy_loss", "value_loss", "entropy"}


def test_short_run_improves_and_is_deterministic():
    # 60 updates of 16 x 8 steps, about 7 500 environment steps: seeds 0-5 double the mean return
    kw = dict(num_envs=16, steps=8, updates=60, lr=3e-3, hidden=32, seed=0, device="cpu")
    h = AC.a2c("CartPole-v1", **kw)
    ends = np.array([e[0] for e in h["episodes"]])
    rets = np.array([e[1] for e in h["episodes"]])
    total = h["env_steps"][-1]
    first, last = rets[ends <= total / 4].mean(), rets[ends > 3 * total / 4].mean()
    assert first < 30 and last > 1.5 * first, (first, last)
    h2 = AC.a2c("CartPole-v1", **(kw | dict(updates=5)))
    h3 = AC.a2c("CartPole-v1", **(kw | dict(updates=5)))
    assert h2["episodes"] == h3["episodes"] and h2["value_loss"] == h3["value_loss"]
    assert h2["policy_loss"] == h["policy_loss"][:5]


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="autoreset"):
        EV.make_vector_env("CartPole-v1", 2, autoreset="never")
    with pytest.raises(ValueError, match="num_envs"):
        EV.make_vector_env("CartPole-v1", 0)
    with pytest.raises(ValueError, match="env_id"):
        EV.make_vector_env(3)
    with pytest.raises(ValueError, match="VectorEnv"):
        EV.RolloutCollector(gym.make("CartPole-v1"))
    env = gym.make_vec("CartPole-v1", 2, vectorization_mode="sync",
                       vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.DISABLED})
    with pytest.raises(ValueError, match="autoreset"):
        EV.RolloutCollector(env)
    env.close()
    env = EV.make_vector_env("CartPole-v1", 2)
    collector = EV.RolloutCollector(env, seed=0)
    with pytest.raises(ValueError, match="policy maps"):
        collector.collect(PolicyNet(3, 2), 4)
    with pytest.raises(ValueError, match="steps"):
        collector.collect(PolicyNet(4, 2), 0)
    env.close()
    with pytest.raises(ValueError, match="rollout"):
        AC.rollout_advantages("rollout", ValueNet(4), gamma=0.9, lam=0.9)
    with pytest.raises(ValueError, match="lam"):
        AC.rollout_advantages(hand_rollout(), TableValue(), gamma=0.9, lam=2.0)
    rollout = hand_rollout()
    ok = torch.zeros(1, 6)
    with pytest.raises(ValueError, match="advantages"):
        AC.a2c_loss(PolicyNet(4, 2), rollout, ok, torch.zeros(6), ok)
    with pytest.raises(ValueError, match="entropy_coef"):
        AC.a2c_loss(PolicyNet(4, 2), rollout, ok, ok, ok, entropy_coef=-1.0)
    rollout.mask[:] = False
    with pytest.raises(ValueError, match="no real step"):
        AC.a2c_loss(PolicyNet(4, 2), rollout, ok, ok, ok)
    for kw in (dict(lr=0.0), dict(num_envs=0), dict(steps=1.5), dict(gamma=0.0), dict(max_grad_norm=-1.0)):
        with pytest.raises(ValueError):
            AC.a2c("CartPole-v1", updates=1, **kw)
