"""Requests a Lynx prefill/decode pair refuses up front, with a 400 that says why.

SGLang 0.5.23 accepts them and then fails in a way that takes workers down or leaves the client
waiting, so a clear refusal before anything is scheduled is what a client can act on:

- ``n`` > 1 (parallel sampling): every sample is sent with the request's one bootstrap room, so the
  samples' KV transfers collide (SGLang's own PD transfer hangs; no sample can be told apart);
- more top logprobs than the vocabulary has tokens: the sampler's ``topk`` fails inside the prefill
  scheduler, which then exits.
"""

from __future__ import annotations

from typing import Optional


def refusal(obj, vocab_size: int) -> Optional[str]:
    """Why a ``GenerateReqInput`` (single or batch, before SGLang normalises it) cannot be served."""
    params = obj.sampling_params if isinstance(obj.sampling_params, list) else [obj.sampling_params]
    n = max((p or {}).get("n", 1) or 1 for p in params) if params else 1
    if n > 1:
        return (f"n={n}: parallel sampling (n > 1) is not supported with prefill/decode disaggregation, "
                f"where every sample would share the request's one KV transfer; send {n} requests instead")
    top = obj.top_logprobs_num if isinstance(obj.top_logprobs_num, list) else [obj.top_logprobs_num]
    most = max((k or 0 for k in top), default=0)
    if most > vocab_size:
        return f"top_logprobs={most} is more than the model's vocabulary of {vocab_size} tokens"
    return None
