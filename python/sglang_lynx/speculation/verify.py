"""The verify pass (and the re-draft pass at a middle stage) and KV rollback, on SGLang's own batch and
allocation machinery.

A speculating request holds output tokens t0 (exact, from prefill) .. ts (speculated on the Anchor)
and KV for the prompt (refined to INT8 by now) and for t0 .. t(s-1) (computed on the Anchor). One
EXTEND forward over t0 .. ts with the prompt's KV as prefix rewrites the KV of those tokens exactly
and gives the exact model's logits at every position: row j predicts the token after tj.

SGLang's torch-native attention (the CPU backend) pads an extend's queries to the whole sequence,
so s tokens after a P-token prompt would cost (P + s)^2, a new prefill; during the verify pass they
attend from the s tokens only, n (P + s). GPU backends (FlashInfer) already do so.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch.nn.functional import scaled_dot_product_attention

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


def pages_to_verify(req, page_size: int) -> int:
    """Pages the verify pass of ``req`` takes from the pool beyond those it holds now: it gives back
    the pages past its prompt and takes slots for all its output tokens, one more than it has KV for."""
    held = -(-req.kv.kv_allocated_len // page_size)
    return -(-(len(req.origin_input_ids) + len(req.output_ids)) // page_size) - held


_in_verify_pass = False  # set on the scheduler thread around the verify forward


@contextlib.contextmanager
def verify_pass():
    global _in_verify_pass
    _in_verify_pass = True
    try:
        yield
    finally:
        _in_verify_pass = False


def attend_new_tokens(query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                      extend_prefix_lens, extend_seq_lens, encoder_lens=None, scaling=None, enable_gqa=False,
                      causal=False, is_cross_attn=False, sliding_window_size=None) -> Optional[torch.Tensor]:
    """Causal attention of each sequence's new tokens over its whole KV, in SGLang's torch-native
    extend layout (query/output [tokens, heads, dim]). None outside the verify pass, or for what it
    does not cover (encoders, sliding windows): SGLang's own attention then runs."""
    if (not _in_verify_pass or encoder_lens is not None or not causal
            or (sliding_window_size is not None and sliding_window_size > -1)):
        return None
    query = query.movedim(0, 1)  # [heads, tokens, dim]
    start = 0
    for i in range(seq_lens.shape[0]):
        new, prefix, total = int(extend_seq_lens[i]), int(extend_prefix_lens[i]), int(seq_lens[i])
        tokens = req_to_token[req_pool_indices[i], :total]
        key, value = k_cache[tokens].movedim(0, 1), v_cache[tokens].movedim(0, 1)
        q = query[:, start:start + new]
        if key.dtype != q.dtype:
            key, value = key.to(q.dtype), value.to(q.dtype)
        # query j sits at position prefix + j and sees keys 0 .. prefix + j
        positions = torch.arange(prefix, prefix + new, device=q.device)
        mask = torch.arange(total, device=q.device)[None, :] <= positions[:, None]
        out = scaled_dot_product_attention(q.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), attn_mask=mask,
                                           scale=scaling, enable_gqa=enable_gqa)
        output[start:start + new] = out.squeeze(0).movedim(0, 1)
        start += new
    return output


def output_logits(scheduler, reqs: list) -> list[torch.Tensor]:
    """One forward pass for all ``reqs`` over their output tokens, on the prompt KV they hold (exact once
    refined to INT8; at the middle stage's bits for a re-draft); per request [len(output_ids), V] logits."""
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
    with verify_pass():
        hidden = runner.forward(forward_batch).logits_output.hidden_states
    # The model's LM head over every position (SGLang keeps only the last one of an extend).
    model = runner.model
    logits = model.logits_processor._get_logits(hidden, model.lm_head,
                                                LogitsMetadata.from_forward_batch(forward_batch),
                                                use_logits_buffer=False)
    return list(logits.split(batch.extend_lens))
