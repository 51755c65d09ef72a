# The README's two set-up commands: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8000

.PHONY: install install-dev serve test lint typecheck clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The service: shared core + app, no training dependencies.
install: $(BIN)/python
	$(BIN)/pip install -e .

install-dev: $(BIN)/python
	$(BIN)/pip install -e ".[dev]"

serve: install
	$(BIN)/uvicorn app.main:app --host 0.0.0.0 --port $(PORT)

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck:
	$(BIN)/mypy

test: install-dev lint typecheck
	$(BIN)/pytest --cov=fercore --cov=training --cov=app --cov-report=term --cov-report=xml --cov-fail-under=80

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
