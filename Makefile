# hybrid_megatron: `make demo` trains the tiny intra-layer MoE hybrid on CPU; `make test` runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch for this machine class; GPU clusters use the Dockerfile instead.
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo lint test test-long test-fast gpu-test clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) launch/slurm.py recipes/intra_tiny_moe.yaml --local --nproc 2

# ruff's lint rules and formatting, and mypy over the package (settings in pyproject.toml).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The suite, under 20 minutes on 2 cores; the few tests marked long run in `make test-long`.
test: install
	$(PY) -m pytest -m "not long" $(PYTEST_ARGS)

# End-to-end multi-run scripts, several minutes each (CI runs them after `make test`).
test-long: install
	$(PY) -m pytest -m long $(PYTEST_ARGS)

# Skips the tests marked slow or long (multi-rank equivalence sweeps, SLURM cluster).
test-fast: install
	$(PY) -m pytest -m "not slow and not long" $(PYTEST_ARGS)

# On a CUDA machine with TE + mamba-ssm installed.
gpu-test:
	python3 -m pytest -m gpu -v

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
