# Quick start: `make demo` runs the main job, `make test` the test suite. Both set up .venv first (idempotent).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fluxrt-installed

.PHONY: setup demo test

setup: $(STAMP)

# torch==2.13.0 resolves to the local CPU wheel on the CPU machines this project runs CI on; installing it
# first keeps pip from pulling the CUDA build as a dependency. Bring-your-own-torch users skip this file and
# run `pip install --no-build-isolation -e .` (README).
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -e '.[test,serve,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fluxrt generate --out out/demo.png --compare-reference

test: $(STAMP)
	$(PY) -m pytest -q
