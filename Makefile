# diffray: `make demo` (train -> export -> image grid) and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.diffray-installed
PYTEST_ARGS ?=

.PHONY: setup browser-deps demo test test-slow test-all test-eval eval bench clean

setup: $(STAMP)

# torch first (the CPU build on this disk; a plain `torch` would pull a multi-GB CUDA build), then the project.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Debian's chromium + chromium-driver for the playground's browser test (tests/e2e/test_playground.py skips
# without them); nothing is downloaded by Selenium. Does nothing when both are already installed.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
	  echo "chromium and chromedriver present"; \
	else \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium chromium-driver; \
	fi

# Trains configs/demo.yaml (the pretrained world model learns the star it never saw, as a LoRA; a rerun
# resumes the finished run, `make clean` starts over), renders outputs/demo_grid.png (base rows, then
# adapter rows, same seeds) and scores star prompts base vs adapter (outputs/demo_eval/).
demo: setup
	$(BIN)/diffray demo --config configs/demo.yaml --out-dir outputs

test: setup
	$(BIN)/python -m pytest tests -m "not slow and not gpu and not eval" --durations=30 $(PYTEST_ARGS)

# The long cases (option matrix, every shipped config end to end); CI runs them after `test`.
test-slow: setup
	$(BIN)/python -m pytest tests -m "slow and not gpu and not eval" --durations=30 $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest tests -m "not gpu and not eval" $(PYTEST_ARGS)

# Quality matrices: more seeds of cases the suites above run once (e.g. DDPO's JPEG rewards over 3 seeds).
# Not in CI (they cost minutes and prove robustness, not that the code path works).
test-eval: setup
	$(BIN)/python -m pytest tests -m "eval and not gpu" --durations=10 $(PYTEST_ARGS)

# Every method's quality figure on the tiny world (evals/methods.py): trains each shipped config on builtin:tiny,
# scores base vs trained with `diffray eval`, writes EVALS.md, EVALS.json and docs/img/evals/*.png. About 85 min
# on 2 CPUs; not in CI (CI runs one row at smoke size). A rerun reuses finished runs (outputs/evals/runs).
eval: setup
	$(BIN)/python evals/methods.py

bench: setup
	$(BIN)/python benchmarks/train_overhead.py
	$(BIN)/python benchmarks/train_overhead.py --paired
	$(BIN)/python benchmarks/zero_step.py
	$(BIN)/python benchmarks/hotswap.py
	$(BIN)/python benchmarks/latent_cache.py
	$(BIN)/python benchmarks/ddpo_overlap.py
	$(BIN)/python benchmarks/serve.py
	$(BIN)/python benchmarks/serve_edge.py
	$(BIN)/python benchmarks/tune_schedulers.py
	$(BIN)/python benchmarks/memory.py

clean:
	rm -rf runs outputs .pytest_cache
