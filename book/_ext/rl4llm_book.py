"""Small build fixes for the book, as a local Sphinx extension.

- Under Jupyter Book 1.0.4 some extensions (sphinx-thebe, sphinx-togglebutton) register their inline set-up
  scripts twice. A duplicated ``const`` declaration is a JavaScript error on every page, which the browser
  check rightly reports; this extension drops exact duplicates from each page's script and style lists.
- Numbering by chapter. Theorems (sphinx-proof), figures, tables and equations are numbered within their chapter,
  "Theorem 12.1" and "(12.3)", where the chapter's number is the one its file name carries
  (``notebooks/12_dpo`` is chapter 12). A numbered toctree would number the chapters in the order they appear,
  and chapters 1-4 and 10 are still to come, so the figure numbers are assigned here from the file names instead;
  section headings are left as the chapters write them. Pages outside ``notebooks/`` are numbered as before.
"""

from __future__ import annotations

import re

from docutils import nodes
from sphinx.environment.collectors.toctree import TocTreeCollector

CHAPTER = re.compile(r"^notebooks/(\d+)_")


def _key(asset) -> tuple:
    # An inline script's file name is None for some extensions and "" for others: treat them alike.
    filename = str(getattr(asset, "filename", asset) or "")
    return (filename, tuple(sorted((k, str(v)) for k, v in getattr(asset, "attributes", {}).items())))


def _dedupe(app, pagename, templatename, context, doctree):
    for name in ("script_files", "css_files"):
        seen, unique = set(), []
        for asset in context.get(name, []):
            k = _key(asset)
            if k not in seen:
                seen.add(k)
                unique.append(asset)
        if name in context:
            context[name] = unique


def chapter_number(docname: str) -> int | None:
    m = CHAPTER.match(docname)
    return int(m.group(1)) if m else None


def _number_by_chapter(app, env) -> list[str]:
    """Re-assign ``env.toc_fignumbers`` with each chapter's number as the section prefix; returns changed pages."""
    before = {doc: {k: dict(v) for k, v in figs.items()} for doc, figs in env.toc_fignumbers.items()}
    saved = env.toc_secnumbers
    env.toc_secnumbers = dict(saved)
    for doc in env.found_docs:
        n = chapter_number(doc)
        if n is not None:
            env.toc_secnumbers[doc] = {"": (n,)}
    try:
        TocTreeCollector().assign_figure_numbers(env)
    finally:
        env.toc_secnumbers = saved   # headings keep the numbers the chapters write; only the counters change
    return [doc for doc in env.toc_fignumbers.keys() | before.keys() if env.toc_fignumbers.get(doc) != before.get(doc)]


def _mark_errata_tables(app, doctree, docname):
    """Give the errata appendix's tables the class ``errata`` (custom.css lays them out to fit a phone)."""
    if docname == "book/errata":
        for table in doctree.findall(nodes.table):
            table["classes"].append("errata")


def setup(app):
    app.connect("doctree-resolved", _mark_errata_tables)
    app.connect("html-page-context", _dedupe, priority=900)
    # After the toctree collector (priority 500) has assigned its numbers.
    app.connect("env-get-updated", _number_by_chapter, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
