"""Workers started with different Lynx settings: the request fails clearly, the workers live on.

In its own module so that no other cluster is up at the same time (memory).
"""

import pytest
import requests

from sglang_lynx.cluster import ClusterSpec, PDCluster
from sglang_lynx.config import LynxConfig

from conftest import POOL_ARGS

pytestmark = pytest.mark.e2e


def test_workers_with_different_lynx_settings_fail_the_request_clearly_and_keep_serving(
        model_path, reference, tmp_path_factory):
    spec = ClusterSpec(model_path=model_path, lynx=LynxConfig(mode="lynx"),
                       decode_lynx=LynxConfig(mode="int8"), log_dir=tmp_path_factory.mktemp("mismatch"),
                       server_args=POOL_ARGS)
    with PDCluster(spec):
        for _ in range(2):
            r = requests.post(f"{spec.router_url}/v1/completions", timeout=120,
                              json={"model": "default", "prompt": "Hello", "max_tokens": 4})
            assert r.status_code >= 400
            assert "Lynx settings differ" in r.text and "--lynx-mode int8" in r.text
        for url in (spec.prefill_url, spec.decode_url):
            assert requests.get(f"{url}/health", timeout=30).status_code == 200
