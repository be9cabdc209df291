# embedding-pipeline: the two set-up commands are `make run` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export EMBEDDING_HOME ?= $(CURDIR)/.embedding_home
export DAGSTER_HOME ?= $(EMBEDDING_HOME)/dagster
STAMP := $(VENV)/.installed
# Keep torch pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

PORT ?= 3000

.PHONY: run test test-fast check ui serve bench bench-quick install system-deps clean cluster-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[test,int8]' $(TORCH_PIN)
	touch $(STAMP)

install: $(STAMP)

## Materialize the whole graph on the bundled sample corpus, then run a sample search.
run: $(STAMP)
	$(BIN)/embedding-pipeline materialize
	$(BIN)/embedding-pipeline search "how do I descale the coffee machine" --k 3

## Install what the tests need (redis-server, chromium for the browser test, PostgreSQL for the second
## warehouse backend and the cluster demo) and run the whole suite, tests spread over 3 processes.
test: system-deps $(STAMP)
	$(BIN)/python -m pytest -q -n 3 --dist worksteal --durations=25

## Unit tests only (no model, no graph run, no multi-second index builds; under 2 minutes on 2 workers): everything not marked slow.
test-fast: system-deps $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

## Lint with the security rules (ruff, [tool.ruff] in pyproject.toml) and load the definitions (dg check defs).
check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/dg check defs

system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

## Open the Dagster UI on http://127.0.0.1:$(PORT) (make ui PORT=3001) with the same home as `make run`.
ui: $(STAMP)
	mkdir -p $(DAGSTER_HOME)
	test -f $(DAGSTER_HOME)/dagster.yaml || $(BIN)/python -c 'import sys, embedding_assets.cli as c; open(sys.argv[1], "w").write(c.DAGSTER_YAML)' $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(PORT)

## Serve /search, /v1/embeddings and the search page on http://127.0.0.1:8000 over `make run`'s index.
serve: $(STAMP)
	$(BIN)/embedding-pipeline serve

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

clean:
	rm -rf $(EMBEDDING_HOME)

## PostgreSQL + Redis + two Celery workers on loopback: backfill 6 sources, compare with an embedded run (JSON).
cluster-demo: system-deps $(STAMP)
	$(BIN)/python -m embedding_assets.cluster.demo
