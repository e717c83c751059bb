"""tools/mutate.py: the mutants it builds, and that it tells a check that can fail from one that cannot."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import mutate  # noqa: E402

CHAPTER = '''
```{code-cell} ipython3
import sympy as sp
from rl4llm.checks import assert_identity
x = sp.Symbol("x", positive=True)
```

```{code-cell} ipython3
assert_identity(sp.diff(x**3, x), 3 * x**2, name="a check that can fail")
```

```{code-cell} ipython3
assert_identity(sp.Max(x, 1), sp.Max(1, x), name="swapping the arguments of Max is no change")
```
'''


def _mutants(src, **kw):
    import ast
    return [m for _, m in mutate.expression_mutants(ast.parse(src, mode="eval").body, 50, **kw)]


def test_expression_mutants_cover_the_operators():
    ms = _mutants("a - b / c + f(d, e)")
    for expected in ("-(a - b / c + f(d, e))", "2 * (a - b / c + f(d, e))", "a - b / c - f(d, e)",
                     "a + b / c + f(d, e)", "a - b * c + f(d, e)", "a - c / b + f(d, e)", "a - b / c + f(e, d)",
                     "a - b / c"):
        assert expected in ms, expected
    assert _mutants("0") == []                                  # -0 and 2 * 0 are the same formula
    assert "-(y)" not in _mutants("y", other="0")               # so is -y == 0 against y == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the tool forks")
def test_a_check_that_can_fail_kills_its_mutants_and_an_equivalent_survivor_is_accepted(tmp_path):
    chapter = tmp_path / "99_toy.md"
    chapter.write_text(CHAPTER)
    cwd = os.getcwd()
    try:
        r = mutate.mutate_chapter(chapter, limit=6, equivalent_file=tmp_path / "none.yml")
        survivors = {(s["cell"], s["mutant"]) for s in r["survived"]}
        assert not any(cell == 2 for cell, _ in survivors)     # every mutant of the derivative check is killed
        assert (3, "sp.Max(1, x)") in survivors                 # the swapped Max survives ...
        eq = tmp_path / "eq.yml"
        eq.write_text("- chapter: 99_toy\n  original: sp.Max(x, 1)\n  mutant: sp.Max(1, x)\n"
                      "  reason: Max is symmetric\n")
        r2 = mutate.mutate_chapter(chapter, limit=6, equivalent_file=eq)
        assert any(a["mutant"] == "sp.Max(1, x)" for a in r2["accepted"])   # ... until it is accepted
        assert r2["killed"] == r["killed"] and len(r2["survived"]) == len(r["survived"]) - 1
    finally:
        os.chdir(cwd)
