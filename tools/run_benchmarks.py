"""Run every script in benchmarks/ on one device and store its results.

    python tools/run_benchmarks.py --device cpu [--quick]

Each ``benchmarks/bench_*.py`` accepts ``--device``, ``--quick`` and ``--out FILE.json``; it prints a table of
ratios against its baseline, measured in the same run, and writes the rows to
``src/rl4llm/bench_results/<name>-<device>.json`` (package data: the file the book's chapters display).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    scripts = sorted((ROOT / "benchmarks").glob("bench_*.py"))
    if not scripts:
        print("no benchmarks found")
        return 0
    out_dir = ROOT / "src" / "rl4llm" / "bench_results"
    out_dir.mkdir(exist_ok=True)
    failed = []
    for script in scripts:
        name = script.stem.removeprefix("bench_")
        cmd = [sys.executable, str(script), "--device", args.device,
               "--out", str(out_dir / f"{name}-{args.device.split(':')[0]}.json")]
        if args.quick:
            cmd.append("--quick")
        print(f"\n== {script.name} on {args.device}", flush=True)
        if subprocess.call(cmd) != 0:
            failed.append(script.name)
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
