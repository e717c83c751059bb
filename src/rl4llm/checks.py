"""Assert symbolic identities and show them.

A derivation step in the book is followed by a cell such as ::

    assert_identity(sp.diff(J, theta), expected, name="log-derivative trick")

which simplifies ``lhs - rhs``; if the result is not zero it raises :class:`AssertionError` showing both sides
and the non-zero remainder, so a wrong formula cannot pass silently. On success it returns an object that
Jupyter displays as ``lhs = rhs`` in LaTeX.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sympy as sp

__all__ = ["Identity", "assert_identity", "assert_nonzero", "log_simplify"]


class Identity:
    """A checked identity ``lhs = rhs``; displays as LaTeX in Jupyter."""

    def __init__(self, lhs: sp.Expr, rhs: sp.Expr, name: str | None = None):
        self.lhs, self.rhs, self.name = lhs, rhs, name

    def _repr_latex_(self) -> str:
        return rf"$\displaystyle {sp.latex(self.lhs)} = {sp.latex(self.rhs)}$"

    def __repr__(self) -> str:
        head = f"{self.name}: " if self.name else ""
        return f"{head}{sp.sstr(self.lhs)} = {sp.sstr(self.rhs)}"


def _as_expr(x) -> sp.Expr | sp.MatrixBase:
    if isinstance(x, Sequence) and not isinstance(x, str):
        return sp.Matrix(x)
    return sp.sympify(x)


def _is_zero(d) -> bool:
    if isinstance(d, sp.MatrixBase):
        return all(e == 0 for e in d)
    return d == 0


def assert_identity(lhs, rhs, *, name: str | None = None,
                    simplify: Callable[[sp.Expr], sp.Expr] = sp.simplify) -> Identity:
    """Assert that ``lhs`` and ``rhs`` are symbolically equal, and return them for display.

    Args:
        lhs, rhs: SymPy expressions, or matrices / sequences of expressions of the same shape.
        name: a short name for the identity, used in the error message and the plain-text display.
        simplify: the simplification applied to ``lhs - rhs`` (elementwise for matrices).

    Raises:
        ValueError: ``lhs`` and ``rhs`` are matrices of different shapes.
        AssertionError: ``lhs - rhs`` does not simplify to zero; the message shows both sides and the remainder.
    """
    lhs, rhs = _as_expr(lhs), _as_expr(rhs)
    if isinstance(lhs, sp.MatrixBase) != isinstance(rhs, sp.MatrixBase) or (
        isinstance(lhs, sp.MatrixBase) and lhs.shape != rhs.shape
    ):
        raise ValueError(
            f"lhs and rhs must have the same shape, got {getattr(lhs, 'shape', 'scalar')} "
            f"and {getattr(rhs, 'shape', 'scalar')}"
        )
    diff = lhs - rhs
    diff = diff.applyfunc(simplify) if isinstance(diff, sp.MatrixBase) else simplify(diff)
    if not _is_zero(diff):
        label = f" '{name}'" if name else ""
        raise AssertionError(
            f"identity{label} does not hold:\n  lhs = {sp.sstr(lhs)}\n  rhs = {sp.sstr(rhs)}\n"
            f"  lhs - rhs simplifies to {sp.sstr(diff)}"
        )
    return Identity(lhs, rhs, name)


def assert_nonzero(expr, *, name: str | None = None,
                   simplify: Callable[[sp.Expr], sp.Expr] = sp.simplify) -> sp.Expr:
    """Assert that ``expr`` does not simplify to zero (used to show that a wrong formula really is wrong).

    Returns the simplified expression. Raises :class:`AssertionError` if it is identically zero.
    """
    e = _as_expr(expr)
    e = e.applyfunc(simplify) if isinstance(e, sp.MatrixBase) else simplify(e)
    if _is_zero(e):
        raise AssertionError(f"expected {name or 'the expression'} to be non-zero, but it simplifies to 0")
    return e


def log_simplify(expr):
    """Expand every log into logs of symbols and of sums, treat those as new symbols, and cancel.

    The ``simplify`` to pass to :func:`assert_identity` for identities between sums of logs (KL divergences,
    log-partition functions). ``sp.simplify`` often fails to see that ``log(a b) - log a - log b`` is zero; here every
    log is split by ``expand_log(force=True)`` (valid for the positive probabilities and partition functions the book
    applies it to) and the remaining logs are replaced by fresh symbols. If the result is 0 as a rational function of
    the symbols and those log-symbols, it is 0 for the actual logs too. (Chapters 9, 11 and 12.)
    """
    expr = sp.expand_log(sp.expand(expr), force=True)
    logs = sorted(expr.atoms(sp.log), key=sp.default_sort_key)
    fresh = [sp.Symbol(f"ell_{i}") for i in range(len(logs))]
    return sp.cancel(sp.together(sp.expand(expr.xreplace(dict(zip(logs, fresh, strict=True))))))
