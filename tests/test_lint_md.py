"""The MyST lint refuses a wrapped line that MyST would turn into a list item or a quote inside inline math."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from lint_md import lint_text  # noqa: E402


@pytest.mark.parametrize("start", ["+ ", "- ", "> ", "* ", "1. ", "12) "])
def test_a_block_start_inside_inline_math_is_refused(start):
    text = f"The loss is $a\n{start}b$, as shown.\n"
    assert [n for n, _ in lint_text(text)] == [2]


@pytest.mark.parametrize("text", [
    "The loss is $a -\nb$, as shown.\n",                          # operator kept on the first line
    "Two $x$ and $y$ closed\n- a real list item\n",               # math closed before the list
    "$$\na\n- b\n$$\n",                                           # display math is a block of its own
    "```python\nx = '$a'\n- 1\n```\n",                            # code fences are not prose
    "Price \\$5 and\n- a list\n",                                 # an escaped dollar opens nothing
    "Code `$` here\n- a list\n",                                  # a dollar in a code span opens nothing
    "Open $a\n\n- new paragraph$\n",                              # a blank line ends the paragraph
])
def test_correct_sources_pass(text):
    assert lint_text(text) == []


def test_inside_a_theorem_directive_the_body_is_linted():
    text = "````{prf:proof}\nSo $a = b\n> 0$.\n````\n"
    assert [n for n, _ in lint_text(text)] == [3]


def test_the_book_sources_pass_the_lint():
    files = sorted((ROOT / "notebooks").glob("*.md")) + sorted((ROOT / "book").glob("*.md"))
    problems = [f"{f.name}:{n}: {m}" for f in files for n, m in lint_text(f.read_text())]
    assert problems == []
