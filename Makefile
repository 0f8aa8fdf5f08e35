# The few verbs a newcomer needs. Each one builds .venv first if it is missing or stale.
#   make compare   install, then run the main job (quantlab compare) on the embedded model
#   make test      install, lint, then run the whole test suite (what CI runs)
#   make lint      ruff (the version pinned in requirements.lock)
#   make test-gpu  the kernel tests compiled on a CUDA GPU, and the GPU-only tests
#   make lab       JupyterLab on the chapters in notebooks/
#   make book      build the Jupyter Book offline into book/_build/html
#   make book-check  build, then check every book page in headless Chromium (apt-get install
#                  chromium): figures, sliders, formulas; full-page shots in book/_build/shots
#   make lock      regenerate requirements.lock (UPGRADE=1: move every pin to its newest release)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.quantlab-installed
# Every package `pip install -e ".[dev]"` installs, pinned with sha256 hashes: torch and triton,
# ruff, the book's tools. `make install` installs exactly these, then quantlab itself.
LOCK ?= requirements.lock
# A torch requirement installed in place of the lock's torch (the CPU wheel), e.g. a CUDA build:
#   make install TORCH=torch==2.13.0      (PyPI's Linux wheel: CUDA 13, with its own triton 3.7.1)
#   make install TORCH=torch==2.13.0+cu128 PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128
# The triton that build brings replaces the lock's too; the rest of the lock still applies.
# .venv remembers it: later make runs reuse it, and `make install TORCH=` goes back to the lock's.
TORCH_FILE := $(VENV)/.quantlab-torch
ifeq ($(origin TORCH),undefined)
TORCH := $(shell cat $(TORCH_FILE) 2>/dev/null)
endif
# `make lock` only: the torch the lock pins, and the uv that resolves it.
LOCK_TORCH ?= torch==2.13.0
UV_VERSION ?= 0.13.9
LOCK_TOOLS := $(VENV)/.lock-tools
UV := $(LOCK_TOOLS)/bin/uv

.PHONY: install compare test test-gpu lint clean book book-check lab lock

install: $(STAMP)

# pip, in hash-checking mode, installs the lock (when TORCH is set: less torch, and less triton if
# that torch pins its own), then quantlab with no dependencies of its own (an editable install has
# no file to hash), built with the lock's setuptools. pip check confirms the set is consistent, and
# LOCK_COVERS_DEV that every requirement of quantlab[dev] is there (a dependency added to
# pyproject.toml without `make lock` fails here).
define TORCH_NEEDS_TRITON
import importlib.metadata as m, sys
sys.exit(not any(r.startswith("triton") for r in m.requires("torch") or ()))
endef
define LOCK_COVERS_DEV
import importlib.metadata as m, sys
from packaging.requirements import Requirement
todo, seen, missing = [("quantlab", "dev")], set(), []
while todo:
    name, extra = todo.pop()
    seen.add((name, extra))
    for r in map(Requirement, m.requires(name) or ()):
        if r.marker and not r.marker.evaluate({"extra": extra}):
            continue
        try:
            have = m.version(r.name)
        except m.PackageNotFoundError:
            have = None
        if have is None or not r.specifier.contains(have, prereleases=True):
            missing.append(f"{r} (installed: {have})")
        todo += [(r.name, e) for e in r.extras if (r.name, e) not in seen]
if missing:
    sys.exit("not in the lock, run make lock: " + "; ".join(missing))
endef
export TORCH_NEEDS_TRITON LOCK_COVERS_DEV
$(STAMP): pyproject.toml $(LOCK) $(TORCH_FILE)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifneq ($(strip $(TORCH)),)
	$(PY) -m pip install -q "$(TORCH)"
	if $(PY) -c "$$TORCH_NEEDS_TRITON"; then drop='torch|triton'; else drop=torch; fi; \
	awk -v drop="^($$drop)==" '$$0 ~ drop {s = 1} s {if ($$0 !~ /\\$$/) s = 0; next} {print}' \
	  $(LOCK) > $(VENV)/lock.txt
else
	cp $(LOCK) $(VENV)/lock.txt
endif
	$(PY) -m pip install -q --require-hashes -r $(VENV)/lock.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	$(PY) -c "$$LOCK_COVERS_DEV"
	touch $(STAMP)

# Rewritten only when TORCH changes, so that a new TORCH reinstalls and the same one does not.
$(TORCH_FILE): FORCE
	@mkdir -p $(VENV)
	@[ -f $@ ] && [ "$$(cat $@)" = "$(TORCH)" ] || echo "$(TORCH)" > $@

FORCE:

compare: $(STAMP)
	$(VENV)/bin/quantlab compare

# Idle OpenMP threads that busy-wait slow every other process on a small machine.
export OMP_WAIT_POLICY ?= PASSIVE

# The unit tests, then every chapter through nbval (tests/nbval, generated from notebooks/ by
# scripts/nbval_notebooks.py): a chapter fails on any error, its assert cells included, and on a
# `# NBVAL_CHECK_OUTPUT` cell whose printout differs from the stored one. --dist loadfile keeps
# each chapter's cells on one worker, in order.
test: $(STAMP) lint
	$(PY) -m pytest -q -n 2
	$(PY) -m pytest -q -n 2 --dist loadfile --nbval-lax --nbval-sanitize-with tests/nbval/sanitize.cfg tests/nbval

lint: $(STAMP)
	$(VENV)/bin/ruff check quantlab tests scripts

# On a machine with a CUDA GPU (and a CUDA torch: make install TORCH=...): every Triton kernel
# test compiled, and the tests that need a GPU. Run it before any benchmark.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m "gpu or kernels" -p no:cacheprovider

book: $(STAMP)
	PYTHON=$(PY) scripts/build_book.sh

book-check: book
	$(PY) scripts/check_book.py

# JupyterLab refuses to run as root without --allow-root (CI machines and containers run as root).
# LAB_ARGS passes more options, e.g. make lab LAB_ARGS=--no-browser.
LAB_ARGS ?=
lab: $(STAMP)
	$(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS) notebooks/

# uv resolves the lock for this machine's Python (3.11, Linux x86_64 in CI) from the sources pip
# uses here (uv does not read pip's configuration): the CPU torch wheel in find-links and any
# local index, besides PyPI. The pins already in the lock are kept unless UPGRADE=1.
pip_conf = $(shell $(PYTHON) -m pip config get global.$(1) 2>/dev/null)
LOCK_SOURCES = $(foreach u,$(sort $(PIP_INDEX_URL) $(call pip_conf,index-url)),--index-url $(u)) \
  $(foreach u,$(sort $(PIP_EXTRA_INDEX_URL) $(call pip_conf,extra-index-url)),--extra-index-url $(u)) \
  $(foreach u,$(sort $(PIP_FIND_LINKS) $(call pip_conf,find-links)),--find-links $(u))

$(UV):
	$(PYTHON) -m venv $(LOCK_TOOLS)
	$(LOCK_TOOLS)/bin/pip install -q "uv==$(UV_VERSION)"

lock: $(UV)
	if [ -f $(LOCK) ]; then cp $(LOCK) $(LOCK_TOOLS)/lock.txt; else rm -f $(LOCK_TOOLS)/lock.txt; fi
	echo "$(LOCK_TORCH)" | $(UV) pip compile pyproject.toml --extra dev --constraints - \
	  --output-file $(LOCK_TOOLS)/lock.txt --generate-hashes --python $(PYTHON) \
	  --index-strategy unsafe-best-match $(LOCK_SOURCES) $(if $(UPGRADE),--upgrade) \
	  --custom-compile-command "make lock" --quiet
	{ echo "# Installed by make install: pip install --require-hashes -r $(LOCK), then"; \
	  echo "# pip install --no-deps -e . (an editable install cannot be hash-checked). For Linux"; \
	  echo "# x86_64 and Python 3.11; $(LOCK_TORCH) resolves to the CPU wheel pip finds on this"; \
	  echo "# machine's disk (make TORCH=... installs another build in its place)."; \
	  cat $(LOCK_TOOLS)/lock.txt; } > $(LOCK)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
