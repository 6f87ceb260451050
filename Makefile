# diffray: `make demo` (train -> export -> image grid) and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.diffray-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

# torch first (the CPU build on this disk; a plain `torch` would pull a multi-GB CUDA build), then the project.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	@mkdir -p outputs
	$(BIN)/diffray train configs/lora.yaml
	$(BIN)/diffray generate --adapter runs/lora-sample/artifact --compare-base --num-images 4 --steps 20 \
	    -p "a red circle on a blue background" -p "a green square on a white background" \
	    --out outputs/demo_grid.png

test: setup
	$(BIN)/python -m pytest tests -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest tests -m "not gpu" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/train_overhead.py

clean:
	rm -rf runs outputs .pytest_cache
