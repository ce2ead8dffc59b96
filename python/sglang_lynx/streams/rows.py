"""The staging area: KV pages in Lynx form, in rows handed out per request, on prefill and on decode.

A row holds one KV page, laid out so that each stream is one contiguous write::

    | header (32 B) | codec meta (table, zeros, scales) | Anchor planes | Residual planes |
    |<------------- first stream (Anchor) ------------------->|<- second stream ->|

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

import struct
import threading
from typing import Optional, Sequence

import numpy as np
import torch
import xxhash

from sglang_lynx.codec import Codec
from sglang_lynx.config import MODES, QUANTIZED_MODES, LynxConfig, LynxConfigError

MAGIC = b"LYNX"
VERSION = 3  # 3: stream checksums; 2: 8-bit scales with a shared exponent per head
# magic, version, mode, anchor bits, flags, group size, valid tokens in the page, first stream's
# checksum, room, Residual's checksum (checksums: the low 32 bits of xxh3-64 over the stream's bytes)
HEADER = struct.Struct("<4sBBBBHHIQI4x")
assert HEADER.size == 32
CHECKSUMMED = 1  # flags: the checksums are set


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
        self.k_buffers, self.v_buffers = list(pool.k_buffer), list(pool.v_buffer)
        _, num_heads, head_dim = self.k_buffers[0].shape
        self.dtype, self.device = self.k_buffers[0].dtype, self.k_buffers[0].device
        self.quantized = config.mode in QUANTIZED_MODES
        if self.quantized:
            self.codec = Codec(num_layers=len(self.k_buffers), num_heads=num_heads, head_dim=head_dim,
                               anchor_bits=config.anchor_bits, group_size=config.group_size)
            meta = self.codec.meta_nbytes(page_size)
            anchor = self.codec.anchor_nbytes(page_size)
            residual = self.codec.residual_nbytes(page_size)
        else:  # raw: the pool's own bytes travel; the row carries only the header
            meta = anchor = residual = 0
        self.meta_at = HEADER.size
        self.anchor_at = self.meta_at + meta
        self.residual_at = self.anchor_at + anchor
        self.row_nbytes = self.residual_at + residual
        # int8 sends everything at once; int4 never sends the Residual.
        self.first_stream_nbytes = self.row_nbytes if config.mode == "int8" else self.residual_at
        self.residual_nbytes = residual if config.mode == "lynx" else 0
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
            kv = self._gather(self._token_indices(pages, num_tokens))
        for i, row in enumerate(rows):
            n = min(self.page_size, num_tokens - i * self.page_size)
            sums = None
            if self.quantized:  # raw: the pool's own bytes travel, the row holds only the header
                planes = self.codec.encode(kv[:, :, i * self.page_size: i * self.page_size + n])
                meta, anchor, residual = self._planes(self.buffer[row], n)
                meta.copy_(planes.meta)
                anchor.copy_(planes.anchor)
                residual.copy_(planes.residual)
                if self.config.verify_checksums:
                    sums = (_checksum(meta, anchor), _checksum(residual))
            self.buffer[row, : HEADER.size] = _header_bytes(self.config, n, room, sums)

    def _gather(self, tokens: torch.Tensor) -> torch.Tensor:
        k = torch.stack([buf.index_select(0, tokens) for buf in self.k_buffers])
        v = torch.stack([buf.index_select(0, tokens) for buf in self.v_buffers])
        return torch.stack([k, v])  # [2, L, T, H, D]

    # --- decode -------------------------------------------------------------------------------

    def land(self, pages: Sequence[int], rows: Sequence[int], num_tokens: int, room: int, merged: bool) -> None:
        """Check ``rows`` and write their KV into pool ``pages`` (Anchor-only or merged)."""
        sums = [self._check_header(row, min(self.page_size, num_tokens - i * self.page_size), room)
                for i, row in enumerate(rows)]
        if not self.quantized:
            return
        parts = []
        for i, row in enumerate(rows):
            n = min(self.page_size, num_tokens - i * self.page_size)
            meta, anchor, residual = self._planes(self.buffer[row], n)
            if sums[i] is not None:
                self._check_sums(row, sums[i], meta, anchor, residual, merged)
            if merged:
                parts.append(self.codec.decode_merged(anchor, residual, meta, n, dtype=self.dtype))
            else:
                parts.append(self.codec.decode_anchor(anchor, meta, n, dtype=self.dtype))
        kv = torch.cat(parts, dim=2)
        tokens = self._token_indices(pages, num_tokens)
        for layer, (k_buf, v_buf) in enumerate(zip(self.k_buffers, self.v_buffers)):
            k_buf.index_copy_(0, tokens, kv[0, layer])
            v_buf.index_copy_(0, tokens, kv[1, layer])

    def _check_header(self, row: int, num_tokens: int, room: int) -> Optional[tuple[int, int]]:
        """Raise unless ``row`` holds this request's page; its stream checksums, if they are to be checked."""
        magic, version, mode, bits, flags, group, n, first_sum, got_room, residual_sum = HEADER.unpack(
            self.buffer[row, : HEADER.size].cpu().numpy().tobytes())
        if magic != MAGIC or got_room != room:
            raise LynxTransferError(
                f"no Lynx data arrived for this request (row {row}): is the prefill worker running "
                f"with --lynx-mode {self.config.mode}?")
        theirs = (MODES[mode] if mode < len(MODES) else f"mode#{mode}", bits, group)
        ours = (self.config.mode, self.config.anchor_bits, self.config.group_size)
        if version != VERSION or theirs != ours:
            raise LynxTransferError(
                f"prefill and decode disagree on Lynx settings: prefill sent mode={theirs[0]} "
                f"anchor_bits={theirs[1]} group_size={theirs[2]}, decode expects mode={ours[0]} "
                f"anchor_bits={ours[1]} group_size={ours[2]}")
        if n != num_tokens:
            raise LynxTransferError(f"row {row} carries {n} tokens, decode expected {num_tokens}")
        if flags & CHECKSUMMED and self.config.verify_checksums:
            return first_sum, residual_sum
        return None

    def _check_sums(self, row: int, sums: tuple[int, int], meta, anchor, residual, merged: bool) -> None:
        # The first stream is checked when it lands, the Residual when it is merged (int8: both at once).
        checks = [("Anchor", sums[0], (meta, anchor))] if not merged or self.config.mode == "int8" else []
        if merged:
            checks.append(("Residual", sums[1], (residual,)))
        for stream, expected, parts in checks:
            if _checksum(*parts) != expected:
                raise LynxTransferError(
                    f"the {stream} of row {row} fails its checksum: the KV was damaged on its way from "
                    f"prefill, and the request fails rather than decode on it")

    # --- shared -------------------------------------------------------------------------------

    def _planes(self, row: torch.Tensor, num_tokens: int):
        """Views of a row's meta, Anchor and Residual for a page holding ``num_tokens`` tokens
        (a partly filled page with more than one codec block uses only its leading blocks)."""
        return (row[self.meta_at: self.meta_at + self.codec.meta_nbytes(num_tokens)],
                row[self.anchor_at: self.anchor_at + self.codec.anchor_nbytes(num_tokens)],
                row[self.residual_at: self.residual_at + self.codec.residual_nbytes(num_tokens)])

    def _token_indices(self, pages: Sequence[int], num_tokens: int) -> torch.Tensor:
        pages = torch.as_tensor(np.asarray(pages), dtype=torch.long)
        offsets = torch.arange(self.page_size, dtype=torch.long)
        return (pages[:, None] * self.page_size + offsets).flatten()[:num_tokens].to(self.device)


def _header_bytes(config: LynxConfig, num_tokens: int, room: int,
                  sums: Optional[tuple[int, int]] = None) -> torch.Tensor:
    first_sum, residual_sum = sums or (0, 0)
    raw = HEADER.pack(MAGIC, VERSION, MODES.index(config.mode), config.anchor_bits,
                      CHECKSUMMED if sums else 0, config.group_size, num_tokens, first_sum, room, residual_sum)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _checksum(*parts: torch.Tensor) -> int:
    """xxh3-64 (low 32 bits) over the bytes of ``parts``, in order (host copies of device rows)."""
    digest = xxhash.xxh3_64()
    for part in parts:
        digest.update(part.cpu().numpy())
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
