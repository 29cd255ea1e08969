# Quickstart: `make demo` (set up and plan the bundled default recipe), `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test lint bench bench-scale docs clean

$(VENV)/.base: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

# CPU torch and megatron-core 0.16.1 are what the parity tests run Megatron's own code with.
$(VENV)/.dev: $(VENV)/.base
	$(PIP) -e '.[dev]' torch==2.13.0 megatron-core==0.16.1
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/megacpp plan

test: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(VENV)/.base
	$(PY) benchmarks/bench_search.py

# NVIDIA's published at-scale runs, planned with their layouts pinned (a few minutes on two cores)
bench-scale: $(VENV)/.base
	$(PY) -m benchmarks.scale.run

# the command reference, generated from the typer app (tests/test_docs.py keeps it current)
docs: $(VENV)/.base
	$(PY) -m megacpp.runtime.cli.docs > docs/cli.md.tmp && mv docs/cli.md.tmp docs/cli.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache .hypothesis
