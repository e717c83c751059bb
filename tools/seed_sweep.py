"""Repeat a chapter's training run over several seeds, to see how robust the property it asserts is.

    python tools/seed_sweep.py ppo  [--seeds 0-9]     # chapter 8: PPO on CartPole-v1, the notebook's settings
    python tools/seed_sweep.py grpo [--seeds 0-4]     # chapter 13: warm start + GRPO on SortTask(4)
    python tools/seed_sweep.py dqn  [--seeds 0-9]     # chapter 4: DQN and Double DQN on CartPole-v1
    python tools/seed_sweep.py sac  [--seeds 0-3]     # chapter 10: SAC with automatic temperature on Pendulum-v1

A notebook runs one seed, because CI executes it; the chapters quote what this script prints for the others.
Runs on the CPU with one thread, as the notebooks do, so seed 0 reproduces the notebook's numbers.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("RL4LLM_DEVICE", "cpu")

import torch  # noqa: E402


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    return seeds


def sweep_ppo(seeds: list[int]) -> None:
    from rl4llm import ppo as P
    from rl4llm.envs import evaluate

    torch.set_default_dtype(torch.float64)  # as in the notebook: its networks are float32 all the same
    rows = []
    for seed in seeds:
        t0 = time.process_time()
        # the call of chapter 8, section 8.4, with the seed varied
        hist = P.ppo("CartPole-v1", num_envs=16, num_steps=64, total_steps=100_000, lr=2.5e-3, epochs=4,
                     minibatches=4, gamma=0.99, lam=0.95, clip_eps=0.2, value_coef=0.5, entropy_coef=0.01,
                     max_grad_norm=0.5, hidden=64, seed=seed, target_return=475, eval_greedy=True, eval_seed=10_000)
        greedy = evaluate(hist["policy"], "CartPole-v1", episodes=20, seed=20_000, greedy=True)
        sampled = evaluate(hist["policy"], "CartPole-v1", episodes=20, seed=20_000)
        rows.append((seed, hist["solved_at"], greedy, sampled))
        print(f"seed {seed}: stopped after {hist['solved_at']} steps; fresh evaluation greedy {greedy:.1f}, "
              f"sampled {sampled:.1f} ({time.process_time() - t0:.0f} s CPU)", flush=True)
    solved = [r[1] for r in rows if r[1] is not None]
    print(f"stopped: {len(solved)} of {len(rows)}", end="")
    if solved:
        print(f", after {min(solved)} to {max(solved)} steps (median {statistics.median(solved):.0f})", end="")
    print(f"; greedy >= 475: {sum(r[2] >= 475 for r in rows)} of {len(rows)}; sampled from "
          f"{min(r[3] for r in rows):.1f} to {max(r[3] for r in rows):.1f}, >= 475: "
          f"{sum(r[3] >= 475 for r in rows)} of {len(rows)}")


def sweep_grpo(seeds: list[int]) -> None:
    from rl4llm import grpo as GR
    from rl4llm.lm import TinyLM, TinyLMConfig
    from rl4llm.tasks import SortTask, supervised_warmstart

    task = SortTask(4)
    rows = []
    for seed in seeds:
        t0 = time.process_time()
        torch.manual_seed(seed)                     # chapter 13, section 13.7, with the seed varied
        base = TinyLM(TinyLMConfig(vocab_size=task.tokenizer.vocab_size, max_len=16))
        warm = supervised_warmstart(base, task, steps=400, batch_size=64, seed=seed, stop_at_accuracy=0.7,
                                    eval_every=5)
        hist = GR.train_grpo(copy.deepcopy(base), task, GR.GRPOConfig(seed=seed))  # defaults: chapter 13's GRPO arm
        rows.append((seed, hist.sampled_accuracy[0], hist.sampled_accuracy[-1], hist.accuracy[0], hist.accuracy[-1]))
        print(f"seed {seed}: warm start {warm.steps} steps; sampled accuracy {rows[-1][1]:.2f} -> {rows[-1][2]:.2f}, "
              f"greedy {rows[-1][3]:.2f} -> {rows[-1][4]:.2f} ({time.process_time() - t0:.0f} s CPU)", flush=True)
    gains = [r[2] - r[1] for r in rows]
    print(f"sampled accuracy: start {min(r[1] for r in rows):.2f} to {max(r[1] for r in rows):.2f}, end "
          f"{min(r[2] for r in rows):.2f} to {max(r[2] for r in rows):.2f}; gain {min(gains):+.2f} to "
          f"{max(gains):+.2f}; end >= 0.8 in {sum(r[2] >= 0.8 for r in rows)} of {len(rows)}")


def sweep_dqn(seeds: list[int]) -> None:
    from rl4llm import dqn as D

    for double in (False, True):
        name = "Double DQN" if double else "DQN"
        rows = []
        for seed in seeds:
            hist = D.dqn(D.DQNConfig(seed=seed, double=double))  # defaults: chapter 4's run, section 4.4
            rows.append((seed, hist.solved_at, hist.final_return, hist.seconds))
            print(f"{name} seed {seed}: solved at {hist.solved_at} steps; fresh greedy evaluation "
                  f"{hist.final_return:.1f} ({hist.seconds:.1f} s CPU)", flush=True)
        solved = [r[1] for r in rows if r[1] is not None]
        print(f"{name}: solved {len(solved)} of {len(rows)}", end="")
        if solved:
            print(f", after {min(solved)} to {max(solved)} steps (median {statistics.median(solved):.0f})", end="")
        print(f"; fresh greedy >= 475: {sum(r[2] >= 475 for r in rows)} of {len(rows)} (min "
              f"{min(r[2] for r in rows):.1f}); CPU {min(r[3] for r in rows):.1f} to {max(r[3] for r in rows):.1f} s")


def sweep_sac(seeds: list[int]) -> None:
    from rl4llm import sac as S

    rows = []
    for seed in seeds:
        hist = S.sac(S.SACConfig(seed=seed))  # defaults: chapter 10's run, section 10.5
        rows.append((seed, hist.final_return, hist.final_worst, hist.seconds))
        print(f"SAC seed {seed}: greedy {hist.final_return:.1f} (worst episode {hist.final_worst:.1f}), "
              f"final alpha {hist.alphas[-1]:.3f}, stopped {hist.stopped} ({hist.seconds:.1f} s CPU)", flush=True)
    print(f"SAC: greedy >= -200 on {sum(r[1] >= -200 for r in rows)} of {len(rows)}; from "
          f"{min(r[1] for r in rows):.1f} to {max(r[1] for r in rows):.1f}; CPU {min(r[3] for r in rows):.1f} to "
          f"{max(r[3] for r in rows):.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", choices=("ppo", "grpo", "dqn", "sac"))
    parser.add_argument("--seeds", default=None,
                        help="e.g. 0-9 or 0,3,5 (default: 0-9 for ppo and dqn, 0-4 for grpo, 0-3 for sac)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = parse_seeds(args.seeds or {"grpo": "0-4", "sac": "0-3"}.get(args.run, "0-9"))
    runs = {"ppo": sweep_ppo, "grpo": sweep_grpo, "dqn": sweep_dqn, "sac": sweep_sac}
    runs[args.run](seeds)


if __name__ == "__main__":
    main()
