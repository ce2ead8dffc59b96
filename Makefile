# sglang-lynx: `make demo` and `make test` set everything up themselves.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-unit bench-codec bench-ttft bench-speculation bench-agreement bench-serving bench-faults bench-load cluster-up cluster-down clean

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

bench-ttft: setup
	$(PY) -m sglang_lynx.bench ttft --modes raw,int8,int4,lynx --bandwidth-mbps 2 --input-len 128 \
		--output-len 16 --num-prompts 3 --json bench-ttft.json --plot bench-ttft.png

# Time to the 2nd and 32nd token: speculation on the Anchor while the Residual streams in.
bench-speculation: setup
	$(PY) -m sglang_lynx.bench ttft --modes int8,int4,lynx --bandwidth-mbps 8 --input-len 256 \
		--output-len 32 --num-prompts 5 --json bench-speculation.json

bench-agreement: setup
	$(PY) -m sglang_lynx.bench agreement --num-prompts 100 --json bench-agreement.json

# SGLang's own load generator (python -m sglang.bench_serving) against a lynx cluster it starts and stops.
bench-serving: setup
	$(PY) -m sglang_lynx.bench serving --modes lynx --bandwidth-mbps 20 --num-prompts 16 --input-len 256 \
		--output-len 32 --max-concurrency 4 --json bench-serving.json

# Real faults (killed and paused workers, leaving clients, damaged bytes) on a prefill + two decode cluster.
bench-faults: setup
	$(PY) -m sglang_lynx.bench faults --json bench-faults.json

# 200 requests of 128-4096 tokens, 16 at a time, 10% of clients leaving early; int8 then lynx.
bench-load: setup
	$(PY) -m sglang_lynx.bench load --modes int8,lynx --num-requests 200 --concurrency 16 --json bench-load.json

cluster-up: setup
	@bash scripts/pd_cluster.sh up

cluster-down:
	@bash scripts/pd_cluster.sh down

clean:
	rm -rf .lynx-cluster .pytest_cache
