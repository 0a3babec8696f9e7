# Two front-door commands: `make demo` and `make test`. Both create (or reuse) .venv
# and install torch==2.13.0 there only if torch is not importable: never an unpinned torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: setup demo test docs lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[test,docs,e3nn,plot,progress]"

demo: setup
	$(BIN)/python examples/demo.py

test: setup
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

# The documentation site (mkdocs + mkdocstrings), warnings as errors, into site/.
docs: setup
	$(BIN)/mkdocs build --strict --site-dir site

lint: setup
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/ruff check recm_opt examples benchmarks tests docs
	$(BIN)/mypy recm_opt

clean:
	rm -rf $(VENV) outputs .pytest_cache site build dist
