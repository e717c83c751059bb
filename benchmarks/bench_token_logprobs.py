"""Peak extra memory and time of ``logprobs_from_logits`` against the naive log-softmax-then-gather.

    python benchmarks/bench_token_logprobs.py [--device cpu|cuda] [--quick] [--out FILE.json]

At a real vocabulary (V = 151,936, Qwen2's) and N = B*T tokens, the logits are the largest tensor of an RL
step, and the naive ``torch.log_softmax(logits.float(), -1).gather(-1, t)`` allocates another float32
``[N, V]`` (two for bf16 logits: the upcast copy and the log-softmax). ``rl4llm.lm.logprobs_from_logits``
works a chunk of rows at a time and needs a few ``[rows, V]`` float32 buffers instead.

Methods, each given logits that already exist:

- ``naive``: ``torch.log_softmax(logits.float(), -1).gather(...)`` -- what a careful user writes;
- ``naive-lowp``: for bf16 only, ``log_softmax`` in bf16 without the upcast (inexact, shown for reference);
- ``ours``: ``logprobs_from_logits(logits, targets)`` with its default chunk size.

Peak extra memory is measured, not computed:

- CUDA: ``torch.cuda.max_memory_allocated()`` during the call minus the memory allocated before it;
- CPU: the process's peak resident set size (``VmHWM``) during the call minus its resident size before it,
  in a fresh subprocess per measurement (so nothing freed earlier can be silently reused), with the peak
  counter reset through ``/proc/self/clear_refs``. This is what the operating system charges, allocator
  included.

Time is the median of several calls after a warm-up, naive and ours interleaved so that background load hits
both alike. The output (the tensor of N log-probabilities) is counted in "extra" for every method.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from rl4llm.device import get_device
from rl4llm.lm import logprobs_from_logits

V = 151_936
MiB = 2**20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_inputs(n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[n, V]`` in ``dtype`` (allocated directly, no float32 staging copy) and targets ``[n]``."""
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.empty(n, V, dtype=dtype, device=device).normal_(0.0, 2.0, generator=g)
    targets = torch.randint(0, V, (n,), device=device, generator=g)
    return logits, targets


def method_fn(name: str):
    if name == "naive":
        return lambda z, t: torch.log_softmax(z.float(), dim=-1).gather(-1, t[:, None]).squeeze(-1)
    if name == "naive-lowp":
        return lambda z, t: torch.log_softmax(z, dim=-1).gather(-1, t[:, None]).squeeze(-1).float()
    if name == "ours":
        return lambda z, t: logprobs_from_logits(z, t)
    raise ValueError(f"unknown method {name!r}")


def methods_for(dtype: str) -> list[str]:
    return ["naive", "naive-lowp", "ours"] if dtype != "float32" else ["naive", "ours"]


# ----------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------
def _proc_status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def _measure_cpu_here(method: str, dtype: str, n: int) -> int:
    """Peak extra RSS (bytes) of one call, in this (fresh) process."""
    logits, targets = make_inputs(n, DTYPES[dtype], torch.device("cpu"))
    fn = method_fn(method)
    fn(logits[:2], targets[:2])  # load lazily-initialised kernels on a tiny input
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _proc_status("VmRSS")
    out = fn(logits, targets)
    peak = _proc_status("VmHWM")
    del out
    return peak - base


def peak_extra_bytes(method: str, dtype: str, n: int, device: torch.device) -> int:
    if device.type == "cuda":
        logits, targets = make_inputs(n, DTYPES[dtype], device)
        fn = method_fn(method)
        fn(logits[:2], targets[:2])
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn(logits, targets)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out, logits, targets
        torch.cuda.empty_cache()
        return peak
    if device.type != "cpu" or not Path("/proc/self/clear_refs").exists():
        raise SystemExit(f"memory measurement needs CUDA or Linux /proc; got device {device}")
    res = subprocess.run([sys.executable, __file__, "--_measure", method, dtype, str(n)],
                         capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------
# Time
# ----------------------------------------------------------------------------------------------------------
def median_times(methods: list[str], dtype: str, n: int, device: torch.device, repeats: int
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per call of each method (interleaved), and max |method - naive| of the outputs."""
    logits, targets = make_inputs(n, DTYPES[dtype], device)
    fns = {m: method_fn(m) for m in methods}
    ref = fns["naive"](logits, targets)
    err = {m: (fns[m](logits, targets) - ref).abs().max().item() for m in methods}  # also the warm-up
    del ref
    times: dict[str, list[float]] = {m: [] for m in methods}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    for _ in range(repeats):
        for m in methods:
            sync(device)
            t0 = time.perf_counter()
            out = fns[m](logits, targets)
            sync(device)
            times[m].append(time.perf_counter() - t0)
            del out
    return {m: statistics.median(ts) for m, ts in times.items()}, err


# ----------------------------------------------------------------------------------------------------------
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
    ap.add_argument("--quick", action="store_true", help="N = 1024 only, fewer repeats")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--_measure", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._measure:
        method, dtype, n = args._measure
        print(_measure_cpu_here(method, dtype, int(n)))
        return 0

    device = get_device(args.device)
    sizes = [1024] if args.quick else [1024, 4096]
    repeats = 3 if args.quick else 5
    memory_method = ("torch.cuda.max_memory_allocated - baseline" if device.type == "cuda" else
                     "peak RSS (VmHWM after clear_refs) - RSS before, fresh subprocess per measurement")
    print(f"logprobs_from_logits vs naive log_softmax+gather, V = {V:,}, on {device_name(device)}, "
          f"torch {torch.__version__}")
    print(f"memory: {memory_method}; time: median of {repeats} after a warm-up\n")
    head = (f"{'dtype':<9} {'N':>5} {'logits MiB':>10} {'method':<10} {'extra MiB':>10} {'extra/logits':>12} "
            f"{'time ms':>9} {'time/naive':>10} {'max|err|':>9}")
    print(head)
    print("-" * len(head))
    rows = []
    for dtype in DTYPES:
        for n in sizes:
            methods = methods_for(dtype)
            logits_bytes = n * V * DTYPES[dtype].itemsize
            times, err = median_times(methods, dtype, n, device, repeats)
            for m in methods:
                extra = peak_extra_bytes(m, dtype, n, device)
                row = dict(dtype=dtype, N=n, V=V, method=m, logits_mib=logits_bytes / MiB,
                           extra_mib=extra / MiB, extra_over_logits=extra / logits_bytes,
                           time_ms=1e3 * times[m], time_over_naive=times[m] / times["naive"],
                           max_abs_err_vs_naive=err[m])
                rows.append(row)
                print(f"{dtype:<9} {n:>5} {row['logits_mib']:>10.0f} {m:<10} {row['extra_mib']:>10.1f} "
                      f"{row['extra_over_logits']:>12.3f} {row['time_ms']:>9.1f} "
                      f"{row['time_over_naive']:>10.2f} {err[m]:>9.1e}", flush=True)
    ours = [r for r in rows if r["method"] == "ours"]
    mem_ok = all(r["extra_over_logits"] <= 0.25 for r in ours)
    time_ok = all(r["time_over_naive"] <= 1.0 for r in ours)
    print(f"\ntargets: ours extra <= 1/4 of logits: {'met' if mem_ok else 'NOT met'}; "
          f"ours time <= naive: {'met' if time_ok else 'NOT met'}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        Path(args.out).write_text(json.dumps(dict(
            benchmark="token_logprobs", device=device_name(device), device_type=device.type,
            torch=torch.__version__, date=date, quick=args.quick, vocab_size=V, memory_method=memory_method,
            repeats=repeats, rows=rows), indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
