"""What a Lynx worker refuses up front, before SGLang's PD path would hang or crash on it."""

import types

import pytest

from sglang_lynx.admission import refusal

VOCAB = 49152


def request(sampling_params=None, top_logprobs_num=None):
    return types.SimpleNamespace(sampling_params=sampling_params, top_logprobs_num=top_logprobs_num)


@pytest.mark.parametrize("obj", [
    request(), request({"n": 1, "temperature": 1.0}), request([{"max_new_tokens": 4}, None]),
    request(top_logprobs_num=20), request(top_logprobs_num=[0, VOCAB]),
])
def test_ordinary_requests_pass(obj):
    assert refusal(obj, VOCAB) is None


def test_parallel_sampling_is_refused_naming_n():
    assert refusal(request({"n": 3}), VOCAB).startswith("n=3: parallel sampling (n > 1) is not supported")
    assert "n=2" in refusal(request([{"n": 1}, {"n": 2}]), VOCAB)  # any request of a batch


def test_more_top_logprobs_than_the_vocabulary_has_tokens_is_refused():
    assert refusal(request(top_logprobs_num=1_000_000), VOCAB) == (
        "top_logprobs=1000000 is more than the model's vocabulary of 49152 tokens")
    assert refusal(request(top_logprobs_num=[1, VOCAB + 1]), VOCAB)
