# The few verbs a newcomer needs. Each one builds .venv first if it is missing or stale.
#   make compare   install, then run the main job (quantlab compare) on the embedded model
#   make test      install, then run the whole test suite (what CI runs)
#   make lint      ruff
#   make lab       JupyterLab on the chapters in notebooks/
#   make book      build the Jupyter Book offline into book/_build/html
#   make book-check  open every book page in headless Chromium (apt-get install chromium)
# TORCH is the torch requirement installed before the project (override for a CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.quantlab-installed

.PHONY: install compare test lint clean book book-check lab

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

compare: $(STAMP)
	$(VENV)/bin/quantlab compare

# Idle OpenMP threads that busy-wait slow every other process on a small machine.
export OMP_WAIT_POLICY ?= PASSIVE

test: $(STAMP)
	$(PY) -m pytest -q -n 2

lint: $(STAMP)
	$(VENV)/bin/ruff check quantlab tests

book: $(STAMP)
	PYTHON=$(PY) scripts/build_book.sh

book-check: book
	$(PY) scripts/check_book.py

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
