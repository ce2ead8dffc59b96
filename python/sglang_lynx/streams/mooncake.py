"""Lynx on SGLang's Mooncake transport: the KV manager, subclassed.

Both workers keep a staging area of Lynx rows (:class:`StagingRows`) beside the KV pool,
registered with Mooncake once; a request holds rows only while its streams travel.

Decode: takes rows for a request when SGLang allocates its pages and sends them to prefill with
SGLang's metadata message. A request whose rows are not free yet stays in SGLang's prealloc
queue, oldest first (``landing.hold_for_staging``): no pages are taken, and prefill waits for the
metadata as it does for a full KV pool. Rows go back once the Anchor (``int8``, ``int4``) or the
Residual (``lynx``) is in the KV pool, or when SGLang releases a failed request; rows whose
Residual may still be on its way go back when it has landed (or failed, or timed out).

First token (``--lynx-first-token-at-prefill``, the default): at a request's last chunk prefill has
its first token in its aux row (the metadata SGLang sends decode after the KV). In the same
scheduler step, once prefill has answered the request, it sends the row to decode in one small
``LYNX_FIRST`` message beside the paced link, which decode writes into its own aux row for the
request (``first_token`` does the rest).

Prefill (per request chunk, on the scheduler thread right after the forward): takes the
request's rows at its first chunk (or queues the chunk, oldest first, until they are free),
encodes the chunk's pages into them, then hands the chunk to the stream scheduler. Its Anchor
job writes the first stream of every row into decode's rows and only then passes the chunk on to
SGLang's own transfer worker, with no pages (``raw``: with the pages, whose bytes SGLang writes
itself). SGLang's worker then sends the first token (aux row) and reports Success to decode
exactly as usual, and prefill answers its HTTP request (the router relays decode's stream only
after that answer), unless it answered it at the first token. In ``lynx`` mode the Residual
follows in bounded jobs behind every pending Anchor; its end is announced to decode with a
``LYNX_RESIDUAL`` message. The request's KV pages and rows are released only after that: the
prefill scheduler's release is deferred until then.

Decode appends the address of its rows and its Lynx settings to SGLang's registration message.
Prefill refuses to transfer to a decode worker whose settings differ, through SGLang's own
per-session rejection, so the request fails with that reason and both workers keep serving.

Every byte either side writes goes through :meth:`LynxKVManager._transfer_data`, paced by the
emulated link (``--lynx-bandwidth-mbps``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import threading
import time
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.common.conn import ABORT_TAG
from sglang.srt.disaggregation.common.utils import AuxDataCodec
from sglang.srt.disaggregation.mooncake.conn import MooncakeKVManager
from sglang.srt.disaggregation.utils import DisaggregationMode
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.utils.network import NetworkAddress

from sglang_lynx.config import PLAIN_POOL, LynxConfig, LynxConfigError
from sglang_lynx.streams import ranks
from sglang_lynx.streams.rows import VERSION, StagingRows, row_runs, split_blocks
from sglang_lynx.streams.scheduler import ANCHOR, RESIDUAL, Pacer, StreamScheduler
from sglang_lynx.streams.timings import Timings

logger = logging.getLogger(__name__)

REGISTRATION_FRAME = b"LYNX"  # followed by one JSON frame, at the end of decode's registration
ROWS_FRAME = b"LYNX_ROWS"  # followed by decode's rows (int32), at the end of SGLang's metadata message
RESIDUAL_MESSAGE = b"LYNX_RESIDUAL"  # [header, room, b"1" ok | b"0" failed, reason]
MIDDLE_MESSAGE = b"LYNX_MIDDLE"  # [header, room]: the Residual's middle stage is in decode's rows
FIRST_TOKEN_MESSAGE = b"LYNX_FIRST"  # [header, room, decode's aux index, the aux row of each buffer...]
# A new request's Anchor waits for at most one Residual job: keep a job to a few ms of link time.
RESIDUAL_JOB_SECONDS = 0.02
RESIDUAL_JOB_BYTES = (4 << 10, 1 << 20)  # bounds, whatever the link
MAX_BLOCKS_PER_BATCH = 1024  # transfer blocks per Mooncake batch
NO_PAGES = np.empty(0, dtype=np.int32)
FLOAT_KV = (torch.float16, torch.bfloat16, torch.float32)


def check_pool(pool, mode: str) -> None:
    """Refuse a KV pool other than the one Lynx reads and writes: SGLang's MHATokenToKVPool itself (its
    subclasses lay pages out otherwise), token-major, in a float dtype. Which pool a worker gets depends
    on the model, so this is known only once the pool exists."""
    if type(pool) is not MHATokenToKVPool:
        detail = ""
    elif pool.kv_cache_layout != "nhd":
        detail = f" laid out {pool.kv_cache_layout}"
    elif pool.dtype not in FLOAT_KV:
        detail = f" of {pool.dtype}"
    else:
        return
    raise LynxConfigError(f"--lynx-mode {mode} needs {PLAIN_POOL}; this worker's KV pool is a "
                          f"{type(pool).__name__}{detail}. --lynx-mode off serves this model without Lynx")


class ResidualArrival(NamedTuple):
    failure: Optional[str]  # None: every byte of the Residual is in decode's rows
    at: float  # when decode heard of it (time.time())


@dataclasses.dataclass
class _ResidualPlan:
    """Where one request's Residual goes: (session, src rows, dst rows, endpoint, port) pieces."""

    pieces: list = dataclasses.field(default_factory=list)
    failure: Optional[str] = None


@dataclasses.dataclass
class _Chunk:
    """A prefill chunk whose KV is ready, waiting to be encoded into its request's rows."""

    room: int
    pages: np.ndarray
    num_tokens: int
    index_slice: slice
    is_last_chunk: bool
    targets: list  # (decode session, SGLang's TransferInfo)
    forward: Callable  # SGLang's add_transfer_request, given kv_indices
    queued_at: float


class LynxKVManager(MooncakeKVManager):
    # Send a failure's reason with the status (as SGLang's Mori and NIXL backends do), so that a
    # request refused for mismatched settings tells the client why. Decode always parses it.
    kv_status_msg_carries_reason = True

    def __init__(self, *args, **kwargs):
        # Prefill: decode aborted these rooms before this worker saw their request (room -> deadline).
        self.early_aborts: dict[int, float] = {}
        super().__init__(*args, **kwargs)
        self.lynx = LynxConfig.from_env()
        self.pacer = Pacer(self.lynx.bandwidth_mbps)
        # One record per request: the first tensor-parallel rank's (every rank moves its own heads alike).
        self.timings = Timings(self.lynx.timings_file if self.attn_tp_rank == 0 else None,
                               role=self.disaggregation_mode.value)
        self.rows: Optional[StagingRows] = None
        self.staged: dict[int, np.ndarray] = {}  # room -> the rows it holds
        if self.disaggregation_mode == DisaggregationMode.PREFILL:
            self.peers: dict[str, Optional[dict]] = {}  # decode session -> its Lynx registration
            self.peer_rows: dict[int, dict[str, np.ndarray]] = {}  # room -> decode session -> its rows
            self.waiting_chunks: collections.deque[_Chunk] = collections.deque()  # for rows, oldest first
            self.streams = StreamScheduler()
            self.residual_plans: dict[int, _ResidualPlan] = {}  # from first stream to Residual's end
            # room -> releases to run on the scheduler thread (SGLang's health checks all share room 0)
            self.deferred_releases: dict[int, list[Callable[[], None]]] = {}
            # room -> its first token's messages to decode, sent once prefill has answered its request
            self.first_token_messages: dict[int, list[tuple[NetworkAddress, list[bytes]]]] = {}
        else:
            self.waiting_since: dict[int, float] = {}  # room -> when it first waited for rows
            self.staging_waits: dict[int, float] = {}  # room -> seconds it waited, until it lands
            self.residual_arrivals: dict[int, ResidualArrival] = {}
            self.residual_sources: dict[int, str] = {}  # room -> bootstrap address of the prefill sending it
            # Rows of ended requests whose Residual may still be written into them: room -> (rows, deadline).
            self.abandoned: dict[int, tuple[np.ndarray, float]] = {}
            self.first_tokens: dict[int, float] = {}  # room -> when its first token came (aux row written)
            self.middle_arrivals: dict[int, float] = {}  # room -> when its Residual's middle stage landed
            self.arrived = threading.Event()  # a Residual or a first token: wakes an idle scheduler
            self._arrivals_lock = threading.Lock()  # the receiving thread vs the scheduler

    def attach_pool(self, pool) -> None:
        """Allocate the staging area beside the KV pool and register it for transfers."""
        check_pool(pool, self.lynx.mode)
        pool_nbytes = sum(b.numel() * b.element_size() for b in (*pool.k_buffer, *pool.v_buffer))
        self.rows = StagingRows(self.lynx, pool, pool.page_size, self.lynx.staging_nbytes(pool_nbytes))
        self.engine.register(self.rows.data_ptr, self.rows.nbytes)
        logger.info("Lynx %s staging: %d rows x %d B = %.1f MiB, %.1f%% of the KV pool (%.0f MiB); "
                    "%d tokens in flight at most; first stream %d B per row, Residual from byte %d; rows at 0x%x",
                    self.lynx.mode, self.rows.num_rows, self.rows.row_nbytes, self.rows.nbytes / 2**20,
                    100 * self.rows.nbytes / pool_nbytes, pool_nbytes / 2**20,
                    self.rows.num_rows * self.rows.page_size, self.rows.first_stream_nbytes,
                    self.rows.residual_at, self.rows.data_ptr)

    def too_large(self, pages: int) -> Optional[str]:
        """Why a request of ``pages`` pages can never be staged here, if it cannot."""
        if pages <= self.rows.num_rows:
            return None
        return (f"the prompt needs {pages} Lynx rows ({pages * self.rows.row_nbytes / 2**20:.1f} MiB) but the "
                f"{self.disaggregation_mode.value} worker's staging area holds {self.rows.num_rows} "
                f"({self.rows.nbytes / 2**20:.1f} MiB): raise --lynx-staging-mb")

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
        lynx = {"mode": self.lynx.mode, "stages": self.lynx.stages,
                "group_size": self.lynx.group_size, "first_token_at_prefill": self.lynx.first_token_at_prefill,
                "tp_size": self.attn_tp_size, "rows_ptr": self.rows.data_ptr,
                "row_nbytes": self.rows.row_nbytes, "row_version": VERSION}
        return super().build_receiver_registration_message() + [REGISTRATION_FRAME, json.dumps(lynx).encode()]

    def build_receiver_metadata_message(self, *, bootstrap_room, kv_indices, is_dummy, **kwargs):
        """Decode: SGLang's metadata message for a request whose pages were just allocated, plus the
        rows it takes (``landing.hold_for_staging`` let it through only if they are free)."""
        message = super().build_receiver_metadata_message(
            bootstrap_room=bootstrap_room, kv_indices=kv_indices, is_dummy=is_dummy, **kwargs)
        if is_dummy:
            return message
        rows = self.staged.get(bootstrap_room)
        if rows is None:
            rows = self.rows.alloc(len(kv_indices))
            if rows is None:  # not held back: only a request SGLang admits past the hold gets here
                rows = NO_PAGES
            else:
                self.staged[bootstrap_room] = rows
                since = self.waiting_since.pop(bootstrap_room, None)
                self.staging_waits[bootstrap_room] = 0.0 if since is None else time.time() - since
        return message + [ROWS_FRAME, rows.tobytes()]

    def _make_worker_recv(self, socket, *args, **kwargs):
        recv = super()._make_worker_recv(socket, *args, **kwargs)

        def recv_with_lynx():
            msg = recv()
            if msg is None:
                return None
            if msg[0] == RESIDUAL_MESSAGE:
                self._on_residual_message(msg)
                return None
            if msg[0] == MIDDLE_MESSAGE:
                self._on_middle_message(msg)
                return None
            if msg[0] == FIRST_TOKEN_MESSAGE:
                self._on_first_token(msg)
                return None
            if self.disaggregation_mode != DisaggregationMode.PREFILL:
                return msg
            if msg[0] == ABORT_TAG and len(msg) >= 2:
                self._note_early_abort(int(msg[1]))
            if msg[0] == b"None":
                # A decode worker registers; SGLang's parser ignores frames it does not know.
                session = msg[3].decode("ascii")
                lynx = len(msg) >= 2 and msg[-2] == REGISTRATION_FRAME
                self.peers[session] = json.loads(msg[-1]) if lynx else None
                return msg[:-2] if lynx else msg
            if len(msg) >= 2 and msg[-2] == ROWS_FRAME:  # a request's metadata, with decode's rows
                room, session = int(msg[0].decode("ascii")), msg[3].decode("ascii")
                self.peer_rows.setdefault(room, {})[session] = np.frombuffer(msg[-1], dtype=np.int32)
                return msg[:-2]
            return msg

        return recv_with_lynx

    def _note_early_abort(self, room: int) -> None:
        """Prefill: decode refuses requests it holds for rows (too large, aborted) possibly before this
        worker has registered them, and SGLang drops an abort for a room it does not know yet: the
        request would then wait out the bootstrap timeout. Remember it for when the room registers."""
        now = time.monotonic()
        if self.request_status.get(room) is None:
            self.early_aborts[room] = now + self.bootstrap_timeout
        for expired in [r for r, deadline in self.early_aborts.items() if deadline < now]:
            del self.early_aborts[expired]

    def update_status(self, bootstrap_room, status):
        super().update_status(bootstrap_room, status)
        if status == KVPoll.Bootstrapping and self.early_aborts.pop(bootstrap_room, None) is not None:
            self.record_failure(bootstrap_room, "Aborted by the decode worker")
            super().update_status(bootstrap_room, KVPoll.Failed)
        if status == KVPoll.Failed and self.disaggregation_mode == DisaggregationMode.PREFILL:
            # e.g. decode answered the request on its first token and aborted the transfer
            self.timings.close(bootstrap_room, failed=True)

    def _validate_peer_state_layout(self, decode_kv_args):
        fully_checked, mismatch = super()._validate_peer_state_layout(decode_kv_args)
        if mismatch is None:
            mismatch = self._lynx_mismatch(self.peers.get(decode_kv_args.mooncake_session_id))
        return fully_checked, mismatch

    def _lynx_mismatch(self, peer: Optional[dict]) -> Optional[str]:
        ours = {"mode": self.lynx.mode, "stages": self.lynx.stages, "group_size": self.lynx.group_size,
                "first_token_at_prefill": self.lynx.first_token_at_prefill}
        # (A decode worker of an earlier release sends no first_token_at_prefill: it takes no early token.)
        theirs = {k: peer.get(k, False) for k in ours} if peer else {"mode": "off"}
        if theirs != ours:
            flag = lambda k, v: (f"--{'' if v else 'no-'}lynx-{k.replace('_', '-')}" if isinstance(v, bool)
                                 else f"--lynx-{k.replace('_', '-')} {v}")
            describe = lambda d: " ".join(flag(k, v) for k, v in d.items())
            return (f"Lynx settings differ: prefill runs {describe(ours)}, decode runs {describe(theirs)}; "
                    f"start both workers with the same Lynx settings")
        if peer.get("tp_size", 1) != self.attn_tp_size:
            return (f"Lynx needs the same --tp-size on both workers (each rank sends its own KV heads to its "
                    f"peer rank): prefill runs --tp-size {self.attn_tp_size}, decode --tp-size {peer.get('tp_size', 1)}")
        if peer.get("row_version", 1) != VERSION:
            return (f"Lynx page row formats differ (version {VERSION} on prefill, {peer.get('row_version', 1)} "
                    f"on decode): run the same sglang-lynx release on both workers")
        if peer["row_nbytes"] != self.rows.row_nbytes:
            return (f"Lynx page rows differ ({self.rows.row_nbytes} B on prefill, {peer['row_nbytes']} B on "
                    f"decode): the workers need the same model and --page-size")
        return None

    # --- prefill: rows --------------------------------------------------------------------------

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
        if is_last_chunk:
            self.timings.add(bootstrap_room, kv_ready=time.time())  # the prompt's forward is done
            if self.lynx.first_token_at_prefill and aux_index is not None:
                self._prepare_first_token(bootstrap_room, aux_index, targets)
        self.waiting_chunks.append(_Chunk(bootstrap_room, pages, num_tokens, index_slice, is_last_chunk,
                                          targets, forward, time.time()))
        self.start_waiting_chunks()

    def start_waiting_chunks(self) -> None:
        """Encode and send every waiting chunk whose request holds rows or can take them now; a
        request that finds too few free rows waits, and so does every newer one (scheduler thread)."""
        blocked, waiting = False, collections.deque()
        for chunk in self.waiting_chunks:
            if chunk.room not in self.staged and (blocked or not self._take_rows(chunk)):
                blocked = True
                waiting.append(chunk)
            else:
                self._encode_chunk(chunk)
        self.waiting_chunks = waiting

    def _take_rows(self, chunk: _Chunk) -> bool:
        """Rows for the whole request at its first chunk; False if it has to wait for them."""
        room = chunk.room
        sessions = self.peer_rows.get(room, {})
        decode_rows = [sessions.get(session) for session, _ in chunk.targets]
        if any(rows is None or len(rows) == 0 for rows in decode_rows):
            self._fail(room, "Lynx: the decode worker sent no staging rows for this request")
            return True
        pages = max(len(rows) for rows in decode_rows)
        reason = self.too_large(pages)
        if reason is not None:
            self._fail(room, f"Lynx: {reason}")
            return True
        rows = self.rows.alloc(pages)
        if rows is None:
            return False
        self.staged[room] = rows
        self.timings.add(room, staging_wait_s=time.time() - chunk.queued_at)
        return True

    def _fail(self, room, reason: str) -> None:
        logger.error("Lynx: room %s: %s", room, reason)
        self.conclude_failure(bootstrap_room=room, failure_reason=reason)

    def _encode_chunk(self, chunk: _Chunk) -> None:
        room = chunk.room
        if room not in self.staged or self.request_status.get(room) == KVPoll.Failed:
            return chunk.forward(kv_indices=chunk.pages)  # failed or aborted: SGLang concludes
        if self.lynx.mode == "raw":  # SGLang's worker writes these pool pages itself
            self.timings.add(room, first_stream_bytes=len(chunk.pages) * sum(self.kv_args.kv_item_lens))
        started = time.time()
        rows = self.staged[room][chunk.index_slice]
        try:
            self.rows.encode(chunk.pages, rows, chunk.num_tokens, room)  # right after the forward, on this thread
        except ValueError as e:  # KV the codec cannot hold (NaN, Inf): this request fails, the worker serves on
            self._fail(room, f"Lynx: this request's KV cannot be encoded: {e}")
            return chunk.forward(kv_indices=chunk.pages)  # SGLang concludes the failed request
        self.timings.add(room, encode_s=time.time() - started, tokens=chunk.num_tokens)
        forward = functools.partial(chunk.forward, kv_indices=chunk.pages if self.lynx.mode == "raw" else NO_PAGES)
        self.streams.submit(ANCHOR, functools.partial(self._send_first_stream, chunk, rows, forward))

    def _free_rows(self, room) -> None:
        """Prefill: the request's KV is released; so are its rows and what waited for them."""
        self.rows.free(self.staged.pop(room, NO_PAGES))
        self.peer_rows.pop(room, None)
        self.first_token_messages.pop(room, None)  # it ended before its first token went
        if any(chunk.room == room for chunk in self.waiting_chunks):
            self.waiting_chunks = collections.deque(c for c in self.waiting_chunks if c.room != room)

    # --- prefill: streams ---------------------------------------------------------------------

    def _prepare_first_token(self, room, aux_index: int, targets) -> None:
        """The request's aux row (first token, its logprobs, cached-token counts) for each decode worker."""
        rows = [AuxDataCodec.serialize_data_from_buffer(ptr + size * aux_index, size)
                for ptr, size in zip(self.kv_args.aux_data_ptrs, self.kv_args.aux_item_lens)]
        self.first_token_messages[room] = [
            (NetworkAddress(info.endpoint, info.dst_port),
             [FIRST_TOKEN_MESSAGE, str(room).encode(), str(info.dst_aux_index).encode(), *rows])
            for _, info in targets]

    def send_first_token(self, room) -> None:
        """Send the first token of ``room`` to decode, ahead of its KV (scheduler thread, once prefill
        has answered the request: decode may end it on this token)."""
        for address, frames in self.first_token_messages.pop(room):
            self._send_multipart_locked(address.to_tcp(), frames, is_ipv6=address.is_ipv6)
        self.timings.add(room, first_token_sent=time.time())

    def _send_first_stream(self, chunk: _Chunk, rows, forward) -> None:
        room = chunk.room
        if self.request_status.get(room) in (None, KVPoll.Failed) or room not in self.peer_rows:
            return forward()  # aborted (or released) meanwhile: SGLang's worker drops the chunk
        plan = self.residual_plans.setdefault(room, _ResidualPlan()) if self.lynx.mode == "lynx" else None
        for session, info in chunk.targets:
            dst_rows = self.peer_rows[room][session][chunk.index_slice]
            blocks = row_runs(rows, dst_rows, self.rows.data_ptr, self.peers[session]["rows_ptr"],
                              self.rows.row_nbytes, 0, self.rows.first_stream_nbytes)
            if self._transfer_data(session, blocks) != 0:
                self.residual_plans.pop(room, None)
                self.conclude_failure(bootstrap_room=room,
                                      failure_reason=f"Lynx: writing the first KV stream to {session} failed")
                return
            self.timings.add(room, first_stream_bytes=sum(b[2] for b in blocks))
            if plan is not None:
                plan.pieces.append((session, rows, dst_rows, info.endpoint, info.dst_port))
        forward()
        if chunk.is_last_chunk:
            # SGLang's worker now writes the first token and reports Success; the Residual must not
            # take the link before that, or the first token would wait behind it.
            self._wait_concluded(room)
            self.timings.add(room, first_stream_sent=time.time())
            if plan is not None:
                self._schedule_residual(room)
            else:
                self.timings.flush(room)

    def set_bandwidth(self, mbps: float) -> None:
        """The emulated link's rate, at once (``lynx_bandwidth_mbps`` of SGLang's
        ``/set_internal_state``): a sweep over rates needs no restart."""
        self.lynx = dataclasses.replace(self.lynx, bandwidth_mbps=mbps)  # checked as the flag is
        self.pacer.set_rate(mbps)

    def _wait_concluded(self, room, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (self.request_status.get(room) not in (KVPoll.Success, KVPoll.Failed, None)
               and time.monotonic() < deadline):
            time.sleep(0.001)

    def _schedule_residual(self, room) -> None:
        """Queue the Residual's stages, each behind every pending Anchor and every earlier stage; decode
        hears of each stage's end (the last one's with its outcome)."""
        plan = self.residual_plans[room]
        low, high = RESIDUAL_JOB_BYTES
        rate = self.pacer.bytes_per_s
        job_bytes = high if rate is None else int(min(high, max(low, rate * RESIDUAL_JOB_SECONDS)))
        stages = self.rows.later_streams
        for i, (offset, length) in enumerate(stages):
            for session, src, dst, _, _ in plan.pieces:
                blocks = row_runs(src, dst, self.rows.data_ptr, self.peers[session]["rows_ptr"],
                                  self.rows.row_nbytes, offset, length)
                for job in split_blocks(blocks, job_bytes):
                    self.streams.submit(RESIDUAL + i, functools.partial(self._send_residual, room, session, job))
            last = i == len(stages) - 1
            self.streams.submit(RESIDUAL + i, functools.partial(
                self._finish_residual if last else self._finish_middle, room))

    def _send_residual(self, room, session, blocks) -> None:
        plan = self.residual_plans[room]
        if plan.failure is None and self.request_status.get(room) == KVPoll.Failed:
            plan.failure = "Lynx: the request was aborted"  # decode no longer wants its Residual
        if plan.failure is not None:
            return
        if self._transfer_data(session, blocks) != 0:
            plan.failure = f"Lynx: writing the Residual to {session} failed"
        else:
            self.timings.add(room, residual_bytes=sum(b[2] for b in blocks))

    def _finish_middle(self, room) -> None:
        plan = self.residual_plans[room]
        if plan.failure is None:  # a failure is told with the last stage
            self._tell_decode(plan, [MIDDLE_MESSAGE, str(room).encode()])
            self.timings.add(room, middle_sent=time.time())

    def _tell_decode(self, plan: _ResidualPlan, frames: list[bytes]) -> None:
        for endpoint, port in {(endpoint, port) for _, _, _, endpoint, port in plan.pieces}:
            address = NetworkAddress(endpoint, port)
            self._send_multipart_locked(address.to_tcp(), frames, is_ipv6=address.is_ipv6)

    def _finish_residual(self, room) -> None:
        plan = self.residual_plans.pop(room)
        ok = plan.failure is None
        self._tell_decode(plan, [RESIDUAL_MESSAGE, str(room).encode(), b"1" if ok else b"0",
                                 (plan.failure or "").encode()])
        if not ok:
            logger.error("Lynx: Residual of room %s: %s", room, plan.failure)
        self.timings.flush(room, residual_sent=time.time(), **({} if ok else {"failure": plan.failure}))

    # --- prefill: release ---------------------------------------------------------------------

    def release_after_residual(self, room, release: Callable[[], None]) -> None:
        """Release a finished request's KV and rows at the end of this scheduler step, or once its
        Residual has gone (scheduler thread)."""
        self.deferred_releases.setdefault(room, []).append(release)

    def step(self, group) -> None:
        """Prefill, at the end of each scheduler step: the releases whose Residual has gone from every
        rank of ``group`` (pages freed on some ranks only would make their next batches differ), then
        chunks that waited for rows."""
        rooms = list(self.deferred_releases)
        for room, gone in zip(rooms, ranks.on_every_rank(group, [r not in self.residual_plans for r in rooms])):
            if gone:
                for release in self.deferred_releases.pop(room):
                    release()
                self._free_rows(room)
        if self.waiting_chunks:
            self.start_waiting_chunks()

    def has_work(self) -> bool:
        return bool(self.deferred_releases or self.waiting_chunks)

    # --- decode: rows -------------------------------------------------------------------------

    def note_waiting(self, held: list, admitted: list) -> None:
        """Decode: the rooms of the requests held in the prealloc queue for rows now, and of those
        let through (whose wait ends when they take their rows)."""
        with self._arrivals_lock:
            expired = self._expired_rows()
        self.rows.free(expired)  # here too, so that they come back on a worker that sees no releases
        now = time.time()
        since = {room: self.waiting_since.get(room, now) for room in held}
        since.update((room, self.waiting_since[room]) for room in admitted if room in self.waiting_since)
        self.waiting_since = since

    def staging_wait(self, room) -> float:
        """Seconds the request of ``room`` waited for rows (once, when it lands)."""
        return self.staging_waits.pop(room, 0.0)

    def release_rows(self, room, residual_due: bool = False, rows_written: bool = False) -> None:
        """Decode: the request of ``room`` is done with its rows. ``residual_due``: its Residual's
        message has not been taken yet (it is dropped when it comes). ``rows_written``: prefill may
        still be writing that Residual into the rows, so they go back once it has landed or failed
        (or after SGLang's waiting timeout, should prefill never say)."""
        self.waiting_since.pop(room, None)
        self.staging_waits.pop(room, None)
        self.residual_sources.pop(room, None)
        rows = self.staged.pop(room, NO_PAGES)
        with self._arrivals_lock:
            self.first_tokens.pop(room, None)
            self.middle_arrivals.pop(room, None)
            if residual_due and self.residual_arrivals.pop(room, None) is None:
                # A second release of the same request (SGLang's, after Lynx's own) keeps what the first kept.
                kept, _ = self.abandoned.get(room, (NO_PAGES, 0.0))
                if rows_written:
                    kept, rows = np.concatenate([kept, rows]), NO_PAGES
                self.abandoned[room] = (kept, time.monotonic() + self.waiting_timeout)
            rows = np.concatenate([rows, self._expired_rows()])
        self.rows.free(rows)

    def _expired_rows(self) -> np.ndarray:
        """Quarantined rows whose Residual has not come within the timeout (caller holds the lock)."""
        now = time.monotonic()
        expired = [room for room, (_, deadline) in self.abandoned.items() if deadline < now]
        return np.concatenate([NO_PAGES, *(self.abandoned.pop(room)[0] for room in expired)])

    # --- decode: arrivals ---------------------------------------------------------------------

    def _on_first_token(self, msg) -> None:
        room, aux_index, rows = int(msg[1]), int(msg[2]), msg[3:]
        if self.request_status.get(room) in (None, KVPoll.Failed, KVPoll.Success):
            return  # its request has ended (aux row freed, maybe someone else's now) or has its aux already
        for buffer, row in enumerate(rows[:len(self.kv_args.aux_data_ptrs)]):
            AuxDataCodec.deserialize_data_to_buffer(self.kv_args, buffer, aux_index, row)
        with self._arrivals_lock:
            self.first_tokens[room] = time.time()
        self.arrived.set()

    def first_token_came(self, room) -> Optional[float]:
        """When the first token of ``room`` came, once it has (its aux row then holds it); else None."""
        return self._arrival(self.first_tokens, room)

    def take_first_token(self, room) -> Optional[float]:
        """:meth:`first_token_came`, once: the token is being committed."""
        return self._arrival(self.first_tokens, room, take=True)

    def _arrival(self, arrivals: dict, room, take: bool = False):
        """What the receiving thread recorded in ``arrivals`` for ``room`` (None: nothing yet)."""
        with self._arrivals_lock:
            return arrivals.pop(room, None) if take else arrivals.get(room)

    def _on_residual_message(self, msg) -> None:
        room, ok, reason = int(msg[1]), msg[2] == b"1", msg[3].decode()
        with self._arrivals_lock:
            abandoned = self.abandoned.pop(room, None)
            if abandoned is None:
                self.residual_arrivals[room] = ResidualArrival(None if ok else reason, time.time())
        if abandoned is not None:
            self.rows.free(abandoned[0])
            return
        self.arrived.set()

    def _on_middle_message(self, msg) -> None:
        room = int(msg[1])
        with self._arrivals_lock:
            if room not in self.staged:
                return  # released: its Residual is no longer wanted
            self.middle_arrivals[room] = time.time()  # (taken once its first stream has landed)
        self.arrived.set()

    def middle_arrival(self, room) -> Optional[float]:
        """When the Residual's middle stage of ``room`` landed, once it has; else None."""
        return self._arrival(self.middle_arrivals, room)

    def take_middle_arrival(self, room) -> Optional[float]:
        """:meth:`middle_arrival`, once: the request is being refined to it."""
        return self._arrival(self.middle_arrivals, room, take=True)

    def expect_residual(self, room, bootstrap_addr: str) -> None:
        """Decode: ``room`` landed on its Anchor; its Residual comes from the prefill at ``bootstrap_addr``."""
        self.residual_sources[room] = bootstrap_addr

    def _handle_node_failure(self, failed_bootstrap_addr: str):
        """Decode: SGLang's heartbeat lost a prefill worker and fails the requests still transferring
        from it; the Residuals it was still to send will not come either."""
        super()._handle_node_failure(failed_bootstrap_addr)
        lost = [room for room, addr in self.residual_sources.items() if addr == failed_bootstrap_addr]
        with self._arrivals_lock:
            for room in lost:
                self.residual_arrivals.setdefault(room, ResidualArrival(
                    f"lost the prefill worker ({failed_bootstrap_addr}) before the Residual arrived", time.time()))
        if lost:
            logger.error("Lynx: lost the prefill worker %s: %d requests will not get their Residual",
                         failed_bootstrap_addr, len(lost))
            self.arrived.set()

    def residual_arrival(self, room) -> Optional[ResidualArrival]:
        """The Residual of ``room`` once it has landed (or failed); else None."""
        return self._arrival(self.residual_arrivals, room)

    def take_residual_arrival(self, room) -> Optional[ResidualArrival]:
        """:meth:`residual_arrival`, once: the request is done waiting for it."""
        return self._arrival(self.residual_arrivals, room, take=True)

    def wait_for_residual(self, timeout: float) -> None:
        """Sleep until a Residual (or its middle stage, or a first token) lands or ``timeout`` passes (an
        idle scheduler waiting for one)."""
        if self.arrived.wait(timeout):
            self.arrived.clear()
