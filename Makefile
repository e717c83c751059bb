# Reinforcement learning for LLMs, derived and run.
#   make book   -> set up .venv + MathJax, build the HTML book, print where to open it
#   make test   -> set up, then run every check (unit tests, notebook pairs, nbval twice, book build, browser check)
# Other targets: setup, lab, serve, execute [NB=notebooks/05_policy_gradient.md], sync, mutate [NB=...], bench,
#   gpu-check, lint, clean.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
# The torch requirement installed before everything else. The default is the CPU wheel; for CUDA use e.g.
#   make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
# Notebooks run in parallel, one file per worker (pytest-xdist --dist loadfile); 2 matches the CI machine.
NBVAL_WORKERS ?= 2
VENV  ?= .venv
BIN   := $(VENV)/bin
PY    := $(BIN)/python
NB    ?= all
BUILD := _build
MATHJAX_SRC := node_modules/mathjax/es5
MATHJAX_DST := book/_static/mathjax
# JupyterLab is not needed to build or test the book; `make lab` installs this version into the environment.
JUPYTERLAB ?= jupyterlab==4.6.6
PORT ?= 8000

.PHONY: help setup book test unit pairs nbval nbval-avx2 build-book check-book browser-deps execute sync mutate bench \
        gpu-check lint lab serve clean

help:
	@sed -n '2,5p' Makefile

# --- set-up ------------------------------------------------------------------------------------------------
# The stamp depends on the files that define the environment, so editing a pin re-installs.
$(VENV)/.stamp: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is required"'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[book,test]"
	@touch $@

node_modules/.package-lock.json: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error

setup: $(VENV)/.stamp node_modules/.package-lock.json

# --- the book ----------------------------------------------------------------------------------------------
$(MATHJAX_DST)/tex-chtml-full.js: node_modules/.package-lock.json
	@rm -rf $(MATHJAX_DST) && mkdir -p $(dir $(MATHJAX_DST)) && cp -r $(MATHJAX_SRC) $(MATHJAX_DST)

build-book: setup $(MATHJAX_DST)/tex-chtml-full.js
	@rm -rf $(BUILD)/html $(BUILD)/.doctrees $(BUILD)/jupyter_execute
	$(BIN)/jupyter-book build . --builder html -W --keep-going
	$(PY) tools/check_html.py $(BUILD)/html

book: build-book
	@echo "Open the book at: file://$(abspath $(BUILD)/html/index.html)  (or run make serve, for search excerpts)"

# Serve the built book over http: the search page shows excerpts only when the pages are fetched over http.
serve:
	@test -f $(BUILD)/html/index.html || { echo "no built book: run make book first"; exit 1; }
	@echo "Serving the book at http://127.0.0.1:$(PORT)/ (Ctrl-C stops)"
	$(PY) -m http.server --bind 127.0.0.1 --directory $(BUILD)/html $(PORT)

# --- working on the notebooks --------------------------------------------------------------------------------
# JupyterLab in the project's environment, opened on notebooks/ (jupytext pairs each .md with its .ipynb).
$(VENV)/.lab-stamp: $(VENV)/.stamp
	$(PY) -m pip install --quiet -c constraints.txt "$(JUPYTERLAB)"
	@touch $@

lab: $(VENV)/.lab-stamp
	$(BIN)/jupyter lab notebooks

# --- checks ------------------------------------------------------------------------------------------------
lint: setup
	$(BIN)/ruff check src tests tools benchmarks
	$(PY) tools/lint_md.py

unit: setup
	$(PY) -m pytest tests -q

pairs: setup
	$(PY) tools/check_pairs.py

nbval: setup
	RL4LLM_DEVICE=cpu PYTHONHASHSEED=0 \
	  $(PY) -m pytest -p tools.nbtimes --nbval --nbval-sanitize-with tools/nbval_sanitize.cfg \
	  --nbval-cell-timeout=600 -n $(NBVAL_WORKERS) --dist loadfile notebooks -q

# The same run with PyTorch, MKL and oneDNN held to their AVX2 kernels: on an AVX-512 machine this rounds like an
# AVX2-only one, so a cell whose compared output depends on the processor fails here instead of on someone else's.
nbval-avx2:
	@if [ "$$(uname -m)" != x86_64 ]; then echo "nbval-avx2: skipped (the AVX2 kernels exist on x86-64 only)"; \
	else ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 $(MAKE) --no-print-directory nbval; fi

browser-deps:
	@if ! command -v chromium >/dev/null 2>&1 && [ "$${CI:-}" = "true" ]; then \
	  echo "CI: installing Debian's chromium for the browser check"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi

check-book: browser-deps
	$(PY) tools/check_book.py $(BUILD)/html

test: setup
	@$(PY) tools/stage.py "lint"            -- $(MAKE) --no-print-directory lint
	@$(PY) tools/stage.py "unit tests"      -- $(MAKE) --no-print-directory unit
	@$(PY) tools/stage.py "notebook pairs"  -- $(MAKE) --no-print-directory pairs
	@$(PY) tools/stage.py "nbval"           -- $(MAKE) --no-print-directory nbval
	@$(PY) tools/stage.py "nbval, AVX2"     -- $(MAKE) --no-print-directory nbval-avx2
	@$(PY) tools/stage.py "book build"      -- $(MAKE) --no-print-directory build-book
	@$(PY) tools/stage.py "browser check"   -- $(MAKE) --no-print-directory check-book
	@$(PY) tools/stage.py --summary

# --- notebooks ---------------------------------------------------------------------------------------------
# Re-execute notebooks deterministically on the CPU and write their .ipynb twins (NB=path/to/one.md or all).
execute: setup
	$(PY) tools/execute_notebooks.py $(if $(filter all,$(NB)),notebooks/*.md,$(NB))

# Bring the .ipynb inputs in line with edited .md sources, keeping outputs of unchanged cells.
sync: setup
	$(BIN)/jupytext --to ipynb --update notebooks/*.md

# Mutation check of the SymPy assertions (book/mutation.md): perturb each checked formula, report the survivors.
# Not part of `make test`; exits non-zero while a chapter has survivors not accepted in tools/mutants_equivalent.yml.
mutate: setup
	$(PY) tools/mutate.py $(if $(filter all,$(NB)),notebooks/*.md,$(NB)) --record book/mutation.md

# --- performance -------------------------------------------------------------------------------------------
bench: setup
	$(PY) tools/run_benchmarks.py --device cpu

# Runs every notebook's code and every benchmark on CUDA. Needs only torch, sympy, numpy and matplotlib,
# so it works on a GPU machine without Jupyter:  make gpu-check PY=python3
gpu-check:
	$(PY) tools/gpu_check.py

clean:
	rm -rf $(BUILD) $(MATHJAX_DST)
