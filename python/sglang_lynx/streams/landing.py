"""Decode side: hold requests until their rows are free, land the streams in the KV pool.

A request leaves SGLang's prealloc queue (pages allocated, metadata sent to prefill) only when the
staging area has rows for it, oldest first (:func:`hold_for_staging`). When SGLang sees its transfer
complete (first stream + first token), its rows are checked and written into the KV pool:
Anchor-only (``int4``, ``lynx``) or exact INT8 (``int8``). A ``lynx`` request is then
:class:`Anchored` until its Residual lands and :meth:`Anchored.refine` rewrites its pages with
INT8-exact values (a Residual in stages: :meth:`Anchored.refine_middle` first, at the bits of the
middle stage); what it does meanwhile is the speculation module's business.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from http import HTTPStatus
from typing import Optional

from sglang.srt.disaggregation.utils import FAKE_BOOTSTRAP_HOST, prepare_abort

from sglang_lynx.streams import ranks
from sglang_lynx.streams.first_token import COMMITTING, end_transfer
from sglang_lynx.streams.mooncake import LynxKVManager, ResidualArrival
from sglang_lynx.streams.rows import LynxTransferError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Anchored:
    """A ``lynx`` request whose prompt pages hold Anchor-only KV until its Residual lands."""

    manager: LynxKVManager
    pages: list  # in the KV pool
    rows: list  # in the staging area
    num_tokens: int
    room: int
    since: float
    arrived: bool = False

    def residual_came(self) -> bool:
        """Whether :meth:`take_residual` has an answer: the Residual landed, failed or is late."""
        return (self.manager.residual_arrival(self.room) is not None
                or time.time() - self.since >= self.manager.waiting_timeout)

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

    @property
    def has_middle(self) -> bool:
        """Whether its Residual comes in two stages (``--lynx-stages 4,2,2``)."""
        return self.manager.rows.num_streams > 2

    def middle_came(self) -> bool:
        """Whether the Residual's middle stage has landed (and not been taken yet)."""
        return self.manager.middle_arrival(self.room) is not None

    def refine_middle(self) -> Optional[str]:
        """Rewrite the prompt pages with the KV at the bits of the Anchor and the middle stage; the
        reason if the bytes are not usable."""
        self.record(middle_landed=self.manager.take_middle_arrival(self.room))
        return self._land(self.manager.rows.num_streams - 1, "refine_middle_s")

    def refine(self) -> Optional[str]:
        """Rewrite the prompt pages with INT8-exact KV; the reason if the bytes are not usable."""
        return self._land(self.manager.rows.num_streams, "refine_s")

    def _land(self, streams: int, timing: str) -> Optional[str]:
        started = time.time()
        try:
            self.manager.rows.land(self.pages, self.rows, self.num_tokens, self.room, streams=streams)
        except LynxTransferError as e:
            return str(e)
        self.record(**{timing: time.time() - started})
        return None

    def record(self, **fields) -> None:
        self.manager.timings.add(self.room, **fields)

    def close(self, failure: Optional[str] = None, **fields) -> None:
        """Done with the rows (before SGLang frees the pages); a Residual still to come is dropped."""
        self.manager.release_rows(self.room, residual_due=not self.arrived, rows_written=not self.arrived)
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


def hold_for_staging(original, queue, *args, **kwargs):
    """AROUND ``DecodePreallocQueue.pop_preallocated``: let requests through, oldest first, only as
    far as the staging area has free rows for them; the others stay queued, with no pages taken. A
    request that needs more rows than the whole area is refused with a clear error."""
    manager = queue.kv_manager
    if not isinstance(manager, LynxKVManager):
        return original(queue, *args, **kwargs)
    if queue.pp_size == 1:
        queue._update_handshake_waiters()  # as pop_preallocated does first: hidden requests need it too
    # Every rank lets the same requests through: as far as the rank with the fewest free rows can.
    free = ranks.fewest(queue.gloo_group, manager.rows.free_rows) if queue.queue else manager.rows.free_rows
    held, admitted, refused = [], [], []
    for entry in queue.queue:
        req = entry.req
        # Requests still in their handshake count too: it may complete inside pop_preallocated.
        if req.finished() or req.bootstrap_host == FAKE_BOOTSTRAP_HOST:
            continue
        pages = manager.rows.pages_for(queue._rebootstrap_prefill_len(req))
        reason = manager.too_large(pages)
        if reason is not None:
            refused.append((entry, reason))  # kept from pop_preallocated until SGLang's abort scan drops it
        elif held or pages > free:
            held.append(entry)
        else:
            free -= pages
            admitted.append(req.bootstrap_room)
    # Refused once the handshake is done on every rank: prefill can then be told, and not left waiting.
    told = [(entry, reason) for (entry, reason), ready in zip(refused, ranks.on_every_rank(
        queue.gloo_group, [entry.waiting_for_input for entry, _ in refused])) if ready]
    for entry, reason in told:
        prepare_abort(entry.req, f"Lynx: {reason}", status_code=HTTPStatus.BAD_REQUEST)
    receivers = [entry.kv_receiver for entry, _ in told]  # SGLang's abort scan drops them from the entries
    manager.note_waiting([entry.req.bootstrap_room for entry in held], admitted)
    hidden = {id(entry) for entry in held + [entry for entry, _ in refused] if not entry.req.finished()}
    everyone = list(queue.queue)
    queue.queue = [entry for entry in everyone if id(entry) not in hidden]
    try:
        return original(queue, *args, **kwargs)  # its abort scan answers the refused ones
    finally:
        position = {id(entry): i for i, entry in enumerate(everyone)}
        back = [entry for entry in everyone if id(entry) in hidden]
        queue.queue = sorted(queue.queue + back, key=lambda entry: position.get(id(entry), len(everyone)))
        for receiver in receivers:  # after the scan, so that the error stays ours; prefill drops the request
            receiver.ensure_abort_notified()


def release_failed(result, queue, decode_req):
    """AFTER ``DecodeTransferQueue._release_request``: SGLang lets go of a failed request's pages
    (once prefill can no longer write them); its rows go too."""
    manager = getattr(queue.scheduler.disagg_decode_prealloc_queue, "kv_manager", None)
    if isinstance(manager, LynxKVManager):
        # Its Residual, if one was on its way, stops once prefill sees the failure.
        manager.release_rows(decode_req.req.bootstrap_room, residual_due=manager.lynx.mode == "lynx")
    return result


def commit_transfer(original, queue, decode_req):
    """AROUND ``DecodeTransferQueue._commit_transfer_to_req``: land the first stream first (and
    the first token only, where it came ahead of the KV: ``first_token.stream_first_tokens``)."""
    first_token = getattr(decode_req, "lynx_first_token", None)
    receiver = decode_req.kv_receiver
    manager = getattr(receiver, "kv_mgr", None)
    # Warm-up and health-check requests use a fake transfer: no KV travels for them.
    if (first_token == COMMITTING or not isinstance(manager, LynxKVManager)
            or decode_req.req.bootstrap_host == FAKE_BOOTSTRAP_HOST):
        return original(queue, decode_req)
    req, mode, room = decode_req.req, manager.lynx.mode, decode_req.req.bootstrap_room
    pages, num_tokens = request_pages(queue, req, manager.rows.page_size)
    rows = manager.staged.get(room)
    failure = None
    try:
        if rows is None or len(rows) != len(pages):
            raise LynxTransferError(f"this request holds {0 if rows is None else len(rows)} Lynx rows for "
                                    f"{len(pages)} pages")
        manager.rows.land(pages, rows, num_tokens, room, streams=manager.rows.num_streams if mode == "int8" else 1)
    except LynxTransferError as e:
        failure = str(e)
    # SGLang commits the same requests in the same order on every rank: they agree on each landing.
    if ranks.on_any_rank(queue.gloo_group, [failure is not None])[0]:
        failure = failure or "its KV did not land on another tensor-parallel rank"
        logger.error("Lynx: request %s: %s", req.rid, failure)
        manager.release_rows(room, residual_due=mode == "lynx", rows_written=mode == "lynx")
        prepare_abort(req, f"Lynx KV transfer: {failure}", status_code=HTTPStatus.INTERNAL_SERVER_ERROR)
        receiver.clear()
        decode_req.kv_receiver = None
        return None
    now = time.time()
    manager.timings.add(room, rid=req.rid, first_stream_landed=now, tokens=num_tokens,
                        staging_wait_s=manager.staging_wait(room))
    if first_token is None:
        result = original(queue, decode_req)
        manager.timings.add(room, first_token_streamed=now)  # by SGLang, in this scheduler step
    else:  # SGLang committed it when the first token came: only the transfer's end is left
        result = None
        end_transfer(decode_req)
    if mode == "lynx" and not req.finished():
        anchored_requests(queue)[req.rid] = Anchored(manager, pages, list(rows), num_tokens, room, now)
        manager.expect_residual(room, receiver.bootstrap_addr)
    else:
        # A lynx request that ends on its first token does not wait for its Residual.
        manager.release_rows(room, residual_due=mode == "lynx", rows_written=mode == "lynx")
        manager.timings.flush(room)
    return result
