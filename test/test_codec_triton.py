"""The fused Triton kernels give bit-identical results to the PyTorch reference.

On a GPU they run compiled on CUDA tensors; without one, on CPU tensors under TRITON_INTERPRET=1 (slow,
so the sizes stay small).
"""

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined, i.e. on first import

pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lynx_kernels  # noqa: E402
from sglang_lynx.codec import Codec  # noqa: E402
from test_codec_reference import DTYPES, flat, random_kv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
examples = settings(max_examples=25 if DEVICE == "cpu" else 100, deadline=None)
# The interpreter runs the kernels with numpy, which warns about the NaN and Inf of the tests that
# feed them (values the kernels poison and the codec then rejects).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@st.composite
def small_cases(draw):
    L, H = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    D = draw(st.sampled_from([1, 3, 8, 20, 128]))  # 128: Qwen2.5
    G = draw(st.sampled_from([8, 16]))
    T = draw(st.integers(1, 2 * G + 3))
    kv = random_kv(draw(st.integers(0, 2**31)), L, T, H, D, draw(st.sampled_from(DTYPES)),
                   grid=draw(st.sampled_from([0, 2])))
    return kv.to(DEVICE), draw(st.integers(2, 6)), G


def both(op, *args, **kwargs):
    return [getattr(lynx_kernels, op)(*args, **kwargs, backend=b) for b in ("reference", "triton")]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@examples
@given(small_cases())
def test_quantize_split_is_bit_identical(case):
    kv, A, G = case
    ref, tri = both("quantize_split", kv, A, G)
    assert all(same_bits(r, t) for r, t in zip(flat(ref), flat(tri)))


@examples
@given(small_cases(), st.sampled_from(DTYPES))
def test_dequantization_is_bit_identical(case, dtype):
    kv, A, G = case
    T = kv.shape[2]
    anchor, residual, meta = lynx_kernels.quantize_split(kv, A, G, backend="reference")
    g = torch.Generator().manual_seed(T)
    table = (torch.randint(0, (2 ** (8 - A) - 1) * 16 + 1, (2, kv.shape[1], 2**A), generator=g) / 16).half()
    ref, tri = both("dequant_anchor", anchor, meta, table.to(DEVICE), T, dtype)
    assert same_bits(ref, tri)
    ref, tri = both("merge_dequant", anchor, residual, meta, T, dtype)
    assert same_bits(ref, tri)


@examples
@given(small_cases(), st.sampled_from(DTYPES))
def test_decoding_with_a_table_per_block_into_the_slots_of_a_kv_pool_is_bit_identical(case, dtype):
    kv, A, G = case
    _, L, T, H, D = kv.shape
    anchor, residual, meta = lynx_kernels.quantize_split(kv, A, G, backend="reference")
    g = torch.Generator().manual_seed(T)
    tables = (torch.randint(0, (2 ** (8 - A) - 1) * 16 + 1, (anchor.shape[0], 2, L, 2**A), generator=g) / 16).half()
    index = torch.randperm(T + 5, generator=g)[:T].to(DEVICE)
    for op, args in (("dequant_anchor", (anchor, meta, tables.to(DEVICE))),
                     ("merge_dequant", (anchor, residual, meta))):
        pools = [[torch.zeros(T + 5, H, D, dtype=dtype, device=DEVICE) for _ in range(2 * L)] for _ in range(2)]
        for pool, backend in zip(pools, ("reference", "triton")):
            getattr(lynx_kernels, op)(*args, T, dtype, lynx_kernels.Slots(pool, index), backend=backend)
        assert all(same_bits(r, t) for r, t in zip(*pools))


def test_codec_round_trip_on_the_triton_backend_matches_the_reference():
    kv = random_kv(11, 2, 37, 2, 16).to(DEVICE)
    planes = {b: Codec(2, 2, 16, group_size=16, backend=b).encode(kv) for b in ("reference", "triton")}
    assert all(same_bits(r, t) for r, t in zip(planes["reference"][:3], planes["triton"][:3]))
    codec = Codec(2, 2, 16, group_size=16, backend="triton")
    p = planes["triton"]
    anchor = codec.decode_anchor(p.anchor, p.meta, 37)
    merged = codec.decode_merged(p.anchor, p.residual, p.meta, 37)
    reference = Codec(2, 2, 16, group_size=16, backend="reference")
    assert same_bits(anchor, reference.decode_anchor(p.anchor, p.meta, 37))
    assert same_bits(merged, reference.decode_merged(p.anchor, p.residual, p.meta, 37))


def test_signed_zeros_and_constant_groups_give_the_same_metadata_bits():
    kv = torch.zeros(2, 1, 16, 1, 8)
    kv[0, 0, :, 0, :4] = -0.0  # channels of -0.0 only
    kv[0, 0, 5, 0, 4] = -0.0  # a -0.0 among +0.0
    kv[1] = 0.25  # constant groups
    ref, tri = both("quantize_split", kv.to(DEVICE), 4, 16)
    assert all(same_bits(r, t) for r, t in zip(flat(ref), flat(tri)))


def test_channels_far_below_their_head_s_largest_get_the_same_raised_scale():
    kv = random_kv(14, 1, 16, 2, 8)
    kv[..., 0, :3] *= 1e-4  # scales more than 7 binades below the head's largest
    kv[..., 1, 5] *= 1e3
    ref, tri = both("quantize_split", kv.to(DEVICE), 4, 16)
    assert (ref[2].scale_code == 7 << 5).any()  # 7 binades down, mantissa 0: the raised scale
    assert all(same_bits(r, t) for r, t in zip(flat(ref), flat(tri)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_rejected(bad):
    kv = random_kv(12, 1, 20, 1, 8)
    kv[0, 0, 17, 0, 3] = bad
    with pytest.raises(ValueError, match="kv contains NaN or Inf"):
        Codec(1, 1, 8, group_size=8, backend="triton").encode(kv.to(DEVICE))


@pytest.mark.parametrize("plan", [(4, 4), (4, 2, 2), (5, 1, 2), (2, 3, 3), (6, 1, 1)],
                         ids=lambda p: ",".join(map(str, p)))
def test_splitting_the_residual_into_stages_and_merging_them_are_bit_identical(plan):
    R = 8 - plan[0]
    residual = torch.randint(0, 256, (3, 2, 2, R, 40), dtype=torch.uint8, device=DEVICE)
    ref, tri = both("split_stages", residual, plan[1:])
    assert all(same_bits(r, t) for r, t in zip(ref, tri))
    for landed in range(1, len(plan)):
        assert same_bits(*both("merge_stages", ref[:landed], plan[1:]))


@pytest.mark.skipif(DEVICE == "cuda", reason="only CPU tensors need the interpreter")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        lynx_kernels.quantize_split(torch.zeros(2, 1, 8, 1, 8), 4, 8, backend="triton")


COMPILE_FOR_GPU = """
import triton
from triton.backends.compiler import GPUTarget
from lynx_kernels import triton_kernels as k

def compile(fn, pointers, options=None, **constexprs):
    ints = {name: "i32" for name in fn.arg_names if name not in pointers and name not in constexprs}
    signature = {**pointers, **ints, **dict.fromkeys(constexprs, "constexpr")}
    source = triton.compiler.ASTSource(fn, signature, constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)

planes = {"anchor_ptr": "*u8", "residual_ptr": "*u8"}
meta = {"zero_ptr": "*fp16", "scale_ptr": "*u8", "exponent_ptr": "*u8"}
for kv in ("*bf16", "*fp32"):
    quantize = compile(k._quantize_split_kernel, {"kv_ptr": kv, **planes, **meta}, k.QUANTIZE_OPTIONS,
                       G=64, BLOCK_D=128, A=3)
    assert "fma" not in quantize.asm["ptx"], "quantization must round the product before adding 2**23"
for out, merge, slots in (("*fp32", True, False), ("*bf16", False, True)):
    slots_pointers = {"buffer_offset_ptr": "*i64", "index_ptr": "*i64"}
    pointers = {**planes, **meta, "table_ptr": "*fp16", "out_ptr": out, **slots_pointers}
    compile(k._dequant_kernel, pointers, G=64, BLOCK_D=128, A=3, MERGE=merge, SLOTS=slots)
compile(k._split_stage_kernel, {"residual_ptr": "*u8", "stage_ptr": "*u8"}, R=4, SHIFT=2, BITS=2, BLOCK=256)
compile(k._merge_stages_kernel, {"first_ptr": "*u8", "second_ptr": "*u8", "residual_ptr": "*u8"},
        R=4, FIRST=2, SECOND=0, FILL=2, BLOCK=256)
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU tests above compile the kernels for real")
def test_kernels_compile_for_an_nvidia_gpu_without_fma_in_quantization():
    """The interpreter accepts some code that the compiler rejects, and does not fuse a multiply and an
    add as the compiler may: compile to an H100 target (no GPU needed) and read the PTX."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPU], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
