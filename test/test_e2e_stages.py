"""Three-stage refinement end to end (``--lynx-stages 4,2,2``): real SGLang workers, real Mooncake writes,
the real model.

The Residual travels as a middle stage (2 bits) then a last one (2 bits), every request's middle stage
before any request's last. When a request's middle stage lands, decode refines its prompt KV to 6 bits
and re-drafts the tokens it speculated on the Anchor; only the final pass, on INT8 KV, verifies, so the
answers are int8's and no client sees a token before it.
"""

import pytest
import requests

from sglang_lynx.cluster import settled

from conftest import SPECULATION_PROMPTS, ask_all_at_once, assert_streamed_only_once_verified, decode_records

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("lynx_pd", ["int8", "stages"], indirect=True)]

STAGED = 10  # of the speculation prompts, asked of the three-stage cluster (all of int8's are shared)
answers: dict[str, list] = {}  # cluster -> (answer, send time) per speculation prompt


def test_greedy_three_stage_lynx_re_drafts_at_the_middle_stage_and_answers_as_int8(lynx_cluster):
    name, cluster, timings = lynx_cluster
    answers[name] = ask_all_at_once(cluster, STAGED if name == "stages" else len(SPECULATION_PROMPTS))
    if name == "int8":
        return
    assert [a.text for a, _ in answers["stages"]] == [a.text for a, _ in answers["int8"][:STAGED]]
    decoded = decode_records(timings)
    mine = [decoded[answer.id] for answer, _ in answers["stages"]]
    assert all(r["first_stream_landed"] < r["middle_landed"] < r["residual_landed"] for r in mine)
    redrafted = [r for r in mine if "redraft_s" in r]  # those that had speculated by their middle stage
    assert len(redrafted) >= len(mine) // 2, f"{len(redrafted)} of {len(mine)} requests re-drafted"
    assert any(r["redrafted"] > 0 for r in redrafted), "no draft was replaced at the middle stage"
    assert any(r["redrafted"] < r["redraft_speculated"] for r in redrafted), "no draft was kept at the middle stage"
    assert all(r["speculated"] > 0 for r in mine)


def test_no_client_sees_a_token_before_the_last_stage_has_landed_and_verified_it(lynx_cluster):
    name, _, timings = lynx_cluster
    if name == "int8":
        pytest.skip("applies to the three-stage cluster")
    assert_streamed_only_once_verified(answers["stages"], timings)


def test_re_drafts_are_counted_in_server_info_and_prometheus_and_nothing_is_left_held(lynx_cluster):
    name, cluster, _ = lynx_cluster
    if name == "int8":
        pytest.skip("applies to the three-stage cluster")
    books, _ = cluster.wait_settled(timeout=60)
    assert settled(books)
    state = cluster.lynx_state("decode")
    assert state["free_kv_tokens"] == state["total_kv_tokens"] and state["rows_in_use"] == 0
    assert state["speculating"] == 0
    text = requests.get(f"{cluster.spec.decode_url}/metrics", timeout=60).text
    counter = lambda metric: sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                 if line.startswith(f"sglang:lynx_{metric}_total"))
    assert counter("redraft_passes") == state["redraft_passes"] > 0
    assert counter("redrafted_tokens") == state["redrafted_tokens"] > 0
    assert state["redrafted_requests"] > 0
