"""The cost of input checking in ``grpo_loss``: its time over the time of the same math without checks.

Usage: python benchmarks/bench_checks.py [--n 64] [--l 512] [--repeats 200]

Both sides compute the GRPO loss with a KL penalty at ``[N, L]`` (token-level ratios, ``aggregation="grpo"``) and its
statistics; the unchecked side is the math of :func:`rl4llm.grpo.grpo_loss` written out with no validation. The
ratio is measured in one run, on one thread, in process CPU time, so it does not depend on the machine's load; the
two losses are asserted equal first.
"""

from __future__ import annotations

import argparse
import time

import torch

from rl4llm.grpo import grpo_loss


def unchecked(logp, logp_old, adv, keep, logp_ref, *, eps=0.2, beta=0.04):
    """The math of grpo_loss (token level, "grpo" weights, k3 penalty), no checks."""
    N, L = logp.shape
    zero = torch.zeros((), dtype=torch.float32)
    w = keep / (keep.sum(-1, keepdim=True) * N)
    lp = torch.where(keep, logp, zero)
    lp_old = torch.where(keep, logp_old, zero)
    a = torch.where(keep, adv[:, None].expand(N, L), zero)
    ratio = torch.exp(lp - lp_old)
    obj = torch.where(keep, torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a), zero)
    policy = -(w * obj).sum()
    x = torch.where(keep, logp_ref, zero) - lp
    k3 = torch.where(keep, torch.expm1(x) - x, zero)
    kl = (w * k3).sum()
    with torch.no_grad():
        r = (lp - lp_old).exp()
        clipped = ((a > 0) & (r > 1 + eps)) | ((a < 0) & (r < 1 - eps))
        n = keep.sum()
        _ = (float(policy), float(kl), float(k3.sum() / n), float((clipped & keep).sum() / n),
             float(torch.where(keep, r, zero).sum() / n))
    return policy + beta * kl


def cpu_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(5):
        t = time.process_time()
        for _ in range(repeats):
            fn()
        best = min(best, (time.process_time() - t) / repeats)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--l", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    N, L = args.n, args.l
    logp = -torch.rand(N, L, generator=g) * 3
    logp_old = logp + 0.05 * torch.randn(N, L, generator=g)
    logp_ref = logp + 0.05 * torch.randn(N, L, generator=g)
    adv = torch.randn(N, generator=g)
    lengths = torch.randint(1, L + 1, (N,), generator=g)
    keep = torch.arange(L)[None, :] < lengths[:, None]
    ours, _ = grpo_loss(logp, logp_old, adv, keep, beta=0.04, logp_ref=logp_ref)
    ref = unchecked(logp, logp_old, adv, keep, logp_ref)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-7), (ours, ref)
    t_checked = cpu_time(lambda: grpo_loss(logp, logp_old, adv, keep, beta=0.04, logp_ref=logp_ref), args.repeats)
    t_plain = cpu_time(lambda: unchecked(logp, logp_old, adv, keep, logp_ref), args.repeats)
    print(f"grpo_loss [{N}, {L}]: {t_checked * 1e3:.3f} ms, unchecked math {t_plain * 1e3:.3f} ms, "
          f"ratio {t_checked / t_plain:.2f} (CPU time, 1 thread)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
