# Fresh-clone entry points: `make demo` (the main job) and `make test` (the suite).
# Each sets up its own virtualenv; torch/torchvision come pinned from constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tvtool-installed

# `make test` is the full suite (what CI runs); `make test-fast` skips @pytest.mark.slow (local work).
.PHONY: demo test test-fast lint completions bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tvtool demo

test: $(STAMP)
	$(BIN)/ruff check tvtool tests bench
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/ruff check tvtool tests bench
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -m "not slow" -n auto

lint: $(STAMP)
	$(BIN)/ruff check tvtool tests bench

completions: $(STAMP)
	$(BIN)/python -m tvtool.cli.completions

bench: $(STAMP)
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/merge.py
	$(BIN)/python bench/compose.py
	$(BIN)/python bench/zoo.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache tvtool-demo
