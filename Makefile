# One command each, shared by people and CI. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.DEFAULT_GOAL := help
.PHONY: help install run test bench lint migrate services-stop clean

help: ## show this list
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,dev]"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) ## create .venv and install the project with test and dev tools

run: $(STAMP) ## run the whole pipeline (embedded PostgreSQL/Redis/simulator unless configured)
	$(BIN)/sentiment run $(ARGS)

test: $(STAMP) ## run the tests against real PostgreSQL and Redis (embedded unless configured)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# BENCH_ARGS reaches all three, so only flags they share: --repeat N, --json.
bench: $(STAMP) ## run the benchmarks; each prints its ratio against a baseline from the same run
	$(BIN)/python bench/insert.py $(BENCH_ARGS)
	$(BIN)/python bench/scrape.py $(BENCH_ARGS)
	$(BIN)/python bench/pipeline.py $(BENCH_ARGS)

lint: $(STAMP) ## ruff, mypy, and `alembic check` (models and migrations agree)
	$(BIN)/ruff check sentiment tests bench alembic celeryconfig.py
	$(BIN)/ruff format --check sentiment tests bench alembic celeryconfig.py
	$(BIN)/mypy sentiment celeryconfig.py
	$(BIN)/sentiment migrate --check

migrate: $(STAMP) ## apply migrations (alembic upgrade head)
	$(BIN)/sentiment migrate

services-stop: $(STAMP) ## stop the embedded PostgreSQL and Redis
	$(BIN)/sentiment services stop

# The test suite's and the benchmarks' servers stop by themselves; in case one was cut short:
clean: ## stop the embedded servers; remove .venv, .sentiment, .sentiment-test, .sentiment-bench
	-$(BIN)/sentiment services stop
	-DATA_DIR=.sentiment-test EMBEDDED_PG_PORT=54339 EMBEDDED_REDIS_PORT=63809 $(BIN)/sentiment services stop
	-DATA_DIR=.sentiment-bench EMBEDDED_PG_PORT=54359 EMBEDDED_REDIS_PORT=63829 $(BIN)/sentiment services stop
	rm -rf $(VENV) .sentiment .sentiment-test .sentiment-bench
