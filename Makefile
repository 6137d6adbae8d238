# Two commands on a fresh machine:  `make run` (the main job: Knowledge Concentration on the default preset)
# and `make test` (the test suite).
# Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kc-installed
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)

.PHONY: install run test lint bench clean

$(STAMP): setup.py pyproject.toml requirements-dev.txt requirements-peers.txt $(CSRC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# a plain `pip install torch` would pull a multi-GB CUDA build: pin the CPU build when no torch is present
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	# the peers the compat tests compare with: without their declared dependencies (a CUDA torch)
	$(PY) -m pip install -q --no-deps -r requirements-peers.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m kc run

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy  # the core interfaces of kc_kernels ([tool.mypy] in pyproject.toml)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-enable

clean:
	rm -rf build *.egg-info kc_kernels/*.so
