"""Tests for rl4llm.pg: weights against plain loops, the surrogate's gradient, exact unbiasedness on a tiny
problem, the policy, episode collection (autoreset and truncation), and a short deterministic training run."""

from __future__ import annotations

import itertools

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gymnasium.vector import AutoresetMode
from hypothesis import given, settings
from hypothesis import strategies as st

from rl4llm import pg
from rl4llm.envs import collect_episodes, evaluate
from rl4llm.nets import PolicyNet
from rl4llm.pg import pg_weights, reinforce, reinforce_surrogate
from rl4llm.returns import leave_one_out_baseline

TOL = dict(rtol=1e-12, atol=1e-12)

# ----------------------------------------------------------------------------------------------------------
# pg_weights against plain loops
# ----------------------------------------------------------------------------------------------------------


def ref_weights(r: list[float], d: list[bool], gamma: float, kind: str, b: list[float]) -> list[float]:
    """Psi_t for one row, straight from the definitions (k = step index within the episode)."""
    T = len(r)
    starts = [0] + [t + 1 for t in range(T - 1) if d[t]]
    out = [0.0] * T
    for s, e in zip(starts, starts[1:] + [T], strict=True):
        for t in range(s, e):
            if kind == "total":
                out[t] = sum(gamma ** (u - s) * r[u] for u in range(s, e)) - b[t]
            else:
                out[t] = sum(gamma ** (u - s) * r[u] for u in range(t, e)) - gamma ** (t - s) * b[t]
    return out


@st.composite
def weight_cases(draw):
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 10))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rewards = torch.from_numpy(rng.uniform(-5, 5, size=(B, T)))
    dones = torch.from_numpy(rng.random((B, T)) < draw(st.sampled_from([0.0, 0.3])))
    form = draw(st.sampled_from(["none", "float", "row", "full", "0d"]))
    baseline = {
        "none": None,
        "float": 1.25,
        "row": torch.from_numpy(rng.normal(size=(B, 1))),
        "full": torch.from_numpy(rng.normal(size=(B, T))),
        "0d": torch.tensor(-0.5, dtype=torch.float64),
    }[form]
    return rewards, dones, baseline


@settings(max_examples=80, deadline=None)
@given(weight_cases(), st.one_of(st.just(1.0), st.floats(0.05, 1.0)),
       st.sampled_from(["total", "reward_to_go"]), st.booleans())
def test_pg_weights_match_reference(case, gamma, kind, pass_dones):
    rewards, dones, baseline = case
    if not pass_dones:
        dones = torch.zeros_like(dones)
    got = pg_weights(rewards, gamma, kind=kind, baseline=baseline, dones=dones if pass_dones else None)
    b_full = torch.zeros_like(rewards) if baseline is None else torch.as_tensor(baseline, dtype=torch.float64)
    b_full = b_full.expand(rewards.shape)
    want = [ref_weights(r, d, gamma, kind, b)
            for r, d, b in zip(rewards.tolist(), dones.tolist(), b_full.tolist(), strict=True)]
    assert got.shape == rewards.shape and got.dtype == rewards.dtype
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), **TOL)


def test_pg_weights_hand_example():
    r = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64)

    def row(*xs):
        return torch.tensor([xs], dtype=torch.float64)

    # total: R = 1 + 0.5*2 + 0.25*4 = 3 at every step; reward-to-go: [3, 2*0.5 + 4*0.25, 4*0.25] = [3, 2, 1]
    torch.testing.assert_close(pg_weights(r, 0.5, kind="total"), row(3.0, 3.0, 3.0))
    torch.testing.assert_close(pg_weights(r, 0.5), row(3.0, 2.0, 1.0))
    # a baseline of 1 in the reward-to-go form subtracts gamma^t * 1 = [1, 0.5, 0.25]; in the total form, 1
    torch.testing.assert_close(pg_weights(r, 0.5, baseline=1.0), row(2.0, 1.5, 0.75))
    torch.testing.assert_close(pg_weights(r, 0.5, kind="total", baseline=1.0), row(2.0, 2.0, 2.0))


def test_pg_weights_low_precision():
    r = torch.ones(3, 600, dtype=torch.bfloat16)
    w = pg_weights(r, 1.0)
    assert w.dtype == torch.bfloat16
    assert w[0, 0].item() == 600.0 and w[0, -1].item() == 1.0


def test_pg_weights_validation():
    r = torch.ones(4, 3)
    with pytest.raises(ValueError, match="kind"):
        pg_weights(r, 0.9, kind="q")
    with pytest.raises(ValueError, match="baseline"):
        pg_weights(r, 0.9, baseline=torch.zeros(4))  # [B] against [B, T]: refused, not broadcast over time
    with pytest.raises(ValueError, match="baseline"):
        pg_weights(r, 0.9, baseline=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="baseline"):
        pg_weights(r, 0.9, baseline=torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match="baseline"):
        pg_weights(r, 0.9, baseline=float("nan"))
    with pytest.raises(ValueError, match="baseline"):
        pg_weights(r, 0.9, baseline="batch_mean")
    with pytest.raises(ValueError, match="gamma"):
        pg_weights(r, 0.0)
    with pytest.raises(ValueError, match="rewards"):
        pg_weights(torch.tensor([[1.0, float("nan")]]), 0.9)
    with pytest.raises(ValueError, match="dones"):
        pg_weights(r, 0.9, dones=torch.zeros(4, 1, dtype=torch.bool))


def test_leave_one_out_baseline_with_a_mask_matches_a_loop():
    rng = torch.Generator().manual_seed(0)
    v = torch.randn(5, 6, generator=rng, dtype=torch.float64)
    m = torch.rand(5, 6, generator=rng) < 0.7
    m[:, 0] = True
    m[1:, 5] = False  # only row 0 is alive at t = 5: no other row, baseline 0
    got = leave_one_out_baseline(v, 0, mask=m)
    for i, t in itertools.product(range(5), range(6)):
        others = [v[j, t].item() for j in range(5) if j != i and m[j, t]]
        want = sum(others) / len(others) if others else 0.0
        assert abs(got[i, t].item() - want) < 1e-12
    with pytest.raises(ValueError, match="at least 2 samples"):
        leave_one_out_baseline(torch.ones(1, 4), 0)
    with pytest.raises(ValueError, match="mask"):
        leave_one_out_baseline(v, 0, mask=m[:, :3])


# ----------------------------------------------------------------------------------------------------------
# The surrogate
# ----------------------------------------------------------------------------------------------------------


def test_surrogate_gradient_equals_hand_sum():
    # Two trajectories of three steps over 3 actions, one shared logit vector theta (a state-free policy).
    theta = torch.tensor([0.3, -1.0, 0.5], dtype=torch.float64, requires_grad=True)
    actions = torch.tensor([[0, 2, 1], [1, 1, 0]])
    weights = torch.tensor([[2.0, -1.0, 0.5], [3.0, 4.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    logp = F.log_softmax(theta, -1)[actions]                                   # [2, 3]
    (grad,) = torch.autograd.grad(reinforce_surrogate(logp, weights, mask), theta)
    # d log pi(a) / d theta = onehot(a) - softmax(theta); average the masked, weighted sum over the 2 rows.
    p = torch.softmax(theta.detach(), -1)
    hand = torch.zeros(3, dtype=torch.float64)
    for b, t in itertools.product(range(2), range(3)):
        if mask[b, t]:
            hand += weights[b, t] * (F.one_hot(actions[b, t], 3).double() - p)
    torch.testing.assert_close(grad, hand / 2, **TOL)
    value = reinforce_surrogate(logp, weights, mask)
    torch.testing.assert_close(value, (logp * weights * mask).sum() / 2, **TOL)


def test_surrogate_detaches_weights_and_ignores_masked_garbage():
    logp = torch.tensor([[-0.5, -1.0, -float("inf")]], requires_grad=True)
    weights = torch.tensor([[1.0, 2.0, float("nan")]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    out = reinforce_surrogate(logp, weights, mask)
    out.backward()
    assert torch.isfinite(out)
    torch.testing.assert_close(out, torch.tensor(-2.5))
    torch.testing.assert_close(logp.grad, torch.tensor([[1.0, 2.0, 0.0]]))
    assert weights.grad is None


def test_surrogate_rows_and_dtypes():
    logp = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(reinforce_surrogate(logp, w), (logp * w).sum() / 6, **TOL)  # 6 rows
    one = reinforce_surrogate(logp[0, 0], w[0, 0])  # a single [T] trajectory: no division
    torch.testing.assert_close(one, (logp[0, 0] * w[0, 0]).sum(), **TOL)
    half = reinforce_surrogate(logp.detach().bfloat16(), w.bfloat16())
    assert half.dtype == torch.float32


def test_surrogate_validation():
    with pytest.raises(ValueError, match="weights"):
        reinforce_surrogate(torch.zeros(8, 5, requires_grad=True), torch.ones(8, 1))
    with pytest.raises(ValueError, match="weights"):
        reinforce_surrogate(torch.zeros(8, 5), torch.ones(8))
    with pytest.raises(ValueError, match="mask"):
        reinforce_surrogate(torch.zeros(2, 5), torch.ones(2, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="mask"):
        reinforce_surrogate(torch.zeros(2, 5), torch.ones(2, 5), torch.ones(2, 1))
    with pytest.raises(ValueError, match="mask"):
        reinforce_surrogate(torch.zeros(2, 5), torch.ones(2, 5), torch.full((2, 5), 0.5))
    with pytest.raises(ValueError, match="weights"):
        reinforce_surrogate(torch.zeros(2, 2), torch.tensor([[1.0, float("inf")], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="logp"):
        reinforce_surrogate(torch.tensor([[0.0, -float("inf")]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="logp"):
        reinforce_surrogate(torch.zeros(2, 2, dtype=torch.int64), torch.ones(2, 2))
    with pytest.raises(ValueError, match="weights"):
        reinforce_surrogate(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.int64))


@pytest.mark.parametrize("kind", ["total", "reward_to_go"])
@pytest.mark.parametrize("baseline", [None, 0.7])
def test_estimator_is_exactly_unbiased_on_a_two_step_problem(kind, baseline):
    """Expected surrogate gradient over all trajectories (by enumeration) equals the gradient of J."""
    gamma = 0.8
    # A state-free policy with separate logits per step; reward r_t = R[t, a_t] depends on the action.
    logits = torch.tensor([[0.2, -0.4, 1.0], [0.0, 0.7, -0.3]], dtype=torch.float64, requires_grad=True)
    R = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]], dtype=torch.float64)
    trajs = torch.tensor(list(itertools.product(range(3), repeat=2)))                     # [9, 2] actions
    logp_all = F.log_softmax(logits, -1)                                                  # [2, 3]
    logp = torch.stack([logp_all[0, trajs[:, 0]], logp_all[1, trajs[:, 1]]], dim=-1)     # [9, 2]
    prob = logp.sum(-1).exp()                                                             # [9]
    rewards = torch.stack([R[0, trajs[:, 0]], R[1, trajs[:, 1]]], dim=-1)                 # [9, 2]
    J = (prob * (rewards[:, 0] + gamma * rewards[:, 1])).sum()
    (grad_J,) = torch.autograd.grad(J, logits, retain_graph=True)
    psi = pg_weights(rewards, gamma, kind=kind, baseline=baseline)
    # sum_tau p(tau) * (per-trajectory surrogate); the surrogate of a single [T] row is not divided.
    expected = sum(prob[i].detach() * reinforce_surrogate(logp[i], psi[i]) for i in range(len(trajs)))
    (grad_est,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad_est, grad_J, **TOL)


# ----------------------------------------------------------------------------------------------------------
# The policy
# ----------------------------------------------------------------------------------------------------------


def test_policy_shapes_and_determinism():
    torch.manual_seed(0)
    policy = PolicyNet(4, 3, hidden=(16, 8))
    obs = torch.randn(5, 4)
    assert policy(obs).shape == (5, 3)
    assert policy(torch.randn(2, 7, 4)).shape == (2, 7, 3)
    assert isinstance(policy.dist(obs), torch.distributions.Categorical)
    a1, lp1 = policy.act(obs, torch.Generator().manual_seed(1))
    a2, lp2 = policy.act(obs, torch.Generator().manual_seed(1))
    assert a1.shape == (5,) and a1.dtype == torch.int64 and torch.equal(a1, a2) and torch.equal(lp1, lp2)
    torch.testing.assert_close(lp1, policy.dist(obs).log_prob(a1))
    torch.testing.assert_close(policy.log_prob(obs, a1), lp1)
    greedy, _ = policy.act(obs, greedy=True)
    assert torch.equal(greedy, policy(obs).argmax(-1))
    with pytest.raises(ValueError, match="obs"):
        policy(torch.randn(5, 3))
    with pytest.raises(ValueError, match="actions"):
        policy.log_prob(obs, a1[:4])
    with pytest.raises(ValueError, match="actions"):
        policy.log_prob(obs, torch.full((5,), 3))
    with pytest.raises(ValueError, match="actions"):
        policy.log_prob(obs, a1.float())
    with pytest.raises(ValueError, match="hidden"):
        PolicyNet(4, 2, hidden=0)
    with pytest.raises(ValueError, match="n_actions"):
        PolicyNet(4, 0)


def test_policy_starts_near_uniform_and_samples_the_right_frequencies():
    policy = PolicyNet(2, 3, hidden=4)
    p0 = policy.dist(torch.randn(10, 2)).probs
    assert (p0 - 1 / 3).abs().max() < 0.02
    with torch.no_grad():
        policy.net[-1].weight.zero_()
        policy.net[-1].bias.copy_(torch.log(torch.tensor([0.2, 0.5, 0.3])))
    n = 40_000
    actions, _ = policy.act(torch.zeros(n, 2), torch.Generator().manual_seed(0))
    freq = torch.bincount(actions, minlength=3).double() / n
    # Standard error of each frequency is at most sqrt(0.25 / n) = 0.0025; allow 5 of those.
    assert (freq - torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)).abs().max() < 0.0125


# ----------------------------------------------------------------------------------------------------------
# Collecting episodes: autoreset and truncation
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Rollouts step tiny tensors; with several intra-op threads on a busy machine they only add waiting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ScriptedVectorEnv(gym.vector.VectorEnv):
    """Sub-environment i runs episodes of fixed length ``lengths[i]`` with reward 1 per step; its observation
    is ``[step index, episode number]``. It follows gymnasium's next-step autoreset: the step after an episode
    ends returns the reset observation and a junk reward of 1000 that belongs to no episode."""

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, lengths, truncate):
        self.lengths, self.truncate = np.array(lengths), np.array(truncate)
        self.num_envs = len(lengths)
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.single_action_space = gym.spaces.Discrete(2)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, self.num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, self.num_envs)

    def _obs(self):
        return np.stack([self.t, self.episode], axis=1).astype(np.float32)

    def reset(self, *, seed=None, options=None):
        self.t = np.zeros(self.num_envs)
        self.episode = np.zeros(self.num_envs)
        self.prev_done = np.zeros(self.num_envs, dtype=bool)
        return self._obs(), {}

    def step(self, actions):
        self.t += 1
        ended = self.t >= self.lengths
        reward = np.ones(self.num_envs)
        terminated, truncated = ended & ~self.truncate, ended & self.truncate
        # next-step autoreset of the sub-environments that ended at the previous step
        self.t[self.prev_done] = 0
        self.episode[self.prev_done] += 1
        reward[self.prev_done] = 1000.0
        terminated[self.prev_done] = truncated[self.prev_done] = False
        self.prev_done = terminated | truncated
        return self._obs(), reward, terminated, truncated, {}


def test_collect_episodes_masks_autoreset_steps():
    lengths, truncate = [1, 3, 6, 2], [False, True, False, True]
    env = ScriptedVectorEnv(lengths, truncate)
    batch = collect_episodes(env, PolicyNet(2, 2, hidden=4), generator=torch.Generator().manual_seed(0))
    T = max(lengths)
    assert batch.obs.shape == (4, T, 2)
    assert batch.rewards.shape == batch.mask.shape == batch.dones.shape == batch.actions.shape == (4, T)
    assert batch.lengths.tolist() == lengths
    assert batch.returns.tolist() == [float(n) for n in lengths]          # no junk reward leaked in
    assert batch.terminated.tolist() == [not x for x in truncate]
    for i, n in enumerate(lengths):
        assert batch.mask[i].tolist() == [True] * n + [False] * (T - n)
        assert batch.dones[i].tolist() == [t == n - 1 for t in range(T)]
        # real steps see the first episode's observations 0, 1, ..., n-1 in order
        assert batch.obs[i, :n].tolist() == [[float(t), 0.0] for t in range(n)]
    assert (batch.rewards[~batch.mask] == 0).all()


def test_collect_episodes_agrees_with_gymnasium_statistics(one_thread):
    """Returns and lengths of the first episode of each CartPole sub-environment, as counted by gymnasium."""

    class Recorder(gym.vector.VectorWrapper):
        def __init__(self, env):
            super().__init__(env)
            self.infos = []

        def step(self, actions):
            out = self.env.step(actions)
            self.infos.append(out[-1])
            return out

    env = Recorder(gym.wrappers.vector.RecordEpisodeStatistics(gym.make_vec("CartPole-v1", num_envs=6)))
    torch.manual_seed(0)
    policy = PolicyNet(4, 2, hidden=8)
    batch = collect_episodes(env, policy, generator=torch.Generator().manual_seed(0), seed=3)
    first_r, first_l = [None] * 6, [None] * 6
    for info in env.infos:
        for i in np.flatnonzero(info.get("_episode", np.zeros(6, dtype=bool))):
            if first_r[i] is None:
                first_r[i], first_l[i] = float(info["episode"]["r"][i]), int(info["episode"]["l"][i])
    env.close()
    assert batch.returns.tolist() == first_r
    assert batch.lengths.tolist() == first_l


def test_collect_episodes_truncation_at_time_limit(one_thread):
    # A greedy "push towards the pole" controller balances CartPole; with a 30-step limit every episode is
    # truncated, not terminated, and all have exactly 30 steps.
    env = gym.make_vec("CartPole-v1", num_envs=3, max_episode_steps=30)
    policy = PolicyNet(4, 2, hidden=())
    with torch.no_grad():
        policy.net[-1].weight.copy_(torch.tensor([[0.0, 0.0, -10.0, -1.0], [0.0, 0.0, 10.0, 1.0]]))
    batch = collect_episodes(env, policy, seed=0, greedy=True)
    env.close()
    assert batch.lengths.tolist() == [30, 30, 30]
    assert batch.terminated.tolist() == [False, False, False]
    assert batch.dones[:, -1].all() and batch.dones.sum().item() == 3


def test_collect_episodes_validation():
    env = ScriptedVectorEnv([2], [False])
    with pytest.raises(ValueError, match="policy"):
        collect_episodes(env, PolicyNet(3, 2))
    with pytest.raises(RuntimeError, match="max_steps"):
        collect_episodes(ScriptedVectorEnv([50], [False]), PolicyNet(2, 2), max_steps=10)


# ----------------------------------------------------------------------------------------------------------
# Training: a short, deterministic run
# ----------------------------------------------------------------------------------------------------------

SMOKE = dict(num_envs=8, iterations=3, hidden=16, device="cpu")


def test_reinforce_smoke_and_determinism(one_thread):
    h1 = reinforce(seed=1, **SMOKE)
    h2 = reinforce(seed=1, **SMOKE)
    keys = ["iteration", "env_steps", "episodes", "mean_return", "mean_length"]
    for k in keys:
        assert len(h1[k]) == 3, k
        assert h1[k] == h2[k], k
    assert h1["iteration"] == [0, 1, 2]
    assert h1["episodes"] == [8, 16, 24]
    assert all(b > a for a, b in itertools.pairwise(h1["env_steps"]))
    assert all(8 <= r <= 500 for r in h1["mean_return"])          # CartPole: 8 steps at least, 500 at most
    s1, s2 = h1["policy"].state_dict(), h2["policy"].state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    h3 = reinforce(seed=2, **SMOKE)
    assert h3["mean_return"] != h1["mean_return"]
    score = evaluate(h1["policy"], "CartPole-v1", episodes=4, seed=0)
    assert isinstance(score, float) and score == evaluate(h1["policy"], "CartPole-v1", episodes=4, seed=0)


@pytest.mark.parametrize("options", [dict(weights="total", baseline="leave_one_out"),
                                     dict(weights="reward_to_go", baseline="leave_one_out", gamma=1.0),
                                     dict(weights="reward_to_go", baseline=20.0)])
def test_reinforce_variants_run(options, one_thread):
    h = reinforce(seed=0, **{**SMOKE, "iterations": 2, **options})
    assert len(h["mean_return"]) == 2


def test_reinforce_validation():
    for bad in (dict(weights="q"), dict(baseline="mean"), dict(gamma=1.5), dict(num_envs=0),
                dict(iterations=0), dict(lr=-1.0), dict(log_every=0), dict(device="nonsense")):
        with pytest.raises(ValueError):
            reinforce(**{**SMOKE, **bad})
    with pytest.raises(ValueError, match="episodes"):
        evaluate(PolicyNet(4, 2), episodes=0)


def test_public_names():
    for name in pg.__all__:
        assert hasattr(pg, name)
