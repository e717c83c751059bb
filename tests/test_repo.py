"""Invariants of the repository itself: pinned environments agree, every notebook is paired and in the book."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from notebook_code import extract_cells  # noqa: E402


def pyproject_requirements() -> dict[str, Requirement]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(data["dependencies"]) + [r for extra in data["optional-dependencies"].values() for r in extra]
    return {Requirement(r).name.lower(): Requirement(r) for r in reqs}


def environment_requirements() -> dict[str, Requirement]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {Requirement(r).name.lower(): Requirement(r) for r in pip if not r.startswith("-e")}


def makefile_torch() -> Requirement:
    m = re.search(r"^TORCH \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "Makefile must define TORCH ?= <requirement>"
    return Requirement(m.group(1))


def test_environment_yml_and_pyproject_name_the_same_packages():
    py, env = pyproject_requirements(), environment_requirements()
    assert sorted(py) == sorted(env), "packages differ between pyproject.toml and environment.yml"
    for name, req in py.items():
        if name == "torch":
            continue
        assert str(req.specifier) == str(env[name].specifier), f"{name}: {req.specifier} vs {env[name].specifier}"


def test_torch_pin_is_the_makefile_default_and_satisfies_the_package_range():
    torch_default = makefile_torch()
    env_torch = environment_requirements()["torch"]
    assert str(env_torch.specifier) == str(torch_default.specifier)
    version = str(torch_default.specifier).removeprefix("==")
    assert pyproject_requirements()["torch"].specifier.contains(version)


def test_every_direct_dependency_is_pinned_exactly():
    for name, req in pyproject_requirements().items():
        if name != "torch":
            assert str(req.specifier).startswith("=="), f"{name} is not pinned: {req}"


def test_constraints_agree_with_direct_pins():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            pins[req.name.lower().replace("_", "-")] = str(req.specifier)
    assert "torch" not in pins, "torch is chosen by the TORCH make variable, not by constraints.txt"
    for name, req in pyproject_requirements().items():
        if name != "torch":
            assert pins.get(name) == str(req.specifier), f"constraints.txt disagrees on {name}"


def test_jupyter_book_is_version_1():
    assert pyproject_requirements()["jupyter-book"].specifier.contains("1.0.4.post1")
    assert not pyproject_requirements()["jupyter-book"].specifier.contains("2.0.0")


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [ch["file"] for ch in part["chapters"]]
    return files


def test_every_notebook_is_paired_and_in_the_toc():
    sources = sorted(p.stem for p in (ROOT / "notebooks").glob("*.md"))
    twins = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert sources == twins, "every notebooks/X.md needs an executed notebooks/X.ipynb and vice versa"
    in_toc = sorted(f.removeprefix("notebooks/") for f in toc_files() if f.startswith("notebooks/"))
    assert in_toc == sources, "the table of contents must list exactly the notebooks that exist"


def planned_chapters() -> set[str]:
    """The chapter names of the plan in CONTRIBUTING.md's "Table of contents" section."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    section = text.split("## Table of contents", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"\b(?:\d\d|app[A-Z])_[a-z_]+\b", section))


def test_the_plan_is_in_the_repository():
    planned = planned_chapters()
    chapters = {p for p in planned if p[:2].isdigit()}
    assert len(chapters) == 13 and {"05_policy_gradient", "13_grpo"} <= chapters, sorted(planned)
    assert {"appA_off_policy", "appB_soft_policy_iteration"} <= planned, sorted(planned)


def test_contributing_guide_lists_every_module():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    for path in (ROOT / "src" / "rl4llm").glob("*.py"):
        if path.stem != "__init__":
            assert re.search(rf"\b{path.stem}\b", text), f"CONTRIBUTING.md's layout does not mention {path.stem}"


def test_toc_entries_exist_and_chapter_numbers_follow_the_plan():
    planned = planned_chapters()
    for f in toc_files():
        assert any((ROOT / f).with_suffix(s).exists() for s in (".md", ".ipynb")), f"{f} is in _toc.yml but missing"
        if f.startswith("notebooks/"):
            assert f.removeprefix("notebooks/") in planned, f"{f} is not a chapter of the plan in CONTRIBUTING.md"


@pytest.mark.parametrize("md", sorted((ROOT / "notebooks").glob("*.md")), ids=lambda p: p.name)
def test_notebook_sources_are_myst_paired_and_extractable(md):
    text = md.read_text()
    assert "formats: ipynb,md:myst" in text
    cells = extract_cells(text)
    assert cells, "a chapter without code cells"
    for code in cells:
        compile(code, str(md), "exec")  # plain Python: `make gpu-check` runs it without Jupyter


def test_code_cell_extraction_drops_options():
    text = ("x\n```{code-cell} ipython3\n:tags: [hide-input]\n\na = 1\n```\n\n"
            "```{code-cell} ipython3\n---\ntags: [x]\n---\nb = 2\n```\n")
    assert extract_cells(text) == ["\na = 1", "b = 2"]


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    assert "make test" in (ROOT / "README.md").read_text()


# Calls that draw from torch's global random generator when no ``generator=`` is passed. Since torch 2.x seeds
# that generator differently in every process, a notebook that uses one of these before ``torch.manual_seed``
# produces different outputs on every run, and nbval then fails at random.
GLOBAL_RNG_CALL = re.compile(
    r"\b(?:PolicyNet|ValueNet|TinyLM|ScalarModel|nn\.Linear|nn\.Embedding)\(|"
    r"\btorch\.(?:randn|rand|randint|randperm|normal|multinomial|bernoulli)\(|\.(?:normal_|uniform_|random_)\(")


def first_unseeded_global_draw(code: str) -> str | None:
    """The first line of ``code`` that draws from the global generator before any ``torch.manual_seed``."""
    for line in code.splitlines():
        stripped = line.split("#")[0]
        if "torch.manual_seed(" in stripped:
            return None
        if GLOBAL_RNG_CALL.search(stripped) and "generator=" not in stripped:
            return line.strip()
    return None


def test_seed_check_catches_unseeded_draws():
    assert first_unseeded_global_draw("import torch\npolicy = PolicyNet(4, 2, 16)\n") == "policy = PolicyNet(4, 2, 16)"
    assert first_unseeded_global_draw("x = torch.randn(3, 4)") == "x = torch.randn(3, 4)"
    assert first_unseeded_global_draw("torch.manual_seed(0)\nnet = TinyLM(cfg)\nx = torch.rand(2)") is None
    assert first_unseeded_global_draw("x = torch.randn(3, generator=g)\n# PolicyNet(4, 2)\n") is None


@pytest.mark.parametrize("md", sorted((ROOT / "notebooks").glob("*.md")), ids=lambda p: p.name)
def test_notebooks_seed_the_global_generator_before_drawing_from_it(md):
    line = first_unseeded_global_draw("\n".join(extract_cells(md.read_text())))
    assert line is None, f"{md.name} draws from torch's global generator before torch.manual_seed: {line!r}"


def _bib_entries() -> dict[str, str]:
    """The raw text of each entry of the bibliography, keyed by citation key, checking braces as it reads."""
    text = (ROOT / "book" / "references.bib").read_text()
    entries: dict[str, str] = {}
    for chunk in re.split(r"\n(?=@)", "\n" + text):
        if not chunk.strip():
            continue
        m = re.match(r"@\w+\{([^,\s]+),", chunk)
        assert m, f"references.bib: cannot read the entry starting {chunk[:60]!r}"
        key = m.group(1)
        assert key not in entries, f"references.bib: {key} appears twice"
        depth = 0
        for ch in chunk:
            depth += (ch == "{") - (ch == "}")
            assert depth >= 0, f"references.bib: {key} closes a brace it never opened"
        assert depth == 0, f"references.bib: {key} leaves {depth} brace(s) open (a missing closing '}}')"
        entries[key] = chunk
    return entries


def test_bibliography_entries_are_closed_and_every_citation_resolves():
    entries = _bib_entries()
    for key, chunk in entries.items():
        assert re.search(r"^\s*year\s*=", chunk, re.M), f"references.bib: {key} has no year"
        assert "$" not in chunk, f"references.bib: {key} has TeX math, which the bibliography shows as raw text"
    cited = set()
    for path in [*ROOT.glob("notebooks/*.md"), *ROOT.glob("book/*.md")]:
        for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", path.read_text()):
            cited |= {k.strip() for k in group.split(",")}
    missing = sorted(cited - entries.keys())
    assert not missing, f"cited but not in references.bib: {missing}"


def test_bibliography_check_catches_an_unclosed_entry(tmp_path, monkeypatch):
    bib = (ROOT / "book" / "references.bib").read_text()
    broken = bib.replace("\n}\n", "\n", 1)  # drop one entry's closing brace, as a careless merge would
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "references.bib").write_text(broken)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="brace"):
        _bib_entries()
