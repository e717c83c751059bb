"""Static checks of the built HTML: the book must read with no network.

- no page loads a script or stylesheet from another host (MathJax comes from ``_static/mathjax``);
- every page that contains math loads the local MathJax.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REMOTE = re.compile(r"""<(?:script|link)\b[^>]*\b(?:src|href)=["'](?:https?:)?//[^"']+["']""", re.I)
LOCAL_MATHJAX = re.compile(r"""<script\b[^>]*src=["'][^"']*_static/mathjax/tex-chtml-full\.js(?:\?[^"']*)?["']""", re.I)
HAS_MATH = re.compile(r'class="math[ "]')


def main(root: str) -> int:
    pages = sorted(Path(root).rglob("*.html"))
    if not pages:
        print(f"no HTML pages under {root}: build the book first (make book)")
        return 1
    problems = []
    for page in pages:
        html = page.read_text(errors="replace")
        rel = page.relative_to(root)
        problems += [f"{rel}: remote asset {m.group(0)[:120]}" for m in REMOTE.finditer(html)]
        if HAS_MATH.search(html) and not LOCAL_MATHJAX.search(html):
            problems.append(f"{rel}: has math but does not load the local MathJax")
    for p in problems:
        print(p)
    print(f"static HTML check: {len(pages)} pages, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "_build/html"))
