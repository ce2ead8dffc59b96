"""Decode side: land the streams in the KV pool.

When SGLang sees a request's transfer complete (first stream + first token), its pages are checked
and written into the KV pool: Anchor-only (``int4``, ``lynx``) or exact INT8 (``int8``). A ``lynx``
request is then :class:`Anchored` until its Residual lands and :meth:`Anchored.refine` rewrites its
pages with INT8-exact values; what it does meanwhile is the speculation module's business.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from http import HTTPStatus
from typing import Optional

from sglang.srt.disaggregation.utils import FAKE_BOOTSTRAP_HOST, prepare_abort

from sglang_lynx.streams.mooncake import LynxKVManager, ResidualArrival
from sglang_lynx.streams.rows import LynxTransferError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Anchored:
    """A ``lynx`` request whose prompt pages hold Anchor-only KV until its Residual lands."""

    manager: LynxKVManager
    pages: list
    num_tokens: int
    room: int
    since: float
    arrived: bool = False

    def take_residual(self) -> Optional[ResidualArrival]:
        """None while the Residual is on its way; then once its arrival (or why it will not come)."""
        arrival = self.manager.take_residual_arrival(self.room)
        if arrival is None:
            waited = time.time() - self.since
            if waited < self.manager.waiting_timeout:
                return None
            arrival = ResidualArrival(f"the Residual did not arrive within {waited:.0f} s", time.time())
        else:
            self.arrived = True
        self.record(residual_landed=arrival.at)
        return arrival

    def refine(self) -> Optional[str]:
        """Rewrite the prompt pages with INT8-exact KV; the reason if the bytes are not usable."""
        started = time.time()
        try:
            self.manager.rows.land(self.pages, self.num_tokens, self.room, merged=True)
        except LynxTransferError as e:
            return str(e)
        self.record(refine_s=time.time() - started)
        return None

    def record(self, **fields) -> None:
        self.manager.timings.add(self.room, **fields)

    def close(self, failure: Optional[str] = None, **fields) -> None:
        """Done with the rows (before SGLang frees the pages); a Residual still to come is dropped."""
        self.manager.rows.forget(self.pages)
        if not self.arrived:
            self.manager.abandon_residual(self.room)
        if failure is not None:
            fields["failure"] = failure
        self.manager.timings.flush(self.room, **fields)


def anchored_requests(queue) -> dict[str, Anchored]:
    """The transfer queue's ``lynx`` requests landed on their Anchor and not yet taken up, by rid."""
    if not hasattr(queue, "_lynx_anchored"):
        queue._lynx_anchored = {}
    return queue._lynx_anchored


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
    now = time.time()
    manager.timings.add(req.bootstrap_room, rid=req.rid, first_stream_landed=now, tokens=num_tokens)
    result = original(queue, decode_req)
    if mode == "lynx" and not req.finished():
        anchored_requests(queue)[req.rid] = Anchored(manager, pages, num_tokens, req.bootstrap_room, now)
    else:
        manager.rows.forget(pages)
        if mode == "lynx":
            manager.abandon_residual(req.bootstrap_room)
        manager.timings.flush(req.bootstrap_room)
    return result
