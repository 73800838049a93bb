# Quick start: `make run` trains, `make test` tests. Both set up what they need:
# a virtualenv with pinned packages (constraints.txt) and the offline Fashion-MNIST.
PYTHON ?= python3
VENV   ?= .venv
ARGS   ?=
PYTEST_ARGS ?=
FASHION_MNIST := /usr/share/datasets/fashion-mnist

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

# Real data offline: Debian's dataset-fashion-mnist. Without root or apt, mptrain
# still looks in dataset.root and tries torchvision's download, and says how to fix it.
data:
	@if [ ! -d $(FASHION_MNIST) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
	      || echo "note: apt-get could not install dataset-fashion-mnist; mptrain will say how to get the data"; \
	  elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
	    (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
	      || echo "note: apt-get could not install dataset-fashion-mnist; mptrain will say how to get the data"; \
	  else \
	    echo "note: $(FASHION_MNIST) missing and apt-get unavailable; put the idx files in dataset.root"; \
	  fi; \
	fi

clean:
	rm -rf $(VENV) runs multirun outputs .pytest_cache
