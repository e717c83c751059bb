"""Small build fixes for the book, as a local Sphinx extension.

Under Jupyter Book 1.0.4 some extensions (sphinx-thebe, sphinx-togglebutton) register their inline set-up
scripts twice. A duplicated ``const`` declaration is a JavaScript error on every page, which the browser
check rightly reports; this extension drops exact duplicates from each page's script and style lists.
"""

from __future__ import annotations


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


def setup(app):
    app.connect("html-page-context", _dedupe, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
