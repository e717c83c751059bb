import pytest
import sympy as sp

from rl4llm.checks import assert_identity, assert_nonzero

x, y = sp.symbols("x y", real=True)


def test_true_identity_passes_and_displays_as_latex():
    ident = assert_identity(sp.sin(x) ** 2 + sp.cos(x) ** 2, 1, name="pythagoras")
    assert ident._repr_latex_() == r"$\displaystyle \sin^{2}{\left(x \right)} + \cos^{2}{\left(x \right)} = 1$"
    assert repr(ident).startswith("pythagoras: ")


def test_false_identity_raises_with_both_sides_and_remainder():
    with pytest.raises(AssertionError, match=r"(?s)'square'.*lhs = x\*\*2.*rhs = x.*simplifies to x\*\(x - 1\)"):
        assert_identity(x**2, x, name="square")


def test_matrices_are_compared_elementwise():
    assert_identity([x + y, 2 * x], sp.Matrix([y + x, x + x]))
    with pytest.raises(AssertionError):
        assert_identity([x, y], [x, x])
    with pytest.raises(ValueError, match="same shape"):
        assert_identity([x, y], [x, y, x])


def test_custom_simplifier_is_used():
    u = sp.Symbol("u", positive=True)
    assert_identity(u / (u + 1) + 1 / (u + 1), 1, simplify=sp.cancel)


def test_assert_nonzero():
    assert assert_nonzero(x - y) == x - y
    with pytest.raises(AssertionError, match="simplifies to 0"):
        assert_nonzero(sp.sin(x) ** 2 + sp.cos(x) ** 2 - 1)


def test_log_simplify_proves_log_identities_that_simplify_needs_help_with_and_rejects_a_wrong_one():
    from rl4llm.checks import log_simplify

    a, b, c = sp.symbols("a b c", positive=True)
    kl = a / (a + b) * sp.log((a / (a + b)) / (c / (b + c)))
    split = a / (a + b) * (sp.log(a) - sp.log(a + b) - sp.log(c) + sp.log(b + c))
    assert log_simplify(kl - split) == 0
    assert_identity(kl, split, simplify=log_simplify)
    wrong = a / (a + b) * (sp.log(a) - sp.log(a + b) - sp.log(c) - sp.log(b + c))    # one sign flipped
    assert log_simplify(kl - wrong) != 0
    with pytest.raises(AssertionError):
        assert_identity(kl, wrong, simplify=log_simplify)
