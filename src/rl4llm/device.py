"""Device selection and seeding.

The device is CUDA when available, then Apple's MPS, then the CPU. The environment variable
``RL4LLM_DEVICE`` overrides the choice (``cpu``, ``cuda``, ``cuda:1``, ``mps``); asking for a device
that does not exist here is an error, never a silent fall-back, so a GPU run cannot quietly become
a CPU run.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["get_device", "seed_everything"]

_ENV = "RL4LLM_DEVICE"


def _available(dev: torch.device) -> bool:
    if dev.type == "cpu":
        return True
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False
        return dev.index is None or dev.index < torch.cuda.device_count()
    if dev.type == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    return False


def get_device(name: str | None = None) -> torch.device:
    """Return the device to run on.

    Args:
        name: an explicit device string. If ``None``, ``$RL4LLM_DEVICE`` is used if set, else the first
            available of CUDA, MPS, CPU.

    Raises:
        ValueError: the requested device string is malformed, of an unsupported type, or not available.
    """
    source = "name"
    if name is None:
        name = os.environ.get(_ENV) or None
        source = _ENV
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _available(torch.device("mps")):
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name.strip().lower())
    except (RuntimeError, ValueError) as exc:
        raise ValueError(
            f"{source}={name!r} is not a device string; expected 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from exc
    if dev.type not in {"cpu", "cuda", "mps"}:
        raise ValueError(f"{source}={name!r}: expected a device of type 'cpu', 'cuda' or 'mps', got {dev.type!r}")
    if not _available(dev):
        raise ValueError(f"{source}={name!r}: that device is not available on this machine")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (all devices) and return a CPU generator seeded with ``seed``.

    Args:
        seed: a non-negative integer.

    Returns:
        A ``torch.Generator`` for code that prefers an explicit generator to global state.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 -- seeding the legacy global generator is the point
    torch.manual_seed(seed)  # also seeds every CUDA device
    return torch.Generator().manual_seed(seed)
