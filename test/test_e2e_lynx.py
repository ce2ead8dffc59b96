"""Each Lynx mode end to end: real SGLang workers, real Mooncake writes, the real model.

raw answers exactly like SGLang's own transfer; lynx exactly like int8 (its Residual refines
the KV to INT8 before any token after the first is computed); int4 serves from the Anchor alone.
The link is paced so that the Residual takes a visible time.
"""

import json
import math
import time

import pytest

from sglang_lynx.client import complete
from sglang_lynx.cluster import ClusterSpec, PDCluster
from sglang_lynx.config import LynxConfig

from conftest import MAX_TOKENS, PROMPTS

pytestmark = pytest.mark.e2e

BANDWIDTH_MBPS = 40  # the long prompt's Residual (~2.9 MB) takes ~0.6 s
MODES = ["raw", "int8", "lynx", "int4"]  # int8 answers first: lynx is compared with them
answers_by_mode: dict[str, dict] = {}


@pytest.fixture(scope="module", params=MODES)
def lynx_cluster(request, model_path, reference, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp(request.param)
    timings = log_dir / "timings.jsonl"
    lynx = LynxConfig(mode=request.param, bandwidth_mbps=BANDWIDTH_MBPS, timings_file=str(timings))
    with PDCluster(ClusterSpec(model_path=model_path, lynx=lynx, log_dir=log_dir)) as cluster:
        yield request.param, cluster, timings


def ask_everything(url: str) -> dict:
    return {(name, stream): complete(url, prompt, max_tokens=MAX_TOKENS, stream=stream).text
            for name, prompt in PROMPTS.items() for stream in (False, True)}


def test_greedy_answers_per_mode(lynx_cluster, reference):
    mode, cluster, _ = lynx_cluster
    answers = answers_by_mode[mode] = ask_everything(cluster.spec.router_url)
    assert all(text.strip() for text in answers.values())
    if mode == "raw":  # pool bytes unchanged: exactly SGLang's own output
        assert answers == {(name, s): reference[name] for name, s in answers}
    if mode == "int8":  # INT8 KV is near-lossless: most answers stay the same as full precision
        same = sum(answers[(name, False)] == reference[name] for name in PROMPTS)
        assert same >= len(PROMPTS) // 2, f"only {same} of {len(PROMPTS)} int8 answers equal fp32"
    if mode == "lynx":
        assert "int8" in answers_by_mode, "the int8 cluster runs first"
        assert answers == answers_by_mode["int8"]


def test_every_request_is_timed_and_the_residual_travels_only_in_lynx_mode(lynx_cluster):
    mode, cluster, timings = lynx_cluster
    complete(cluster.spec.router_url, PROMPTS["long"], max_tokens=4)
    records = [json.loads(line) for line in timings.read_text().splitlines()]
    prefill = [r for r in records if r["role"] == "prefill"]
    decode = [r for r in records if r["role"] == "decode"]
    assert prefill and decode
    last = prefill[-1]
    assert last["first_stream_bytes"] > 0
    assert ("residual_bytes" in last) == (mode == "lynx")
    if mode in ("int4", "lynx"):  # the 4-bit Anchor plus scales, whole 64-token pages of 11520 values
        token_slots = math.ceil(last["tokens"] / 64) * 64
        assert last["first_stream_bytes"] < token_slots * 11520 * 0.6


def test_lynx_streams_the_first_token_before_the_residual_is_applied(lynx_cluster):
    mode, cluster, timings = lynx_cluster
    if mode != "lynx":
        pytest.skip("only lynx mode has a second stream")
    sent = time.time()
    answer = complete(cluster.spec.router_url, PROMPTS["long"], max_tokens=8, stream=True)
    first_token_at = sent + answer.ttft_s
    records = [json.loads(line) for line in timings.read_text().splitlines()]
    decode = [r for r in records if r["role"] == "decode"][-1]
    prefill = [r for r in records if r["role"] == "prefill"][-1]
    assert decode["first_token_streamed"] < decode["residual_landed"] <= decode["residual_applied"]
    assert first_token_at < decode["residual_applied"], \
        f"first token reached the client {first_token_at - decode['residual_applied']:.3f} s after refinement"
    # The first token did not wait behind the Residual on the link: most of it crossed afterwards.
    residual_s = prefill["residual_bytes"] * 8 / (BANDWIDTH_MBPS * 1e6)
    assert decode["residual_landed"] - decode["first_token_streamed"] >= 0.8 * residual_s
