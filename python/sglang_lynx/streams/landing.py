"""Decode side: land the streams in the KV pool, and hold a request until its Residual is in.

* When SGLang sees a request's transfer complete (first stream + first token), its pages are
  checked and written into the KV pool: Anchor-only (``int4``, ``lynx``) or exact INT8 (``int8``).
* In ``lynx`` mode the request then waits, outside SGLang's queues, for its Residual; its first
  token (exact: prefill computed it at full precision) is streamed to the client at once. When
  the Residual lands, its pages are rewritten with INT8-exact values on the scheduler thread and
  the request joins the batch. It never decodes on Anchor-only KV here: that is speculation.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from http import HTTPStatus

from sglang.srt.disaggregation.utils import FAKE_BOOTSTRAP_HOST, prepare_abort

from sglang_lynx.streams.mooncake import LynxKVManager
from sglang_lynx.streams.rows import LynxTransferError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Waiting:
    decode_req: object
    manager: LynxKVManager
    pages: list
    num_tokens: int
    since: float
    first_token_streamed: bool = False


def request_pages(queue, req, page_size: int) -> tuple[list, int]:
    """The decode pool pages holding the prompt of ``req``, and its token count."""
    num_tokens = len(req.origin_input_ids)
    tokens = queue.scheduler.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :num_tokens:page_size]
    return (tokens // page_size).tolist(), num_tokens


def commit_transfer(original, queue, decode_req):
    """AROUND ``DecodeTransferQueue._commit_transfer_to_req``: land the first stream first."""
    receiver = decode_req.kv_receiver
    manager = getattr(receiver, "kv_mgr", None)
    # Warm-up and health-check requests use a fake transfer: no KV travels for them.
    if not isinstance(manager, LynxKVManager) or decode_req.req.bootstrap_host == FAKE_BOOTSTRAP_HOST:
        return original(queue, decode_req)
    req, mode = decode_req.req, manager.lynx.mode
    pages, num_tokens = request_pages(queue, req, manager.rows.page_size)
    try:
        manager.rows.land(pages, num_tokens, req.bootstrap_room, merged=mode == "int8")
    except LynxTransferError as e:
        logger.error("Lynx: request %s: %s", req.rid, e)
        prepare_abort(req, f"Lynx KV transfer: {e}", status_code=HTTPStatus.INTERNAL_SERVER_ERROR)
        receiver.clear()
        decode_req.kv_receiver = None
        return None
    manager.timings.add(req.bootstrap_room, rid=req.rid, first_stream_landed=time.time(), tokens=num_tokens)
    if mode == "lynx":
        _waiting(queue)[req.rid] = _Waiting(decode_req, manager, pages, num_tokens, time.time())
    else:
        manager.rows.forget(pages)
        manager.timings.flush(req.bootstrap_room)
    return original(queue, decode_req)


def pop_transferred(original, queue, *args, **kwargs):
    """AROUND ``DecodeTransferQueue.pop_transferred``: hold ``lynx`` requests until refined."""
    ready = original(queue, *args, **kwargs)
    waiting = _waiting(queue)
    if not waiting:
        return ready
    released = [req for req in ready if req.rid not in waiting]
    for rid, entry in list(waiting.items()):
        req = entry.decode_req.req
        if not entry.first_token_streamed:
            # The first token came from prefill's full-precision forward: it is final.
            queue.scheduler.output_streamer.stream_output([req], req.return_logprob)
            entry.first_token_streamed = True
            entry.manager.timings.add(req.bootstrap_room, first_token_streamed=time.time())
        arrival = entry.manager.take_residual_arrival(req.bootstrap_room)
        failure = None
        if arrival is None:
            waited = time.time() - entry.since
            if waited < entry.manager.waiting_timeout:
                continue
            failure = f"the Residual did not arrive within {waited:.0f} s"
        else:
            failure, landed_at = arrival
            entry.manager.timings.add(req.bootstrap_room, residual_landed=landed_at)
        del waiting[rid]
        if failure is None:
            failure = _refine(entry)
        if failure is None:
            released.append(req)
        else:
            _abort(queue, entry, failure)
    return released


def has_waiting(queue) -> bool:
    return bool(getattr(queue, "_lynx_waiting", None))


def _refine(entry: _Waiting):
    req = entry.decode_req.req
    try:
        entry.manager.rows.land(entry.pages, entry.num_tokens, req.bootstrap_room, merged=True)
    except LynxTransferError as e:
        return str(e)
    entry.manager.rows.forget(entry.pages)
    entry.manager.timings.flush(req.bootstrap_room, residual_applied=time.time())
    return None


def _abort(queue, entry: _Waiting, failure: str) -> None:
    req = entry.decode_req.req
    logger.error("Lynx: request %s: %s", req.rid, failure)
    entry.manager.rows.forget(entry.pages)
    entry.manager.timings.flush(req.bootstrap_room, failure=failure)
    prepare_abort(req, f"Lynx KV transfer: {failure}", status_code=HTTPStatus.INTERNAL_SERVER_ERROR)
    queue.scheduler.output_streamer.stream_output([req], req.return_logprob)
    queue._release_request(entry.decode_req)


def _waiting(queue) -> dict:
    if not hasattr(queue, "_lynx_waiting"):
        queue._lynx_waiting = {}
    return queue._lynx_waiting
