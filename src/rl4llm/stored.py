"""Stored benchmark results that the chapters display, shipped with the package.

``tools/run_benchmarks.py`` (``make bench``) writes ``<name>-<device>.json`` into ``rl4llm/bench_results/``;
chapters 7 and 9 read them through :func:`benchmark_result`, so a notebook downloaded on its own, with
``rl4llm`` installed, finds the same table as the book.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def benchmark_result(name: str, device: str = "cpu") -> dict[str, Any]:
    """The stored result of ``benchmarks/bench_<name>.py`` on ``device`` (e.g. ``"gae"``, ``"token_logprobs"``)."""
    if not isinstance(name, str) or not isinstance(device, str):
        raise TypeError(f"name and device must be strings, got {type(name).__name__} and {type(device).__name__}")
    folder = resources.files("rl4llm") / "bench_results"
    path = folder / f"{name}-{device}.json"
    if not path.is_file():
        stored = sorted(p.name for p in folder.iterdir() if p.name.endswith(".json"))
        raise ValueError(f"no stored benchmark result {name!r} for device {device!r}; stored: {stored}")
    return json.loads(path.read_text())
