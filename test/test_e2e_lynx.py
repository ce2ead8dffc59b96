"""Each Lynx mode end to end: real SGLang workers, real Mooncake writes, the real model.

raw answers exactly like SGLang's own transfer; int4 serves from the Anchor alone; int8 from exact
INT8 KV. lynx decodes on the Anchor while its Residual streams in, shows no client a token before
verification, and answers exactly like int8. Its link is slow enough, and its requests many enough
at once, that every request speculates for a while before its Residual lands.
"""

import collections
import json
import math
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import psutil
import pytest
import requests
from scipy.stats import chi2_contingency

from sglang_lynx.bench.serving import bench_serving_cmd
from sglang_lynx.client import complete
from sglang_lynx.cluster import ClusterError, settled

from conftest import (CAP, HELD_MBPS, LINK_MBPS, MAX_TOKENS, PROMPTS, SPECULATION_MAX_TOKENS, SPECULATION_PROMPTS,
                      ask_all_at_once, assert_streamed_only_once_verified, prefill_holds)

pytestmark = pytest.mark.e2e


MEDIUM = SPECULATION_PROMPTS[0]  # ~150 tokens: a Residual of ~1.8 s here
SAMPLING_PROMPT = "Here is a list of fruits: apple, banana, cherry,"  # a few likely tokens at each step
SAMPLES = 200
SAMPLING_LINK_MBPS = 16
FAST_LINK_MBPS = 400

answers: dict[str, dict] = collections.defaultdict(dict)  # mode -> name -> answer, for comparing modes


def records(timings, role: str) -> list[dict]:
    return [r for r in map(json.loads, timings.read_text().splitlines()) if r["role"] == role]


def decode_record(timings, rid: str) -> dict:
    return next(r for r in records(timings, "decode") if r.get("rid") == rid)


def only(mode, *modes):
    if mode not in modes:
        pytest.skip(f"applies to {', '.join(modes)}")


def test_greedy_answers_per_mode(lynx_cluster, reference):
    mode, cluster, _ = lynx_cluster
    only(mode, "raw", "int8", "int4")  # lynx is compared with int8 on many more prompts below
    cases = [(name, stream) for name in PROMPTS for stream in (False, True)]

    def ask(case):
        name, stream = case
        return complete(cluster.spec.router_url, PROMPTS[name], max_tokens=MAX_TOKENS, stream=stream).text

    # raw must equal the single server token for token: asked one at a time, as the reference was.
    with ThreadPoolExecutor(1 if mode == "raw" else len(cases)) as pool:
        got = dict(zip(cases, pool.map(ask, cases)))
    answers[mode]["prompts"] = got
    assert all(text.strip() for text in got.values())
    if mode == "raw":  # pool bytes unchanged: exactly SGLang's own output
        assert got == {(name, s): reference[name] for name, s in got}
    if mode == "int8":  # INT8 KV is near-lossless: most answers stay the same as full precision
        same = sum(got[(name, False)] == reference[name] for name in PROMPTS)
        assert same >= len(PROMPTS) // 2, f"only {same} of {len(PROMPTS)} int8 answers equal fp32"


def test_the_first_token_reaches_the_client_while_the_link_holds_back_all_the_kv(lynx_cluster):
    """Prefill sends the first token ahead of the KV, and decode streams it at once: TTFT is prefill's
    time. With --no-lynx-first-token-at-prefill (the int4 cluster) it comes with the KV, as in SGLang."""
    mode, cluster, timings = lynx_cluster
    early = cluster.spec.lynx.first_token_at_prefill
    first = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        with cluster.link_at(HELD_MBPS):
            asked = pool.submit(complete, cluster.spec.router_url, MEDIUM, max_tokens=4, stream=True,
                                on_text=lambda piece: first.set())
            came = first.wait(timeout=60 if early else 5)
        answer = asked.result()
    assert len(answer.chunks) > 1
    record = decode_record(timings, answer.id)
    if early:
        assert came, "no first token while the link held the KV back"
        assert record["first_token_came"] <= record["first_token_streamed"] < record["first_stream_landed"]
    else:
        assert not came and "first_token_came" not in record
        assert record["first_token_streamed"] >= record["first_stream_landed"]


def test_a_one_token_request_is_answered_while_the_link_holds_back_its_kv_which_is_then_freed(lynx_cluster):
    mode, cluster, timings = lynx_cluster
    only(mode, "raw", "int8", "lynx")  # with the first token at prefill
    with ThreadPoolExecutor(1) as pool:
        with cluster.link_at(HELD_MBPS):
            answer = pool.submit(complete, cluster.spec.router_url, MEDIUM, max_tokens=1).result(timeout=60)
    assert answer.text and answer.finish_reason == "length"
    assert decode_record(timings, answer.id)["finished_on_first_token"]
    books, _ = cluster.wait_settled()
    assert settled(books), books


def test_every_request_is_timed_and_the_residual_travels_only_in_lynx_mode(lynx_cluster):
    mode, cluster, timings = lynx_cluster
    complete(cluster.spec.router_url, MEDIUM, max_tokens=4)
    prefill, decode = records(timings, "prefill"), records(timings, "decode")
    assert prefill and decode
    last = prefill[-1]
    assert last["first_stream_bytes"] > 0
    assert ("residual_bytes" in last) == (mode == "lynx")
    if mode == "int4":  # the 4-bit Anchor plus scales, whole 64-token pages of 11520 values
        token_slots = math.ceil(last["tokens"] / 64) * 64
        assert last["first_stream_bytes"] < token_slots * 11520 * 0.6
    if mode == "lynx":  # 4 of 8 bits, and the scales of 16-token groups, go first
        assert last["first_stream_bytes"] < 0.65 * (last["first_stream_bytes"] + last["residual_bytes"])


def test_greedy_lynx_equals_int8_while_speculating_and_rolling_back(lynx_cluster):
    mode, cluster, timings = lynx_cluster
    only(mode, "int8", "lynx")
    results = ask_all_at_once(cluster)
    answers[mode]["speculation"] = results
    if mode == "int8":
        return
    texts = [answer.text for answer, _ in results]
    assert texts == [answer.text for answer, _ in answers["int8"]["speculation"]]
    decoded = [decode_record(timings, answer.id) for answer, _ in results]
    speculated = [r["speculated"] for r in decoded]
    assert min(speculated) >= 16, f"every request speculates at least 16 tokens; got {speculated}"
    assert any(r["rolled_back"] > 0 for r in decoded), "no request rolled back a speculated token"
    assert any(r["accepted"] > 0 for r in decoded)


def test_no_client_sees_a_token_before_it_is_verified(lynx_cluster):
    """Streamed answers equal int8's word for word (test above), and after the first token (exact,
    from prefill) nothing reaches the client before its request's verification."""
    mode, _, timings = lynx_cluster
    only(mode, "lynx")
    assert_streamed_only_once_verified(answers["lynx"]["speculation"], timings)


def test_the_first_token_comes_before_the_residual_is_applied(lynx_cluster):
    mode, cluster, timings = lynx_cluster
    only(mode, "lynx")
    sent = time.time()
    answer = complete(cluster.spec.router_url, MEDIUM, max_tokens=8, stream=True)
    record = decode_record(timings, answer.id)
    prefill = next(r for r in records(timings, "prefill") if r["room"] == record["room"])
    assert record["first_token_streamed"] < record["residual_landed"] <= record["residual_applied"]
    assert sent + answer.ttft_s < record["residual_applied"]
    # The first token did not wait behind the Residual on the link: most of it crossed afterwards.
    residual_s = prefill["residual_bytes"] * 8 / (LINK_MBPS * 1e6)
    assert record["residual_landed"] - record["first_token_streamed"] >= 0.8 * residual_s


def test_the_cap_holds(lynx_cluster):
    mode, _, timings = lynx_cluster
    only(mode, "lynx")
    decoded = [decode_record(timings, answer.id) for answer, _ in answers["lynx"]["speculation"]]
    assert max(r["speculated"] for r in decoded) == CAP
    assert all(r["speculated"] <= CAP for r in records(timings, "decode") if "speculated" in r)
    assert any("paused" in r for r in decoded)


def speculated_word(url: str) -> str:
    """A word from the middle of the greedy answer to MEDIUM (lynx's is int8's), which a request alone
    meets on a speculated token: asked as a stop string, it stops the request while it speculates."""
    return complete(url, MEDIUM, max_tokens=MAX_TOKENS).text.split()[4]


def test_length_stop_and_eos_met_while_speculating_finish_after_verification(lynx_cluster):
    mode, cluster, timings = lynx_cluster
    only(mode, "int8", "lynx")
    url = cluster.spec.router_url
    stop_word = speculated_word(url)
    cases = {  # each stops within the tokens a request speculates here
        "max_tokens": dict(prompt=MEDIUM, max_tokens=6),
        "stop string": dict(prompt=MEDIUM, max_tokens=SPECULATION_MAX_TOKENS, stop=[stop_word]),
        "eos": dict(prompt=[{"role": "user", "content": "Answer with one word: what colour is grass?"}],
                    max_tokens=SPECULATION_MAX_TOKENS),
    }
    got = {}
    for name, case in cases.items():
        for stream in (False, True):
            answer = complete(url, stream=stream, **case)
            got[(name, stream)] = (answer.text, answer.finish_reason)
            if mode == "lynx":
                record = decode_record(timings, answer.id)
                assert "residual_applied" in record and record["speculated"] >= 1, record
    assert got[("max_tokens", False)][1] == "length" and got[("eos", False)][1] == "stop"
    assert got[("stop string", False)][1] == "stop" and stop_word not in got[("stop string", False)][0]
    answers[mode]["stops"] = got
    if mode == "lynx":
        assert got == answers["int8"]["stops"]


def test_logprobs_are_the_exact_model_s(lynx_cluster):
    mode, cluster, timings = lynx_cluster
    only(mode, "int8", "lynx")
    answer = complete(cluster.spec.router_url, MEDIUM, max_tokens=12, logprobs=3)
    answers[mode]["logprobs"] = answer
    if mode == "int8":
        return
    assert decode_record(timings, answer.id)["speculated"] >= 1
    ours, int8 = answer.logprobs, answers["int8"]["logprobs"].logprobs
    assert ours["tokens"] == int8["tokens"] and len(ours["tokens"]) == 12
    assert ours["token_logprobs"] == pytest.approx(int8["token_logprobs"], abs=2e-3)
    for mine, theirs in zip(ours["top_logprobs"], int8["top_logprobs"]):
        assert mine.keys() == theirs.keys()


def test_logprobs_number_the_output_tokens_when_a_stop_falls_among_the_speculated_ones(lynx_cluster):
    """Verification can keep tokens past a stop met on a speculated token (at least the exact model's
    token after the last kept one); the logprobs end where the output does. int8 is SGLang's own."""
    mode, cluster, timings = lynx_cluster
    only(mode, "int8", "lynx")
    url = f"{cluster.spec.router_url}/v1/completions"

    def ask(**body):
        body = {"model": "default", "temperature": 0, "logprobs": 3, **body}
        return requests.post(url, json=body, timeout=600).json()

    stop_word = speculated_word(cluster.spec.router_url)
    cases = {  # each stops within the tokens a request speculates here
        "max_tokens": ({"prompt": MEDIUM, "max_tokens": 6}, "length"),
        "stop string": ({"prompt": MEDIUM, "max_tokens": SPECULATION_MAX_TOKENS, "stop": [stop_word]},
                        "stop"),
    }
    for name, (body, finish_reason) in cases.items():
        response = ask(**body)
        choice, output_tokens = response["choices"][0], response["usage"]["completion_tokens"]
        assert choice["finish_reason"] == finish_reason, name
        fields = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        assert {f: len(choice["logprobs"][f]) for f in fields} == dict.fromkeys(fields, output_tokens), name
        if name == "max_tokens":
            assert output_tokens == 6
        if mode == "lynx":
            record = decode_record(timings, response["id"])
            assert "residual_applied" in record and record["speculated"] >= 1, (name, record)


def test_sampled_tokens_follow_the_distribution_of_int8(lynx_cluster):
    """The next 4 tokens of a fixed prompt at temperature 1, SAMPLES times per mode. At each of the
    speculated positions (2 to 4), a chi-square test of homogeneity between lynx's and int8's tokens,
    at significance 0.001 (tokens seen fewer than 10 times in both runs together are pooled)."""
    mode, cluster, timings = lynx_cluster
    only(mode, "int8", "lynx")

    def sample(_):
        return complete(cluster.spec.router_url, SAMPLING_PROMPT, max_tokens=4, temperature=1.0,
                        ignore_eos=True, logprobs=0)

    # lynx: a faster link than the other tests', for 200 requests; with 24 in flight, a Residual still
    # waits behind the Anchors of the requests that arrive after its own.
    with ThreadPoolExecutor(24) as pool, cluster.link_at(SAMPLING_LINK_MBPS) if mode == "lynx" else nullcontext():
        samples = list(pool.map(sample, range(SAMPLES)))
    answers[mode]["samples"] = [s.logprobs["tokens"] for s in samples]
    if mode == "int8":
        return
    speculated = [decode_record(timings, s.id)["speculated"] for s in samples]
    assert sum(n >= 3 for n in speculated) >= SAMPLES // 2, "most samples must have speculated all 3 tokens"
    categories = []
    for position in (1, 2, 3):
        lynx, int8 = ([tokens[position] for tokens in run] for run in (answers["lynx"]["samples"],
                                                                        answers["int8"]["samples"]))
        frequent = sorted(t for t in set(lynx) | set(int8) if lynx.count(t) + int8.count(t) >= 10)
        table = [[run.count(t) for t in frequent] + [sum(t not in frequent for t in run)] for run in (lynx, int8)]
        table = [column for column in zip(*table) if sum(column) > 0]
        categories.append(len(table))
        if len(table) > 1:
            assert chi2_contingency(list(zip(*table))).pvalue > 1e-3, f"token {position + 1}: {table}"
    assert max(categories) >= 3, "the prompt must leave the model several likely tokens somewhere"


def abort_while_speculating(cluster, path: str, body: dict, rid_of) -> tuple[dict, list]:
    """Stream ``body`` to the router's ``path``; after the first event (the first token, from prefill),
    abort the request on the decode worker (``rid_of(event)`` its id) once it speculates. The first
    event, and the rest."""
    def decode_speculates(books) -> bool:
        return books["decode"]["speculating"] == 1

    with requests.post(f"{cluster.spec.router_url}{path}", json=body, stream=True, timeout=120) as r:
        events = (json.loads(line[5:]) for line in r.iter_lines()
                  if line.startswith(b"data:") and line != b"data: [DONE]")
        first = next(events)
        cluster.wait_until(decode_speculates, workers=["decode"])
        requests.post(f"{cluster.spec.decode_url}/abort_request", json={"rid": rid_of(first)}, timeout=60)
        return first, list(events)


def test_a_request_aborted_mid_speculation_shows_nothing_unverified_and_frees_its_kv(lynx_cluster):
    """SGLang's own abort (what its HTTP server does when a client leaves) on the decode worker, while
    the request decodes on the Anchor. (sglang-router 0.3.2 does not pass a client's disconnect on to
    the workers: the request then runs to its end and is freed as usual.)"""
    mode, cluster, timings = lynx_cluster
    only(mode, "lynx")
    body = {"model": "default", "prompt": MEDIUM, "max_tokens": 64, "stream": True, "temperature": 0}
    first, rest = abort_while_speculating(cluster, "/v1/completions", body, lambda event: event["id"])
    shown = first["choices"][0]["text"] + "".join(e["choices"][0]["text"] for e in rest if e.get("choices"))
    assert shown == first["choices"][0]["text"], "only the first (exact) token was shown"
    assert any(e.get("choices") and e["choices"][0]["finish_reason"] == "abort" or "error" in e for e in rest)
    record = decode_record(timings, first["id"])
    assert "failure" in record and "residual_applied" not in record


@pytest.mark.parametrize("api", ["completions", "generate"])
def test_a_request_aborted_mid_speculation_shows_no_logprob_past_its_verified_token(lynx_cluster, api):
    """In the abort's decode step SGLang logs the decoded token's logprobs after Lynx has cut the request
    back to its first token. No field (token logprobs, top logprobs, and on SGLang's own API the chosen
    tokens' logprobs) holds more entries than that one verified token."""
    mode, cluster, timings = lynx_cluster
    only(mode, "lynx")
    if api == "completions":  # each chunk carries its new entries
        body = {"model": "default", "prompt": MEDIUM, "max_tokens": 64, "stream": True, "temperature": 0,
                "logprobs": 3, "stream_options": {"include_usage": True}}
        first, rest = abort_while_speculating(cluster, "/v1/completions", body, lambda event: event["id"])
        rid = first["id"]
        shown = [c["logprobs"] for e in [first, *rest] for c in e.get("choices") or [] if c.get("logprobs")]
        counts = {f: sum(len(lp[f]) for lp in shown)
                  for f in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        counts.update((f"usage {i}", e["usage"]["completion_tokens"]) for i, e in enumerate(rest) if e.get("usage"))
    else:  # each event carries everything so far
        body = {"text": MEDIUM, "stream": True, "sampling_params": {"max_new_tokens": 64, "temperature": 0},
                "return_logprob": True, "top_logprobs_num": 3, "token_ids_logprob": [0, 1]}
        first, rest = abort_while_speculating(cluster, "/generate", body, lambda event: event["meta_info"]["id"])
        rid = first["meta_info"]["id"]
        metas = [e["meta_info"] for e in [first, *rest] if "meta_info" in e]
        counts = {f: max(len(m.get(f) or []) for m in metas)
                  for f in ("output_token_logprobs", "output_top_logprobs", "output_token_ids_logprobs")}
        counts["completion_tokens"] = max(m["completion_tokens"] for m in metas)
    record = decode_record(timings, rid)
    assert "failure" in record and "residual_applied" not in record, "only the first token was verified"
    assert all(n <= 1 for n in counts.values()), counts


def test_the_link_rate_is_set_at_runtime(lynx_cluster):
    """SGLang's ``/set_internal_state`` sets prefill's link (``lynx_bandwidth_mbps``) at once; a rate
    the flag would refuse is refused, and the link keeps its rate."""
    mode, cluster, timings = lynx_cluster
    only(mode, "lynx")

    def residual_mbps() -> float:  # alone on the link, the Residual follows the Anchor at once
        answer = complete(cluster.spec.router_url, MEDIUM, max_tokens=2)
        room = decode_record(timings, answer.id)["room"]
        sent = next(r for r in records(timings, "prefill") if r["room"] == room)
        return sent["residual_bytes"] * 8 / 1e6 / (sent["residual_sent"] - sent["first_stream_sent"])

    cluster.wait_settled()  # no Residual of an earlier request left on the link
    assert cluster.lynx_state("prefill")["bandwidth_mbps"] == LINK_MBPS
    with cluster.link_at(4 * LINK_MBPS):
        assert cluster.lynx_state("prefill")["bandwidth_mbps"] == 4 * LINK_MBPS
        assert 2 * LINK_MBPS < residual_mbps() <= 4.1 * LINK_MBPS
    with pytest.raises(ClusterError):
        cluster.set_link(-1)
    assert cluster.lynx_state("prefill")["bandwidth_mbps"] == LINK_MBPS
    assert residual_mbps() <= 1.05 * LINK_MBPS


@pytest.mark.parametrize("lynx_pd", ["lynx"], indirect=True)
def test_workers_waiting_on_the_link_do_not_keep_a_core_busy(lynx_cluster):
    """Prefill with a request's KV on the link and decode waiting for it poll, and sleep between polls:
    the two cores stay free for the workers that compute, the router and the clients."""
    _, cluster, _ = lynx_cluster
    with ThreadPoolExecutor(1) as pool:
        with cluster.link_at(HELD_MBPS):
            answer = pool.submit(complete, cluster.spec.router_url, MEDIUM, max_tokens=2)
            cluster.wait_until(prefill_holds(1), workers=["prefill"])
            busy = cluster.cpu_percent(seconds=3)
        assert answer.result().text
    assert busy < 40, f"a cluster waiting on its link used {busy:.0f}% of a core"


def test_speculation_counters_are_exported_with_sglang_s_prometheus_metrics(lynx_cluster):
    mode, cluster, _ = lynx_cluster
    only(mode, "lynx")
    text = requests.get(f"{cluster.spec.decode_url}/metrics", timeout=60).text
    counter = lambda name: sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                               if line.startswith(f"sglang:lynx_{name}_total"))
    state = cluster.lynx_state("decode")
    assert counter("speculated_tokens") == state["speculated_tokens"] > 0
    assert counter("accepted_tokens") == state["accepted_tokens"] > 0
    assert counter("verify_passes") == state["verify_passes"] > 0
    assert counter("rollbacks") == state["rolled_back_requests"] > 0
    assert counter("draft_mismatches") == state["draft_mismatches"]


def test_sglang_s_own_load_generator_runs_against_the_router(lynx_cluster, model_path, tmp_path):
    """`python -m sglang.bench_serving`, as an SGLang user runs it, in this environment."""
    mode, cluster, _ = lynx_cluster
    only(mode, "lynx")
    output = tmp_path / "bench.jsonl"
    cmd = bench_serving_cmd(cluster.spec.router_url, model_path, output, num_prompts=4, input_len=64, output_len=8,
                            max_concurrency=2)
    with cluster.link_at(FAST_LINK_MBPS):  # what is measured here is that it runs
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Serving Benchmark Result" in result.stdout
    assert json.loads(output.read_text().splitlines()[-1])["completed"] == 4


def test_a_worker_s_scheduler_and_detokenizer_are_forked_from_its_launcher_hooked_for_its_mode(lynx_cluster):
    """On a CPU they start as copies of the launcher, which hooked SGLang for its flags: no fork server,
    no second import of SGLang (8 CPU-seconds each), and the hooks of its mode in place."""
    mode, cluster, _ = lynx_cluster
    for name in ("prefill", "decode"):
        children = psutil.Process(cluster.procs[name].pid).children()
        assert sorted(child.cmdline()[0] for child in children) == ["sglang::detokenizer", "sglang::scheduler"]
        assert cluster.lynx_state(name)["mode"] == mode  # the scheduler's own answer


def test_nothing_is_left_held_after_the_requests(lynx_cluster):
    """Decode's KV slots and Lynx rows are back at their starting count, aborts included."""
    mode, cluster, _ = lynx_cluster  # which held nothing when this module started (conftest)
    cluster.wait_settled(timeout=60)
    state = cluster.lynx_state("decode")
    assert state["free_kv_tokens"] == state["total_kv_tokens"]
    assert state["rows_in_use"] == 0 and state.get("speculating", 0) == 0
