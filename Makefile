# Quick start: `make demo` runs the main job, `make test` the test suite. Both set up .venv first (idempotent).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fluxrt-installed

.PHONY: setup demo test browser

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

# The web page's tests (tests/test_serve_page.py) drive Debian's headless Chromium. As root with apt-get (CI) it is
# installed here, and a browser still missing then fails those tests instead of skipping them; without root they
# skip, and this says so.
CAN_APT := $(shell [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && echo 1)
FLUXRT_REQUIRE_BROWSER ?= $(CAN_APT)

browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$(CAN_APT)" = 1 ]; then \
	  echo "make: installing chromium and chromium-driver (apt) for the web page's browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
	  || { echo "make: apt-get could not install chromium chromium-driver (its error is above)"; exit 1; }; \
	else \
	  echo "make: no chromium/chromedriver and not root with apt-get: the browser tests will skip" \
	    "(install them: apt-get install chromium chromium-driver)"; \
	fi

test: $(STAMP) browser
	FLUXRT_REQUIRE_BROWSER=$(FLUXRT_REQUIRE_BROWSER) $(PY) -m pytest -q
