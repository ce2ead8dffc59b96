"""Fused Triton kernels of the Lynx codec, bit-identical to ``reference`` (shapes and format are described there).

One program handles one head of one segment (a block's G tokens of one layer's K or V): a G x D tile
that stays in registers from load to store, so each kernel reads and writes every byte once.
On a CPU they run under ``TRITON_INTERPRET=1`` (tests); otherwise they need CUDA tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

from . import reference
from .reference import Slots, empty_planes

# Globals used inside kernels must be constexpr.
CODE_BITS = tl.constexpr(reference.CODE_BITS)
STRIPES = tl.constexpr(reference.STRIPES)
SCALE_MANTISSA_BITS = tl.constexpr(reference.SCALE_MANTISSA_BITS)
MAX_OFFSET = tl.constexpr(reference.MAX_OFFSET)
MIN_EXPONENT = tl.constexpr(reference.MIN_EXPONENT)
FLOAT32_MANTISSA_BITS = tl.constexpr(reference.FLOAT32_MANTISSA_BITS)
SCALE_MANTISSA_MASK = tl.constexpr(reference.SCALE_MANTISSA_MASK)
SCALE_SHIFT = tl.constexpr(reference.SCALE_SHIFT)
FLOAT32_INF_BITS = tl.constexpr(reference.FLOAT32_INF_BITS)
# Quantization rounds (x - zero) * inv to float32, then adds 2**23 to round to an integer; contracting
# the two into one FMA would round once instead of twice and differ from the reference on rare inputs.
# (Dequantization may fuse: its products are exact.)
QUANTIZE_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _fp16_floor(x):
    """The largest float16 <= x (float32); as reference.fp16_floor."""
    h = x.to(tl.float16)
    # One float16 down is -1 on the bits of a positive number, +1 on those of a negative one (rounding
    # keeps the sign, so h = +-0 never has to cross zero).
    bits = h.to(tl.int16, bitcast=True)
    down = (bits + tl.where(bits < 0, 1, -1).to(tl.int16)).to(tl.float16, bitcast=True)
    return tl.where(h.to(tl.float32) > x, down, h)


@triton.jit
def _round_half_even(y):
    # For 0 <= y < 2**22, adding 2**23 leaves no fraction bits, so the hardware's round-to-nearest-even
    # does the rounding (libdevice.rint is not available in the interpreter).
    return (y + 8388608.0) - 8388608.0


@triton.jit
def _to_bfloat16(x):
    # fp32 -> bf16 rounding to nearest even, by hand: the interpreter's .to(tl.bfloat16) truncates.
    bits = x.to(tl.uint32, bitcast=True)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _group_metadata(lo, hi, valid, bits: tl.constexpr):
    """As reference.group_metadata over one head's channels (those where valid): float16 zero rounded
    down, scale code and the head's exponent (the scale rounded up)."""
    zero = _fp16_floor(lo + 0.0)  # + 0.0 folds -0.0 into +0.0
    levels = tl.full(lo.shape, 2**bits - 1, tl.float32)
    s = tl.math.div_rn((hi + 0.0) - zero.to(tl.float32), levels)
    # As reference.encode_scale, on the bits.
    s_bits = tl.minimum(s.to(tl.int32, bitcast=True) & 0x7FFFFFFF, FLOAT32_INF_BITS)
    s_bits = (s_bits + (2**SCALE_SHIFT - 1)) & -(2**SCALE_SHIFT)
    e = s_bits >> FLOAT32_MANTISSA_BITS
    exponent = tl.maximum(tl.max(tl.where(valid, e, 0), axis=0), MIN_EXPONENT)
    offset = exponent - e
    mantissa = (s_bits >> SCALE_SHIFT) & SCALE_MANTISSA_MASK
    code = tl.where(offset <= MAX_OFFSET, (offset << SCALE_MANTISSA_BITS) | mantissa, MAX_OFFSET << SCALE_MANTISSA_BITS)
    return zero, code, exponent


@triton.jit
def _decode_scale(code, exponent):
    """As reference.decode_scale."""
    code = code.to(tl.int32)
    bits = (exponent.to(tl.int32) - (code >> SCALE_MANTISSA_BITS)) << FLOAT32_MANTISSA_BITS
    bits |= (code & SCALE_MANTISSA_MASK) << SCALE_SHIFT
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _program(H, G: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (block, slice, head) and its G x BLOCK_D tile as 8 stripes of G / 8 tokens.

    Column k of a stripe is token k // BLOCK_D of the stripe, channel k % BLOCK_D.
    """
    blk = tl.program_id(0).to(tl.int64)  # offsets of large buffers pass 2**31
    program = tl.program_id(1).to(tl.int64)  # slice * H + head
    k = tl.arange(0, G // STRIPES * BLOCK_D)
    d = k % BLOCK_D
    t = blk * G + tl.arange(0, STRIPES)[:, None] * (G // STRIPES) + (k // BLOCK_D)[None, :]  # [8, cols]
    return blk, program // H, program % H, t, d, k // BLOCK_D


@triton.jit
def _quantize_split_kernel(kv_ptr, anchor_ptr, residual_ptr, zero_ptr, scale_ptr, exponent_ptr,
                           zero_stride, scale_stride, exponent_stride, T, S, H, D,
                           G: tl.constexpr, BLOCK_D: tl.constexpr, A: tl.constexpr):
    R: tl.constexpr = CODE_BITS - A
    TOKENS: tl.constexpr = G // STRIPES  # tokens per stripe
    blk, slc, head, t, d, row = _program(H, G, BLOCK_D)
    in_d = d < D
    t = tl.minimum(t, T - 1)  # the last block repeats the last token, as the reference pads
    x = tl.load(kv_ptr + ((slc * T + t) * H + head) * D + d[None, :], mask=in_d[None, :], other=0.0)
    x = tl.reshape(x.to(tl.float32), [STRIPES, TOKENS, BLOCK_D])

    # Each channel's range over the block's G tokens. GPU min/max may skip NaN: poison the range
    # of a channel holding NaN or Inf, so that the metadata shows it.
    lo = tl.min(tl.min(x, axis=1), axis=0)
    hi = tl.max(tl.max(x, axis=1), axis=0)
    poison = tl.sum(tl.sum(x * 0.0, axis=1), axis=0)
    channel = tl.arange(0, BLOCK_D)
    valid = channel < D
    zero, scale_code, exponent = _group_metadata(tl.where(poison == 0.0, lo, poison), hi, valid, CODE_BITS)
    group = (slc * H + head) * D + channel
    tl.store(zero_ptr + blk * zero_stride + group, zero, mask=valid)
    tl.store(scale_ptr + blk * scale_stride + group, scale_code.to(tl.uint8), mask=valid)
    tl.store(exponent_ptr + blk * exponent_stride + slc * H + head, exponent.to(tl.uint8))

    scale = _decode_scale(scale_code, exponent)
    inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)  # scales are never 0
    codes = _round_half_even((x - zero.to(tl.float32)[None, None, :]) * inv[None, None, :])
    codes = tl.reshape(codes, [STRIPES, TOKENS * BLOCK_D]).to(tl.int64)

    # Word k = sum_i code(stripe i, column k) << bits * i; plane j gets byte j of every word.
    n = TOKENS * H * D
    byte = (row * H + head) * D + d  # in the segment's (token, head, channel) order
    stripe = tl.arange(0, STRIPES).to(tl.int64)[:, None]
    anchor_word = tl.sum((codes >> R) << (stripe * A), axis=0)
    residual_word = tl.sum((codes & (2**R - 1)) << (stripe * R), axis=0)
    anchor_seg = anchor_ptr + (blk * S + slc) * (A * n)
    residual_seg = residual_ptr + (blk * S + slc) * (R * n)
    for j in tl.static_range(A):
        tl.store(anchor_seg + j * n + byte, ((anchor_word >> (8 * j)) & 255).to(tl.uint8), mask=in_d)
    for j in tl.static_range(R):
        tl.store(residual_seg + j * n + byte, ((residual_word >> (8 * j)) & 255).to(tl.uint8), mask=in_d)


@triton.jit
def _unpack(seg_ptr, byte, mask, n, BITS: tl.constexpr):
    """Codes [8, cols] of one packed segment."""
    word = tl.zeros(byte.shape, tl.int64)
    for j in tl.static_range(BITS):
        word |= tl.load(seg_ptr + j * n + byte, mask=mask, other=0).to(tl.int64) << (8 * j)
    stripe = tl.arange(0, STRIPES).to(tl.int64)[:, None]
    return (word[None, :] >> (stripe * BITS)) & (2**BITS - 1)


@triton.jit
def _dequant_kernel(anchor_ptr, residual_ptr, zero_ptr, scale_ptr, exponent_ptr, table_ptr, out_ptr,
                    buffer_offset_ptr, index_ptr, zero_stride, scale_stride, exponent_stride, table_stride,
                    T, S, H, D, G: tl.constexpr, BLOCK_D: tl.constexpr, A: tl.constexpr, MERGE: tl.constexpr,
                    SLOTS: tl.constexpr):
    """SLOTS: out_ptr is the first of a KV pool's buffers, buffer_offset_ptr where each slice's buffer
    starts relative to it (in elements), index_ptr the pool row of each token."""
    R: tl.constexpr = CODE_BITS - A
    blk, slc, head, t, d, row = _program(H, G, BLOCK_D)
    in_d = d < D
    n = G // STRIPES * H * D
    byte = (row * H + head) * D + d
    a = _unpack(anchor_ptr + (blk * S + slc) * (A * n), byte, in_d, n, A)
    if MERGE:
        res = _unpack(residual_ptr + (blk * S + slc) * (R * n), byte, in_d, n, R)
        codes = ((a << R) | res).to(tl.float32)
    else:
        codes = (a << R).to(tl.float32) + tl.load(table_ptr + blk * table_stride + slc * 2**A + a).to(tl.float32)

    group = (slc * H + head) * D + d
    exponent = tl.load(exponent_ptr + blk * exponent_stride + slc * H + head)
    scale = _decode_scale(tl.load(scale_ptr + blk * scale_stride + group, mask=in_d, other=0), exponent)
    zero = tl.load(zero_ptr + blk * zero_stride + group, mask=in_d, other=0.0).to(tl.float32)
    x = codes * scale[None, :] + zero[None, :]  # the product is exact, so an FMA changes nothing
    if out_ptr.dtype.element_ty == tl.bfloat16:
        x = _to_bfloat16(x)
    if SLOTS:
        rows = tl.load(index_ptr + t, mask=t < T, other=0)
        out = out_ptr + tl.load(buffer_offset_ptr + slc) + (rows * H + head) * D + d[None, :]
    else:
        out = out_ptr + ((slc * T + t) * H + head) * D + d[None, :]
    tl.store(out, x.to(out_ptr.dtype.element_ty), mask=(t < T) & in_d[None, :])


def _check_device(t: torch.Tensor) -> None:
    if not (t.is_cuda or knobs.runtime.interpret):
        raise ValueError("the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 to run on a CPU)")


def _launch_shape(num_blocks: int, S: int, H: int, D: int):
    return (num_blocks, S * H), triton.next_power_of_2(D)


def quantize_split(kv: torch.Tensor, anchor_bits: int, group_size: int, out=None):
    _check_device(kv)
    kv = kv.contiguous()
    _, L, T, H, D = kv.shape
    anchor, residual, meta = out if out is not None else empty_planes(kv, anchor_bits, group_size)
    grid, block_d = _launch_shape(triton.cdiv(T, group_size), 2 * L, H, D)
    _quantize_split_kernel[grid](kv, anchor, residual, *meta, *_block_strides(meta), T, 2 * L, H, D,
                                 G=group_size, BLOCK_D=block_d, A=anchor_bits, **QUANTIZE_OPTIONS)
    return anchor, residual, meta


def _block_strides(meta: reference.Meta) -> list[int]:
    """Each field's stride between blocks: its blocks are rows of one buffer or separate tensors."""
    for field in meta:
        if not field[0].is_contiguous():
            raise ValueError("each block of every metadata field must be contiguous")
    return [field.stride(0) for field in meta]


def _dequant(anchor, residual, meta, table, num_tokens, dtype, out, merge):
    _check_device(anchor)
    nb, _, L, A, n = anchor.shape
    H, D = meta.zero.shape[-2:]
    if out is None:
        out = torch.empty((2, L, num_tokens, H, D), dtype=dtype, device=anchor.device)
    if isinstance(out, Slots):
        first, index = out.buffers[0], out.index
        offsets = [buffer.data_ptr() - first.data_ptr() for buffer in out.buffers]
        if any(offset % first.element_size() for offset in offsets):
            raise ValueError("a KV pool's buffers must be aligned to their element size")
        offsets = torch.tensor([offset // first.element_size() for offset in offsets], device=anchor.device)
    else:
        first, offsets, index = out, out, out  # the last two are not read
    table_stride = table.stride(0) if table.dim() == 4 else 0
    grid, block_d = _launch_shape(nb, 2 * L, H, D)
    _dequant_kernel[grid](anchor, residual, *meta, table, first, offsets, index, *_block_strides(meta), table_stride,
                          num_tokens, 2 * L, H, D, G=n * reference.STRIPES // (H * D), BLOCK_D=block_d, A=A,
                          MERGE=merge, SLOTS=isinstance(out, Slots))
    return out


def dequant_anchor(anchor, meta, table, num_tokens: int, dtype=torch.float32, out=None) -> torch.Tensor:
    return _dequant(anchor, anchor, meta, table, num_tokens, dtype, out, merge=False)


def merge_dequant(anchor, residual, meta, num_tokens: int, dtype=torch.float32, out=None) -> torch.Tensor:
    return _dequant(anchor, residual, meta, meta.zero, num_tokens, dtype, out, merge=True)


@triton.jit
def _words(seg_ptr, cols, mask, n, BITS: tl.constexpr):
    """Column k of a segment's BITS planes as one word: 8 codes of BITS bits, stripe i at BITS * i."""
    word = tl.zeros(cols.shape, tl.int64)
    for j in tl.static_range(BITS):
        word |= tl.load(seg_ptr + j * n + cols, mask=mask, other=0).to(tl.int64) << (8 * j)
    return word


@triton.jit
def _store_word(seg_ptr, cols, mask, n, word, BITS: tl.constexpr):
    for j in tl.static_range(BITS):
        tl.store(seg_ptr + j * n + cols, ((word >> (8 * j)) & 255).to(tl.uint8), mask=mask)


@triton.jit
def _split_stage_kernel(residual_ptr, stage_ptr, n, R: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr,
                        BLOCK: tl.constexpr):
    """One stage's planes of one segment's columns: bits SHIFT .. SHIFT + BITS - 1 of every Residual code."""
    seg = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    word = _words(residual_ptr + seg * R * n, cols, mask, n, R)
    stage = tl.zeros(cols.shape, tl.int64)
    for i in tl.static_range(8):
        stage |= ((word >> (R * i + SHIFT)) & (2**BITS - 1)) << (BITS * i)
    _store_word(stage_ptr + seg * BITS * n, cols, mask, n, stage, BITS)


@triton.jit
def _merge_stages_kernel(first_ptr, second_ptr, residual_ptr, n, R: tl.constexpr, FIRST: tl.constexpr,
                         SECOND: tl.constexpr, FILL: tl.constexpr, BLOCK: tl.constexpr):
    """Residual planes of one segment's columns from one or two stages (SECOND = 0: not landed), the
    missing low bits at FILL."""
    seg = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    first = _words(first_ptr + seg * FIRST * n, cols, mask, n, FIRST)
    second = tl.zeros(cols.shape, tl.int64)
    if SECOND > 0:
        second = _words(second_ptr + seg * SECOND * n, cols, mask, n, SECOND)
    word = tl.zeros(cols.shape, tl.int64)
    for i in tl.static_range(8):
        code = ((first >> (FIRST * i)) & (2**FIRST - 1)) << (R - FIRST)
        if SECOND > 0:
            code |= ((second >> (SECOND * i)) & (2**SECOND - 1)) << (R - FIRST - SECOND)
        word |= (code | FILL) << (R * i)
    _store_word(residual_ptr + seg * R * n, cols, mask, n, word, R)


STAGE_BLOCK = 256  # columns per program


def split_stages(residual: torch.Tensor, stage_bits) -> list[torch.Tensor]:
    _check_device(residual)
    residual = residual.contiguous()
    R, n = residual.shape[-2:]
    segments = residual.numel() // (R * n)
    stages, shift = [], R
    for bits in stage_bits:
        shift -= bits
        stage = residual.new_empty(residual.shape[:-2] + (bits, n))
        _split_stage_kernel[(segments, triton.cdiv(n, STAGE_BLOCK))](
            residual, stage, n, R=R, SHIFT=shift, BITS=bits, BLOCK=STAGE_BLOCK)
        stages.append(stage)
    return stages


def merge_stages(stages, stage_bits) -> torch.Tensor:
    if len(stage_bits) > 2:
        raise ValueError(f"the Triton merge takes a Residual of at most two stages; got {list(stage_bits)}")
    first = stages[0].contiguous()
    _check_device(first)
    n, R = first.shape[-1], sum(stage_bits)
    second = stages[1].contiguous() if len(stages) > 1 else first  # not read when it has not landed
    second_bits = stage_bits[1] if len(stages) > 1 else 0
    missing = R - stage_bits[0] - second_bits
    residual = first.new_empty(first.shape[:-2] + (R, n))
    _merge_stages_kernel[(first.numel() // (stage_bits[0] * n), triton.cdiv(n, STAGE_BLOCK))](
        first, second, residual, n, R=R, FIRST=stage_bits[0], SECOND=second_bits, FILL=2**missing // 2,
        BLOCK=STAGE_BLOCK)
    return residual
