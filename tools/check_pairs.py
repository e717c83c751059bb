"""Check that every notebook source ``notebooks/X.md`` and its executed twin ``X.ipynb`` are in sync.

For each pair, a scratch copy of the ``.ipynb`` is updated from the ``.md`` with
``jupytext --to ipynb --update`` (which keeps the outputs of cells whose input is unchanged) and compared
byte for byte with the committed ``.ipynb``. Any difference means the source was edited after the last
execution: run ``make execute NB=notebooks/X.md``. Working on a scratch copy leaves the tree untouched and does
not depend on file times.
"""

from __future__ import annotations

import difflib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def check(md: Path, scratch: Path) -> list[str]:
    ipynb = md.with_suffix(".ipynb")
    if not ipynb.exists():
        return [f"{md.relative_to(ROOT)} has no executed twin {ipynb.name}: run make execute NB={md.relative_to(ROOT)}"]
    shutil.copy(md, scratch / md.name)
    shutil.copy(ipynb, scratch / ipynb.name)
    subprocess.run([sys.executable, "-m", "jupytext", "--quiet", "--to", "ipynb", "--update",
                    str(scratch / md.name)], check=True)
    got, want = (scratch / ipynb.name).read_text(), ipynb.read_text()
    if got == want:
        return []
    diff = "".join(list(difflib.unified_diff(want.splitlines(True), got.splitlines(True),
                                             f"{ipynb.name} (committed)", f"{ipynb.name} (from {md.name})"))[:60])
    return [f"{ipynb.relative_to(ROOT)} is out of date with {md.name}: "
            f"run make execute NB={md.relative_to(ROOT)}\n{diff}"]


def main() -> int:
    nbdir = ROOT / "notebooks"
    sources = sorted(nbdir.glob("*.md"))
    problems: list[str] = []
    for ipynb in sorted(nbdir.glob("*.ipynb")):
        if not ipynb.with_suffix(".md").exists():
            problems.append(f"{ipynb.relative_to(ROOT)} has no .md source")
    with tempfile.TemporaryDirectory() as tmp:
        for md in sources:
            problems += check(md, Path(tmp))
    for p in problems:
        print(p)
    print(f"notebook pairs: {len(sources)} checked, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
