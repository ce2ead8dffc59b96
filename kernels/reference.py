"""PyTorch reference of the Lynx codec kernels: plain vectorised tensor code, on CPU or GPU.

Shapes (``nb`` blocks of ``G`` tokens; a segment is one layer's K or V over one block: G x H x D
codes in kv's own order, token then head then channel; ``n = G * H * D / 8``):

    kv          [2, L, T, H, D]          float32 / bfloat16 / float16
    anchor      [nb, 2, L, A, n]         uint8, the A bit-planes of each segment
    residual    [nb, 2, L, 8 - A, n]     uint8, the 8 - A bit-planes of each segment
    meta        Meta of three tensors, per block (see Meta)
    table       [2, L, 2**A]             float16: Anchor value a stands for code a * 2**(8-A) + table[a]
                [nb, 2, L, 2**A]         or one table per block (blocks encoded apart, e.g. page by page)

Each channel of each head is quantized over a block of G tokens (one group = G elements) with a
float16 zero and an 8-bit scale whose exponent is relative to one exponent per (block, layer's K or
V, head): 3 bytes per group plus 1 per G x D elements (see encode_scale). A segment's codes are cut
into 8 stripes of G / 8 tokens; the k-th codes of the 8 stripes form one little-endian word of 8 * b
bits (b = A or 8 - A) whose b bytes go to the segment's b planes: plane j holds byte j of every word.
For b = 4 that is nibble packing: plane 0 byte k = stripe0[k] | stripe1[k] << 4.

The Triton kernels in ``triton_kernels`` produce bit-identical outputs; every floating point step here
is chosen so that no compiler can legally change it (no a * b + c that could fuse into an FMA unless
the product is exact, and IEEE division).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

CODE_BITS = 8
STRIPES = 8  # codes are packed 8 at a time: b bits x 8 codes = b whole bytes
ROUNDING_BIAS = 2.0**23
ROUNDING_BIAS_BITS = 0x4B000000  # the encoding of 2.0**23 as a float32
# The float work runs over chunks of about this many elements in one reused buffer, which stays in
# cache; full-size temporaries would also cost page faults on every call.
CHUNK_ELEMENTS = 1 << 20
# Scales: SCALE_MANTISSA_BITS of mantissa and an exponent up to MAX_OFFSET binades below a shared one.
SCALE_MANTISSA_BITS = 5
MAX_OFFSET = 7
MIN_EXPONENT = MAX_OFFSET + 1
FLOAT32_MANTISSA_BITS = 23
SCALE_MANTISSA_MASK = 2**SCALE_MANTISSA_BITS - 1
SCALE_SHIFT = FLOAT32_MANTISSA_BITS - SCALE_MANTISSA_BITS  # the scale mantissa's place in a float32
FLOAT32_INF_BITS = 0x7F800000
INF_EXPONENT = FLOAT32_INF_BITS >> FLOAT32_MANTISSA_BITS  # 255: the exponent of a non-finite group


class Meta(NamedTuple):
    """The metadata of nb blocks; in the metadata buffer each block holds these three, in this order."""

    zero: torch.Tensor  # float16 [nb, 2, L, H, D]: each group's minimum, rounded down
    scale_code: torch.Tensor  # uint8 [nb, 2, L, H, D]: the group's scale (encode_scale)
    exponent: torch.Tensor  # uint8 [nb, 2, L, H]: the exponent its head's scale codes are relative to


class Slots(NamedTuple):
    """A decode's destination in a KV pool instead of a new tensor: token t of K (V) of layer l goes to
    row index[t] of buffers[l] (buffers[L + l])."""

    buffers: Sequence[torch.Tensor]  # 2 * L contiguous [pool tokens, H, D] tensors: every K, then every V
    index: torch.Tensor  # int64 [num_tokens], on the buffers' device


def meta_block_nbytes(num_layers: int, num_heads: int, head_dim: int) -> int:
    return 2 * num_layers * num_heads * (3 * head_dim + 1)


def meta_views(blocks: torch.Tensor, num_layers: int, num_heads: int, head_dim: int) -> Meta:
    """uint8 [nb, meta_block_nbytes] (one row per block) -> Meta of views into it."""
    nb, (L, H, D) = blocks.shape[0], (num_layers, num_heads, head_dim)
    n = 2 * L * H * D
    return Meta(blocks[:, : 2 * n].view(torch.float16).view(nb, 2, L, H, D),
                blocks[:, 2 * n: 3 * n].view(nb, 2, L, H, D),
                blocks[:, 3 * n:].view(nb, 2, L, H))


def fp16_floor(x: torch.Tensor) -> torch.Tensor:
    """The largest float16 <= x (float32).

    x rounded to nearest, moved one float16 down where it lies above x. On the sign-magnitude bits one
    float16 down is -1 for a positive number and +1 for a negative one, i.e. -sign(bits | 1) (the int16
    view of a negative float is negative). Rounding keeps the sign of x, so h = +-0 never has to cross
    zero. Bit arithmetic: torch.where and torch.nextafter are slow on CPUs.
    """
    h = x.to(torch.float16)
    bits = h.view(torch.int16)
    step = (bits | 1).sign_().neg_().mul_(h.float() > x)
    return (bits + step).view(torch.float16)


def group_metadata(lo: torch.Tensor, hi: torch.Tensor, bits: int, shared_dims) -> tuple[torch.Tensor, ...]:
    """(zero, scale code, exponent) of asymmetric quantization covering [lo, hi] with 2**bits codes.

    zero is the float16 minimum rounded down and the scale (max - zero) / (2**bits - 1) is rounded up
    (encode_scale, its exponent shared along shared_dims), so every value of the group maps into
    [0, 2**bits - 1] without clamping. A non-finite group (NaN, +-Inf, or a minimum below -65504, the
    float16 range) gives a non-finite zero or an exponent of INF_EXPONENT. Adding 0.0 folds -0.0 into
    +0.0, so that implementations of min/max agree on the bits.
    """
    zero = fp16_floor(lo.float() + 0.0)
    code, exponent = encode_scale((hi.float() + 0.0 - zero.float()) / (2**bits - 1), shared_dims)
    return zero, code, exponent


def encode_scale(s: torch.Tensor, shared_dims) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 scales s >= 0 -> (codes uint8, shaped as s; exponents uint8, s reduced over shared_dims).

    Every s is rounded up to SCALE_MANTISSA_BITS bits of mantissa, (1 + m / 32) * 2**(e - 127) with e
    its float32 exponent field, at most 1/32 above s. The exponents along shared_dims are stored once,
    as E = the largest e (at least MIN_EXPONENT), and each scale as code = (E - e) << 5 | m. A scale more
    than 7 binades below E is raised to 2**(E - 7 - 127), the smallest a code can hold, which still
    covers its group. Non-finite s give E = INF_EXPONENT: an infinite scale.
    """
    bits = (s.view(torch.int32) & 0x7FFFFFFF).clamp_(max=FLOAT32_INF_BITS)  # NaN (of any sign) -> +inf
    bits = (bits + (2**SCALE_SHIFT - 1)) & -(2**SCALE_SHIFT)  # round up; the carry may raise e
    e = bits >> FLOAT32_MANTISSA_BITS
    exponent = torch.amax(e, shared_dims, keepdim=True).clamp_(min=MIN_EXPONENT)
    offset = exponent - e
    mantissa = (bits >> SCALE_SHIFT) & SCALE_MANTISSA_MASK
    code = torch.where(offset <= MAX_OFFSET, (offset << SCALE_MANTISSA_BITS) | mantissa,
                       MAX_OFFSET << SCALE_MANTISSA_BITS)
    return code.to(torch.uint8), exponent.to(torch.uint8)


def decode_scale(code: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """The float32 scales that encode_scale's codes stand for (exponent broadcast against code).

    Built on the bits, so it is exact; MIN_EXPONENT keeps every exponent field >= 1 (a normal float).
    """
    code = code.int()
    bits = (exponent.int() - (code >> SCALE_MANTISSA_BITS)) << FLOAT32_MANTISSA_BITS
    bits |= (code & SCALE_MANTISSA_MASK) << SCALE_SHIFT
    return bits.view(torch.float32)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even codes of x (broadcast against scale and zero), as int32."""
    return _biased_codes(x, scale, zero).sub_(ROUNDING_BIAS_BITS)


def _biased_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out=None) -> torch.Tensor:
    """The codes plus the encoding of 2**23, as int32: their low byte is the 8-bit code.

    Adding 2**23 to 0 <= y < 2**22 leaves no fraction bits, so the addition rounds y to nearest even
    and the code lands in the low bits of the float's encoding (cheaper on CPUs than round() and a
    float to integer conversion).
    """
    inv = torch.reciprocal(scale.float())  # scales are never 0 (see decode_scale)
    return torch.sub(x, zero.float(), out=out).mul_(inv).add_(ROUNDING_BIAS).view(torch.int32)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out=None) -> torch.Tensor:
    """codes * scale + zero in float32 (into out, if given). codes (whole sixteenths below 2**12)
    times a scale (6 significant bits) is exact, so this rounds once whether or not the multiply-add
    is fused."""
    if out is None:
        out = torch.empty(codes.shape, device=codes.device)
    out.copy_(codes)
    return torch.addcmul(zero.float(), out, scale.float(), out=out)


def pack_bits(codes: torch.Tensor, bits: int, out=None) -> torch.Tensor:
    """codes [..., 8, n] (each < 2**bits) -> [..., bits, n]: byte j of the words sum_i codes[i] << bits*i."""
    if out is None:
        out = codes.new_empty(codes.shape[:-2] + (bits, codes.shape[-1]))
    codes, groups = _bit_groups(codes, bits), _bit_groups(out, bits)
    positions = _bit_positions(bits)
    # Every byte has a field starting in it (bits <= 8): the first one (shift < bits) sets the byte,
    # the others are added (disjoint fields: adding is OR-ing; uint8 drops bits shifted past 7) ...
    for m, (byte, shift) in enumerate(positions):
        if shift < bits:
            torch.mul(codes[..., m, :], 2**shift, out=groups[..., byte, :])
        else:
            groups[..., byte, :].add_(codes[..., m, :], alpha=2**shift)
    # ... and then the high bits of fields that cross into the next byte.
    for m, (byte, shift) in enumerate(positions):
        if shift + bits > 8:
            groups[..., byte + 1, :] |= codes[..., m, :] >> (8 - shift)
    return out


def unpack_bits(planes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_bits: planes [..., bits, n] -> codes [..., 8, n]."""
    codes = planes.new_empty(planes.shape[:-2] + (STRIPES, planes.shape[-1]))
    groups, stripes = _bit_groups(planes, bits), _bit_groups(codes, bits)
    for m, (byte, shift) in enumerate(_bit_positions(bits)):
        code = torch.bitwise_right_shift(groups[..., byte, :], shift, out=stripes[..., m, :])
        if shift + bits > 8:
            code |= groups[..., byte + 1, :] << (8 - shift)
    return codes.bitwise_and_(2**bits - 1)


def _bit_positions(bits: int) -> list[tuple[int, int]]:
    """(byte, shift) of the stripes of one group (see _bit_groups) within the group's bytes."""
    return [divmod(bits * m, 8) for m in range(8 // math.gcd(bits, 8))]


def _bit_groups(t: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., 8 stripes or `bits` planes, n] -> [..., gcd(bits, 8), stripes or planes per group, n].

    Stripe i's bits sit at the same position within its group of bytes as stripe i + 8 / gcd(bits, 8)'s
    (e.g. every 2nd stripe for 4 bits), so each position is one operation over all groups.
    """
    return t.unflatten(-2, (math.gcd(bits, 8), -1))


def quantize_split(kv: torch.Tensor, anchor_bits: int, group_size: int, out=None):
    """INT8-quantize kv per (channel, block of G tokens) and split every code into Anchor and Residual planes.

    Returns (anchor, residual, meta) as described in the module docstring, written into out if
    given. The last block is padded with copies of the last token, which leaves every group's range
    unchanged.
    """
    _, L, T, H, D = kv.shape
    G, A = group_size, anchor_bits
    R = CODE_BITS - A
    anchor, residual, meta = out if out is not None else empty_planes(kv, A, G)
    anchor, residual = anchor.flatten(1, 2), residual.flatten(1, 2)  # slices K0..V(L-1)
    nb = anchor.shape[0]
    x = kv.reshape(2 * L, T, H, D)
    chunks, work = _chunks(2 * L, nb, G * H * D, kv.device)

    def tokens(s: slice, b: slice) -> torch.Tensor:  # [S, B, G, H, D]
        return pad_tokens(x[s, b.start * G: b.stop * G], (b.stop - b.start) * G).unflatten(1, (-1, G))

    # Every group's range, chunk by chunk; then all the metadata at once (one exponent per head): per
    # chunk, its dozens of small operations would cost more than reading the KV twice.
    lo, hi = kv.new_empty((2, 2 * L, nb, H, D))
    for s, b in chunks:
        torch.amin(tokens(s, b), 2, out=lo[s, b])
        torch.amax(tokens(s, b), 2, out=hi[s, b])
    zero, scale_code, exponent = group_metadata(lo, hi, CODE_BITS, -1)  # [S, nb, H, D]; exponent [S, nb, H, 1]
    for field, value in zip(meta, (zero, scale_code, exponent.squeeze(-1))):
        field.view(value.transpose(0, 1).shape).copy_(value.transpose(0, 1))
    scale = decode_scale(scale_code, exponent)

    code_work = torch.empty((2, work.numel()), dtype=torch.uint8, device=kv.device)
    for s, b in chunks:
        xs = tokens(s, b)
        biased = _biased_codes(xs, scale[s, b].unsqueeze(2), zero[s, b].unsqueeze(2),
                               out=work[: xs.numel()].view(xs.shape))
        # Block-major codes [B, S, 8 stripes, G / 8 * H * D]; int32 -> uint8 keeps the low byte: the code.
        codes, high = code_work[:, : xs.numel()].view(2, b.stop - b.start, -1, STRIPES, anchor.shape[-1])
        codes.view(biased.transpose(0, 1).shape).copy_(biased.transpose(0, 1))
        pack_bits(torch.bitwise_right_shift(codes, R, out=high), A, out=anchor[b, s])
        pack_bits(codes.bitwise_and_(2**R - 1), R, out=residual[b, s])
    return anchor.unflatten(1, (2, L)), residual.unflatten(1, (2, L)), meta


def empty_planes(kv: torch.Tensor, anchor_bits: int, group_size: int):
    """Uninitialised (anchor, residual, meta) for kv, shaped as the module docstring says."""
    _, L, T, H, D = kv.shape
    nb, n = -(-T // group_size), group_size * H * D // STRIPES
    return (kv.new_empty((nb, 2, L, anchor_bits, n), dtype=torch.uint8),
            kv.new_empty((nb, 2, L, CODE_BITS - anchor_bits, n), dtype=torch.uint8),
            meta_views(kv.new_empty((nb, meta_block_nbytes(L, H, D)), dtype=torch.uint8), L, H, D))


def dequant_anchor(anchor, meta: Meta, table, num_tokens: int, dtype=torch.float32, out=None) -> torch.Tensor:
    """Anchor-only reconstruction: Anchor value a of slice s stands for code a * 2**R + table[s, a]
    (table[block, s, a] with a table per block)."""
    A = anchor.shape[-2]
    R = CODE_BITS - A
    anchor = anchor.flatten(1, 2)  # [nb, 2 * L, A, n]
    # The reconstruction point of every ([block,] slice, Anchor value), flattened so that one index picks it.
    points = (torch.arange(2**A, device=table.device) * 2**R + table.float().view(-1, 2**A)).view(-1)
    block_points = anchor.shape[1] * 2**A if table.dim() == 4 else 0

    def codes(s: slice, b: slice) -> torch.Tensor:
        a = unpack_bits(anchor[b, s], A).long()
        a += (torch.arange(s.start, s.stop, device=a.device) * 2**A).view(1, -1, 1, 1)
        if block_points:
            a += (torch.arange(b.start, b.stop, device=a.device) * block_points).view(-1, 1, 1, 1)
        return points.index_select(0, a.view(-1)).view(a.shape)

    return _dequantize(codes, meta, _group_size(anchor, meta), num_tokens, dtype, out)


def merge_dequant(anchor, residual, meta: Meta, num_tokens: int, dtype=torch.float32, out=None) -> torch.Tensor:
    """Merge Anchor and Residual back into the INT8 codes and dequantize them."""
    A, R = anchor.shape[-2], residual.shape[-2]
    anchor, residual = anchor.flatten(1, 2), residual.flatten(1, 2)

    def codes(s: slice, b: slice) -> torch.Tensor:
        return (unpack_bits(anchor[b, s], A) << R).bitwise_or_(unpack_bits(residual[b, s], R))

    return _dequantize(codes, meta, _group_size(anchor, meta), num_tokens, dtype, out)


def split_stages(residual: torch.Tensor, stage_bits: Sequence[int]) -> list[torch.Tensor]:
    """Residual planes [..., R, n] -> one set of planes [..., b, n] per later stage of a progressive plan:
    stage i holds the next stage_bits[i] bits of every Residual code, high bits first (sum = R)."""
    codes, shift, stages = unpack_bits(residual, residual.shape[-2]), residual.shape[-2], []
    for bits in stage_bits:
        shift -= bits
        stages.append(pack_bits((codes >> shift).bitwise_and_(2**bits - 1), bits))
    return stages


def merge_stages(stages: Sequence[torch.Tensor], stage_bits: Sequence[int]) -> torch.Tensor:
    """Inverse of split_stages, from the stages that have landed (a prefix of the plan): Residual planes
    [..., R, n] whose missing low bits stand at the middle of what they could be (2**(m - 1) for m of
    them; none missing: the Residual, bit for bit)."""
    residual_bits = sum(stage_bits)
    missing = residual_bits - sum(stage_bits[: len(stages)])
    codes = stages[0].new_full(stages[0].shape[:-2] + (STRIPES, stages[0].shape[-1]), 2**missing // 2)
    shift = residual_bits
    for planes, bits in zip(stages, stage_bits):
        shift -= bits
        codes |= unpack_bits(planes, bits) << shift
    return pack_bits(codes, residual_bits)


def pad_tokens(x: torch.Tensor, padded: int) -> torch.Tensor:
    """x [S, T, H, D] -> [S, padded, H, D], repeating the last token."""
    missing = padded - x.shape[1]
    return x if missing == 0 else torch.cat([x, x[:, -1:].expand(-1, missing, -1, -1)], 1)


def _chunks(num_slices: int, num_blocks: int, block_elements: int, device):
    """(slices, blocks) ranges of about CHUNK_ELEMENTS elements covering everything, and a float32
    work buffer for the largest: whole slices if they fit, else runs of blocks of one slice."""
    blocks = max(1, CHUNK_ELEMENTS // block_elements)
    if blocks < num_blocks:
        chunks = [(slice(i, i + 1), slice(j, min(j + blocks, num_blocks)))
                  for i in range(num_slices) for j in range(0, num_blocks, blocks)]
        largest = blocks * block_elements
    else:
        step = blocks // num_blocks
        chunks = [(slice(i, min(i + step, num_slices)), slice(0, num_blocks)) for i in range(0, num_slices, step)]
        largest = min(step, num_slices) * num_blocks * block_elements
    return chunks, torch.empty(largest, device=device)


def _group_size(planes: torch.Tensor, meta: Meta) -> int:
    H, D = meta.zero.shape[-2:]
    return planes.shape[-1] * STRIPES // (H * D)  # n = G * H * D / 8


def _dequantize(codes, meta: Meta, group_size: int, num_tokens: int, dtype, out) -> torch.Tensor:
    """kv [2, L, T, H, D] (into out, if given: such a tensor or Slots) from codes(slices, blocks): the
    block-major codes [B, S, 8, n] there."""
    nb, _, L, H, D = meta.zero.shape
    G = group_size
    zero, scale_code, exponent = (field.flatten(1, 2) for field in meta)
    if out is None:
        out = torch.empty((2, L, num_tokens, H, D), dtype=dtype, device=zero.device)
    result = out
    if not isinstance(out, Slots):
        out = out.view(2 * L, num_tokens, H, D)
    chunks, work = _chunks(2 * L, nb, G * H * D, zero.device)
    for s, b in chunks:
        c = codes(s, b)
        c = c.view(c.shape[0], c.shape[1], -1, H, D).transpose(0, 1)  # [S, B, G, H, D]
        scale = decode_scale(scale_code[b, s], exponent[b, s].unsqueeze(-1))
        x = dequantize(c, scale.transpose(0, 1).unsqueeze(2), zero[b, s].transpose(0, 1).unsqueeze(2),
                       out=work[: c.numel()].view(c.shape))  # scale, zero: [S, B, 1, H, D]
        first, last = b.start * G, min(b.stop * G, num_tokens)
        x = x.flatten(1, 2)[:, : last - first]
        if isinstance(out, Slots):
            for buffer, part in zip(out.buffers[s], x):
                buffer.index_copy_(0, out.index[first:last], part.to(buffer.dtype))
        else:
            out[s, first:last] = x
    return result
