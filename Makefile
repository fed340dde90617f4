# Quick start: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; installed only when no torch is present in the venv.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench docs clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(PY) -m pyro_diffusion demo

test: install
	$(PY) -m pytest -q -ra --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(PY) -m ruff check pyro_diffusion tests bench scripts

bench: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/sampling.py

docs: install
	$(PY) -m pip install -q -e ".[docs]"
	$(PY) -m sphinx -W -q -b html docs docs/_build/html

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
