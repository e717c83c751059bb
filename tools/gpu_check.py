"""Run every notebook's code and every benchmark on a CUDA device.

    python tools/gpu_check.py            # what `make gpu-check` runs

Needs only torch, sympy, numpy and matplotlib (and gymnasium for the CartPole chapters): each notebook's code
cells are extracted into a script (tools/notebook_code.py) and run with ``RL4LLM_DEVICE=cuda``, so no Jupyter
stack is required. Benchmark results are written to ``src/rl4llm/bench_results/``. Exits non-zero, with a clear
message, when no CUDA device is present or when anything fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from notebook_code import to_script  # noqa: E402


def main() -> int:
    try:
        import torch
    except ImportError:
        print("gpu-check: torch is not installed in this Python", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(f"gpu-check needs a CUDA device, and this machine has none visible to torch {torch.__version__} "
              f"(built with CUDA {torch.version.cuda}). Run it on a GPU machine, with a CUDA build of torch.",
              file=sys.stderr)
        return 2
    print(f"gpu-check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    env = dict(os.environ, RL4LLM_DEVICE="cuda", MPLBACKEND="Agg", PYTHONPATH=str(ROOT / "src"))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for md in sorted((ROOT / "notebooks").glob("*.md")):
            script = Path(tmp) / (md.stem + ".py")
            script.write_text(to_script(md))
            t0 = time.perf_counter()
            rc = subprocess.call([sys.executable, str(script)], cwd=md.parent, env=env)
            results.append((f"notebook {md.stem}", rc, time.perf_counter() - t0))
    t0 = time.perf_counter()
    rc = subprocess.call([sys.executable, str(ROOT / "tools" / "run_benchmarks.py"), "--device", "cuda"], env=env)
    results.append(("benchmarks", rc, time.perf_counter() - t0))
    print("\n== gpu-check ==")
    for name, rc, seconds in results:
        print(f"  {name:<32} {'ok' if rc == 0 else 'FAILED':<7} {seconds:7.1f} s")
    return 1 if any(rc for _, rc, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
