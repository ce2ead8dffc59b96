"""Prefill/decode serving through sglang-router, KV over Mooncake, answers exactly like one server.

Real SGLang workers, real Mooncake transfers (TCP on 127.0.0.1) and the real SmolLM2 model.
"""

import pytest
import requests

from sglang_lynx.client import complete
from sglang_lynx.cluster import ClusterSpec, PDCluster

from conftest import MAX_TOKENS, POOL_ARGS, PROMPTS

pytestmark = pytest.mark.e2e



@pytest.fixture(scope="module")
def cluster(model_path, reference, tmp_path_factory):
    spec = ClusterSpec(model_path=model_path, log_dir=tmp_path_factory.mktemp("pd"), server_args=POOL_ARGS)
    with PDCluster(spec) as cluster:
        yield cluster


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("name", PROMPTS)
def test_pd_output_equals_single_server(cluster, reference, name, stream):
    answer = complete(cluster.spec.router_url, PROMPTS[name], max_tokens=MAX_TOKENS, stream=stream)
    assert answer.text == reference[name]
    assert answer.text.strip(), "the model produced nothing"
    if stream:
        assert len(answer.chunks) > 1, "streaming delivered everything at once"


def test_repeated_prompt_is_served_again_identically(cluster, reference):
    # The second request for a cached prefix took a CUDA-only path on CPU before the compat layer.
    for _ in range(2):
        assert complete(cluster.spec.router_url, PROMPTS["capital"], max_tokens=MAX_TOKENS).text == \
            reference["capital"]


def test_malformed_request_gets_a_client_error_and_the_cluster_keeps_serving(cluster, reference):
    url = cluster.spec.router_url
    bad = requests.post(f"{url}/v1/completions", json={"model": "default", "max_tokens": "many"}, timeout=60)
    assert 400 <= bad.status_code < 500
    assert complete(url, PROMPTS["capital"], max_tokens=MAX_TOKENS).text == reference["capital"]


def test_idle_servers_do_not_keep_a_core_busy(cluster):
    busy = cluster.cpu_percent(seconds=5)
    assert busy < 40, f"idle cluster used {busy:.0f}% of a core"
