# Two front-door commands: `make demo` and `make test`. Both create (or reuse) .venv
# and install torch==2.13.0 there only if torch is not importable: never an unpinned torch.
# The install runs once: it is redone only when pyproject.toml changes (a stamp file in .venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
# Where torch comes from: pip's configured index unless set, e.g.
# `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu` for the CPU-only build.
TORCH_INDEX ?=
STAMP := $(VENV)/.recm_opt-installed
# One torch thread: the demo's and the tests' models are small, and torch's default of one
# thread per core thrashes when the cores are shared (a demo step: 357 ms at 2 threads with one
# other busy process on 2 cores, 17.9 ms at 1). Override with `make demo THREADS=2`.
THREADS ?= 1
export OMP_NUM_THREADS := $(THREADS)

.PHONY: setup demo test docs lint clean

$(BIN)/python:
	@echo "==> creating $(VENV)"
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || { \
		echo "==> installing $(TORCH_PIN) $(if $(TORCH_INDEX),from $(TORCH_INDEX),from pip's index): the largest download"; \
		$(BIN)/pip install --progress-bar on "$(TORCH_PIN)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)"); }
	@echo "==> installing recm_opt (editable) with the test, docs, e3nn, plot and progress extras: a few minutes the first time"
	$(BIN)/pip install --progress-bar on -e ".[test,docs,e3nn,plot,progress]" | grep -v "^Requirement already satisfied" || true
	@$(BIN)/python -c "import recm_opt, pytest, mkdocs" && touch $(STAMP)
	@echo "==> $(VENV) is ready (remove $(STAMP) to reinstall)"

setup: $(STAMP)

demo: setup
	$(BIN)/python examples/demo.py --threads $(THREADS)

test: setup
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

# The documentation site (mkdocs + mkdocstrings), warnings as errors, into site/. It opens from disk
# (site/index.html) with no server and no network.
docs: setup
	$(BIN)/mkdocs build --strict --site-dir site

lint: setup
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/ruff check recm_opt examples benchmarks tests docs
	$(BIN)/mypy recm_opt

clean:
	rm -rf $(VENV) outputs .pytest_cache site build dist
