# sglang-lynx: `make demo` and `make test` set everything up themselves.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-unit bench-codec cluster-up cluster-down clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m sglang_lynx.demo

test: setup
	$(PY) -m pytest

test-unit: setup
	$(PY) -m pytest -m "not e2e"

bench-codec: setup
	$(PY) -m sglang_lynx.bench codec --json bench-codec.json

cluster-up: setup
	@bash scripts/pd_cluster.sh up

cluster-down:
	@bash scripts/pd_cluster.sh down

clean:
	rm -rf .lynx-cluster .pytest_cache
