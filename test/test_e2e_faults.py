"""Bad input, faults and damaged bytes end to end, on one cluster.

A prefill worker and two decode workers in ``lynx`` mode behind sglang-router, the real model and real
Mooncake transfers.

First, bad client input: a malformed or out-of-range request gets SGLang's usual clear 4xx, whose message
names the problem (or, where SGLang accepts the input, a sane 200); never a 5xx, never a hang; after each
the cluster serves on, and afterwards nothing is held.

Then real faults, short versions of ``python -m sglang_lynx.bench faults``: clients that leave, bytes
flipped in prefill's memory after they were checksummed, prefill's sender paused past decode's KV timeout,
prefill killed while decode speculates (then restarted), a decode worker killed while prefill sends to
it. Every request in flight ends in the scenario's bound with its correct output or an error naming the
cause; no client receives text that is not a prefix of the verified answer; the surviving workers free
every KV page and Lynx row; the cluster serves on.
"""

import json
import re
from pathlib import Path

import pytest
import requests
import safetensors.torch

from sglang_lynx.bench.faults import Context, fault_cluster_spec, run_suite
from sglang_lynx.client import complete
from sglang_lynx.cluster import PDCluster, settled

pytestmark = pytest.mark.e2e


INF_PROMPT, INF_TOKEN = "A CMOS image sensor converts light into", 49100  # " CMOS": in no other prompt here


@pytest.fixture(scope="module")
def model_with_an_inf_token(model_path, tmp_path_factory) -> str:
    """The model with the embedding of INF_TOKEN set to Inf, as in a damaged checkpoint: a prompt holding
    that token has NaN KV from the first layer on; every other prompt is answered as by the model itself
    (SmolLM2 ties its output layer to the embedding; here it keeps the original rows)."""
    src, out = Path(model_path), tmp_path_factory.mktemp("inf-token-model")
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            (out / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    weights = safetensors.torch.load_file(src / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    weights["model.embed_tokens.weight"][INF_TOKEN] = float("inf")
    safetensors.torch.save_file(weights, out / "model.safetensors")
    return str(out)


@pytest.fixture(scope="module")
def pd(model_with_an_inf_token, reference, tmp_path_factory):  # reference: its server is gone (memory)
    with PDCluster(fault_cluster_spec(model_with_an_inf_token, tmp_path_factory.mktemp("faults"))) as pd:
        yield pd


# --- bad input ---------------------------------------------------------------------------------

TIMEOUT = 120  # seconds: an answer slower than this is a hang
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
LONG = "word " * 9000  # 9001 tokens: over SmolLM2's context of 8192
TOO_LONG = r"The input \(\d+ tokens\) is longer than the model's context length \(8192 tokens\)"


def completion(prompt: str, **fields) -> dict:
    return {"model": "default", "prompt": prompt, "max_tokens": 4, **fields}


def chat(content: str, **fields) -> dict:
    return {"model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}


def post(pd, path: str, body) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"{pd.spec.router_url}{path}", data=data, timeout=TIMEOUT,
                         headers={"Content-Type": "application/json"})


def serves_on(pd) -> None:
    assert complete(pd.spec.router_url, "The capital of France is", max_tokens=4, timeout=TIMEOUT).text


@pytest.mark.parametrize("path, body", [
    pytest.param(COMPLETIONS, completion("Hi", frobnicate=1), id="completions"),
    pytest.param(CHAT, chat("Hi", frobnicate=1), id="chat"),
])
def test_unknown_fields_are_ignored_and_the_cluster_serves_on(pd, path, body):
    r = post(pd, path, body)
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    assert choice["finish_reason"] == "length" and (choice.get("text") or choice["message"]["content"])
    serves_on(pd)


@pytest.mark.parametrize("path, body, message", [
    pytest.param(COMPLETIONS, b'{"model": "default", "prompt": ', "parse the request body as JSON",
                 id="malformed-json-completions"),
    pytest.param(CHAT, b'{"model": "default", "messages": ', "parse the request body as JSON",
                 id="malformed-json-chat"),
    pytest.param(COMPLETIONS, b'{"model":"default","prompt":"\xff\xfe bad","max_tokens":4}',
                 "JSON: prompt: invalid unicode", id="non-utf8-completions"),
    pytest.param(CHAT, b'{"model":"default","messages":[{"role":"user","content":"\xff\xfe bad"}],"max_tokens":4}',
                 r"JSON: messages\[0\].content: invalid unicode", id="non-utf8-chat"),
    pytest.param(COMPLETIONS, completion("Hi", max_tokens=0), "max_tokens must be positive",
                 id="max-tokens-0-completions"),
    pytest.param(CHAT, chat("Hi", max_tokens=0), "max_completion_tokens: Validation error",
                 id="max-tokens-0-chat"),
    pytest.param(COMPLETIONS, completion("Hi", max_tokens=100000), "maximum context length of 8192 tokens",
                 id="max-tokens-beyond-context-completions"),
    pytest.param(CHAT, chat("Hi", max_tokens=100000), "maximum context length of 8192 tokens",
                 id="max-tokens-beyond-context-chat"),
    pytest.param(COMPLETIONS, completion(LONG), TOO_LONG,
                 id="prompt-beyond-context-completions"),
    pytest.param(CHAT, chat(LONG), TOO_LONG,
                 id="prompt-beyond-context-chat"),
    pytest.param(CHAT, chat("Hi", logprobs=True, top_logprobs=1000000), "top_logprobs: Validation error",
                 id="huge-top-logprobs-chat"),
    pytest.param(COMPLETIONS, completion("Hi", logprobs=1000000),
                 "top_logprobs=1000000 is more than the model's vocabulary", id="huge-logprobs-completions"),
    pytest.param(COMPLETIONS, completion("Hi", n=2, temperature=1), r"n=2: parallel sampling \(n > 1\) is not supported",
                 id="n-2-completions"),
    pytest.param(CHAT, chat("Hi", n=2, temperature=1), r"n=2: parallel sampling \(n > 1\) is not supported",
                 id="n-2-chat"),
])
def test_bad_input_gets_a_400_naming_the_problem_and_the_cluster_serves_on(pd, path, body, message):
    r = post(pd, path, body)
    assert r.status_code == 400, r.text
    assert re.search(message, r.text), r.text
    serves_on(pd)


def test_a_request_whose_kv_cannot_be_encoded_fails_alone_naming_why_and_the_workers_serve_on(pd):
    """NaN KV (here from a token whose embedding is Inf) is refused by the codec on prefill's scheduler
    thread: that request fails with the reason, its rows and pages are freed, both workers serve on."""
    r = post(pd, COMPLETIONS, completion(INF_PROMPT, temperature=0))
    assert r.status_code >= 400, r.text
    assert "KV cannot be encoded" in r.text and "NaN or Inf" in r.text, r.text
    serves_on(pd)
    books, _ = pd.wait_settled()
    assert settled(books), books


def test_bad_input_leaves_nothing_held(pd):
    books, _ = pd.wait_settled()
    assert settled(books), books


# --- faults --------------------------------------------------------------------------------------

SHORT = ["client-disconnects", "corrupt-anchor", "corrupt-residual", "link-stall", "prefill-killed-speculating",
         "decode-killed"]


@pytest.fixture(scope="module")
def results(pd, model_path):
    return {r["scenario"]: r for r in run_suite(pd, Context(model_path), SHORT, num_requests=2)}


@pytest.mark.parametrize("name", SHORT)
def test_every_request_ends_in_bound_correct_or_with_its_cause_and_nothing_leaks(results, name):
    r = results[name]
    failed = {check: ok for check, ok in r["checks"].items() if not ok}
    assert not failed, f"{name}: {failed}; fault error: {r['fault_error']}; endings: {r['endings']}; " \
                       f"books after: {r['books_after']}"


def test_the_faults_really_struck(results):
    assert results["corrupt-residual"]["errors"] == results["corrupt-anchor"]["errors"] == 1
    assert results["prefill-killed-speculating"]["errors"] > 0
    assert results["decode-killed"]["ok"] > 0  # the other decode served (the router retries onto it)
    assert results["client-disconnects"]["disconnected"] >= 6
