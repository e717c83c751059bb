"""Tests of rl4llm.sac (chapter 10): the squashed log-density, the losses, bad inputs and the training loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, TransformedDistribution
from torch.distributions.transforms import AffineTransform, TanhTransform

from rl4llm import sac as S


def test_tanh_log_det_is_exact_where_the_direct_form_fails():
    u = torch.tensor([0.0, 1.0, 5.0, 10.0, 20.0, -20.0], dtype=torch.float64)
    exact = torch.log1p(-torch.tanh(u) ** 2)                # fine in float64 up to |u| ~ 18
    got = S.tanh_log_det(u)
    assert torch.allclose(got[:4], exact[:4], atol=1e-12)
    # at |u| = 20: 1 - tanh^2 = 4 e^{-40} (1 + O(e^{-40}))
    assert abs(got[4].item() - (math.log(4) - 40)) < 1e-12 and abs(got[5].item() - (math.log(4) - 40)) < 1e-12
    u32 = torch.tensor([10.0])
    naive = torch.log(1 - torch.tanh(u32) ** 2 + 1e-6)
    assert abs(S.tanh_log_det(u32).item() - (math.log(4) - 20)) < 1e-4
    assert abs(naive.item() - S.tanh_log_det(u32).item()) > 4.0


def test_squashed_density_integrates_to_one():
    mean, log_std, c = torch.tensor([0.7], dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64), 2.0
    u = torch.linspace(-12, 12, 200_001, dtype=torch.float64)[:, None]
    a = c * torch.tanh(u[:, 0])
    dens = S.squashed_log_prob(u, mean, log_std, c).exp()
    mass = torch.trapezoid(dens, a).item()                  # integral over a of pi(a)
    assert abs(mass - 1.0) < 1e-6


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_squashed_density_matches_transformed_distribution(scale):
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(64, 3, generator=g, dtype=torch.float64)
    log_std = 0.5 * torch.randn(64, 3, generator=g, dtype=torch.float64)
    u = mean + log_std.exp() * torch.randn(64, 3, generator=g, dtype=torch.float64)
    ref = TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform(), AffineTransform(0.0, scale)])
    a = scale * torch.tanh(u)
    assert torch.allclose(S.squashed_log_prob(u, mean, log_std, scale), ref.log_prob(a).sum(-1), atol=1e-9)


def test_temperature_gradient_sign():
    log_alpha = torch.tensor(0.0, requires_grad=True)
    high_entropy = torch.full((8,), 0.5)        # -log pi = -0.5 ... entropy estimate -0.5 > target -1
    S.temperature_loss(log_alpha, high_entropy, -1.0).backward()
    assert log_alpha.grad.item() > 0            # descent lowers alpha
    log_alpha.grad = None
    low_entropy = torch.full((8,), 3.0)         # entropy estimate -3 < -1
    S.temperature_loss(log_alpha, low_entropy, -1.0).backward()
    assert log_alpha.grad.item() < 0
    # d/d alpha of the loss is H - target exactly (alpha = 1)
    log_alpha.grad = None
    S.temperature_loss(log_alpha, high_entropy, -1.0).backward()
    assert abs(log_alpha.grad.item() - (-0.5 + 1.0)) < 1e-6


def test_soft_target_and_actor_loss():
    r = torch.tensor([1.0, 2.0])
    q1, q2, lp = torch.tensor([3.0, 5.0]), torch.tensor([4.0, 1.0]), torch.tensor([0.5, -1.0])
    y = S.soft_q_target(r, q1, q2, lp, torch.tensor([False, True]), 0.9, 0.2)
    assert torch.allclose(y, torch.tensor([1.0 + 0.9 * (3.0 - 0.1), 2.0]))
    assert abs(S.actor_loss(lp, q1, q2, 0.2).item() - ((0.1 - 3.0) + (-0.2 - 1.0)) / 2) < 1e-6


def test_rsample_carries_the_gradient_and_sample_does_not():
    actor = S.SquashedGaussianActor(3, 1, (8,))
    a, lp = actor.sample(torch.zeros(4, 3), generator=torch.Generator().manual_seed(0))
    assert a.requires_grad and lp.requires_grad
    mean, log_std = actor(torch.zeros(4, 3))
    assert not Normal(mean, log_std.exp()).sample().requires_grad


@pytest.mark.parametrize("call, name", [
    (lambda: S.tanh_log_det([1.0]), "u"),
    (lambda: S.squashed_log_prob(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), 0.0), "scale"),
    (lambda: S.squashed_log_prob(torch.zeros(2, 2), torch.zeros(3, 2), torch.zeros(2, 2)), "mean"),
    (lambda: S.soft_q_target(torch.zeros(2, 1), torch.zeros(2), torch.zeros(2), torch.zeros(2),
                             torch.zeros(2, dtype=torch.bool), 0.9, 0.1), "rewards"),
    (lambda: S.soft_q_target(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2),
                             torch.zeros(2, dtype=torch.bool), 0.9, 0.1), "next_q1"),
    (lambda: S.soft_q_target(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2),
                             torch.tensor([0, 2]), 0.9, 0.1), "terminated"),
    (lambda: S.soft_q_target(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2),
                             torch.zeros(2, dtype=torch.bool), 1.5, 0.1), "gamma"),
    (lambda: S.actor_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), -1.0), "alpha"),
    (lambda: S.temperature_loss(torch.zeros(2), torch.zeros(2), -1.0), "log_alpha"),
    (lambda: S.temperature_loss(torch.zeros(()), torch.zeros(2), float("nan")), "target_entropy"),
    (lambda: S.SACConfig(total_steps=0), "total_steps"),
    (lambda: S.SACConfig(tau=0.0), "tau"),
    (lambda: S.SACConfig(lr=float("inf")), "lr"),
    (lambda: S.SACConfig(hidden=()), "hidden"),
    (lambda: S.SACConfig(auto_alpha="yes"), "auto_alpha"),
    (lambda: S.SACConfig(batch_size=2000, learning_starts=1000), "batch_size"),
    (lambda: S.sac("config"), "config"),
])
def test_bad_inputs_name_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_make_box_env_refuses_discrete_actions():
    from rl4llm.envs import make_box_env
    with pytest.raises(ValueError, match="Box action space"):
        make_box_env("CartPole-v1")


def test_sac_smoke_run():
    h = S.sac(S.SACConfig(total_steps=300, learning_starts=200, batch_size=32, hidden=(16,), final_episodes=1),
              log_every=10)
    assert h.stopped is None and math.isfinite(h.final_return)
    assert h.terminated_stored == 0                          # Pendulum only truncates
    assert len(h.update_steps) == len(h.alphas) == len(h.entropies) == len(h.critic_losses) == 11
    assert h.episode_steps == [200] and len(h.episode_returns) == 1
    assert all(math.isfinite(x) for x in h.alphas + h.entropies + h.critic_losses)
    assert h.alphas[-1] != h.alphas[0]                        # the temperature is learned


def test_sac_stops_at_a_non_finite_loss():
    h = S.sac(S.SACConfig(total_steps=300, learning_starts=200, batch_size=32, hidden=(16,), lr=1e30,
                          final_episodes=1))
    assert h.stopped is not None and "non-finite" in h.stopped
    assert math.isnan(h.final_return)
