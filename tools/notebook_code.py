"""Extract the code of a MyST Markdown notebook as a plain Python script, with no Jupyter installed.

    python tools/notebook_code.py notebooks/05_policy_gradient.md > /tmp/ch05.py

Code cells are the ```` ```{code-cell} ```` blocks; their option lines (``:tags: ...`` or a ``---`` YAML header)
are dropped. IPython magics are not allowed in the book's notebooks, so the result is valid Python.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

FENCE_OPEN = re.compile(r"^(`{3,})\{code-cell\}")


def extract_cells(text: str) -> list[str]:
    cells, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE_OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        fence, body, i = m.group(1), [], i + 1
        if i < len(lines) and lines[i].strip() == "---":          # YAML options block
            i += 1
            while i < len(lines) and lines[i].strip() != "---":
                i += 1
            i += 1
        while i < len(lines) and lines[i].startswith(":") and re.match(r"^:\w[\w-]*:", lines[i]):
            i += 1                                                  # short-form options such as :tags:
        while i < len(lines) and lines[i].rstrip() != fence:
            body.append(lines[i])
            i += 1
        i += 1
        code = "\n".join(body)
        if re.search(r"^\s*[%!]", code, re.M):
            raise ValueError(f"code cell uses IPython magics or shell escapes, which a script cannot run:\n{code}")
        cells.append(code)
    return cells


def to_script(path: Path) -> str:
    cells = extract_cells(path.read_text())
    parts = [f"# Code of {path.name}, extracted cell by cell.\n"]
    parts += [f"# %% cell {k}\n{c}\n" for k, c in enumerate(cells, 1)]
    return "\n".join(parts)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.stdout.write(to_script(Path(sys.argv[1])))
