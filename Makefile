# Two commands for a fresh machine (see README):
#   make demo   set up .venv and run the demo
#   make test   set up .venv and run the test suite
# On machines whose pip has a local CPU build of torch (TORCH_SPEC), set-up pins it, so no
# multi-GB CUDA download happens; elsewhere override: make test TORCH_SPEC="torch".

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint docs bench-smoke clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/modelbatch demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/mypy

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench-smoke: setup
	$(BIN)/modelbatch bench --arch mlp --models 1 4 --steps 3 --out bench_out

clean:
	rm -rf $(VENV) demo_out bench_out site .pytest_cache .ruff_cache .mypy_cache
