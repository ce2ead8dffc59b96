"""The staging area: KV pages in Lynx form, in rows handed out per request, on prefill and on decode.

A row holds one KV page, laid out so that each stream is one contiguous write::

    | header (32 B) | codec meta (table, zeros, scales) | Anchor planes | Residual planes |
    |<------------- first stream (Anchor) ------------------->|<- second stream ->|

With ``--lynx-stages A,B,C`` the Residual planes are the middle stage's then the last stage's (the codec's
``split_residual``), each sized for a full page and sent as a stream of its own.

Only KV in flight needs a row, so a worker has a fixed staging area (``--lynx-staging-mb``,
default 5% of its KV pool) and each request takes rows from it for as long as its streams travel:
on prefill from encoding until its last stream has gone, on decode from the moment SGLang allocates
its pages until its Anchor (``int8``, ``int4``) or Residual (``lynx``) is in the KV pool. Decode
tells prefill which of its rows each request got; prefill encodes page ``pages[i]`` into its own row
``rows[i]`` and writes it into decode's row ``decode_rows[i]``.

Each page is encoded on its own (its own scales and anchor table), so pages can be sent, landed and
checked independently. The header names the request (bootstrap room) and the codec settings, so
decode can tell Lynx data of this request from stale bytes or from a prefill worker with other
settings; headers are cleared when rows go back to the free list. With ``--lynx-verify-checksums``
(the default) the header also carries an xxh3 checksum of each stream's bytes, which decode checks
before the stream goes into its KV pool: a row damaged on the way fails its request instead of
giving a different answer. Prefill's flag decides whether the sums are written, decode's whether
they are checked.
"""

from __future__ import annotations

import itertools
import struct
import threading
from typing import Optional, Sequence

import numpy as np
import torch
import xxhash
from lynx_kernels import Slots

from sglang_lynx.codec import Codec, Planes
from sglang_lynx.config import MODES, QUANTIZED_MODES, LynxConfig, LynxConfigError

MAGIC = b"LYNX"
VERSION = 3  # 3: stream checksums; 2: 8-bit scales with a shared exponent per head
# magic, version, mode, anchor bits, flags, group size, valid tokens in the page, first stream's
# checksum, room, Residual's checksum (checksums: the low 32 bits of xxh3-64 over the stream's bytes),
# the middle stage's bits (0: the Residual is one stage)
HEADER = struct.Struct("<4sBBBBHHIQIB3x")
assert HEADER.size == 32
CHECKSUMMED = 1  # flags: the checksums are set
# Rows are encoded and landed this many tokens (whole pages, at least one) at a time, so that beside the
# KV pool a request needs one chunk's KV (prefill) or rows (decode), not its whole prompt's (SmolLM2 in
# float32: 90 and 24 MiB). Smaller chunks would save little, as the codec's own work memory per call
# (20-30 MiB on a CPU) stays, and would cost more calls.
CHUNK_TOKENS = 2048


class LynxTransferError(RuntimeError):
    """Bytes that arrived are not what this decode worker expects; the message says why."""


class StagingRows:
    """A staging area of ``nbytes`` beside a KV pool: rows of one page each, allocated per request.

    ``alloc`` and ``free`` may be called from any thread; encoding and landing run on the
    scheduler thread, on rows their request holds.
    """

    def __init__(self, config: LynxConfig, pool, page_size: int, nbytes: int):
        self.config = config
        self.page_size = page_size
        self.chunk_pages = max(1, CHUNK_TOKENS // page_size)
        self.k_buffers, self.v_buffers = list(pool.k_buffer), list(pool.v_buffer)
        _, num_heads, head_dim = self.k_buffers[0].shape
        self.dtype, self.device = self.k_buffers[0].dtype, self.k_buffers[0].device
        self.quantized = config.mode in QUANTIZED_MODES
        self.residual_plan = config.residual_plan
        if self.quantized:
            self.codec = Codec(num_layers=len(self.k_buffers), num_heads=num_heads, head_dim=head_dim,
                               anchor_bits=config.anchor_bits, group_size=config.group_size)
            meta = self.codec.meta_nbytes(page_size)
            anchor = self.codec.anchor_nbytes(page_size)
            stages = [self.codec.stage_nbytes(page_size, bits) for bits in self.residual_plan]
        else:  # raw: the pool's own bytes travel; the row carries only the header
            meta = anchor = 0
            stages = [0]
        self.meta_at = HEADER.size
        self.anchor_at = self.meta_at + meta
        self.residual_at = self.anchor_at + anchor
        self.stage_at = list(itertools.accumulate(stages, initial=self.residual_at))  # each stage's start, the end
        self.row_nbytes = self.stage_at[-1]
        self.num_streams = 1 + len(stages)  # the first (meta + Anchor), then each stage of the Residual
        # int8 sends everything at once; int4 never sends the Residual.
        self.first_stream_nbytes = self.row_nbytes if config.mode == "int8" else self.residual_at
        # lynx: the later streams, (offset, length) in a row, each sent after the one before across requests.
        self.later_streams = ([(start, end - start) for start, end in zip(self.stage_at, self.stage_at[1:])]
                              if config.mode == "lynx" else [])
        pool_pages = self.k_buffers[0].shape[0] // page_size
        self.num_rows = min(nbytes // self.row_nbytes, pool_pages)  # more rows than pages are never used
        if self.num_rows < 1:
            raise LynxConfigError(
                f"--lynx-staging-mb {nbytes / 2**20:g} holds no Lynx row: one {page_size}-token page takes "
                f"{self.row_nbytes / 2**20:.2f} MiB")
        self.buffer = torch.zeros(self.num_rows, self.row_nbytes, dtype=torch.uint8, device=self.device)
        self._free = list(range(self.num_rows - 1, -1, -1))  # a stack: low rows are reused first
        self._lock = threading.Lock()

    @property
    def data_ptr(self) -> int:
        return self.buffer.data_ptr()

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    # --- allocation -----------------------------------------------------------------------------

    def alloc(self, n: int) -> Optional[np.ndarray]:
        """``n`` free rows (int32 indices), or None when fewer than ``n`` are free."""
        with self._lock:
            if n > len(self._free):
                return None
            taken = [self._free.pop() for _ in range(n)]
        return np.asarray(taken, dtype=np.int32)

    def free(self, rows: Sequence[int]) -> None:
        """Give rows back, headers cleared so that they never pass for a later request's data."""
        if len(rows) == 0:
            return
        self.buffer[torch.as_tensor(np.asarray(rows), dtype=torch.long), : HEADER.size] = 0
        with self._lock:
            self._free.extend(int(r) for r in rows)

    @property
    def free_rows(self) -> int:
        with self._lock:
            return len(self._free)

    @property
    def rows_in_use(self) -> int:
        return self.num_rows - self.free_rows

    # --- prefill ------------------------------------------------------------------------------

    def encode(self, pages: Sequence[int], rows: Sequence[int], num_tokens: int, room: int) -> None:
        """Encode ``num_tokens`` tokens held in pool ``pages`` (all full but the last) into ``rows``,
        with headers naming request ``room``."""
        if self.quantized:
            L, _, H, D = len(self.k_buffers), *self.k_buffers[0].shape
            kv = torch.empty((2, L, min(self.chunk_pages * self.page_size, num_tokens), H, D), dtype=self.dtype,
                             device=self.device)
        for _, chunk_pages, chunk_rows, n in self._chunks(pages, rows, num_tokens):
            sizes = self._row_tokens(len(chunk_rows), n)
            sums = [None] * len(chunk_rows)
            if self.quantized:  # raw: the pool's own bytes travel, the row holds only the header
                self._gather(self._token_indices(chunk_pages, n), kv[:, :, :n])
                for i, (row, m) in enumerate(zip(chunk_rows, sizes)):
                    meta, anchor, stages = self._planes(self.buffer[row], m)
                    residual = self.buffer[row, self.residual_at: self.residual_at + self.codec.residual_nbytes(m)]
                    page = kv[:, :, i * self.page_size: i * self.page_size + m]
                    self.codec.encode(page, out=Planes(anchor, residual, meta, m))
                    if len(stages) > 1:  # the Residual's bit planes, each where its stream starts
                        for stage, planes in zip(stages, self.codec.split_residual(residual, m, self.residual_plan)):
                            stage.copy_(planes)
                if self.config.verify_checksums:
                    sums = [self._sums(host, m) for host, m in zip(self._host_rows(chunk_rows), sizes)]
            headers = b"".join(_header(self.config, m, room, s) for m, s in zip(sizes, sums))
            self.buffer[self._indices(chunk_rows), : HEADER.size] = torch.frombuffer(
                bytearray(headers), dtype=torch.uint8).view(len(chunk_rows), HEADER.size).to(self.device)

    def _gather(self, tokens: torch.Tensor, out: torch.Tensor) -> None:
        """The KV of pool slots ``tokens`` into ``out`` [2, L, T, H, D]."""
        for layer, (k_buf, v_buf) in enumerate(zip(self.k_buffers, self.v_buffers)):
            torch.index_select(k_buf, 0, tokens, out=out[0, layer])
            torch.index_select(v_buf, 0, tokens, out=out[1, layer])

    # --- decode -------------------------------------------------------------------------------

    def land(self, pages: Sequence[int], rows: Sequence[int], num_tokens: int, room: int, streams: int = 1) -> None:
        """Check ``rows`` and write their KV into pool ``pages``: with the first of their ``streams`` landed,
        the Anchor-only reconstruction; with all (``num_streams``), exact INT8; in between (a middle stage),
        the reconstruction at the bits landed."""
        if not 1 <= streams <= self.num_streams:
            raise ValueError(f"a row has {self.num_streams} streams; {streams} cannot have landed")
        headers = self.buffer[self._indices(rows), : HEADER.size].cpu().numpy()  # one read for all
        sums = [self._check_header(row, header.tobytes(), m, room)
                for row, header, m in zip(rows, headers, self._row_tokens(len(rows), num_tokens))]
        if not self.quantized:
            return
        chunks = list(self._chunks(pages, rows, num_tokens))
        if any(s is not None for s in sums):  # every row's, before any KV reaches the pool
            for first, _, chunk_rows, n in chunks:
                sizes = self._row_tokens(len(chunk_rows), n)
                for i, (row, host, m) in enumerate(zip(chunk_rows, self._host_rows(chunk_rows), sizes)):
                    if sums[first + i] is not None:
                        self._check_sums(row, sums[first + i], host, m, streams)
        # Each chunk's meta, Anchor (and stages landed) are gathered into the same buffers.
        spans = [(self.meta_at, self.anchor_at), (self.anchor_at, self.residual_at),
                 *zip(self.stage_at[: streams - 1], self.stage_at[1:streams])]
        staged = [torch.empty((min(self.chunk_pages, len(rows)), end - start), dtype=torch.uint8, device=self.device)
                  for start, end in spans]
        for _, chunk_pages, chunk_rows, n in chunks:
            indices = self._indices(chunk_rows)
            meta, anchor, *stages = (torch.index_select(self.buffer[:, start:end], 0, indices,
                                                        out=buf[: len(indices)])
                                     for (start, end), buf in zip(spans, staged))
            slots = Slots(self.k_buffers + self.v_buffers, self._token_indices(chunk_pages, n))
            try:
                self.codec.decode_pages(anchor, self._residual(stages), meta, n, self.page_size, self.dtype, out=slots)
            except ValueError as e:  # these bytes fail their request, not the worker
                raise LynxTransferError(f"the KV that arrived cannot be decoded: {e}") from e

    def _residual(self, stages: list[torch.Tensor]) -> Optional[torch.Tensor]:
        """The rows' Residual [rows, residual bytes of a page] from the stages landed (each [rows, its
        bytes]): None with none, the stage itself when it is the only one, else merged."""
        if not stages:
            return None
        if len(self.residual_plan) == 1:
            return stages[0]
        pages = stages[0].shape[0]
        return self.codec.merge_residual(stages, pages * self.page_size, self.residual_plan).view(pages, -1)

    def _check_header(self, row: int, header: bytes, num_tokens: int, room: int) -> Optional[tuple[int, int]]:
        """Raise unless ``header`` (of ``row``) names this request's page; its stream checksums, if they
        are to be checked."""
        magic, version, mode, bits, flags, group, n, first_sum, got_room, residual_sum, middle = HEADER.unpack(header)
        if magic != MAGIC or got_room != room:
            raise LynxTransferError(
                f"no Lynx data arrived for this request (row {row}): is the prefill worker running "
                f"with --lynx-mode {self.config.mode}?")
        plan = ",".join(map(str, (bits, middle, 8 - bits - middle) if middle else (bits, 8 - bits)))
        theirs = (MODES[mode] if mode < len(MODES) else f"mode#{mode}", plan, group)
        ours = (self.config.mode, self.config.stages, self.config.group_size)
        if version != VERSION or theirs != ours:
            raise LynxTransferError(
                f"prefill and decode disagree on Lynx settings: prefill sent mode={theirs[0]} "
                f"stages={theirs[1]} group_size={theirs[2]}, decode expects mode={ours[0]} "
                f"stages={ours[1]} group_size={ours[2]}")
        if n != num_tokens:
            raise LynxTransferError(f"row {row} carries {n} tokens, decode expected {num_tokens}")
        if flags & CHECKSUMMED and self.config.verify_checksums:
            return first_sum, residual_sum
        return None

    def _check_sums(self, row: int, sums: tuple[int, int], host: np.ndarray, num_tokens: int, streams: int) -> None:
        """Raise unless the streams of ``row`` (its bytes ``host``) that land now have the checksums ``sums``."""
        meta, anchor, stages = self._planes(host, num_tokens)
        # The first stream is checked when it lands, the Residual when all its stages are in (int8: both at
        # once). A middle stage is not checked on its own: its KV only guides speculation, and its bytes are
        # checked with the last stage's before any token decoded on them is verified.
        checks = [("Anchor", sums[0], (meta, anchor))] if streams == 1 or self.config.mode == "int8" else []
        if streams == self.num_streams:
            checks.append(("Residual", sums[1], stages))
        for stream, expected, parts in checks:
            if _checksum(*parts) != expected:
                raise LynxTransferError(
                    f"the {stream} of row {row} fails its checksum: the KV was damaged on its way from "
                    f"prefill, and the request fails rather than decode on it")

    # --- shared -------------------------------------------------------------------------------

    def _chunks(self, pages: Sequence[int], rows: Sequence[int], num_tokens: int):
        """(first row's position, pages, rows, tokens) of each chunk of a request, in order."""
        per = self.chunk_pages
        for first in range(0, len(rows), per):
            yield (first, pages[first: first + per], rows[first: first + per],
                   min(per * self.page_size, num_tokens - first * self.page_size))

    def _row_tokens(self, count: int, num_tokens: int) -> list[int]:
        """The tokens in each of ``count`` rows holding ``num_tokens`` tokens (all full but the last)."""
        return [min(self.page_size, num_tokens - i * self.page_size) for i in range(count)]

    def _planes(self, row, num_tokens: int):
        """Views of a row's meta, Anchor and Residual stages for a page holding ``num_tokens`` tokens
        (a partly filled page with more than one codec block uses only its leading blocks)."""
        return (row[self.meta_at: self.meta_at + self.codec.meta_nbytes(num_tokens)],
                row[self.anchor_at: self.anchor_at + self.codec.anchor_nbytes(num_tokens)],
                [row[start: start + self.codec.stage_nbytes(num_tokens, bits)]
                 for start, bits in zip(self.stage_at, self.residual_plan)])

    def _sums(self, host: np.ndarray, num_tokens: int) -> tuple[int, int]:
        """The checksums of the first stream (meta, Anchor) and the Residual (its stages in order) of a
        row's bytes ``host``."""
        meta, anchor, stages = self._planes(host, num_tokens)
        return _checksum(meta, anchor), _checksum(*stages)

    def _host_rows(self, rows: Sequence[int]) -> list[np.ndarray]:
        """The bytes of ``rows``, readable on the host: views of an area on the CPU, else one copy of all."""
        if self.device.type == "cpu":
            area = self.buffer.numpy()
            return [area[row] for row in rows]
        return list(self.buffer.index_select(0, self._indices(rows)).cpu().numpy())

    def _indices(self, rows: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(np.asarray(rows), dtype=torch.long).to(self.device)

    def _token_indices(self, pages: Sequence[int], num_tokens: int) -> torch.Tensor:
        pages = torch.as_tensor(np.asarray(pages), dtype=torch.long)
        offsets = torch.arange(self.page_size, dtype=torch.long)
        return (pages[:, None] * self.page_size + offsets).flatten()[:num_tokens].to(self.device)


def _header(config: LynxConfig, num_tokens: int, room: int, sums: Optional[tuple[int, int]] = None) -> bytes:
    first_sum, residual_sum = sums or (0, 0)
    middle = config.residual_plan[0] if len(config.residual_plan) > 1 else 0
    return HEADER.pack(MAGIC, VERSION, MODES.index(config.mode), config.anchor_bits,
                       CHECKSUMMED if sums else 0, config.group_size, num_tokens, first_sum, room, residual_sum, middle)


def _checksum(*parts: np.ndarray) -> int:
    """xxh3-64 (low 32 bits) over the bytes of ``parts``, in order."""
    digest = xxhash.xxh3_64()
    for part in parts:
        digest.update(part)
    return digest.intdigest() & 0xFFFFFFFF


def row_runs(src_rows: Sequence[int], dst_rows: Sequence[int], src_base: int, dst_base: int,
             row_nbytes: int, offset: int, length: int) -> list[tuple[int, int, int]]:
    """Mooncake transfer blocks (src address, dst address, length) for one byte range of rows."""
    return [(src_base + int(s) * row_nbytes + offset, dst_base + int(d) * row_nbytes + offset, length)
            for s, d in zip(src_rows, dst_rows)]


def split_blocks(blocks: list[tuple[int, int, int]], max_bytes: int) -> list[list[tuple[int, int, int]]]:
    """Cut transfer blocks into jobs of at most ``max_bytes`` each, splitting blocks where needed."""
    jobs, job, size = [], [], 0
    for src, dst, length in blocks:
        offset = 0
        while offset < length:
            take = min(length - offset, max_bytes - size)
            job.append((src + offset, dst + offset, take))
            offset, size = offset + take, size + take
            if size == max_bytes:
                jobs.append(job)
                job, size = [], 0
    if job:
        jobs.append(job)
    return jobs
