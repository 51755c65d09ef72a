# The README's two set-up commands: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8000

.PHONY: install install-dev lock serve observe observe-down test test-fast lint typecheck clean

# pip as pinned here, not the one the Python came with: pip before 23.3 resolves a locked package
# again when another asks for it with an extra (pytest-cov's coverage[toml]), takes the newest
# release from the index and then refuses it under --require-hashes.
PIP_VERSION := 26.3
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "pip==$(PIP_VERSION)"

# Installs from the locks (requirements/*.txt, written by `make lock`): every package at its
# locked version and sha256; then the project itself, without dependencies. pip check fails a
# lock that lacks a dependency pyproject.toml asks for (run `make lock`).
define install-locked
	$(BIN)/pip install --require-hashes -r requirements/$(1).txt
	$(BIN)/pip install --no-deps -e .
	$(BIN)/pip check
endef

# The service: shared core + app on ONNX Runtime (and the `gcp` extra); no PyTorch, no training
# dependencies; the service image's lock.
install: $(BIN)/python
	$(call install-locked,api)

# Training and tests: PyTorch at requirements/torch.txt's versions, from the index pip is
# configured with (PyPI, or a CPU wheel index through PIP_EXTRA_INDEX_URL as in CI).
install-dev: $(BIN)/python
	$(BIN)/pip install -r requirements/torch.txt
	$(call install-locked,dev)

# Rewrites requirements/{api,train,dev}.txt from pyproject.toml (scripts/lock.sh), with the uv
# pinned here; `scripts/lock.sh --upgrade` moves every package to its newest allowed version.
UV_VERSION := 0.13.8
lock: $(BIN)/python
	$(BIN)/pip install --quiet "uv==$(UV_VERSION)"
	UV=$(BIN)/uv bash scripts/lock.sh

serve: install
	PORT=$(PORT) $(BIN)/python -m app.serve

# The service with its traces, metrics and alerts on this machine (compose.yaml: Jaeger, Prometheus,
# Grafana; docs/operations.md). COMPOSE=podman-compose for Podman.
COMPOSE ?= docker compose
observe:
	$(COMPOSE) up --build --detach
	@echo "service http://localhost:8080  traces http://localhost:16686  prometheus http://localhost:9090  grafana http://localhost:3000"

observe-down:
	$(COMPOSE) down

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck:
	$(BIN)/mypy

# Test processes (pytest-xdist): with 2 on 2 cores the suite took 35% less time than with one,
# as half of it waits on servers and subprocesses. The 10 slowest tests are listed at the end.
PYTEST_WORKERS ?= 2

test: install-dev lint typecheck
	$(BIN)/pytest -n $(PYTEST_WORKERS) --durations=10 --cov=fercore --cov=training --cov=app --cov=ferkit --cov-report=term --cov-report=xml --cov-fail-under=80

# The inner loop: what is installed already, no lint, no coverage, neither the slow nor the browser
# tests (pytest markers). `make test` runs everything.
test-fast:
	$(BIN)/pytest -n $(PYTEST_WORKERS) -m "not slow and not browser" -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
