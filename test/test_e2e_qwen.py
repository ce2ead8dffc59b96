"""Lynx on a second, larger architecture: Qwen2.5-Coder-1.5B-Instruct (28 layers, 2 KV heads of 128 dims,
QKV bias, a 151,936-token vocabulary), a PD pair of real SGLang workers with the KV pools the CPU
defaults size for it. Greedy ``lynx`` answers exactly as ``int8`` while every request speculates.

Run with ``make test-qwen`` (``pytest -m qwen``): the model is 7.1 GB in float32 and each worker holds
its own copy.
"""

import time

import psutil
import pytest

from conftest import ask_together, decode_records
from sglang_lynx.cluster import ClusterSpec, PDCluster, settled
from sglang_lynx.config import LynxConfig
from sglang_lynx.models import materialise

pytestmark = [pytest.mark.e2e, pytest.mark.qwen]

NEEDED_GIB = 19  # two workers with their weights, pools and runtimes (measured: 19-20 GB in use)
MODES = {  # int8 first: lynx is compared with it. Its link is slow enough that every Residual lands
    "int8": LynxConfig(mode="int8", bandwidth_mbps=40),  # several decode steps after the first token
    "lynx": LynxConfig(mode="lynx", bandwidth_mbps=2),
}
PROMPTS = [
    "def quicksort(items):\n    \"\"\"Sort a list with quicksort and return the sorted list.\"\"\"\n",
    [{"role": "user", "content": "Explain in two sentences what a Python generator is."}],
    "The three most common HTTP methods are GET, POST and",
    [{"role": "user", "content": "Write a SQL query that counts the rows of the table `users`."}],
]
MAX_TOKENS = 16

answers: dict[str, list] = {}


@pytest.fixture(scope="module")
def qwen():
    free = psutil.virtual_memory().available / 2**30
    if free < NEEDED_GIB:
        pytest.skip(f"a Qwen2.5-Coder-1.5B PD pair needs about {NEEDED_GIB} GiB of free memory; "
                    f"{free:.1f} GiB is free here")
    return str(materialise("qwen2.5-coder-1.5b"))


@pytest.fixture(scope="module", params=list(MODES))
def cluster(request, qwen, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp(f"qwen-{request.param}")
    timings = log_dir / "timings.jsonl"
    lynx = LynxConfig(**{**MODES[request.param].__dict__, "timings_file": str(timings)})
    # No --max-total-tokens: the CPU default sizes each pool so that both workers fit.
    with PDCluster(ClusterSpec(model_path=qwen, lynx=lynx, log_dir=log_dir)) as pd:
        yield request.param, pd, timings


def test_the_cpu_default_sizes_a_pool_for_each_worker_and_says_so(cluster):
    _, pd, _ = cluster
    for name in ("prefill", "decode"):
        log = pd.log_path(name).read_text()
        assert "Lynx CPU default KV pool:" in log and "two workers' weights (2 x 6.6 GiB)" in log
        state = pd.lynx_state(name)
        assert state["total_kv_tokens"] >= 16384, state  # about 29,000 on a 24 GB machine
        assert state["rows_total"] * 64 >= 2048, state  # a 2,000-token prompt can be staged


def test_greedy_lynx_equals_int8_while_every_request_speculates(cluster):
    mode, pd, timings = cluster
    got = ask_together(pd.spec.router_url, PROMPTS, MAX_TOKENS)
    answers[mode] = [c.text for c in got]
    assert all(c.finish_reason == "length" and c.text.strip() for c in got)
    if mode == "int8":
        assert "def quicksort" in answers[mode][0] or "if len(items)" in answers[mode][0]
        return
    assert answers["lynx"] == answers["int8"]
    speculated = [decode_records(timings)[c.id]["speculated"] for c in got]
    assert min(speculated) >= 2, f"every request speculates before its Residual lands; got {speculated}"


def test_nothing_is_left_held(cluster):
    _, pd, _ = cluster
    time.sleep(1)
    books, _ = pd.wait_settled()
    assert settled(books), books
