"""KV pages in Lynx form: one byte row per KV-pool page, on prefill and on decode.

A row is laid out so that each stream is one contiguous write per page::

    | header (32 B) | codec meta (table, zeros, scales) | Anchor planes | Residual planes |
    |<------------- first stream (Anchor) ------------------->|<- second stream ->|

Rows are indexed by the page index of the worker's own KV pool: prefill encodes page p into
its row p, and writes it into decode's row q, where q is the decode page SGLang allocated for
it. Decode's rows therefore live exactly as long as the request's pages.

A prefill page cached in the radix tree can belong to several requests in flight at once: its
planes are the same for all of them, but its header names one request. Prefill therefore stamps
the header on the sending thread, right before the page's first stream goes, not when encoding.

Each page is encoded on its own (its own scales and anchor table), so pages can be sent,
landed and checked independently. The header names the request (bootstrap room) and the
codec settings, so decode can tell Lynx data of this request from stale bytes or from a
prefill worker with other settings.
"""

from __future__ import annotations

import struct
from typing import Sequence

import numpy as np
import torch

from sglang_lynx.codec import Codec
from sglang_lynx.config import MODES, LynxConfig

MAGIC = b"LYNX"
VERSION = 2  # 2: 8-bit scales with a shared exponent per head (1: float16 scale and zero)
# magic, version, mode, anchor bits, group size, valid tokens in the page, room
HEADER = struct.Struct("<4sBBBxHH4xQ8x")
assert HEADER.size == 32


class LynxTransferError(RuntimeError):
    """Bytes that arrived are not what this decode worker expects; the message says why."""


class PageRows:
    def __init__(self, config: LynxConfig, pool, page_size: int, num_pages: int):
        self.config = config
        self.page_size = page_size
        self.k_buffers, self.v_buffers = list(pool.k_buffer), list(pool.v_buffer)
        _, num_heads, head_dim = self.k_buffers[0].shape
        self.dtype, self.device = self.k_buffers[0].dtype, self.k_buffers[0].device
        self.quantized = config.mode in ("int8", "int4", "lynx")
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
        self.rows = torch.zeros(num_pages, self.row_nbytes, dtype=torch.uint8, device=self.device)

    @property
    def data_ptr(self) -> int:
        return self.rows.data_ptr()

    @property
    def nbytes(self) -> int:
        return self.rows.numel()

    # --- prefill ------------------------------------------------------------------------------

    def encode(self, pages: Sequence[int], num_tokens: int) -> None:
        """Encode ``num_tokens`` tokens held in ``pages`` (all full but the last) into their rows."""
        if not self.quantized:  # raw: the pool's own bytes travel
            return
        kv = self._gather(self._token_indices(pages, num_tokens))
        for i, page in enumerate(pages):
            n = min(self.page_size, num_tokens - i * self.page_size)
            planes = self.codec.encode(kv[:, :, i * self.page_size: i * self.page_size + n])
            meta, anchor, residual = self._planes(self.rows[page], n)
            meta.copy_(planes.meta)
            anchor.copy_(planes.anchor)
            residual.copy_(planes.residual)

    def stamp(self, pages: Sequence[int], num_tokens: int, room: int) -> None:
        """Write the headers naming request ``room`` into the rows of its ``pages``."""
        for i, page in enumerate(pages):
            self.rows[page, : HEADER.size] = _header_bytes(self.config, min(self.page_size, num_tokens - i * self.page_size), room)

    def _gather(self, tokens: torch.Tensor) -> torch.Tensor:
        k = torch.stack([buf.index_select(0, tokens) for buf in self.k_buffers])
        v = torch.stack([buf.index_select(0, tokens) for buf in self.v_buffers])
        return torch.stack([k, v])  # [2, L, T, H, D]

    # --- decode -------------------------------------------------------------------------------

    def land(self, pages: Sequence[int], num_tokens: int, room: int, merged: bool) -> None:
        """Check the rows of ``pages`` and write their KV into the pool (Anchor-only or merged)."""
        tokens = self._token_indices(pages, num_tokens)
        if not self.quantized:
            self._check_headers(pages, num_tokens, room)
            return
        parts = []
        for i, page in enumerate(pages):
            n = min(self.page_size, num_tokens - i * self.page_size)
            self._check_header(page, n, room)
            meta, anchor, residual = self._planes(self.rows[page], n)
            if merged:
                parts.append(self.codec.decode_merged(anchor, residual, meta, n, dtype=self.dtype))
            else:
                parts.append(self.codec.decode_anchor(anchor, meta, n, dtype=self.dtype))
        kv = torch.cat(parts, dim=2)
        for layer, (k_buf, v_buf) in enumerate(zip(self.k_buffers, self.v_buffers)):
            k_buf.index_copy_(0, tokens, kv[0, layer])
            v_buf.index_copy_(0, tokens, kv[1, layer])

    def in_use(self) -> int:
        """Rows holding a request's data (not yet forgotten)."""
        magic = torch.frombuffer(bytearray(MAGIC), dtype=torch.uint8).to(self.device)
        return int((self.rows[:, : len(MAGIC)] == magic).all(dim=1).sum())

    def forget(self, pages: Sequence[int]) -> None:
        """Clear the headers so that these rows never pass for a later request's data."""
        self.rows[torch.as_tensor(np.asarray(pages), dtype=torch.long), : HEADER.size] = 0

    def _check_headers(self, pages, num_tokens, room) -> None:
        for i, page in enumerate(pages):
            self._check_header(page, min(self.page_size, num_tokens - i * self.page_size), room)

    def _check_header(self, page: int, num_tokens: int, room: int) -> None:
        magic, version, mode, bits, group, n, got_room = HEADER.unpack(
            self.rows[page, : HEADER.size].cpu().numpy().tobytes())
        if magic != MAGIC or got_room != room:
            raise LynxTransferError(
                f"no Lynx data arrived for this request (page {page}): is the prefill worker running "
                f"with --lynx-mode {self.config.mode}?")
        theirs = (MODES[mode] if mode < len(MODES) else f"mode#{mode}", bits, group)
        ours = (self.config.mode, self.config.anchor_bits, self.config.group_size)
        if version != VERSION or theirs != ours:
            raise LynxTransferError(
                f"prefill and decode disagree on Lynx settings: prefill sent mode={theirs[0]} "
                f"anchor_bits={theirs[1]} group_size={theirs[2]}, decode expects mode={ours[0]} "
                f"anchor_bits={ours[1]} group_size={ours[2]}")
        if n != num_tokens:
            raise LynxTransferError(f"page {page} carries {n} tokens, decode expected {num_tokens}")

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


def _header_bytes(config: LynxConfig, num_tokens: int, room: int) -> torch.Tensor:
    raw = HEADER.pack(MAGIC, VERSION, MODES.index(config.mode), config.anchor_bits,
                      config.group_size, num_tokens, room)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def page_runs(src_pages: Sequence[int], dst_pages: Sequence[int], src_base: int, dst_base: int,
              row_nbytes: int, offset: int, length: int) -> list[tuple[int, int, int]]:
    """Mooncake transfer blocks (src address, dst address, length) for one byte range of rows."""
    return [(src_base + int(s) * row_nbytes + offset, dst_base + int(d) * row_nbytes + offset, length)
            for s, d in zip(src_pages, dst_pages)]


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
