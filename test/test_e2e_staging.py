"""The staging area end to end: rows for two long prompts, sixteen prompts of mixed lengths at once.

Requests the rows cannot hold yet wait (decode keeps them in SGLang's prealloc queue; prefill keeps
their encode), oldest first, and then answer exactly as a request alone does (and ``lynx`` as ``int8``).
Nothing fails for lack of rows, nothing is left held afterwards, aborted requests included, and a prompt larger than the whole
area gets a clear error that names the flag.
"""

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from sglang_lynx.client import complete
from sglang_lynx.cluster import settled
from sglang_lynx.data import text_windows

# The shared int8 and lynx clusters, whose rows hold two 1024-token prompts (conftest); int8 first:
# lynx answers as it does.
pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("lynx_pd", ["int8", "lynx"], indirect=True)]

LENGTHS = random.Random(0).sample([128 + (1024 - 128) * i // 15 for i in range(16)], 16)
MAX_TOKENS = 8
LINK_MBPS = 400  # the staging area, not the link, holds the requests back
ALONE = 3  # prompts int8 also answers one at a time, with every row free

answers: dict[str, list] = {}


@pytest.fixture(scope="module")
def prompts(model_path) -> list[str]:
    return text_windows(model_path, LENGTHS)


@pytest.fixture(scope="module")
def cluster(lynx_cluster):
    name, pd, timings = lynx_cluster
    with pd.link_at(LINK_MBPS):
        yield name, pd, timings


def all_at_once(url: str, prompts: list, **kwargs) -> list:
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: complete(url, p, max_tokens=MAX_TOKENS, **kwargs), prompts))


def test_sixteen_prompts_share_rows_for_two_and_answer_as_with_every_row_free(cluster, prompts):
    name, pd, timings = cluster
    state = pd.lynx_state("decode")
    page_size = requests.get(f"{pd.spec.decode_url}/server_info", timeout=30).json()["page_size"]
    assert state["rows_in_use"] == 0
    assert state["rows_total"] * page_size <= 2 * max(LENGTHS) + 128  # about two of the longest prompts
    got = all_at_once(pd.spec.router_url, prompts)
    assert all(c.finish_reason == "length" for c in got)
    answers[name] = [c.text for c in got]
    if name == "int8":
        alone = [complete(pd.spec.router_url, p, max_tokens=MAX_TOKENS).text for p in prompts[:ALONE]]
        assert answers[name][:ALONE] == alone
    else:
        assert answers[name] == answers["int8"]
    rids = {c.id for c in got}
    waits = [r["staging_wait_s"] for r in map(json.loads, timings.read_text().splitlines())
             if r["role"] == "decode" and r.get("rid") in rids]
    assert len(waits) == len(prompts) and sum(w > 0.5 for w in waits) >= len(prompts) // 2


def test_rows_come_back_after_the_requests_and_after_aborts(cluster, prompts):
    name, pd, _ = cluster
    with ThreadPoolExecutor(len(prompts)) as pool:
        pending = [pool.submit(complete, pd.spec.router_url, p, max_tokens=MAX_TOKENS, stream=True)
                   for p in prompts]
        time.sleep(3)  # some requests hold rows, others wait for them
        # sglang-router does not pass a client's disconnect on to the workers: abort on both, as an operator would.
        for url in (pd.spec.decode_url, pd.spec.prefill_url):
            requests.post(f"{url}/abort_request", json={"abort_all": True}, timeout=60)
        ended = []
        for future in pending:
            try:
                ended.append(future.result(timeout=300).finish_reason)
            except RuntimeError as e:  # an error status, or an error event in the stream
                ended.append(str(e))
    assert len(ended) == len(prompts)
    books, _ = pd.wait_settled()
    assert settled(books), books
    assert pd.lynx_state("decode")["requests_waiting_for_rows"] == 0
    # and the cluster serves on
    assert complete(pd.spec.router_url, prompts[0], max_tokens=MAX_TOKENS).text == answers[name][0]


def test_a_prompt_larger_than_the_staging_area_gets_an_error_naming_the_flag(cluster, model_path):
    name, pd, _ = cluster
    with pytest.raises(RuntimeError, match="HTTP 400.*raise --lynx-staging-mb"):
        complete(pd.spec.router_url, text_windows(model_path, [5000])[0], max_tokens=MAX_TOKENS)
    assert complete(pd.spec.router_url, "The capital of France is", max_tokens=4).text
    books, _ = pd.wait_settled()
    assert settled(books), books
