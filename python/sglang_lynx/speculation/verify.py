"""The verify pass and KV rollback, on SGLang's own batch and allocation machinery.

A speculating request holds output tokens t0 (exact, from prefill) .. ts (speculated on the Anchor)
and KV for the prompt (refined to INT8 by now) and for t0 .. t(s-1) (computed on the Anchor). One
EXTEND forward over t0 .. ts with the prompt's KV as prefix rewrites the KV of those tokens exactly
and gives the exact model's logits at every position: row j predicts the token after tj.
"""

from __future__ import annotations

import torch

from sglang.srt.layers.logits_processor import LogitsMetadata
from sglang.srt.managers.overlap_utils import resolve_forward_inputs
from sglang.srt.managers.schedule_batch import ScheduleBatch
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch


def truncate_kv(req, length: int, tree_cache) -> None:
    """Keep the KV of the first ``length`` positions of ``req``; give back the pages past them.

    Paged allocators free whole pages: the partly used last page stays with the request, and its
    stale slots are overwritten by the next tokens' KV.
    """
    kv = req.kv
    page_size = tree_cache.page_size
    start = -(-length // page_size) * page_size
    if kv.kv_allocated_len > start:
        tree_cache.free_kv_row(kv, [(start, kv.kv_allocated_len)])
    kv.kv_allocated_len = kv.kv_committed_len = length
    # SGLang extends the fill ids in place when output_ids grows; after a rollback they must be rebuilt.
    req.full_untruncated_fill_ids = req.origin_input_ids + req.output_ids


def exact_logits(scheduler, reqs: list) -> list[torch.Tensor]:
    """One forward pass for all ``reqs``; per request the [len(output_ids), V] exact logits."""
    for req in reqs:
        prompt_len = len(req.origin_input_ids)
        truncate_kv(req, prompt_len, scheduler.tree_cache)
        req.prefix_len = prompt_len
        req.extend_end = prompt_len + len(req.output_ids)
    batch = ScheduleBatch.init_new(reqs, scheduler.req_to_token_pool, scheduler.token_to_kv_pool_allocator,
                                   scheduler.tree_cache, scheduler.model_config, False,
                                   scheduler.spec_algorithm)
    batch.return_logprob = False  # logprobs come from the full logits below
    batch.prepare_for_extend()
    resolve_forward_inputs(batch, scheduler.future_map)
    runner = scheduler.tp_worker.model_runner
    forward_batch = ForwardBatch.init_new(batch, runner, capture_hidden_mode=CaptureHiddenMode.FULL,
                                          return_hidden_states_before_norm=False)
    hidden = runner.forward(forward_batch).logits_output.hidden_states
    # The model's LM head over every position (SGLang keeps only the last one of an extend).
    model = runner.model
    logits = model.logits_processor._get_logits(hidden, model.lm_head,
                                                LogitsMetadata.from_forward_batch(forward_batch),
                                                use_logits_buffer=False)
    return list(logits.split(batch.extend_lens))
