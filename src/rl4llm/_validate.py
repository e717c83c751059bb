"""The input checks every public function of :mod:`rl4llm` uses (private; tier 0, no RL idea).

Each check takes the value and the name the caller's argument has, and raises :class:`ValueError` (a wrong value,
shape, dtype or device) or returns the value, normalised where that is part of the contract (a 0/1 mask becomes a
bool tensor, an index is made non-negative). Shapes in messages are printed as lists, ``[8, 5]``.
"""

from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor

__all__ = [
    "accumulation_dtype",
    "batch_dim",
    "dim_index",
    "finite_float",
    "float_nonempty",
    "float_tensor",
    "floating",
    "ids",
    "like",
    "mask_or_all",
    "mask_or_none",
    "nonneg_real",
    "obs",
    "positive_int",
    "safe_ratio",
    "same",
    "token_mask",
]


def positive_int(name: str, value) -> int:
    """``value`` must be an ``int`` (not a ``bool``) ``>= 1``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def float_tensor(x, name: str, *, min_dim: int = 1) -> Tensor:
    """A finite floating-point tensor with at least ``min_dim`` dims."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dim(s), got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return x


def batch_dim(dim, x: Tensor, name: str) -> int:
    """``dim`` must index a dim of ``x``; returns it non-negative."""
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int indexing a dim of {name} (shape {list(x.shape)}), got {dim!r}")
    return dim % x.dim()


def mask_or_all(mask, x: Tensor, name: str) -> Tensor:
    """A bool mask of ``x``'s shape and device (``None``: all True); numeric masks must hold only 0 and 1."""
    if mask is None:
        return torch.ones_like(x, dtype=torch.bool)
    if not isinstance(mask, Tensor) or mask.shape != x.shape:
        got = list(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a tensor of {name}' shape {list(x.shape)}, got {got}")
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but {name} is on {x.device}")
    if mask.dtype != torch.bool:
        if mask.is_complex() or not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask must be a bool tensor, or numeric with values in {0, 1}")
        mask = mask != 0
    return mask


def obs(x, obs_dim: int) -> Tensor:
    """``x`` must be a tensor of shape ``[..., obs_dim]``; returns it."""
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != obs_dim:
        shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"obs must be a tensor of shape [..., {obs_dim}], got {shape}")
    return x


def safe_ratio(num: Tensor, den: Tensor, fallback: Tensor) -> Tensor:
    """``num / den`` where ``den > 0``, else ``fallback`` (no division by zero anywhere, so no NaN gradient)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), fallback)


def finite_float(x, name: str, *, allow_neg_inf: bool = False) -> Tensor:
    """A non-empty floating-point tensor without NaN or infinities (``-inf`` allowed with ``allow_neg_inf``)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point tensor, got {got}")
    if x.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    if bool(torch.isnan(x).any()):
        raise ValueError(f"{name} contains NaN")
    bad = torch.isposinf(x) if allow_neg_inf else ~torch.isfinite(x)
    if bool(bad.any()):
        what = "+inf" if allow_neg_inf else "infinite values"
        raise ValueError(f"{name} contains {what}; log-probabilities and rewards must be finite"
                         + (" (or -inf for a zero probability)" if allow_neg_inf else ""))
    return x


def like(x: Tensor, other: Tensor, name: str, other_name: str) -> None:
    """``x`` must have ``other``'s shape and device."""
    if x.shape != other.shape:
        raise ValueError(f"{name} must have the shape of {other_name}, {tuple(other.shape)}, got {tuple(x.shape)}")
    if x.device != other.device:
        raise ValueError(f"{name} is on {x.device} but {other_name} is on {other.device}")


def dim_index(dim, x: Tensor) -> int:
    """``dim`` must be an int indexing a dim of ``x``; returned as given."""
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}) for a tensor of shape "
                         f"{tuple(x.shape)}, got {dim!r}")
    return dim


def accumulation_dtype(*xs: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (the accumulation dtype of 16-bit inputs too)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def floating(x, name: str) -> Tensor:
    """``x`` must be a floating-point tensor."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point tensor, got {got}")
    return x


def same(x: Tensor, other: Tensor, name: str, other_name: str) -> None:
    """``x`` must have ``other``'s shape and device (shapes printed as lists)."""
    if x.shape != other.shape:
        raise ValueError(f"{name} must have the shape of {other_name}, {list(other.shape)}, got {list(x.shape)}")
    if x.device != other.device:
        raise ValueError(f"{name} is on {x.device} but {other_name} is on {other.device}")


def mask_or_none(mask, other: Tensor, other_name: str) -> Tensor | None:
    """``None``, or ``mask`` as a bool tensor of ``other``'s shape and device (numeric masks: only 0 and 1)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a 0/1 tensor of shape {list(other.shape)}, got {type(mask).__name__}")
    same(mask, other, "mask", other_name)
    if mask.dtype != torch.bool:
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0 and 1 (or be a bool tensor)")
        mask = mask != 0
    return mask


def nonneg_real(value, name: str) -> float:
    """A finite real number ``>= 0`` (not a ``bool``), as a float."""
    if isinstance(value, bool) or not isinstance(value, Real) or not (0.0 <= float(value) < float("inf")):
        raise ValueError(f"{name} must be a finite real number >= 0, got {value!r}")
    return float(value)


def float_nonempty(x, name: str, shape: str, dim: int | None = None) -> Tensor:
    """A non-empty, finite floating-point tensor (with ``dim`` dims); ``shape`` describes it in messages."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point {shape} tensor, got {got}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must be a {shape} tensor, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty {shape} tensor, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def ids(name: str, x, *, vocab_size: int | None = None, shape: str = "[B, T]") -> None:
    """``x`` must be a non-empty 2-D integer tensor of token ids in ``[0, vocab_size)``."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a {shape} integer tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name} must be a {shape} integer tensor, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a {shape} integer tensor, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty {shape} tensor, got shape {tuple(x.shape)}")
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        bound = f"[0, {vocab_size})" if vocab_size is not None else "[0, V)"
        raise ValueError(f"{name} must hold token ids in {bound}, got values in [{lo}, {hi}]")


def token_mask(name: str, mask, shape: torch.Size, expected: str) -> Tensor:
    """``mask`` must have ``shape`` and values in {0, 1}; returned as a bool tensor."""
    if not isinstance(mask, Tensor):
        raise ValueError(f"{name} must be a {expected} tensor of 0/1, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"{name} must have shape {expected} = {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"{name} must contain only 0 and 1")
        mask = mask != 0
    return mask
