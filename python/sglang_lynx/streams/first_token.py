"""The first token at prefill time (``--lynx-first-token-at-prefill``, the default in every Lynx mode).

Prefill computes a request's first token exactly, from the full-precision KV, before any KV moves;
SGLang then ships it in the request's aux row behind the whole KV, and the router relays decode's
stream only once prefill has answered its own HTTP request, which SGLang does when the transfer is
over. Here:

* prefill answers its HTTP request right after the forward that made the token, as SGLang answers
  it once the KV has gone (the router relays decode's stream from then on), and sends decode the
  aux row in one small message, ahead of the KV (:func:`answer_prefill_requests`);
* decode commits the token with SGLang's own commit of the aux row and streams it at once
  (:func:`stream_first_tokens`); tokens 2 onward wait for the KV, as before. A failure of the
  transfer afterwards reaches the client from decode, after that first token.
"""

from __future__ import annotations

import time

from sglang.srt.managers.schedule_batch import FINISH_LENGTH

from sglang_lynx.streams import ranks
from sglang_lynx.streams.mooncake import LynxKVManager

# A decode request whose first token came ahead of its KV: while SGLang commits it, and after.
COMMITTING, COMMITTED = "committing", "committed"


def answer_prefill_requests(result, scheduler, *args, **kwargs):
    """AFTER ``process_disagg_prefill_inflight_queue`` (prefill, each scheduler step, right after the
    forward's results): answer the requests whose first token is ready (their last chunk is out of
    the forward, and decode has said where its aux row is), as SGLang answers a request whose
    transfer is done, then send decode their first tokens. In that order: decode ends a request that
    ends on its first token by aborting its transfer, which prefill would otherwise answer as a
    failure. SGLang concludes the transfers later, sending nothing more."""
    manager = getattr(scheduler.disagg_prefill_bootstrap_queue, "kv_manager", None)
    if not isinstance(manager, LynxKVManager) or not manager.first_token_messages:
        return result
    ready = [req for req in scheduler.disagg_prefill_inflight_queue
             if req.bootstrap_room in manager.first_token_messages]
    if not ready:
        return result
    kept = [req.finished_reason for req in ready]
    for req in ready:
        req.finished_reason = FINISH_LENGTH(length=0)
    scheduler.output_streamer.stream_output(ready, any(req.return_logprob for req in ready))
    for req, reason in zip(ready, kept):
        req.finished_reason = reason  # still transferring
        manager.send_first_token(req.bootstrap_room)
    return result


def stream_first_tokens(queue, *args, **kwargs) -> None:
    """BEFORE ``DecodeTransferQueue.pop_transferred`` (decode): every request whose first token came
    from prefill ahead of its KV (its aux row written) gets it now, by SGLang's own commit of that
    row, and the client sees it at once. A request that ends on it (``max_tokens`` 1, EOS, a stop)
    ends now: its transfer is aborted as a client's abort would, so that its KV leaves the link."""
    manager = getattr(queue.scheduler.disagg_decode_prealloc_queue, "kv_manager", None)
    if not isinstance(manager, LynxKVManager) or not manager.lynx.first_token_at_prefill:
        return
    receiving = [d for d in queue.queue if d.kv_receiver is not None and not d.req.finished()]
    # Each rank hears from its own prefill rank: a token is taken once every rank has it.
    everywhere = ranks.on_every_rank(
        queue.gloo_group, [manager.first_token_came(d.req.bootstrap_room) is not None for d in receiving])
    for decode_req in [d for d, came in zip(receiving, everywhere) if came]:
        req, room = decode_req.req, decode_req.req.bootstrap_room
        came = manager.take_first_token(room)
        receiver, decode_req.kv_receiver = decode_req.kv_receiver, _StillReceiving()
        decode_req.lynx_first_token = COMMITTING
        try:
            queue._commit_transfer_to_req(decode_req)
        finally:
            decode_req.kv_receiver, decode_req.lynx_first_token = receiver, COMMITTED
        req.update_finish_state()
        queue.scheduler.output_streamer.stream_output([req], req.return_logprob)
        manager.timings.add(room, rid=req.rid, first_token_came=came, first_token_streamed=time.time())
        if req.finished():
            manager.timings.flush(room, finished_on_first_token=True)
            receiver.abort()


class _StillReceiving:
    """A request's KV receiver while SGLang commits its first token: the commit ends by clearing the
    receiver (the transfer is over), but the KV is still on its way."""

    def clear(self) -> None:
        pass


def end_transfer(decode_req) -> None:
    """What SGLang's commit does last, for a request whose first token it committed earlier."""
    decode_req.kv_receiver.clear()
    decode_req.kv_receiver = None
    decode_req.req.time_stats.set_wait_queue_entry_time()
