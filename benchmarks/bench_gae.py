"""Time ``rl4llm.returns.gae``: the parallel scan against the reference loop over time, and against the floor.

    python benchmarks/bench_gae.py [--device cpu|cuda] [--quick] [--out FILE.json] [--threads N] [--repeats N]

Most code computes generalised advantage estimates with a Python loop over the ``T`` time steps, vectorised over
the batch: fine for a short rollout, slow for a language-model-length sequence. ``gae(..., method="scan")`` solves
the same backward recursion with a parallel associative scan in ceil(log2 T) vectorised steps, and
``method="auto"`` (the default) picks the faster of the two for the shape and device.

Inputs: float32 ``[B, T]`` rewards, values and next_values (standard normal), and episode boundaries inside every
row: each step is terminated with probability 1/256 and otherwise truncated with probability 1/256 (so
``next_values`` is needed); gamma = 0.99, lambda = 0.95. Every method gets the same tensors and is timed end to
end, input validation included, exactly as a user calls it.

- Time: the median of ``--repeats`` calls after a warm-up; methods interleaved, so background load hits all alike.
  On the CPU one intra-op thread by default (``--threads 0``: torch's default): the kernels are elementwise passes
  over a few MiB, and on a shared machine a second thread mostly adds noise.
- Floor: the bytes an ideal kernel must move (reading rewards, values and next_values in float32 and the two flags
  as bytes, writing the float32 advantages: 18 bytes per step) divided by the copy bandwidth of the same device,
  measured here as (read + written bytes) / time of ``dst.copy_(src)`` on a 128 MiB float32 tensor (median of
  repeats spread over the run).
- Error: each float32 result against a float64 run of the reference loop on the same inputs. "Equal to the loop's
  to float32 rounding" means that the scan's error is of the same size as the loop's own.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from rl4llm.device import get_device
from rl4llm.returns import gae

SHAPES = [(1024, 128), (256, 1024), (64, 4096), (8, 16384)]
QUICK_SHAPES = [(1024, 128), (64, 4096)]
METHODS = ["loop", "scan", "auto"]
GAMMA, LAM, P_END = 0.99, 0.95, 1 / 256
BYTES_PER_STEP = 3 * 4 + 2 * 1 + 4
COPY_MIB = 128
MiB = 2**20


def make_inputs(B: int, T: int, device: torch.device) -> dict:
    """The keyword arguments of one ``gae`` call: float32 ``[B, T]`` tensors with boundaries inside rows."""
    g = torch.Generator(device="cpu").manual_seed(B * 100_003 + T)
    u = torch.rand(B, T, generator=g)
    kw = dict(rewards=torch.randn(B, T, generator=g), values=torch.randn(B, T, generator=g),
              next_values=torch.randn(B, T, generator=g), terminated=u < P_END,
              truncated=(u >= P_END) & (u < 2 * P_END))
    return {k: v.to(device) for k, v in kw.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, repeats: int) -> list[float]:
    """Bytes per second (read + written) of ``dst.copy_(src)`` on a 128 MiB float32 tensor, one per repeat."""
    src = torch.rand(COPY_MIB * MiB // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: page in both buffers
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        out.append(2 * src.numel() * 4 / (time.perf_counter() - t0))
    return out


def median_times(kw: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds per call of each method, interleaved, after one warm-up call each."""
    for m in METHODS:
        gae(**kw, gamma=GAMMA, lam=LAM, method=m)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(repeats):
        for m in METHODS:
            sync(device)
            t0 = time.perf_counter()
            out = gae(**kw, gamma=GAMMA, lam=LAM, method=m)
            sync(device)
            times[m].append(time.perf_counter() - t0)
            del out
    return {m: statistics.median(ts) for m, ts in times.items()}


def errors(kw: dict) -> tuple[dict[str, float], float]:
    """Max |float32 result - float64 reference| of each method, and max |reference|."""
    kw64 = {k: v.double() if v.is_floating_point() else v for k, v in kw.items()}
    ref = gae(**kw64, gamma=GAMMA, lam=LAM, method="loop")
    err = {m: (gae(**kw, gamma=GAMMA, lam=LAM, method=m).double() - ref).abs().max().item() for m in METHODS}
    return err, ref.abs().max().item()


def auto_choice(B: int, T: int, device: torch.device) -> str:
    from rl4llm.returns import _auto_method  # the rule gae(method="auto") applies

    return _auto_method(torch.Size([B, T]), device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else platform.processor()
    except OSError:
        cpu = platform.processor()
    return f"CPU: {cpu} ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: rl4llm.device.get_device())")
    ap.add_argument("--quick", action="store_true", help="two shapes, fewer repeats")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per method and shape")
    args = ap.parse_args(argv)
    device = get_device(args.device)
    if args.threads < 0:
        raise SystemExit("--threads must be >= 0")
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = args.repeats or (3 if args.quick else 9)
    if repeats < 1:
        raise SystemExit("--repeats must be >= 1")

    print(f"gae: loop over time vs parallel scan, float32, gamma = {GAMMA}, lambda = {LAM}, "
          f"P(end) = 2/256 per step, on {device_name(device)}, torch {torch.__version__}")
    bandwidth = copy_bandwidth(device, repeats)
    print(f"time: median of {repeats} interleaved calls after a warm-up; floor: {BYTES_PER_STEP} bytes/step "
          f"/ copy bandwidth (median {statistics.median(bandwidth) / 1e9:.1f} GB/s, measured around each shape)\n")
    head = (f"{'B':>5} {'T':>6} {'loop ms':>9} {'scan ms':>9} {'auto ms':>9} {'auto':>5} {'loop/auto':>9} "
            f"{'floor ms':>9} {'auto/floor':>10} {'err loop':>9} {'err auto':>9}")
    print(head)
    print("-" * len(head))
    rows = []
    for B, T in shapes:
        kw = make_inputs(B, T, device)
        err, scale = errors(kw)
        bandwidth += copy_bandwidth(device, max(1, repeats // 3))
        times = median_times(kw, device, repeats)
        bandwidth += copy_bandwidth(device, max(1, repeats // 3))
        floor = B * T * BYTES_PER_STEP / statistics.median(bandwidth)
        chosen = auto_choice(B, T, device)
        row = dict(B=B, T=T, auto_method=chosen, floor_ms=1e3 * floor, max_abs_reference=scale,
                   **{f"{m}_ms": 1e3 * times[m] for m in METHODS},
                   **{f"{m}_over_loop": times[m] / times["loop"] for m in METHODS},
                   **{f"{m}_over_floor": times[m] / floor for m in METHODS},
                   **{f"{m}_max_abs_err_vs_float64": err[m] for m in METHODS})
        rows.append(row)
        print(f"{B:>5} {T:>6} {row['loop_ms']:>9.2f} {row['scan_ms']:>9.2f} {row['auto_ms']:>9.2f} {chosen:>5} "
              f"{times['loop'] / times['auto']:>9.1f} {row['floor_ms']:>9.3f} {row['auto_over_floor']:>10.1f} "
              f"{err['loop']:>9.1e} {err['auto']:>9.1e}", flush=True)

    fast_long = all(r["loop_ms"] / r["auto_ms"] >= 5 for r in rows if r["T"] >= 4096)
    never_slower = all(r["auto_ms"] <= r["loop_ms"] for r in rows)
    # float32 rounding: the loop's own error is a few eps * max|A|; the scan sums the same terms in another order and
    # must be no worse than twice that (plus 4 eps * max|A| of slack for rows where the loop happens to be lucky)
    eps = torch.finfo(torch.float32).eps
    rounding = all(r[f"{m}_max_abs_err_vs_float64"] <= 2 * r["loop_max_abs_err_vs_float64"]
                   + 4 * eps * r["max_abs_reference"] for r in rows for m in METHODS)
    print(f"\ntargets: auto >= 5x loop at T >= 4096: {'met' if fast_long else 'NOT met'}; "
          f"auto never slower than loop: {'met' if never_slower else 'NOT met'}; "
          f"errors at float32 rounding: {'met' if rounding else 'NOT met'}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        Path(args.out).write_text(json.dumps(dict(
            benchmark="gae", device=device_name(device), device_type=device.type, torch=torch.__version__,
            date=date, quick=args.quick, threads=torch.get_num_threads(), repeats=repeats, dtype="float32",
            gamma=GAMMA, lam=LAM, p_terminated=P_END, p_truncated=P_END, bytes_per_step=BYTES_PER_STEP,
            copy_bandwidth_gbs=statistics.median(bandwidth) / 1e9,
            targets=dict(auto_5x_at_T_ge_4096=fast_long, auto_never_slower=never_slower,
                         errors_at_float32_rounding=rounding),
            rows=rows), indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
