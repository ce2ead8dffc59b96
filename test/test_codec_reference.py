"""The Lynx codec's behaviour, on the PyTorch reference kernels (CPU).

INT8 per (layer, K/V, head, channel) over blocks of G tokens; every code split into an Anchor (its A
high bits) and a Residual (its 8 - A low bits), packed into block-major byte buffers.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lynx_kernels
from lynx_kernels import reference
from sglang_lynx.codec import Codec
from sglang_lynx.codec.anchor_table import RESOLUTION, centre_table, estimate_table
from sglang_lynx.codec.rtn import fake_quantize

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
examples = settings(max_examples=40, deadline=None)


def random_kv(seed: int, L: int, T: int, H: int, D: int, dtype=torch.float32, grid: int = 0) -> torch.Tensor:
    """KV-like data: per-channel offsets and spreads that differ by orders of magnitude, a few outliers;
    grid > 0 snaps values to multiples of 1 / grid (ties, repeated values, constant groups, -0.0)."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(2, L, 1, H, D, generator=g) * 4
    spread = torch.exp(torch.randn(2, L, 1, H, D, generator=g) * 1.5)
    kv = offset + spread * torch.randn(2, L, T, H, D, generator=g)
    outliers = torch.rand(2, L, T, H, D, generator=g) < 0.01
    kv = torch.where(outliers, kv * 8, kv)
    if grid:
        kv = torch.round(kv * grid) / grid
        kv[..., ::3] = -kv[..., ::3] * 0.0  # some -0.0 and +0.0
    return kv.to(dtype)


@st.composite
def kv_cases(draw, max_tokens=150):
    L, H = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    D = draw(st.sampled_from([1, 3, 8, 20, 64, 128]))  # 64: SmolLM2, 128: Qwen2.5
    T = draw(st.integers(1, max_tokens))
    dtype = draw(st.sampled_from(DTYPES))
    kv = random_kv(draw(st.integers(0, 2**31)), L, T, H, D, dtype, grid=draw(st.sampled_from([0, 0, 2])))
    codec = Codec(L, H, D, anchor_bits=draw(st.integers(2, 6)), group_size=draw(st.sampled_from([8, 16, 64])))
    return codec, kv


def flat(outputs) -> list[torch.Tensor]:
    """quantize_split's (anchor, residual, Meta) as a list of tensors."""
    anchor, residual, meta = outputs
    return [anchor, residual, *meta]


def per_element(codec: Codec, meta: torch.Tensor, T: int):
    """(scale, zero) of every element's group, float32 [2, L, T, H, D], read from meta as documented:
    after the header, block after block: float16 zero per (K/V, layer, head, channel), then the scale
    codes (offset << 5 | mantissa) in the same order, then one exponent E per (K/V, layer, head);
    scale = (1 + mantissa / 32) * 2**(E - offset - 127)."""
    nb, L, H, D = codec.num_blocks(T), codec.num_layers, codec.num_heads, codec.head_dim
    blocks = meta[codec.meta_header_nbytes:].view(nb, -1)
    n = 2 * L * H * D
    zero = blocks[:, : 2 * n].contiguous().view(torch.float16).double().view(nb, 2, L, H, D)
    code = blocks[:, 2 * n: 3 * n].double().view(nb, 2, L, H, D)
    exponent = blocks[:, 3 * n:].double().view(nb, 2, L, H, 1)
    offset, mantissa = torch.div(code, 32, rounding_mode="floor"), code % 32
    scale = (1 + mantissa / 32) * torch.pow(2.0, exponent - offset - 127)

    def per_token(x):  # [nb, 2, L, H, D] -> [2, L, T, H, D]
        x = x.permute(1, 2, 0, 3, 4).unsqueeze(3).expand(-1, -1, -1, codec.group_size, -1, -1)
        return x.reshape(2, L, nb * codec.group_size, H, D)[:, :, :T].float()

    return per_token(scale), per_token(zero)


def encoded(case):
    """(codec, kv, T, planes, (scale, zero) per element) of a kv_cases() example, kv encoded."""
    codec, kv = case
    planes = codec.encode(kv)
    return codec, kv, kv.shape[2], planes, per_element(codec, planes.meta, kv.shape[2])


def rounding_slack(kv, scale, zero):
    """Float32 rounding in (x - zero) / scale and code * scale + zero: a few ulps of the magnitudes."""
    return 4 * torch.finfo(torch.float32).eps * (kv.abs() + zero.abs() + 256 * scale)


# --- merge exactness and error bounds -------------------------------------------------------------


@examples
@given(kv_cases())
def test_anchor_plus_residual_decodes_to_exactly_the_int8_dequantization(case):
    codec, kv = case
    planes = codec.encode(kv)
    merged = codec.decode_merged(planes.anchor, planes.residual, planes.meta, kv.shape[2])
    assert torch.equal(merged, fake_quantize(kv, codec.group_size, 1, 8))


# Progressive plans (bits per stage, 8 in all): the Anchor, then the Residual in one or two stages.
PLANS = [(a, *rest) for a in range(2, 7) for rest in
         [(8 - a,), *((b, 8 - a - b) for b in range(1, 8 - a))]]


@pytest.mark.parametrize("plan", PLANS, ids=[",".join(map(str, p)) for p in PLANS])
def test_the_residual_splits_into_the_stages_of_every_plan_and_merges_back_to_int8_bit_for_bit(plan):
    codec = Codec(2, 3, 20, anchor_bits=plan[0], group_size=16)
    kv, T = random_kv(plan[0], 2, 37, 3, 20), 37
    planes = codec.encode(kv)
    stages = codec.split_residual(planes.residual, T, plan[1:])
    assert [s.numel() for s in stages] == [planes.residual.numel() * b // codec.residual_bits for b in plan[1:]]
    assert torch.equal(codec.merge_residual(stages, T, plan[1:]), planes.residual)
    int8 = codec.decode_merged(planes.anchor, codec.merge_residual(stages, T, plan[1:]), planes.meta, T)
    assert torch.equal(int8, fake_quantize(kv, codec.group_size, 1, 8))


@pytest.mark.parametrize("plan", [p for p in PLANS if len(p) == 3], ids=lambda p: ",".join(map(str, p)))
def test_before_the_last_stage_each_code_has_its_landed_bits_and_the_middle_of_the_missing_ones(plan):
    codec = Codec(1, 2, 8, anchor_bits=plan[0], group_size=8)
    planes = codec.encode(random_kv(1, 1, 20, 2, 8))
    stages = codec.split_residual(planes.residual, 20, plan[1:])
    R, missing = codec.residual_bits, plan[2]
    exact = reference.unpack_bits(planes.residual.view(3, 2, 1, R, -1), R)
    partial = reference.unpack_bits(codec.merge_residual(stages[:1], 20, plan[1:]).view(3, 2, 1, R, -1), R)
    assert torch.equal(partial >> missing, exact >> missing)
    assert (partial & (2**missing - 1)).eq(2**missing // 2).all()


def test_stages_that_do_not_make_up_the_residual_are_rejected():
    codec = Codec(1, 1, 8, anchor_bits=4, group_size=8)
    planes = codec.encode(random_kv(0, 1, 8, 1, 8))
    for stages in ([2, 1], [4, 0], [5]):
        with pytest.raises(ValueError, match="at least one bit, 4 in all"):
            codec.split_residual(planes.residual, 8, stages)


@examples
@given(kv_cases())
def test_int8_error_is_at_most_half_a_code_step(case):
    codec, kv, T, planes, (scale, zero) = encoded(case)
    err = (codec.decode_merged(planes.anchor, planes.residual, planes.meta, T) - kv.float()).abs()
    assert (err <= scale / 2 + rounding_slack(kv.float(), scale, zero)).all()


@examples
@given(kv_cases())
def test_centre_rule_anchor_error_is_at_most_half_a_residual_step(case):
    codec, kv, T, planes, (scale, zero) = encoded(case)
    centre = codec.decode_anchor(planes.anchor, planes.meta, T, table=centre_table(codec.num_layers,
                                                                                    codec.anchor_bits))
    half_residual_step = 2 ** (codec.residual_bits - 1) * scale
    assert ((centre - kv.float()).abs() <= half_residual_step + rounding_slack(kv.float(), scale, zero)).all()


@examples
@given(kv_cases())
def test_anchor_rebuilds_inside_its_bin_off_centre_by_at_most_the_table_offset(case):
    """The mean rule moves each bin's point off centre by the table's offset, and the bound with it."""
    codec, kv, T, planes, (scale, zero) = encoded(case)
    table, _ = codec.split_meta(planes.meta, T)
    R = codec.residual_bits
    assert ((table >= 0) & (table <= 2**R - 1) & (table * RESOLUTION == (table * RESOLUTION).round())).all()
    off_centre = (table.float() - (2**R - 1) / 2).abs().amax()
    anchor = codec.decode_anchor(planes.anchor, planes.meta, T)
    bound = (2 ** (R - 1) + off_centre) * scale + rounding_slack(kv.float(), scale, zero)
    assert ((anchor - kv.float()).abs() <= bound).all()


def test_mean_rule_beats_the_centre_rule_on_bell_shaped_groups():
    kv = torch.randn(2, 2, 512, 2, 16, generator=torch.Generator().manual_seed(0))  # bell-shaped groups
    codec = Codec(2, 2, 16)
    planes = codec.encode(kv)
    centre = codec.decode_anchor(planes.anchor, planes.meta, 512, table=centre_table(2, 4))
    mean = codec.decode_anchor(planes.anchor, planes.meta, 512)
    assert (mean - kv).square().sum() < 0.99 * (centre - kv).square().sum()


# --- the byte layout ------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 7, 64, 65, 200])
def test_buffer_sizes_are_known_from_the_token_count_alone(T):
    codec = Codec(3, 2, 24, anchor_bits=3, group_size=64)
    planes = codec.encode(random_kv(T, 3, T, 2, 24))
    blocks = math.ceil(T / 64)
    codes_per_block = 2 * 3 * 64 * 2 * 24  # K/V x layers x tokens x heads x head_dim
    assert codec.anchor_block_nbytes == codes_per_block * 3 // 8
    assert codec.residual_block_nbytes == codes_per_block * 5 // 8
    # Per group of 64 elements a float16 zero and an 8-bit scale; per head one exponent.
    assert codec.meta_block_nbytes == 2 * 3 * 2 * (24 * 3 + 1)
    assert codec.meta_header_nbytes == 2 * 3 * 2**3 * 2  # float16 table of 2**A entries per K/V layer
    assert planes.anchor.numel() == codec.anchor_nbytes(T) == blocks * codec.anchor_block_nbytes
    assert planes.residual.numel() == codec.residual_nbytes(T) == blocks * codec.residual_block_nbytes
    assert planes.meta.numel() == codec.meta_nbytes(T) == (codec.meta_header_nbytes
                                                           + blocks * codec.meta_block_nbytes)
    assert all(p.dtype == torch.uint8 and p.dim() == 1 for p in planes[:3]) and planes.num_tokens == T


def test_each_block_is_one_slice_of_each_buffer_that_depends_only_on_its_tokens():
    codec = Codec(2, 2, 16, group_size=16)
    kv = random_kv(1, 2, 50, 2, 16)  # blocks: tokens 0-15, 16-31, 32-47, 48-49 (+ padding)
    changed = kv.clone()
    changed[:, :, 16:32] *= 3  # only block 1
    a, b = codec.encode(kv), codec.encode(changed)
    for buf, size in (("anchor", codec.anchor_block_nbytes), ("residual", codec.residual_block_nbytes)):
        x, y = getattr(a, buf).view(-1, size), getattr(b, buf).view(-1, size)
        assert torch.equal(x[[0, 2, 3]], y[[0, 2, 3]]) and not torch.equal(x[1], y[1])
    header = codec.meta_header_nbytes
    x, y = a.meta[header:].view(-1, codec.meta_block_nbytes), b.meta[header:].view(-1, codec.meta_block_nbytes)
    assert torch.equal(x[[0, 2, 3]], y[[0, 2, 3]]) and not torch.equal(x[1], y[1])


def test_encode_can_write_into_given_buffers_such_as_registered_transfer_memory():
    codec = Codec(2, 2, 8, group_size=16)
    kv = random_kv(13, 2, 40, 2, 8)
    out = codec.empty_planes(40)
    planes = codec.encode(kv, out=out)
    assert all(p.data_ptr() == o.data_ptr() for p, o in zip(planes[:3], out[:3]))
    assert all(torch.equal(p, q) for p, q in zip(planes[:3], codec.encode(kv)[:3]))
    with pytest.raises(ValueError, match="residual of 40 tokens must hold"):
        codec.encode(kv, out=out._replace(residual=out.residual[:-1]))


def test_a_prefix_of_whole_blocks_decodes_on_its_own():
    codec = Codec(2, 3, 8, group_size=16)
    kv = random_kv(2, 2, 70, 3, 8)
    planes = codec.encode(kv)
    full_merged = codec.decode_merged(planes.anchor, planes.residual, planes.meta, 70)
    full_anchor = codec.decode_anchor(planes.anchor, planes.meta, 70)
    T = 32  # two blocks
    anchor, residual = planes.anchor[: codec.anchor_nbytes(T)], planes.residual[: codec.residual_nbytes(T)]
    meta = planes.meta[: codec.meta_nbytes(T)]
    assert torch.equal(codec.decode_merged(anchor, residual, meta, T), full_merged[:, :, :T])
    assert torch.equal(codec.decode_anchor(anchor, meta, T), full_anchor[:, :, :T])


def encoded_pages(codec: Codec, kv: torch.Tensor, page_tokens: int):
    """kv encoded one page at a time, each page's buffers in a row of its own (as in Lynx staging rows):
    (anchor, residual, meta) [pages, bytes of a full page], and each page decoded alone (anchor, merged)."""
    T = kv.shape[2]
    pages = -(-T // page_tokens)
    rows = [torch.zeros(pages, nbytes(page_tokens), dtype=torch.uint8)
            for nbytes in (codec.anchor_nbytes, codec.residual_nbytes, codec.meta_nbytes)]
    alone = [], []
    for i in range(pages):
        planes = codec.encode(kv[:, :, i * page_tokens: (i + 1) * page_tokens])
        for row, plane in zip(rows, planes[:3]):
            row[i, : plane.numel()] = plane
        alone[0].append(codec.decode_anchor(planes.anchor, planes.meta, planes.num_tokens))
        alone[1].append(codec.decode_merged(planes.anchor, planes.residual, planes.meta, planes.num_tokens))
    return rows, [torch.cat(parts, dim=2) for parts in alone]


@pytest.mark.parametrize("page_tokens, T", [(16, 16), (16, 70), (32, 70), (32, 90)])  # 1 or 2 blocks a page
def test_pages_encoded_apart_decode_in_one_call_as_each_alone(page_tokens, T):
    codec = Codec(2, 3, 8, group_size=16)
    (anchor, residual, meta), (alone_anchor, alone_merged) = encoded_pages(codec, random_kv(3, 2, T, 3, 8),
                                                                           page_tokens)
    assert torch.equal(codec.decode_pages(anchor, None, meta, T, page_tokens), alone_anchor)
    assert torch.equal(codec.decode_pages(anchor, residual, meta, T, page_tokens), alone_merged)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pages_can_decode_straight_into_the_slots_of_a_kv_pool(dtype):
    codec = Codec(2, 3, 8, group_size=16)
    (anchor, residual, meta), (alone_anchor, alone_merged) = encoded_pages(codec, random_kv(4, 2, 70, 3, 8), 32)
    index = torch.randperm(100)[:70]
    for res, alone in ((None, alone_anchor), (residual, alone_merged)):
        pool = [torch.full((100, 3, 8), 7.0, dtype=dtype) for _ in range(4)]  # K0, K1, V0, V1
        slots = lynx_kernels.Slots(pool, index)
        assert codec.decode_pages(anchor, res, meta, 70, 32, dtype, out=slots) is slots
        expected = torch.full((4, 100, 3, 8), 7.0, dtype=dtype)
        expected[:, index] = alone.flatten(0, 1).to(dtype)
        assert torch.equal(torch.stack(pool), expected)  # every other slot untouched


def test_pages_of_the_wrong_layout_or_slots_that_do_not_fit_are_rejected():
    codec = Codec(2, 3, 8, group_size=16)
    (anchor, residual, meta), _ = encoded_pages(codec, random_kv(5, 2, 70, 3, 8), 32)
    with pytest.raises(ValueError, match="103 tokens do not fill 3 pages of 32 tokens"):
        codec.decode_pages(anchor, None, meta, 103, 32)
    with pytest.raises(ValueError, match="do not fill 3 pages of 24 tokens"):
        codec.decode_pages(anchor, None, meta, 70, 24)
    with pytest.raises(ValueError, match=r"meta of 3 pages of 32 tokens must be a contiguous uint8 tensor \[3, "):
        codec.decode_pages(anchor, None, meta[:, :-1], 70, 32)
    pool = [torch.zeros(100, 3, 8) for _ in range(4)]
    for slots in (lynx_kernels.Slots(pool[:3], torch.arange(70)), lynx_kernels.Slots(pool, torch.arange(69)),
                  lynx_kernels.Slots([b.half() for b in pool], torch.arange(70))):
        with pytest.raises(ValueError, match="out must be Slots of 4 contiguous torch.float32 buffers"):
            codec.decode_pages(anchor, residual, meta, 70, 32, out=slots)


def test_metadata_holds_each_channel_s_float16_minimum_and_a_scale_covering_its_range_over_each_block():
    codec = Codec(1, 1, 4, group_size=8)
    kv = random_kv(3, 1, 11, 1, 4)
    planes = codec.encode(kv)
    scale, zero = per_element(codec, planes.meta, 11)
    block1 = kv[:, :, 8:11]  # the last block: tokens 8-10, padded with copies of token 10
    lo, hi = block1.amin(2), block1.amax(2)
    assert torch.equal(zero[:, :, 8], reference.fp16_floor(lo).float())
    exact = (hi - zero[:, :, 8]) / 255
    assert (scale[:, :, 8] >= exact).all() and (scale[:, :, 8] <= exact * (1 + 1 / 32)).all()


def test_scales_keep_5_mantissa_bits_and_share_an_exponent_reaching_7_binades_down():
    s = torch.tensor([[3.0, 3.01, 2.0**-5, 2.0**-6 * 1.9, 1e-30, 0.0]])  # one head's channels
    code, exponent = reference.encode_scale(s, -1)
    assert exponent.tolist() == [[128]]  # 3.01 rounds up to 3.0625 = 1.53125 * 2**1 (field 128)
    scale = reference.decode_scale(code, exponent)
    # Rounded up to 5 mantissa bits; 8 binades and more below the largest: raised to 2**(1 - 7).
    assert scale.tolist() == [[3.0, 3.0625, 2.0**-5, 2.0**-6 * 1.90625, 2.0**-6, 2.0**-6]]
    code, exponent = reference.encode_scale(torch.tensor([math.inf, math.nan, 1.0]), 0)
    assert exponent.item() == 255 and reference.decode_scale(code, exponent)[0] == math.inf


def test_anchor_and_residual_are_the_high_and_low_bits_of_each_code():
    kv = random_kv(4, 2, 8, 3, 4)  # one block of G = 8 tokens, so stripe i is token i
    anchor, residual, meta = lynx_kernels.quantize_split(kv, anchor_bits=3, group_size=8)
    scale = reference.decode_scale(meta.scale_code[0], meta.exponent[0].unsqueeze(-1)).unsqueeze(2)  # [2, L, 1, H, D]
    zero = meta.zero[0].unsqueeze(2)
    codes = reference.quantize(kv, scale, zero).to(torch.uint8).flatten(3)  # [K/V, L, token, head * channel]
    assert torch.equal(reference.unpack_bits(anchor[0], 3), codes >> 5)
    assert torch.equal(reference.unpack_bits(residual[0], 5), codes & 31)


@pytest.mark.parametrize("chunk_elements", [1, 300, 2000])  # runs of 1 and 2 blocks; 2 layers at a time
def test_results_do_not_depend_on_how_the_work_is_chunked(monkeypatch, chunk_elements):
    codec = Codec(3, 2, 8, group_size=8)
    kv = random_kv(10, 3, 45, 2, 8)
    planes = codec.encode(kv)
    decoded = (codec.decode_anchor(planes.anchor, planes.meta, 45),
               codec.decode_merged(planes.anchor, planes.residual, planes.meta, 45))
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", chunk_elements)
    chunked = codec.encode(kv)
    assert all(torch.equal(a, b) for a, b in zip(planes[:3], chunked[:3]))
    assert torch.equal(codec.decode_anchor(planes.anchor, planes.meta, 45), decoded[0])
    assert torch.equal(codec.decode_merged(planes.anchor, planes.residual, planes.meta, 45), decoded[1])


# --- packing ----------------------------------------------------------------------------------------


def test_four_bit_packing_is_nibbles_of_two_stripes():
    codes = torch.arange(16, dtype=torch.uint8).view(8, 2)  # stripe i holds 2i, 2i + 1
    packed = reference.pack_bits(codes, 4)
    assert packed.tolist() == [[0 | 2 << 4, 1 | 3 << 4], [4 | 6 << 4, 5 | 7 << 4],
                               [8 | 10 << 4, 9 | 11 << 4], [12 | 14 << 4, 13 | 15 << 4]]


def test_packing_is_a_little_endian_bit_stream_of_8_codes_per_word():
    codes = torch.tensor([5, 1, 7, 0, 2, 6, 3, 4], dtype=torch.uint8).view(8, 1)
    word = sum(int(c) << (3 * i) for i, c in enumerate(codes.view(-1)))
    assert reference.pack_bits(codes, 3).view(-1).tolist() == list(word.to_bytes(3, "little"))


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), shape=st.lists(st.integers(1, 4), max_size=2), n=st.integers(1, 40),
       seed=st.integers(0, 2**31))
def test_unpack_inverts_pack(bits, shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (*shape, 8, n), generator=g, dtype=torch.uint8)
    packed = reference.pack_bits(codes, bits)
    assert packed.shape == (*shape, bits, n)
    assert torch.equal(reference.unpack_bits(packed, bits), codes)


# --- rounding helpers -------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.floats(-65504, 65504, allow_nan=False, width=32))
def test_float16_floor_is_the_nearest_float16_below(value):
    x = torch.tensor([value], dtype=torch.float32)
    down = reference.fp16_floor(x)
    assert down.dtype == torch.float16 and down.float() <= x
    assert torch.nextafter(down, torch.tensor([math.inf], dtype=torch.float16)).float() > x or down.float() == x


def test_codes_round_to_nearest_even():
    x = torch.tensor([0.0, 0.5, 1.5, 2.5, 2.49, 254.5, 255.0])
    codes = reference.quantize(x, torch.tensor(1.0, dtype=torch.float16), torch.tensor(0.0, dtype=torch.float16))
    assert codes.tolist() == [0, 0, 2, 2, 2, 254, 255]


def test_a_constant_group_decodes_exactly():
    codec = Codec(1, 1, 2, group_size=8)
    kv = torch.full((2, 1, 8, 1, 2), 0.375)
    planes = codec.encode(kv)
    assert torch.equal(codec.decode_merged(planes.anchor, planes.residual, planes.meta, 8), kv)
    assert torch.equal(codec.decode_anchor(planes.anchor, planes.meta, 8), kv)


# --- the anchor reconstruction table ---------------------------------------------------------------


def test_table_is_the_mean_code_offset_per_bin_and_layer_with_empty_bins_at_the_centre():
    # One layer, G = 8 (stripe 0 = token 0), A = 4: token 0's codes are the sample.
    codes = torch.zeros(1, 2, 1, 8, 4, dtype=torch.uint8)  # [nb, K/V, L, stripe, n = H * D]
    codes[0, 0, 0, 0] = torch.tensor([0x12, 0x15, 0x1F, 0xF0], dtype=torch.uint8)  # K: bin 1 x3, bin 15 x1
    codes[0, 1, 0, 0] = torch.tensor([0x33, 0x33, 0x34, 0x34], dtype=torch.uint8)  # V: bin 3 x4
    table = estimate_table(reference.pack_bits(codes >> 4, 4), reference.pack_bits(codes & 15, 4))
    assert table.shape == (2, 1, 16) and table.dtype == torch.float16
    assert table[0, 0, 1] == round((2 + 5 + 15) / 3 * 16) / 16
    assert table[0, 0, 15] == 0 and table[1, 0, 3] == 3.5
    assert table[0, 0, 0] == table[1, 0, 0] == 7.5  # empty bins: the centre of 0..15


# --- dtypes and validation --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_decoding_to_a_narrower_dtype_rounds_the_float32_result_once(dtype):
    codec = Codec(2, 2, 8, group_size=16)
    kv = random_kv(5, 2, 40, 2, 8)
    planes = codec.encode(kv)
    for decode in (lambda dt: codec.decode_anchor(planes.anchor, planes.meta, 40, dtype=dt),
                   lambda dt: codec.decode_merged(planes.anchor, planes.residual, planes.meta, 40, dtype=dt)):
        out = decode(dtype)
        assert out.dtype == dtype and torch.equal(out, decode(torch.float32).to(dtype))


def test_backend_none_picks_the_reference_on_cpu_and_unknown_backends_are_rejected():
    kv = random_kv(6, 1, 16, 1, 8)
    assert all(torch.equal(a, b) for a, b in zip(flat(lynx_kernels.quantize_split(kv, 4, 8)),
                                                 flat(reference.quantize_split(kv, 4, 8))))
    with pytest.raises(ValueError, match="backend must be one of reference, triton"):
        lynx_kernels.quantize_split(kv, 4, 8, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of reference, triton"):
        Codec(1, 1, 8, backend="fast")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_rejected(bad):
    kv = random_kv(7, 2, 20, 2, 8)
    kv[1, 1, 13, 0, 5] = bad
    with pytest.raises(ValueError, match="kv contains NaN or Inf"):
        Codec(2, 2, 8, group_size=8).encode(kv)


def test_values_below_the_float16_zero_points_are_rejected_and_large_ranges_are_fine():
    kv = random_kv(8, 1, 8, 1, 8)
    kv[0, 0, 3, 0, 2] = -1e6
    with pytest.raises(ValueError, match="below -65504, beyond the float16 range"):
        Codec(1, 1, 8, group_size=8).encode(kv)
    kv[0, 0, 3, 0, 2] = 1e7  # a float32 range far beyond float16's: the scale holds it
    codec = Codec(1, 1, 8, group_size=8)
    planes = codec.encode(kv)
    merged = codec.decode_merged(planes.anchor, planes.residual, planes.meta, 8)
    assert (merged - kv).abs().max() <= 1e7 / 255


@pytest.mark.parametrize("kwargs, message", [
    (dict(anchor_bits=8), "anchor_bits must be between 2 and 6"),
    (dict(anchor_bits=1), "anchor_bits must be between 2 and 6"),
    (dict(group_size=4), "group_size must be a power of two >= 8"),
    (dict(group_size=48), "group_size must be a power of two >= 8"),
    (dict(head_dim=0), "head_dim must be a positive integer"),
    (dict(num_layers=2.0), "num_layers must be a positive integer"),
])
def test_invalid_codec_parameters_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Codec(**{"num_layers": 2, "num_heads": 2, "head_dim": 8, **kwargs})


def test_kv_of_the_wrong_shape_or_dtype_is_rejected():
    codec = Codec(2, 2, 8)
    with pytest.raises(ValueError, match=r"kv must have shape \[2, 2, T, 2, 8\]"):
        codec.encode(torch.zeros(2, 2, 5, 2, 9))
    with pytest.raises(ValueError, match="kv has no tokens"):
        codec.encode(torch.zeros(2, 2, 0, 2, 8))
    with pytest.raises(ValueError, match="kv must be float32, bfloat16 or float16"):
        codec.encode(torch.zeros(2, 2, 5, 2, 8, dtype=torch.int32))


def test_buffers_of_the_wrong_size_or_type_are_rejected():
    codec = Codec(1, 1, 8, group_size=8)
    planes = codec.encode(random_kv(9, 1, 20, 1, 8))
    with pytest.raises(ValueError, match=f"anchor of 30 tokens must hold {codec.anchor_nbytes(30)} bytes"):
        codec.decode_anchor(planes.anchor, planes.meta, 30)
    with pytest.raises(ValueError, match="residual must be a contiguous 1-D uint8 tensor"):
        codec.decode_merged(planes.anchor, planes.residual.view(torch.int8), planes.meta, 20)
    with pytest.raises(ValueError, match="meta of 20 tokens must hold"):
        codec.decode_anchor(planes.anchor, planes.meta[:-2], 20)
    with pytest.raises(ValueError, match="num_tokens must be a positive integer"):
        codec.decode_anchor(planes.anchor, planes.meta, 0)
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16"):
        codec.decode_anchor(planes.anchor, planes.meta, 20, dtype=torch.int8)
