"""The shared environment layer: the replay buffer, the one env check, the package's lazy submodules."""

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

from rl4llm import envs
from rl4llm.envs import ReplayBuffer


def filled(capacity: int, n: int, *, obs_dim: int = 3) -> ReplayBuffer:
    """A buffer that received transitions 0..n-1, transition i holding i everywhere."""
    buf = ReplayBuffer(capacity, obs_dim)
    for i in range(n):
        buf.add(np.full((1, obs_dim), i, np.float32), np.array([i]), np.array([float(i)]),
                np.full((1, obs_dim), i + 0.5, np.float32), np.array([i % 2 == 0]))
    return buf


def test_ring_buffer_keeps_exactly_the_last_capacity_transitions():
    buf = filled(5, 12)
    assert len(buf) == 5
    assert sorted(buf.rewards.tolist()) == [7.0, 8.0, 9.0, 10.0, 11.0]
    # every field of a slot belongs to the same transition
    for k in range(5):
        i = buf.rewards[k].item()
        assert buf.obs[k].tolist() == [i] * 3 and buf.next_obs[k].tolist() == [i + 0.5] * 3
        assert buf.actions[k].item() == i and buf.terminated[k].item() == (int(i) % 2 == 0)


def test_a_batch_larger_than_the_capacity_keeps_its_tail():
    buf = ReplayBuffer(3, 1)
    buf.add(np.arange(5.0)[:, None], np.arange(5), np.arange(5.0), np.arange(5.0)[:, None], np.zeros(5))
    assert sorted(buf.rewards.tolist()) == [2.0, 3.0, 4.0] and len(buf) == 3


def test_uniform_sampling_is_reproducible_and_covers_only_stored_transitions():
    buf = filled(100, 10)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = buf.sample(20_000, g1), buf.sample(20_000, g2)
    assert torch.equal(a.rewards, b.rewards)
    counts = torch.bincount(a.rewards.long(), minlength=10).double()
    assert counts.numel() == 10                                   # nothing outside the 10 stored ones
    # uniform: every count within 5 standard deviations of 2000 (binomial sd ~ 42)
    assert ((counts - 2000).abs() < 5 * (20_000 * 0.1 * 0.9) ** 0.5).all()


def test_truncation_stores_the_true_final_observation_and_is_not_terminal():
    env = envs.make_vector_env("CartPole-v1", 1, max_episode_steps=3)
    buf = ReplayBuffer(10, 4)
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        nxt, r, term, trunc, _ = env.step(np.array([0]))
        buf.add(obs, np.array([0]), r, nxt, term)
        obs = nxt
    assert trunc[0] and not term[0]
    assert not buf.terminated[:3].any()                          # the cut is not a terminal state
    assert torch.equal(buf.next_obs[2], torch.as_tensor(nxt[0]))  # the observation it was cut at
    env.close()


@pytest.mark.parametrize("bad, match", [
    (dict(rewards=np.array([np.nan])), "rewards contain NaN"),
    (dict(obs=np.zeros((1, 2))), r"obs must have shape \[1, 3\]"),
    (dict(terminated=np.array([2])), "terminated must be bool"),
    (dict(actions=np.array([0.5])), "actions must be an integer"),
])
def test_bad_transitions_are_refused_by_name(bad, match):
    args = dict(obs=np.zeros((1, 3)), actions=np.array([0]), rewards=np.array([1.0]), next_obs=np.zeros((1, 3)),
                terminated=np.array([False]))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        ReplayBuffer(4, 3).add(**args)


def test_sampling_an_empty_buffer_or_bad_sizes_is_refused():
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(4, 3).sample(1)
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        ReplayBuffer(0, 3)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        filled(4, 2).sample(0)


def test_the_one_env_check():
    env = envs.make_vector_env("CartPole-v1", 2)
    assert envs.check_env(env) == (4, 2, "next_step")
    env.close()
    with pytest.raises(ValueError, match="env must be a gymnasium VectorEnv"):
        envs.check_env(gym.make("CartPole-v1"))


def test_lazy_submodules_and_the_language_model_half_without_gymnasium():
    code = ("import sys, rl4llm; rl4llm.grpo; rl4llm.rlhf; rl4llm.dpo; rl4llm.reward_model; "
            "assert 'gymnasium' not in sys.modules, 'gymnasium loaded'; rl4llm.ppo; "
            "assert 'gymnasium' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    import rl4llm
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rl4llm.nope  # noqa: B018
