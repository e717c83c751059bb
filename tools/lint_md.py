"""Lint the MyST sources for a wrapped line that MyST reads as a list item or a quote inside inline math.

Markdown decides block structure before it looks for ``$...$``. So when a paragraph's inline math is wrapped and
the next line starts with ``+ ``, ``- ``, ``* ``, ``> `` or ``1. ``, that line becomes a list item or a block quote,
the math is cut in two, and the reader sees raw TeX. This lint tracks the open ``$`` across the lines of each
paragraph (outside code fences, display-math blocks and code spans) and refuses such a line start.

    python tools/lint_md.py [FILE.md ...]      # default: notebooks/*.md and book/*.md
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^\s*(`{3,}|~{3,}|:{3,})(.*)$")
# Directives whose body is MyST again (theorems, proofs, admonitions, dropdowns): their fences are transparent.
MYST_BODY = re.compile(r"^\{(prf:\w+|admonition|note|warning|tip|important|hint|caution|attention|danger|error"
                       r"|seealso|dropdown|margin|sidebar|topic|div|card|tab-item|tab-set|grid-item-card)\}")
BAD_START = re.compile(r"^\s*(?:[-+*>]|\d+[.)])(?:\s|$)")


def _dollars(line: str) -> int:
    """How many inline-math ``$`` delimiters a line holds (escaped ``\\$``, ``$$`` and code spans excluded)."""
    line = re.sub(r"(`+).*?\1", "", line)          # code spans
    line = line.replace(r"\$", "")
    line = line.replace("$$", "")
    return line.count("$")


def lint_text(text: str) -> list[tuple[int, str]]:
    """``(line number, message)`` for every continuation line inside inline math that starts a block."""
    problems = []
    fences: list[tuple[str, bool]] = []   # (marker, transparent) for each open fence
    in_display = False
    open_math = False
    open_since = 0
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        opaque = any(not t for _, t in fences)
        if m and not in_display:
            marker, info = m.group(1), m.group(2).strip()
            if fences and marker[0] == fences[-1][0][0] and len(marker) >= len(fences[-1][0]) and not info:
                fences.pop()
                open_math = False
                continue
            if not opaque:
                fences.append((marker, bool(MYST_BODY.match(info)) or marker[0] == ":" and not info.startswith("{")))
                open_math = False
                continue
        if opaque:
            continue
        stripped = line.strip()
        if in_display:
            if "$$" in stripped:
                in_display = False
            continue
        if stripped.startswith("$$"):
            rest = stripped[2:]
            if "$$" not in rest:
                in_display = True
            open_math = False
            continue
        if not stripped:              # a blank line ends the paragraph (and any unclosed math with it)
            open_math = False
            continue
        if stripped.startswith(":") and re.match(r"^:\w[\w-]*:", stripped):   # directive options (:label: ...)
            continue
        if open_math and BAD_START.match(line):
            problems.append((n, f"line starts with {stripped.split()[0]!r} inside inline math opened on line "
                                f"{open_since}: MyST makes it a list item or a quote; re-wrap the line"))
        if _dollars(line) % 2:
            open_math = not open_math
            open_since = n
    return problems


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv] or sorted((ROOT / "notebooks").glob("*.md")) + sorted((ROOT / "book").glob("*.md"))
    count = 0
    for f in files:
        for n, msg in lint_text(f.read_text()):
            print(f"{f}:{n}: {msg}")
            count += 1
    print(f"lint_md: {len(files)} files, {count} problem(s)")
    return 1 if count else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
