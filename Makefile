# Quick start: `make run` trains, `make test` tests. Both set up what they need:
# a virtualenv with pinned packages (constraints.txt) and the offline datasets.
PYTHON ?= python3
VENV   ?= .venv
ARGS   ?=
PYTEST_ARGS ?=
FASHION_MNIST := /usr/share/datasets/fashion-mnist
JARGON := /usr/share/doc/jargon-text/jargon.txt.gz

.PHONY: run test test-fast setup data clean

run: setup data
	$(VENV)/bin/mptrain model=resnet precision=mixed $(ARGS)

test: setup data
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-fast: setup data
	$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $@

# Real data offline: Debian's dataset-fashion-mnist (images) and jargon-text (the
# Jargon File, for the language model). Without root or apt, mptrain still looks in
# dataset.root / dataset.path and says how to fix what is missing.
DATA_PACKAGES := $(if $(wildcard $(FASHION_MNIST)),,dataset-fashion-mnist) $(if $(wildcard $(JARGON)),,jargon-text)
APT_INSTALL = apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DATA_PACKAGES)

data:
	@if [ -n "$(strip $(DATA_PACKAGES))" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    ($(APT_INSTALL)) >/dev/null || echo "note: apt-get could not install $(DATA_PACKAGES); mptrain will say how to get the data"; \
	  elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
	    (sudo sh -c '$(APT_INSTALL)') >/dev/null || echo "note: apt-get could not install $(DATA_PACKAGES); mptrain will say how to get the data"; \
	  else \
	    echo "note: $(DATA_PACKAGES) missing and apt-get unavailable; see dataset.root / dataset.path"; \
	  fi; \
	fi

clean:
	rm -rf $(VENV) runs multirun outputs .pytest_cache
