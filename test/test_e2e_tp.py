"""Lynx over tensor parallelism: a PD pair whose workers each run two ranks (``--tp-size 2``), each rank
sending and landing its own KV heads (SGLang pads SmolLM2's 3 KV heads to 4 for two CPU ranks). The
ranks agree on every Lynx decision (``streams.ranks``): greedy ``lynx`` answers exactly as ``int8``
while the requests speculate, and a worker serves on with nothing held.

Run with ``make test-tp`` (``pytest -m tp``): four schedulers on this machine's cores take longer to
start than the whole of ``make test`` can spare.
"""

import time

import psutil
import pytest
import requests

from conftest import GROUP, POOL_ARGS, PROMPTS, ask_together, decode_records
from sglang_lynx.cluster import ClusterSpec, PDCluster, settled
from sglang_lynx.config import LynxConfig

pytestmark = [pytest.mark.e2e, pytest.mark.tp]

TP_ARGS = ["--tp-size", "2"]
MODES = {  # int8 first: lynx is compared with it; lynx's link lets every request speculate
    "int8": LynxConfig(mode="int8", bandwidth_mbps=400, group_size=GROUP),
    "lynx": LynxConfig(mode="lynx", bandwidth_mbps=4, group_size=GROUP),
}
MAX_TOKENS = 24

answers: dict[str, list] = {}


@pytest.fixture(scope="module", params=list(MODES))
def cluster(request, model_path, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp(f"tp-{request.param}")
    timings = log_dir / "timings.jsonl"
    lynx = LynxConfig(**{**MODES[request.param].__dict__, "timings_file": str(timings)})
    spec = ClusterSpec(model_path=model_path, lynx=lynx, log_dir=log_dir, server_args=POOL_ARGS + TP_ARGS)
    with PDCluster(spec) as pd:
        yield request.param, pd, timings


def test_each_worker_runs_a_scheduler_per_rank(cluster):
    mode, pd, _ = cluster
    for name in ("prefill", "decode"):
        children = [child.cmdline()[0] for child in psutil.Process(pd.procs[name].pid).children()]
        assert sorted(children) == ["sglang::detokenizer", "sglang::scheduler_TP0", "sglang::scheduler_TP1"]
        assert pd.lynx_state(name)["mode"] == mode


def test_greedy_lynx_equals_int8_while_the_requests_speculate(cluster):
    mode, pd, timings = cluster
    got = ask_together(pd.spec.router_url, list(PROMPTS.values()), MAX_TOKENS)
    answers[mode] = [c.text for c in got]
    assert all(c.finish_reason == "length" and c.text.strip() for c in got)
    if mode == "int8":
        assert "Paris" in answers[mode][0]
        return
    assert answers["lynx"] == answers["int8"]
    speculated = [decode_records(timings)[c.id]["speculated"] for c in got]  # short prompts: a few steps
    assert sum(speculated) >= len(got) * (MAX_TOKENS - 1) // 2, f"too little speculation to test: {speculated}"


def test_nothing_is_left_held(cluster):
    _, pd, _ = cluster
    time.sleep(1)
    books, _ = pd.wait_settled()
    assert settled(books), books


def test_workers_with_different_tensor_parallel_sizes_fail_the_request_clearly_and_keep_serving(
        model_path, tmp_path_factory):
    spec = ClusterSpec(model_path=model_path, lynx=MODES["lynx"], log_dir=tmp_path_factory.mktemp("tp-mismatch"),
                       server_args=POOL_ARGS, decode_server_args=TP_ARGS)
    with PDCluster(spec):
        r = requests.post(f"{spec.router_url}/v1/completions", timeout=120,
                          json={"model": "default", "prompt": "Hello", "max_tokens": 4})
        assert r.status_code >= 400
        assert "Lynx needs the same --tp-size on both workers" in r.text, r.text
        for url in (spec.prefill_url, spec.decode_url):
            assert requests.get(f"{url}/health", timeout=30).status_code == 200
