"""The Lynx codec: one request's KV cache <-> three contiguous byte buffers (Anchor, Residual, metadata).

    codec = Codec(num_layers=L, num_heads=H, head_dim=D, anchor_bits=4, group_size=64)
    planes = codec.encode(kv)                                        # kv [2, L, T, H, D], K then V
    kv_hat = codec.decode_anchor(planes.anchor, planes.meta, T)      # as soon as Anchor + meta landed
    kv_hat = codec.decode_merged(planes.anchor, planes.residual, planes.meta, T)  # == INT8, bit for bit
    codec.decode_pages(anchors, residuals, metas, T, page_tokens, out=lynx_kernels.Slots(pool_buffers, slots))

Every code is INT8, quantized per (layer, K/V, head, channel) over a block of G tokens with a float16
zero and an 8-bit scale (its exponent relative to one shared per head and block: 3 bytes per group).
Its A high bits form the Anchor, its 8 - A low bits the Residual. All three buffers are block-major:
block i (tokens i*G .. i*G + G - 1, the last block padded) is one fixed-size slice of each, so whole
blocks can be sent, and decoded, separately; ``meta`` starts with a fixed-size header (the per-layer
anchor reconstruction table). A prefix of whole blocks of the three buffers (plus the header) decodes
on its own with num_tokens = the tokens those blocks hold. Transfer modes map to it as: ``int8`` sends
all three and calls decode_merged; ``int4`` sends Anchor + meta and calls decode_anchor; ``lynx`` sends
Anchor + meta first and the Residual after. ``decode_pages`` decodes in one call pages that were
encoded one by one (each with its own table), straight into a KV pool's slots if asked. The format is
documented in docs/codec.md.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

import lynx_kernels

from lynx_kernels.reference import INF_EXPONENT

from .anchor_table import estimate_table

ANCHOR_BITS = range(2, 7)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Planes(NamedTuple):
    anchor: torch.Tensor  # uint8 [anchor_nbytes(num_tokens)]
    residual: torch.Tensor  # uint8 [residual_nbytes(num_tokens)]
    meta: torch.Tensor  # uint8 [meta_nbytes(num_tokens)]
    num_tokens: int


class Codec:
    """Encoder and decoder for one model's KV layout; sizes and checks are fixed at construction.

    Buffer sizes, all in bytes: ``anchor_block_nbytes``, ``residual_block_nbytes`` and
    ``meta_block_nbytes`` per block of ``group_size`` tokens, ``meta_header_nbytes`` once per request;
    ``anchor_nbytes(T)`` etc. for a request of T tokens.
    """

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, anchor_bits: int = 4,
                 group_size: int = 64, backend: str | None = None):
        for name, value in (("num_layers", num_layers), ("num_heads", num_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if anchor_bits not in ANCHOR_BITS:
            raise ValueError(f"anchor_bits must be between {ANCHOR_BITS.start} and {ANCHOR_BITS.stop - 1} "
                             f"(the Residual carries the other 8 - A bits); got {anchor_bits!r}. Plain INT8 "
                             f"is the Anchor and Residual sent together, decoded with decode_merged.")
        if not isinstance(group_size, int) or group_size < 8 or group_size & (group_size - 1):
            raise ValueError(f"group_size must be a power of two >= 8 (a block's tokens are packed as "
                             f"8 stripes of group_size / 8 tokens); got {group_size!r}")
        if backend not in (None, *lynx_kernels.BACKENDS):
            raise ValueError(f"backend must be one of {', '.join(lynx_kernels.BACKENDS)} or None; got {backend!r}")
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.anchor_bits, self.residual_bits = anchor_bits, 8 - anchor_bits
        self.group_size = group_size
        self.backend = backend  # None: Triton for CUDA tensors, the PyTorch reference otherwise
        block_codes = self.block_codes = 2 * num_layers * num_heads * group_size * head_dim
        self.anchor_block_nbytes = block_codes * anchor_bits // 8
        self.residual_block_nbytes = block_codes * self.residual_bits // 8
        self.meta_block_nbytes = lynx_kernels.meta_block_nbytes(num_layers, num_heads, head_dim)
        self.meta_header_nbytes = 2 * num_layers * 2**anchor_bits * 2  # float16 table

    def __repr__(self) -> str:
        return (f"Codec(num_layers={self.num_layers}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"anchor_bits={self.anchor_bits}, group_size={self.group_size})")

    # --- sizes, known from the token count alone ---------------------------------------------

    def num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.group_size)

    def anchor_nbytes(self, num_tokens: int) -> int:
        return self.num_blocks(num_tokens) * self.anchor_block_nbytes

    def residual_nbytes(self, num_tokens: int) -> int:
        return self.num_blocks(num_tokens) * self.residual_block_nbytes

    def stage_nbytes(self, num_tokens: int, bits: int) -> int:
        """One stage of ``bits`` bits of every code (``split_residual``)."""
        return self.num_blocks(num_tokens) * self.block_codes * bits // 8

    def meta_nbytes(self, num_tokens: int) -> int:
        return self.meta_header_nbytes + self.num_blocks(num_tokens) * self.meta_block_nbytes

    def empty_planes(self, num_tokens: int, device=None) -> Planes:
        """Uninitialised buffers of the right sizes, e.g. for encode(kv, out=...)."""
        sizes = self.anchor_nbytes(num_tokens), self.residual_nbytes(num_tokens), self.meta_nbytes(num_tokens)
        return Planes(*(torch.empty(n, dtype=torch.uint8, device=device) for n in sizes), num_tokens)

    # --- encode / decode ------------------------------------------------------------------------

    def encode(self, kv: torch.Tensor, out: Planes | None = None) -> Planes:
        """kv [2, L, T, H, D] (float32, bfloat16 or float16) -> Planes, written into out if given
        (e.g. buffers registered with the transfer engine; on kv's device)."""
        self._check_kv(kv)
        T = kv.shape[2]
        planes = self.empty_planes(T, kv.device) if out is None else Planes(*out[:3], T)
        if any(buf.device != kv.device for buf in planes[:3]):
            raise ValueError(f"out buffers must be on kv's device ({kv.device})")
        anchor = self._blocks(planes.anchor, "anchor", T, self.anchor_bits)
        residual = self._blocks(planes.residual, "residual", T, self.residual_bits)
        table, meta = self.split_meta(planes.meta, T)
        lynx_kernels.quantize_split(kv, self.anchor_bits, self.group_size, out=(anchor, residual, meta),
                                    backend=self.backend)
        # The kernels leave a non-finite zero or an infinite exponent in the metadata of a group holding
        # NaN or Inf: checking it is cheap.
        if not (torch.isfinite(meta.zero).all() and (meta.exponent != INF_EXPONENT).all()):
            if not torch.isfinite(kv).all():
                raise ValueError("kv contains NaN or Inf; the Lynx codec cannot quantize it")
            raise ValueError("kv has values below -65504, beyond the float16 range of the codec's zero points")
        table.copy_(estimate_table(anchor, residual))
        return planes

    def decode_anchor(self, anchor: torch.Tensor, meta: torch.Tensor, num_tokens: int,
                      dtype: torch.dtype = torch.float32, table: torch.Tensor | None = None) -> torch.Tensor:
        """Anchor-only reconstruction -> kv_hat [2, L, num_tokens, H, D] of dtype.

        table overrides the reconstruction table of the meta header (e.g. anchor_table.centre_table).
        """
        anchor = self._blocks(anchor, "anchor", num_tokens, self.anchor_bits)
        header_table, group_meta = self.split_meta(meta, num_tokens)
        return lynx_kernels.dequant_anchor(anchor, group_meta, header_table if table is None else table,
                                           num_tokens, self._dtype(dtype), backend=self.backend)

    def decode_merged(self, anchor: torch.Tensor, residual: torch.Tensor, meta: torch.Tensor, num_tokens: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Anchor + Residual -> kv_hat [2, L, num_tokens, H, D], exactly the INT8 dequantization."""
        anchor = self._blocks(anchor, "anchor", num_tokens, self.anchor_bits)
        residual = self._blocks(residual, "residual", num_tokens, self.residual_bits)
        _, group_meta = self.split_meta(meta, num_tokens)
        return lynx_kernels.merge_dequant(anchor, residual, group_meta, num_tokens, self._dtype(dtype),
                                          backend=self.backend)

    def split_residual(self, residual: torch.Tensor, num_tokens: int, stage_bits) -> list[torch.Tensor]:
        """The Residual as the later stages of a progressive plan: ``stage_bits`` (summing to 8 - A) bits
        of every code each, high bits first; each stage a buffer laid out block by block as the Residual."""
        self._check_stages(stage_bits)
        planes = lynx_kernels.split_stages(self._blocks(residual, "residual", num_tokens, self.residual_bits),
                                           stage_bits, backend=self.backend)
        return [p.view(-1) for p in planes]

    def merge_residual(self, stages: list[torch.Tensor], num_tokens: int, stage_bits) -> torch.Tensor:
        """The Residual from the stages landed so far (a prefix of ``stage_bits``): exactly the Residual
        once all have; until then every code's missing low bits stand at the middle of their range, so that
        decode_merged gives the reconstruction at the bits landed."""
        self._check_stages(stage_bits)
        if not 1 <= len(stages) <= len(stage_bits):
            raise ValueError(f"{len(stages)} stages landed of a Residual in {len(stage_bits)}")
        nb = self.num_blocks(num_tokens)
        planes = [stage.view(nb, 2, self.num_layers, bits, -1) for stage, bits in zip(stages, stage_bits)]
        return lynx_kernels.merge_stages(planes, stage_bits, backend=self.backend).view(-1)

    def decode_pages(self, anchor: torch.Tensor, residual: torch.Tensor | None, meta: torch.Tensor, num_tokens: int,
                     page_tokens: int, dtype: torch.dtype = torch.float32, out: lynx_kernels.Slots | None = None):
        """Pages encoded one by one (``encode`` on each run of ``page_tokens`` tokens, all full but the
        last) -> kv_hat [2, L, num_tokens, H, D] of dtype, Anchor-only (``residual`` None; each page has
        its own table) or merged. With ``out`` (Slots of a KV pool of dtype) it goes there instead.

        anchor, residual, meta: uint8 [pages, anchor_nbytes(page_tokens)] etc., row i holding page i's
        buffer as encode wrote it (a partly filled last page: its leading bytes; the rest is not read).
        """
        pages, per_page = anchor.shape[0], page_tokens // self.group_size
        if page_tokens % self.group_size or not (pages - 1) * page_tokens < num_tokens <= pages * page_tokens:
            raise ValueError(f"{num_tokens} tokens do not fill {pages} pages of {page_tokens} tokens (a multiple "
                             f"of group_size {self.group_size}) all but the last")
        named = {"anchor": (anchor, self.anchor_nbytes(page_tokens)), "meta": (meta, self.meta_nbytes(page_tokens))}
        if residual is not None:
            named["residual"] = (residual, self.residual_nbytes(page_tokens))
        for name, (buf, nbytes) in named.items():
            if buf.dtype != torch.uint8 or buf.shape != (pages, nbytes) or not buf.is_contiguous():
                raise ValueError(f"{name} of {pages} pages of {page_tokens} tokens must be a contiguous uint8 "
                                 f"tensor [{pages}, {nbytes}]; got {buf.dtype} {list(buf.shape)}")
        dtype, nb = self._dtype(dtype), self.num_blocks(num_tokens)
        L, H, D = self.num_layers, self.num_heads, self.head_dim
        if out is not None:
            self._check_slots(out, num_tokens, dtype, anchor.device)
        # Every page's blocks in token order; a block's metadata leaves its page's header out.
        blocks = lambda buf, bits: buf.view(pages * per_page, 2, L, bits, -1)[:nb]
        group_meta = lynx_kernels.meta_views(
            meta[:, self.meta_header_nbytes:].reshape(pages * per_page, self.meta_block_nbytes)[:nb], L, H, D)
        if residual is not None:
            return lynx_kernels.merge_dequant(blocks(anchor, self.anchor_bits), blocks(residual, self.residual_bits),
                                              group_meta, num_tokens, dtype, out, backend=self.backend)
        tables = meta[:, : self.meta_header_nbytes].view(torch.float16).view(pages, 2, L, 2**self.anchor_bits)
        return lynx_kernels.dequant_anchor(blocks(anchor, self.anchor_bits), group_meta,
                                           tables.repeat_interleave(per_page, 0)[:nb], num_tokens, dtype, out,
                                           backend=self.backend)

    def split_meta(self, meta: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, lynx_kernels.Meta]:
        """meta -> views (table float16 [2, L, 2**A], the blocks' lynx_kernels.Meta)."""
        self._check_bytes(meta, "meta", self.meta_nbytes(num_tokens), num_tokens)
        L, H, D = self.num_layers, self.num_heads, self.head_dim
        table = meta[: self.meta_header_nbytes].view(torch.float16).view(2, L, 2**self.anchor_bits)
        blocks = meta[self.meta_header_nbytes:].view(self.num_blocks(num_tokens), self.meta_block_nbytes)
        return table, lynx_kernels.meta_views(blocks, L, H, D)

    # --- checks and views -------------------------------------------------------------------

    def _check_kv(self, kv: torch.Tensor) -> None:
        L, H, D = self.num_layers, self.num_heads, self.head_dim
        if kv.dim() != 5 or kv.shape[0] != 2 or (kv.shape[1], kv.shape[3], kv.shape[4]) != (L, H, D):
            raise ValueError(f"kv must have shape [2, {L}, T, {H}, {D}] (K/V, layers, tokens, kv heads, "
                             f"head_dim); got {list(kv.shape)}")
        if kv.shape[2] < 1:
            raise ValueError("kv has no tokens (T = 0)")
        if kv.dtype not in FLOAT_DTYPES:
            raise ValueError(f"kv must be float32, bfloat16 or float16; got {kv.dtype}")

    def _check_stages(self, stage_bits) -> None:
        if sum(stage_bits) != self.residual_bits or min(stage_bits) < 1:
            raise ValueError(f"the Residual's stages must each carry at least one bit, {self.residual_bits} in "
                             f"all (8 - anchor_bits); got {list(stage_bits)}")

    def _dtype(self, dtype: torch.dtype) -> torch.dtype:
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be float32, bfloat16 or float16; got {dtype}")
        return dtype

    def _check_slots(self, out: lynx_kernels.Slots, num_tokens: int, dtype: torch.dtype, device) -> None:
        L, H, D = self.num_layers, self.num_heads, self.head_dim
        fits = len(out.buffers) == 2 * L and all(
            b.dim() == 3 and b.shape[1:] == (H, D) and b.dtype == dtype and b.device == device and b.is_contiguous()
            for b in out.buffers)
        if not fits or out.index.shape != (num_tokens,) or out.index.dtype != torch.long:
            raise ValueError(f"out must be Slots of {2 * L} contiguous {dtype} buffers [tokens, {H}, {D}] on {device} "
                             f"and an int64 index of {num_tokens} tokens")

    def _check_bytes(self, buf: torch.Tensor, name: str, nbytes: int, num_tokens: int) -> None:
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be a positive integer; got {num_tokens!r}")
        if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 1-D uint8 tensor; got {buf.dtype} {list(buf.shape)}")
        if buf.numel() != nbytes:
            raise ValueError(f"{name} of {num_tokens} tokens must hold {nbytes} bytes; got {buf.numel()}")

    def _blocks(self, buf: torch.Tensor, name: str, num_tokens: int, bits: int) -> torch.Tensor:
        """A plane buffer as [nb, 2, L, bits, n]: n = G * H * D / 8 bytes per bit-plane of a segment."""
        nb = self.num_blocks(num_tokens)
        self._check_bytes(buf, name, nb * (self.anchor_block_nbytes + self.residual_block_nbytes) // 8 * bits,
                          num_tokens)
        return buf.view(nb, 2, self.num_layers, bits, -1)
