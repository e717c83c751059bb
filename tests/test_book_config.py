"""The book's configuration: one repository URL, theme options merged rather than replaced, chapter numbering."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
sys.path.insert(0, str(ROOT / "book" / "_ext"))
from rl4llm_book import chapter_number  # noqa: E402


def test_theme_options_are_merged_into_what_jupyter_book_generates():
    # Jupyter Book writes html_theme_options from `repository:` and `html:`; a `sphinx.config.html_theme_options`
    # replaces them (no repository button, no issue link) unless the update is recursive.
    sphinx = CONFIG["sphinx"]
    if "html_theme_options" in sphinx.get("config", {}):
        assert sphinx.get("recursive_update") is True
        assert "repository_url" not in sphinx["config"]["html_theme_options"], "the URL belongs in repository.url"
    assert CONFIG["html"]["use_repository_button"] and CONFIG["html"]["use_issues_button"]


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.md")) + [ROOT / "README.md",
                                                                               ROOT / "book" / "how_to_run.md"],
                         ids=lambda p: p.name)
def test_install_lines_use_the_configured_repository(path):
    url = CONFIG["repository"]["url"].rstrip("/")
    text = path.read_text()
    installs = re.findall(r"git\+(https://[^\"` ]+)", text)
    assert installs, f"{path.name} does not say how to install rl4llm"
    assert set(installs) == {url}, f"{path.name} installs from {installs}, _config.yml says {url}"


def test_every_notebook_says_how_to_get_rl4llm_before_its_first_code_cell():
    for md in sorted((ROOT / "notebooks").glob("*.md")):
        text = md.read_text()
        assert text.index("pip install") < text.index("```{code-cell}"), md.name


def test_chapters_are_numbered_by_their_file_name():
    assert chapter_number("notebooks/12_dpo") == 12
    assert chapter_number("notebooks/05_policy_gradient") == 5
    assert chapter_number("book/errata") is None
