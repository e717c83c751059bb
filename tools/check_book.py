"""Open every page of the built book in headless Chromium and check what a reader would see.

Every page is opened at two widths, a laptop (1400 px) and a phone (420 px). A page fails when

- it shows raw TeX: math that MathJax did not typeset, or a ``$`` or a ``\\command`` in the visible text outside
  code and typeset math (what a wrapped MyST line that starts a list or a quote inside ``$...$`` leaves behind);
- something overflows sideways: an element of the article (prose, display math, a theorem box, a table, a figure,
  code or its output) reaches past the right edge of the article column by more than ``ALLOWANCE_PX``, or the page
  itself scrolls sideways. A box that scrolls inside its own frame (display math, a wide table or code output)
  does not overflow the page; those are counted and reported, not failed. Content clipped by a box that hides
  its overflow counts as overflow;
- it does not link to the repository and its issue tracker (the URL in ``_config.yml``, ``repository.url``);
- at 420 px, the one visible navigation button (\u2630) does not open the table of contents, or two search
  fields are visible at 1400 px;
- an image did not load, a link to a local file does not exist, a request failed, or the console shows an error.

    python tools/check_book.py _build/html [--screenshots DIR] [--only PAGE ...]

Chromium comes from Debian (``apt-get install chromium``). Without it the check says that it skipped; under
``CI=true`` a missing browser is a failure, because CI must run this check.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import re
import shutil
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

WIDTHS = (1400, 420)
# Sub-pixel rounding and the focus ring of a button: an element may reach this far past the article's right edge.
ALLOWANCE_PX = 4
MAX_SHOT_PX = 12_000
ROOT = Path(__file__).resolve().parents[1]


def repository_url() -> str:
    """The one place the repository's address is written down."""
    return yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"].rstrip("/")


# Raw TeX in the visible text: a dollar sign, or a backslash command, in text that is neither code nor typeset math.
RAW_TEX_JS = r"""
() => {
  const problems = [];
  const skip = 'pre, code, script, style, textarea, mjx-container, .highlight, .MathJax, mjx-assistive-mml, kbd';
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const el = n.parentElement;
    if (!el || el.closest(skip)) continue;
    const text = n.textContent;
    const m = text.match(/\\[A-Za-z]+|\$/);
    if (m) problems.push('raw TeX ' + JSON.stringify(m[0]) + ' in <' + el.tagName.toLowerCase() + '>: ...'
                         + text.slice(Math.max(0, m.index - 40), m.index + 40).replace(/\s+/g, ' ') + '...');
  }
  return problems;
}
"""

# Horizontal overflow inside the article column. Returns {overflow: [...], scrolls: {kind: count}, page: px}.
OVERFLOW_JS = r"""
(allowance) => {
  const article = document.querySelector('article.bd-article') || document.querySelector('main') || document.body;
  const right = Math.min(article.getBoundingClientRect().right, document.documentElement.clientWidth);
  const kinds = [
    ['math', 'mjx-container[display="true"], div.math'],
    ['theorem', 'div.proof, div.admonition, div.dropdown'],
    ['table', 'table'],
    ['figure', 'figure, img'],
    ['code', 'div.highlight pre, div.cell_input'],
    ['output', 'div.cell_output pre, div.cell_output .output'],
    ['prose', 'p, li, dl, h1, h2, h3, h4'],
  ];
  const scrollsInside = el => {
    for (let a = el.parentElement; a && a !== article; a = a.parentElement) {
      const ox = getComputedStyle(a).overflowX;
      if ((ox === 'auto' || ox === 'scroll') && a.getBoundingClientRect().right <= right + allowance) return a;
      if (ox === 'hidden' || ox === 'clip') return null;   // clipped: the reader cannot scroll to what is cut off
    }
    return null;
  };
  const overflow = [], scrolls = {};
  const seen = new Set();
  for (const [kind, sel] of kinds) {
    article.querySelectorAll(sel).forEach(el => {
      if (seen.has(el) || !el.getClientRects().length) return;
      seen.add(el);
      const r = el.getBoundingClientRect();
      const box = scrollsInside(el);
      if (r.right > right + allowance && !box) {
        overflow.push(kind + ' reaches ' + Math.round(r.right - right) + ' px past the column: '
                      + (el.textContent || el.getAttribute('src') || '').trim().slice(0, 50).replace(/\s+/g, ' '));
      } else if ((el.scrollWidth > el.clientWidth + allowance
                  && ['auto', 'scroll'].includes(getComputedStyle(el).overflowX))
                 || (box && r.right > right + allowance)) {
        scrolls[kind] = (scrolls[kind] || 0) + 1;
      }
    });
  }
  return {overflow, scrolls, page: document.documentElement.scrollWidth - document.documentElement.clientWidth};
}
"""

# At 420 px: exactly one visible button opens the primary sidebar; after a click the table of contents is on screen.
VISIBLE_JS = r"""
(sel) => Array.from(document.querySelectorAll(sel)).filter(el => {
  const r = el.getBoundingClientRect(), s = getComputedStyle(el);
  return r.width > 0 && r.height > 0 && s.visibility !== 'hidden' && s.display !== 'none' && r.right > 0
         && r.left < window.innerWidth && r.bottom > 0 && r.top < window.innerHeight;
}).length
"""
DRAWER_OPEN_JS = r"""
() => {
  const links = Array.from(document.querySelectorAll('.bd-sidebar-primary nav a, dialog[open] nav a'));
  return links.some(a => {
    const r = a.getBoundingClientRect();
    if (r.width === 0 || r.right <= 0 || r.left >= window.innerWidth || r.top < 0 || r.bottom > window.innerHeight)
      return false;
    const hit = document.elementFromPoint(r.left + Math.min(10, r.width / 2), r.top + r.height / 2);
    return hit !== null && (hit === a || a.contains(hit));
  });
}
"""
TOGGLE = "button.primary-toggle, label.primary-toggle"
SEARCH_FIELD = "input[type=search], .search-button-field, form.bd-search"


# Runs in the page after MathJax has finished; returns a list of problems.
PAGE_PROBLEMS_JS = r"""
() => {
  const problems = [];
  document.querySelectorAll('.math').forEach((el, i) => {
    if (!el.querySelector('mjx-container')) problems.push('untypeset math #' + i + ': ' + el.textContent.slice(0, 60));
  });
  document.querySelectorAll('mjx-merror').forEach(el => problems.push('MathJax error: ' + el.textContent.slice(0, 80)));
  const clone = document.body.cloneNode(true);
  clone.querySelectorAll('pre, code, script, style, textarea, mjx-container, .highlight').forEach(e => e.remove());
  const text = clone.textContent;
  for (const raw of ['\\(', '\\[', '$$']) {
    const k = text.indexOf(raw);
    if (k >= 0) problems.push('raw math delimiter ' + raw + ' in text: ...'
                              + text.slice(Math.max(0, k - 30), k + 40).replace(/\s+/g, ' '));
  }
  document.querySelectorAll('img').forEach(img => {
    if (!img.complete || img.naturalWidth === 0)
      problems.push('broken image: ' + (img.getAttribute('src') || '').slice(0, 80));
  });
  return problems;
}
"""


def local_link_problems(root: Path, page: Path) -> list[str]:
    problems = []
    for href in re.findall(r'<a\b[^>]*\bhref="([^"]+)"', page.read_text(errors="replace")):
        url = urlparse(href)
        if url.scheme or href.startswith(("#", "//", "mailto:")):
            continue
        target = (page.parent / unquote(url.path)).resolve()
        if url.path and not target.exists():
            problems.append(f"broken local link: {href}")
        elif target.is_relative_to(root.resolve()) is False:
            problems.append(f"link leaves the book: {href}")
    return problems


def drawer_problems(page, width: int) -> list[str]:
    """Click the one visible navigation button and require the table of contents to be on screen and clickable."""
    n = page.evaluate(VISIBLE_JS, TOGGLE)
    if n != 1:
        return [f"{width} px: {n} visible navigation buttons (\u2630), expected exactly one"]
    if page.evaluate(DRAWER_OPEN_JS):
        return [f"{width} px: the table of contents is already open before \u2630 is clicked"]
    visible = [el for el in page.query_selector_all(TOGGLE) if el.is_visible()]
    visible[0].click()
    page.wait_for_timeout(600)
    if not page.evaluate(DRAWER_OPEN_JS):
        return [f"{width} px: clicking \u2630 does not open the table of contents"]
    return []


def screenshot(page, out: Path) -> None:
    """A full-page PNG, cut at ``MAX_SHOT_PX`` (Chromium gives up on the longest chapters)."""
    height = min(page.evaluate("() => document.documentElement.scrollHeight"), MAX_SHOT_PX)
    width = page.viewport_size["width"]
    page.screenshot(path=str(out), full_page=True, clip={"x": 0, "y": 0, "width": width, "height": height},
                    timeout=120_000)


def serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def skip_or_fail(reason: str) -> int:
    if os.environ.get("CI") == "true":
        print(f"browser check FAILED: {reason} (CI must run this check)")
        return 1
    print(f"browser check SKIPPED: {reason}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default="_build/html")
    ap.add_argument("--screenshots", help="write a full-page PNG of every page into this folder")
    ap.add_argument("--only", nargs="*", help="check only the pages whose path ends with one of these")
    args = ap.parse_args()
    root = Path(args.root)
    pages = sorted(p for p in root.rglob("*.html") if "_static" not in p.parts)
    if not pages:
        print(f"no pages under {root}: build the book first (make book)")
        return 1
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return skip_or_fail("chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return skip_or_fail("the playwright package is not installed")

    if args.only:
        pages = [p for p in pages if any(p.relative_to(root).as_posix().endswith(o) for o in args.only)]
    repo = repository_url()
    totals = {w: {"overflow": 0, "scrolls": {}} for w in WIDTHS}
    server, base = serve(root)
    failures = 0
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            for page_path in pages:
                rel = page_path.relative_to(root).as_posix()
                redirect = re.search(r'http-equiv="refresh" content="0; url=([^"]+)"', page_path.read_text(), re.I)
                if redirect:  # e.g. the root index.html: only its target must exist
                    target = (page_path.parent / redirect.group(1).split("#")[0]).resolve()
                    problems = [] if target.exists() else [f"redirect to a missing page: {redirect.group(1)}"]
                    print(f"  {'ok' if not problems else 'FAILED':<6} {rel} (redirect)")
                    for p in problems:
                        print(f"         {p}")
                    failures += bool(problems)
                    continue
                problems, notes = [], []
                for width in WIDTHS:
                    page = browser.new_page(viewport={"width": width, "height": 900})
                    events: list[str] = []
                    page.on("console", lambda m, ev=events: ev.append(f"console {m.type}: {m.text[:160]}")
                            if m.type == "error" else None)
                    page.on("pageerror", lambda e, ev=events: ev.append(f"page error: {e}"))
                    page.on("requestfailed", lambda r, ev=events: ev.append(f"request failed: {r.url[:120]}"))
                    page.on("response", lambda r, ev=events: ev.append(f"HTTP {r.status}: {r.url[:120]}")
                            if r.status >= 400 else None)
                    page.goto(f"{base}/{rel}", wait_until="load")
                    page.evaluate("() => (window.MathJax && MathJax.startup && MathJax.startup.promise) || null")
                    page.wait_for_timeout(50)
                    found = page.evaluate(PAGE_PROBLEMS_JS) + page.evaluate(RAW_TEX_JS)
                    ov = page.evaluate(OVERFLOW_JS, ALLOWANCE_PX)
                    found += [f"{width} px: {o}" for o in ov["overflow"]]
                    if ov["page"] > ALLOWANCE_PX:
                        found.append(f"{width} px: the page scrolls sideways by {ov['page']} px")
                    totals[width]["overflow"] += len(ov["overflow"])
                    for kind, k in ov["scrolls"].items():
                        totals[width]["scrolls"][kind] = totals[width]["scrolls"].get(kind, 0) + k
                    if ov["scrolls"]:
                        notes.append(f"{width} px: scroll inside their own box: "
                                     + ", ".join(f"{k} {kind}" for kind, k in sorted(ov["scrolls"].items())))
                    if rel.endswith(".html") and not rel.startswith(("genindex", "search", "py-modindex")):
                        for what, prefix in (("repository", repo), ("issue tracker", repo + "/issues")):
                            if not page.evaluate("(p) => Array.from(document.links).some(a => a.href.startsWith(p))",
                                                 prefix):
                                found.append(f"{width} px: no link to the {what} ({prefix})")
                    if width == max(WIDTHS) and not rel.startswith("search"):
                        n_search = page.evaluate(VISIBLE_JS, SEARCH_FIELD)
                        if n_search > 1:
                            found.append(f"{width} px: {n_search} search fields are visible")
                    if args.screenshots:
                        out = Path(args.screenshots) / f"{rel.replace('/', '__').removesuffix('.html')}-{width}.png"
                        out.parent.mkdir(parents=True, exist_ok=True)
                        screenshot(page, out)
                    if width == min(WIDTHS):
                        found += drawer_problems(page, width)
                        if args.screenshots:
                            page.screenshot(path=str(out.with_name(out.stem + "-drawer.png")))
                    problems += events + [p for p in found if p not in problems]
                    page.close()
                problems += local_link_problems(root, page_path)
                status = "ok" if not problems else "FAILED"
                print(f"  {status:<6} {rel}")
                for p in problems + notes:
                    print(f"         {p}")
                failures += bool(problems)
            browser.close()
    finally:
        server.shutdown()
    for width in WIDTHS:
        scrolls = ", ".join(f"{k} {kind}" for kind, k in sorted(totals[width]["scrolls"].items())) or "none"
        print(f"overflow at {width} px (allowance {ALLOWANCE_PX} px): {totals[width]['overflow']} elements past the "
              f"column; boxes that scroll inside their own frame: {scrolls}")
    print(f"browser check: {len(pages)} pages, {failures} with problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
