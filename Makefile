# Quick start: `make run` trains, `make test` tests. Both set up what they need:
# a virtualenv with pinned packages (constraints.txt) and the offline datasets.
PYTHON ?= python3
VENV   ?= .venv
ARGS   ?=
PYTEST_ARGS ?=
# one pytest worker per core (pytest-xdist), each single-threaded (tests/conftest.py); a module's tests stay on one
# worker, so its module-scoped runs are made once. PYTEST_WORKERS=0 runs the suite in this process.
PYTEST_WORKERS ?= auto
PYTEST := $(VENV)/bin/python -m pytest -n $(PYTEST_WORKERS) --dist loadscope
FASHION_MNIST := /usr/share/datasets/fashion-mnist
JARGON := /usr/share/doc/jargon-text/jargon.txt.gz

.PHONY: run test test-fast test-unit lint setup data test-tools clean

run: setup data
	$(VENV)/bin/mptrain model=resnet precision=mixed $(ARGS)

test: setup data test-tools lint
	$(PYTEST) $(PYTEST_ARGS)

test-fast: setup data lint
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

# in-process tests only (no console-script subprocesses): the quick loop while editing
test-unit: setup
	$(PYTEST) -m "not slow and not e2e" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(VENV)/bin/python -m pip install --quiet -e '.[test,sweep,lowp,docs,timm,hf,detection,speech,translation]'
	touch $@

# Real data offline: Debian's dataset-fashion-mnist (images) and jargon-text (the
# Jargon File, for the language model), espeak-ng (the speech family speaks the translation
# catalogs' sentences with it), and the packages whose translation catalogs form the translation family's
# corpus (mptrain/data/catalog_packages.txt: the same corpus on every machine). Without root or apt, mptrain still looks in
# dataset.root / dataset.path and says how to fix what is missing. The tests also use
# Debian's chromium (the report's HTML is rendered headless; that test skips without it).
DATA_PACKAGES := $(if $(wildcard $(FASHION_MNIST)),,dataset-fashion-mnist) $(if $(wildcard $(JARGON)),,jargon-text) \
                 $(if $(wildcard /usr/bin/espeak-ng),,espeak-ng) $(MISSING_CATALOG_PACKAGES)
CATALOG_PACKAGES := $(shell sed -n 's/^\([a-z0-9.+-]*\):.*/\1/p' mptrain/data/catalog_packages.txt)
MISSING_CATALOG_PACKAGES := $(shell command -v dpkg-query >/dev/null && for p in $(CATALOG_PACKAGES); do \
                              dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done)
TEST_PACKAGES := $(if $(wildcard /usr/bin/chromium),,chromium)

# $(call apt_install,packages,what goes without them)
define apt_install
	@if [ -n "$(strip $(1))" ]; then \
	  cmd='apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(strip $(1))'; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (sh -c "$$cmd") >/dev/null || echo "note: apt-get could not install $(strip $(1)); $(2)"; \
	  elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
	    (sudo sh -c "$$cmd") >/dev/null || echo "note: apt-get could not install $(strip $(1)); $(2)"; \
	  else \
	    echo "note: $(strip $(1)) missing and apt-get unavailable; $(2)"; \
	  fi; \
	fi
endef

data:
	$(call apt_install,$(DATA_PACKAGES),mptrain will say how to get the data)

test-tools:
	$(call apt_install,$(TEST_PACKAGES),the headless-browser test will skip)

clean:
	rm -rf $(VENV) runs multirun outputs .pytest_cache
