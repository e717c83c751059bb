"""Execute MyST notebooks deterministically on the CPU and write their executed .ipynb twins.

    python tools/execute_notebooks.py notebooks/05_policy_gradient.md [more.md ...]

For each source ``X.md`` this (1) brings ``X.ipynb``'s inputs in line with the source the same way
``jupytext --to ipynb --update`` does, (2) runs every cell in a fresh kernel with ``RL4LLM_DEVICE=cpu`` and
``PYTHONHASHSEED=0``, and (3) writes the notebook without timing metadata. Executing an unchanged notebook
twice therefore gives byte-identical files, and ``tools/check_pairs.py`` accepts the result.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

TIMEOUT_S = 900


def execute(md: Path) -> float:
    if md.suffix != ".md":
        raise SystemExit(f"expected a .md notebook source, got {md}")
    ipynb = md.with_suffix(".ipynb")
    # Same code path as the pair check, so the inputs and notebook metadata are exactly what it expects.
    subprocess.run([sys.executable, "-m", "jupytext", "--quiet", "--to", "ipynb", "--update", str(md)], check=True)
    nb = nbformat.read(ipynb, as_version=4)
    env_before = {k: os.environ.get(k) for k in ("RL4LLM_DEVICE", "PYTHONHASHSEED")}
    os.environ.update(RL4LLM_DEVICE="cpu", PYTHONHASHSEED="0")
    t0 = time.perf_counter()
    try:
        NotebookClient(
            nb, timeout=TIMEOUT_S, kernel_name="python3", record_timing=False, coalesce_streams=True,
            resources={"metadata": {"path": str(md.parent)}},
        ).execute()
    finally:
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    seconds = time.perf_counter() - t0
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    jupytext.write(nb, ipynb, fmt="ipynb")
    return seconds


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    for p in paths:
        seconds = execute(Path(p))
        print(f"executed {p}: {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
