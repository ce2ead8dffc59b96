"""Lynx on SGLang's Mooncake transport: the KV manager, subclassed.

Prefill (per request chunk, on the scheduler thread right after the forward):
  encode the chunk's pages into :class:`PageRows`, then hand the chunk to the stream
  scheduler. Its Anchor job writes the first stream of every page into the decode worker's
  rows and only then passes the chunk on to SGLang's own transfer worker, with no pages
  (``raw``: with the pages, whose bytes SGLang writes itself). SGLang's worker then sends the
  first token (aux row) and reports Success to decode exactly as usual, and prefill answers
  its HTTP request (the router relays decode's stream only after that answer). In ``lynx``
  mode the Residual follows in bounded jobs behind every pending Anchor; its end is announced
  to decode with a ``LYNX_RESIDUAL`` message. The request's KV pages (and so its rows) are
  released only after that: the prefill scheduler's release is deferred until then.

Decode: allocates rows beside its KV pool, registers them with Mooncake and appends their
address and its Lynx settings to SGLang's registration message. Prefill refuses to transfer
to a decode worker whose settings differ, through SGLang's own per-session rejection, so the
request fails with that reason and both workers keep serving.

Every byte either side writes goes through :meth:`LynxKVManager._transfer_data`, paced by the
emulated link (``--lynx-bandwidth-mbps``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
import time
from typing import Callable, NamedTuple, Optional

import numpy as np

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.mooncake.conn import MooncakeKVManager
from sglang.srt.disaggregation.utils import DisaggregationMode
from sglang.srt.utils.network import NetworkAddress

from sglang_lynx.config import LynxConfig
from sglang_lynx.streams.rows import VERSION, PageRows, page_runs, split_blocks
from sglang_lynx.streams.scheduler import ANCHOR, RESIDUAL, Pacer, StreamScheduler
from sglang_lynx.streams.timings import Timings

logger = logging.getLogger(__name__)

REGISTRATION_FRAME = b"LYNX"  # followed by one JSON frame, at the end of decode's registration
RESIDUAL_MESSAGE = b"LYNX_RESIDUAL"  # [header, room, b"1" ok | b"0" failed, reason]
# A new request's Anchor waits for at most one Residual job: keep a job to a few ms of link time.
RESIDUAL_JOB_SECONDS = 0.02
RESIDUAL_JOB_BYTES = (4 << 10, 1 << 20)  # bounds, whatever the link
MAX_BLOCKS_PER_BATCH = 1024  # transfer blocks per Mooncake batch
NO_PAGES = np.empty(0, dtype=np.int32)


class ResidualArrival(NamedTuple):
    failure: Optional[str]  # None: every byte of the Residual is in decode's rows
    at: float  # when decode heard of it (time.time())


@dataclasses.dataclass
class _ResidualPlan:
    """Where one request's Residual goes: (session, src pages, dst pages, endpoint, port) pieces."""

    pieces: list = dataclasses.field(default_factory=list)
    failure: Optional[str] = None


class LynxKVManager(MooncakeKVManager):
    # Send a failure's reason with the status (as SGLang's Mori and NIXL backends do), so that a
    # request refused for mismatched settings tells the client why. Decode always parses it.
    kv_status_msg_carries_reason = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lynx = LynxConfig.from_env()
        self.pacer = Pacer(self.lynx.bandwidth_mbps)
        self.timings = Timings(self.lynx.timings_file, role=self.disaggregation_mode.value)
        self.rows: Optional[PageRows] = None
        if self.disaggregation_mode == DisaggregationMode.PREFILL:
            self.peers: dict[str, Optional[dict]] = {}  # decode session -> its Lynx registration
            self.streams = StreamScheduler()
            self.residual_plans: dict[int, _ResidualPlan] = {}  # from first stream to Residual's end
            self.deferred_releases: dict[int, Callable[[], None]] = {}  # run on the scheduler thread
        else:
            self.residual_arrivals: dict[int, ResidualArrival] = {}
            self.abandoned_rooms: set[int] = set()  # their Residual is no longer wanted
            self.residual_landed = threading.Event()  # wakes an idle scheduler
            self._arrivals_lock = threading.Lock()  # the receiving thread vs the scheduler

    def attach_pool(self, pool) -> None:
        """Allocate rows beside the KV pool (one per page) and register them for transfers."""
        page_size = pool.page_size
        num_pages = pool.k_buffer[0].shape[0] // page_size
        self.rows = PageRows(self.lynx, pool, page_size, num_pages)
        self.engine.register(self.rows.data_ptr, self.rows.nbytes)
        logger.info("Lynx %s rows: %d pages x %d B (%.0f MiB), first stream %d B/page",
                    self.lynx.mode, num_pages, self.rows.row_nbytes, self.rows.nbytes / 2**20,
                    self.rows.first_stream_nbytes)

    # --- the link -----------------------------------------------------------------------------

    def _transfer_data(self, mooncake_session_id, transfer_blocks):
        self.pacer.pace(sum(length for _, _, length in transfer_blocks))
        # Mooncake fails a batch of thousands of blocks (a 4096-token prompt's rows at page size 1).
        for start in range(0, len(transfer_blocks), MAX_BLOCKS_PER_BATCH):
            batch = transfer_blocks[start:start + MAX_BLOCKS_PER_BATCH]
            status = super()._transfer_data(mooncake_session_id, batch)
            if status != 0:
                return status
        return 0

    # --- handshake ----------------------------------------------------------------------------

    def build_receiver_registration_message(self):
        lynx = {"mode": self.lynx.mode, "anchor_bits": self.lynx.anchor_bits,
                "group_size": self.lynx.group_size, "rows_ptr": self.rows.data_ptr,
                "row_nbytes": self.rows.row_nbytes, "row_version": VERSION}
        return super().build_receiver_registration_message() + [REGISTRATION_FRAME, json.dumps(lynx).encode()]

    def _make_worker_recv(self, socket, *args, **kwargs):
        recv = super()._make_worker_recv(socket, *args, **kwargs)

        def recv_with_lynx():
            msg = recv()
            if msg is None:
                return None
            if msg[0] == RESIDUAL_MESSAGE:
                self._on_residual_message(msg)
                return None
            if msg[0] == b"None" and self.disaggregation_mode == DisaggregationMode.PREFILL:
                # A decode worker registers; SGLang's parser ignores frames it does not know.
                session = msg[3].decode("ascii")
                lynx = len(msg) >= 2 and msg[-2] == REGISTRATION_FRAME
                self.peers[session] = json.loads(msg[-1]) if lynx else None
                return msg[:-2] if lynx else msg
            return msg

        return recv_with_lynx

    def _validate_peer_state_layout(self, decode_kv_args):
        fully_checked, mismatch = super()._validate_peer_state_layout(decode_kv_args)
        if mismatch is None:
            mismatch = self._lynx_mismatch(self.peers.get(decode_kv_args.mooncake_session_id))
        return fully_checked, mismatch

    def _lynx_mismatch(self, peer: Optional[dict]) -> Optional[str]:
        ours = {"mode": self.lynx.mode, "anchor_bits": self.lynx.anchor_bits, "group_size": self.lynx.group_size}
        theirs = {k: peer[k] for k in ours} if peer else {"mode": "off"}
        if theirs != ours:
            describe = lambda d: " ".join(f"--lynx-{k.replace('_', '-')} {v}" for k, v in d.items())
            return (f"Lynx settings differ: prefill runs {describe(ours)}, decode runs {describe(theirs)}; "
                    f"start both workers with the same Lynx settings")
        if peer.get("row_version", 1) != VERSION:
            return (f"Lynx page row formats differ (version {VERSION} on prefill, {peer.get('row_version', 1)} "
                    f"on decode): run the same sglang-lynx release on both workers")
        if peer["row_nbytes"] != self.rows.row_nbytes:
            return (f"Lynx page rows differ ({self.rows.row_nbytes} B on prefill, {peer['row_nbytes']} B on "
                    f"decode): the workers need the same model and --page-size")
        return None

    # --- prefill: streams ---------------------------------------------------------------------

    def add_transfer_request(self, bootstrap_room, kv_indices, index_slice, is_last_chunk,
                             aux_index=None, state_indices=None, num_kv_tokens=None, **kwargs):
        forward = functools.partial(
            super().add_transfer_request, bootstrap_room, index_slice=index_slice,
            is_last_chunk=is_last_chunk, aux_index=aux_index, state_indices=state_indices,
            num_kv_tokens=num_kv_tokens, **kwargs)
        infos = self.transfer_infos.get(bootstrap_room, {})
        targets = [(s, info) for s, info in infos.items() if not info.is_dummy]
        if (not targets or self.check_status(bootstrap_room) == KVPoll.Failed
                or any(s in self.state_layout_rejections for s, _ in targets)):
            # Nothing of ours to send; SGLang concludes (dummy rank, failure, rejected peer).
            forward(kv_indices=kv_indices)
            return
        pages = np.asarray(kv_indices, dtype=np.int64)
        num_tokens = num_kv_tokens or len(pages) * self.rows.page_size
        started = time.time()
        if is_last_chunk:
            self.timings.add(bootstrap_room, kv_ready=started)  # the prompt's forward is done
        if self.lynx.mode == "raw":  # SGLang's worker writes these pool pages itself
            self.timings.add(bootstrap_room, first_stream_bytes=len(pages) * sum(self.kv_args.kv_item_lens))
        self.rows.encode(pages, num_tokens)  # right after the forward, on this thread
        self.timings.add(bootstrap_room, encode_s=time.time() - started, tokens=num_tokens)
        self.streams.submit(ANCHOR, functools.partial(
            self._send_first_stream, bootstrap_room, pages, num_tokens, index_slice, is_last_chunk, targets,
            functools.partial(forward, kv_indices=kv_indices if self.lynx.mode == "raw" else NO_PAGES)))

    def _send_first_stream(self, room, pages, num_tokens, index_slice, is_last_chunk, targets, forward) -> None:
        if self.check_status(room) == KVPoll.Failed:
            return forward()  # aborted meanwhile: SGLang's worker drops the chunk
        # Stamped here, on the one sending thread: a radix-cached page may be in several requests' chunks.
        self.rows.stamp(pages, num_tokens, room)
        plan = self.residual_plans.setdefault(room, _ResidualPlan()) if self.lynx.mode == "lynx" else None
        for session, info in targets:
            dst_pages = info.dst_kv_indices[index_slice][: len(pages)]
            blocks = page_runs(pages, dst_pages, self.rows.data_ptr, self.peers[session]["rows_ptr"],
                               self.rows.row_nbytes, 0, self.rows.first_stream_nbytes)
            if self._transfer_data(session, blocks) != 0:
                self.residual_plans.pop(room, None)
                self.conclude_failure(bootstrap_room=room,
                                      failure_reason=f"Lynx: writing the first KV stream to {session} failed")
                return
            self.timings.add(room, first_stream_bytes=sum(b[2] for b in blocks))
            if plan is not None:
                plan.pieces.append((session, pages, dst_pages, info.endpoint, info.dst_port))
        forward()
        if is_last_chunk:
            # SGLang's worker now writes the first token and reports Success; the Residual must not
            # take the link before that, or the first token would wait behind it.
            self._wait_concluded(room)
            self.timings.add(room, first_stream_sent=time.time())
            if plan is not None:
                self._schedule_residual(room)
            else:
                self.timings.flush(room)

    def _wait_concluded(self, room, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (self.request_status.get(room) not in (KVPoll.Success, KVPoll.Failed, None)
               and time.monotonic() < deadline):
            time.sleep(0.001)

    def _schedule_residual(self, room) -> None:
        plan = self.residual_plans[room]
        low, high = RESIDUAL_JOB_BYTES
        rate = self.pacer.bytes_per_s
        job_bytes = high if rate is None else int(min(high, max(low, rate * RESIDUAL_JOB_SECONDS)))
        for session, src, dst, _, _ in plan.pieces:
            blocks = page_runs(src, dst, self.rows.data_ptr, self.peers[session]["rows_ptr"],
                               self.rows.row_nbytes, self.rows.residual_at, self.rows.residual_nbytes)
            for job in split_blocks(blocks, job_bytes):
                self.streams.submit(RESIDUAL, functools.partial(self._send_residual, room, session, job))
        self.streams.submit(RESIDUAL, functools.partial(self._finish_residual, room))

    def _send_residual(self, room, session, blocks) -> None:
        plan = self.residual_plans[room]
        if plan.failure is not None:
            return
        if self._transfer_data(session, blocks) != 0:
            plan.failure = f"Lynx: writing the Residual to {session} failed"
        else:
            self.timings.add(room, residual_bytes=sum(b[2] for b in blocks))

    def _finish_residual(self, room) -> None:
        plan = self.residual_plans.pop(room)
        ok = plan.failure is None
        endpoints = {(endpoint, port) for _, _, _, endpoint, port in plan.pieces}
        for endpoint, port in endpoints:
            address = NetworkAddress(endpoint, port)
            self._send_multipart_locked(
                address.to_tcp(),
                [RESIDUAL_MESSAGE, str(room).encode(), b"1" if ok else b"0", (plan.failure or "").encode()],
                is_ipv6=address.is_ipv6)
        if not ok:
            logger.error("Lynx: Residual of room %s: %s", room, plan.failure)
        self.timings.flush(room, residual_sent=time.time(), **({} if ok else {"failure": plan.failure}))

    # --- prefill: page release ----------------------------------------------------------------

    def release_after_residual(self, room, release: Callable[[], None]) -> None:
        """Release a finished request's KV now, or once its Residual has gone (scheduler thread)."""
        if room in self.residual_plans:
            self.deferred_releases[room] = release
        else:
            release()

    def run_deferred_releases(self) -> None:
        for room in [r for r in self.deferred_releases if r not in self.residual_plans]:
            self.deferred_releases.pop(room)()

    # --- decode: arrivals ---------------------------------------------------------------------

    def _on_residual_message(self, msg) -> None:
        room, ok, reason = int(msg[1]), msg[2] == b"1", msg[3].decode()
        with self._arrivals_lock:
            if room in self.abandoned_rooms:
                self.abandoned_rooms.discard(room)
                return
            self.residual_arrivals[room] = ResidualArrival(None if ok else reason, time.time())
        self.residual_landed.set()

    def take_residual_arrival(self, room) -> Optional[ResidualArrival]:
        """The Residual of ``room`` once it has landed (or failed); else None."""
        with self._arrivals_lock:
            return self.residual_arrivals.pop(room, None)

    def abandon_residual(self, room) -> None:
        """The request of ``room`` has ended: drop its Residual, now or when it comes."""
        with self._arrivals_lock:
            if self.residual_arrivals.pop(room, None) is None:
                self.abandoned_rooms.add(room)

    def wait_for_residual(self, timeout: float) -> None:
        """Sleep until a Residual lands or ``timeout`` passes (an idle scheduler waiting for one)."""
        if self.residual_landed.wait(timeout):
            self.residual_landed.clear()
