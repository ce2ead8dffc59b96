"""PyTorch reference of the Lynx codec kernels: plain vectorised tensor code, on CPU or GPU.

Shapes (``nb`` blocks of ``G`` tokens; a segment is one layer's K or V over one block: G x H x D
codes in kv's own order, token then head then channel; ``n = G * H * D / 8``):

    kv          [2, L, T, H, D]          float32 / bfloat16 / float16
    anchor      [nb, 2, L, A, n]         uint8, the A bit-planes of each segment
    residual    [nb, 2, L, 8 - A, n]     uint8, the 8 - A bit-planes of each segment
    scale_zero  [nb, 2, L, H, D, 2]      float16 (scale, zero) of each channel's group of G tokens
    table       [2, L, 2**A]             float16: Anchor value a stands for code a * 2**(8-A) + table[a]

Each channel of each head is quantized over a block of G tokens (one group = G elements). A segment's
codes are cut into 8 stripes of G / 8 tokens; the k-th codes of the 8 stripes form one little-endian
word of 8 * b bits (b = A or 8 - A) whose b bytes go to the segment's b planes: plane j holds byte j
of every word. For b = 4 that is nibble packing: plane 0 byte k = stripe0[k] | stripe1[k] << 4.

The Triton kernels in ``triton_kernels`` produce bit-identical outputs; every floating point step here
is chosen so that no compiler can legally change it (no a * b + c that could fuse into an FMA unless
the product is exact, and IEEE division).
"""

from __future__ import annotations

import math

import torch

CODE_BITS = 8
STRIPES = 8  # codes are packed 8 at a time: b bits x 8 codes = b whole bytes
ROUNDING_BIAS = 2.0**23
ROUNDING_BIAS_BITS = 0x4B000000  # the encoding of 2.0**23 as a float32
# The float work runs over chunks of about this many elements in one reused buffer, which stays in
# cache; full-size temporaries would also cost page faults on every call.
CHUNK_ELEMENTS = 1 << 20


def fp16_floor(x: torch.Tensor) -> torch.Tensor:
    """The largest float16 <= x (float32)."""
    return _fp16_step(x, x.to(torch.float16), -1)


def fp16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16 >= x (float32)."""
    return _fp16_step(x, x.to(torch.float16), 1)


def _fp16_step(x: torch.Tensor, h: torch.Tensor, direction: int) -> torch.Tensor:
    """h (x rounded to nearest) moved one float16 in direction where it lies on the wrong side of x.

    On the sign-magnitude bits, one float16 up is +1 for a positive h and -1 for a negative one, i.e.
    sign(bits | 1) (the int16 view of a negative float is negative). Rounding keeps the sign of x, so
    h = +-0 never has to cross zero. Bit arithmetic: torch.where and torch.nextafter are slow on CPUs.
    """
    bits = h.view(torch.int16)
    wrong_side = h.float() > x if direction < 0 else h.float() < x
    step = (bits | 1).sign_().mul_(direction).mul_(wrong_side)
    return (bits + step).view(torch.float16)


def scale_zero(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric float16 (scale, zero) covering [lo, hi] with 2**bits codes.

    zero is rounded down and scale up, so every value of the group maps into [0, 2**bits - 1] without
    clamping. A non-finite group (NaN, +-Inf, or a minimum beyond float16) gives a non-finite result.
    Adding 0.0 folds -0.0 into +0.0, so that implementations of min/max agree on the bits.
    """
    zero = fp16_floor(lo.float() + 0.0)
    scale = fp16_ceil((hi.float() + 0.0 - zero.float()) / (2**bits - 1))
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even codes of x (broadcast against scale and zero), as int32."""
    return _biased_codes(x, scale, zero).sub_(ROUNDING_BIAS_BITS)


def _biased_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out=None) -> torch.Tensor:
    """The codes plus the encoding of 2**23, as int32: their low byte is the 8-bit code.

    Adding 2**23 to 0 <= y < 2**22 leaves no fraction bits, so the addition rounds y to nearest even
    and the code lands in the low bits of the float's encoding (cheaper on CPUs than round() and a
    float to integer conversion).
    """
    inv = torch.reciprocal(scale.float()).nan_to_num_(posinf=0.0)  # a constant group gets code 0
    return torch.sub(x, zero.float(), out=out).mul_(inv).add_(ROUNDING_BIAS).view(torch.int32)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out=None) -> torch.Tensor:
    """codes * scale + zero in float32 (into out, if given). codes (whole sixteenths below 2**12)
    times a float16 scale is exact, so this rounds once whether or not the multiply-add is fused."""
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

    Returns (anchor, residual, scale_zero) as described in the module docstring, written into out if
    given. The last block is padded with copies of the last token, which leaves every group's range
    unchanged.
    """
    _, L, T, H, D = kv.shape
    G, A = group_size, anchor_bits
    R = CODE_BITS - A
    anchor, residual, meta = out if out is not None else empty_planes(kv, A, G)
    anchor, residual, meta = anchor.flatten(1, 2), residual.flatten(1, 2), meta.flatten(1, 2)  # slices K0..V(L-1)
    nb = anchor.shape[0]
    x = kv.reshape(2 * L, T, H, D)
    chunks, work = _chunks(2 * L, nb, G * H * D, kv.device)

    def tokens(s: slice, b: slice) -> torch.Tensor:  # [S, B, G, H, D]
        return pad_tokens(x[s, b.start * G: b.stop * G], (b.stop - b.start) * G).unflatten(1, (-1, G))

    # Every group's range, chunk by chunk; then all scales and zeros at once.
    lo, hi = kv.new_empty((2, 2 * L, nb, H, D))
    for s, b in chunks:
        torch.amin(tokens(s, b), 2, out=lo[s, b])
        torch.amax(tokens(s, b), 2, out=hi[s, b])
    scale, zero = scale_zero(lo, hi, CODE_BITS)  # [S, nb, H, D]
    meta[..., 0], meta[..., 1] = scale.transpose(0, 1), zero.transpose(0, 1)

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
    return anchor.unflatten(1, (2, L)), residual.unflatten(1, (2, L)), meta.unflatten(1, (2, L))


def empty_planes(kv: torch.Tensor, anchor_bits: int, group_size: int):
    """Uninitialised (anchor, residual, scale_zero) for kv, shaped as the module docstring says."""
    _, L, T, H, D = kv.shape
    nb, n = -(-T // group_size), group_size * H * D // STRIPES
    return (kv.new_empty((nb, 2, L, anchor_bits, n), dtype=torch.uint8),
            kv.new_empty((nb, 2, L, CODE_BITS - anchor_bits, n), dtype=torch.uint8),
            kv.new_empty((nb, 2, L, H, D, 2), dtype=torch.float16))


def dequant_anchor(anchor, scale_zero, table, num_tokens: int, dtype=torch.float32, out=None) -> torch.Tensor:
    """Anchor-only reconstruction: Anchor value a of slice s stands for code a * 2**R + table[s, a]."""
    A = anchor.shape[-2]
    R = CODE_BITS - A
    anchor = anchor.flatten(1, 2)  # [nb, 2 * L, A, n]
    # The reconstruction point of every (slice, Anchor value), flattened so that one index picks it.
    points = (torch.arange(2**A, device=table.device) * 2**R + table.float().view(-1, 2**A)).view(-1)

    def codes(s: slice, b: slice) -> torch.Tensor:
        a = unpack_bits(anchor[b, s], A).long()
        a += (torch.arange(s.start, s.stop, device=a.device) * 2**A).view(1, -1, 1, 1)
        return points.index_select(0, a.view(-1)).view(a.shape)

    return _dequantize(codes, scale_zero, _group_size(anchor, scale_zero), num_tokens, dtype, out)


def merge_dequant(anchor, residual, scale_zero, num_tokens: int, dtype=torch.float32, out=None) -> torch.Tensor:
    """Merge Anchor and Residual back into the INT8 codes and dequantize them."""
    A, R = anchor.shape[-2], residual.shape[-2]
    anchor, residual = anchor.flatten(1, 2), residual.flatten(1, 2)

    def codes(s: slice, b: slice) -> torch.Tensor:
        return (unpack_bits(anchor[b, s], A) << R).bitwise_or_(unpack_bits(residual[b, s], R))

    return _dequantize(codes, scale_zero, _group_size(anchor, scale_zero), num_tokens, dtype, out)


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


def _group_size(planes: torch.Tensor, scale_zero: torch.Tensor) -> int:
    H, D = scale_zero.shape[-3:-1]
    return planes.shape[-1] * STRIPES // (H * D)  # n = G * H * D / 8


def _dequantize(codes, scale_zero, group_size: int, num_tokens: int, dtype, out) -> torch.Tensor:
    """kv [2, L, T, H, D] (into out, if given) from codes(slices, blocks): the block-major codes
    [B, S, 8, n] there."""
    nb, _, L, H, D, _ = scale_zero.shape
    G = group_size
    scale_zero = scale_zero.flatten(1, 2)
    if out is None:
        out = torch.empty((2, L, num_tokens, H, D), dtype=dtype, device=scale_zero.device)
    result, out = out, out.view(2 * L, num_tokens, H, D)
    chunks, work = _chunks(2 * L, nb, G * H * D, scale_zero.device)
    for s, b in chunks:
        c = codes(s, b)
        c = c.view(c.shape[0], c.shape[1], -1, H, D).transpose(0, 1)  # [S, B, G, H, D]
        sz = scale_zero[b, s].transpose(0, 1).unsqueeze(2)  # [S, B, 1, H, D, 2]
        x = dequantize(c, sz[..., 0], sz[..., 1], out=work[: c.numel()].view(c.shape))
        first, last = b.start * G, min(b.stop * G, num_tokens)
        out[s, first:last] = x.flatten(1, 2)[:, : last - first]
    return result
