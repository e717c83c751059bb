"""Open every page of the built book in headless Chromium and check what a reader would see.

A page fails when it has math that MathJax did not typeset (a ``.math`` element without output, or raw
``\\(``, ``\\[``, ``$$`` left in the visible text), an image that did not load, a link to a local file that does
not exist, a failed request, or a console error.

    python tools/check_book.py _build/html [--screenshots DIR]

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

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

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
                page = browser.new_page(viewport={"width": 1280, "height": 900})
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
                problems = events + page.evaluate(PAGE_PROBLEMS_JS) + local_link_problems(root, page_path)
                if args.screenshots:
                    out = Path(args.screenshots) / (rel.replace("/", "__").removesuffix(".html") + ".png")
                    out.parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(out), full_page=True)
                page.close()
                status = "ok" if not problems else "FAILED"
                print(f"  {status:<6} {rel}")
                for p in problems:
                    print(f"         {p}")
                failures += bool(problems)
            browser.close()
    finally:
        server.shutdown()
    print(f"browser check: {len(pages)} pages, {failures} with problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
