"""Lynx codec kernels (installed as ``lynx_kernels``).

Every operation has a PyTorch reference (``lynx_kernels.reference``, any device) and a fused Triton
kernel (``lynx_kernels.triton_kernels``), bit-identical to each other. ``backend=None`` picks Triton
for CUDA tensors and the reference otherwise; tests and benchmarks name the backend explicitly.
Tensor shapes and the packed format are described in ``reference``.
"""

from __future__ import annotations

import importlib.util

import torch

from . import reference
from .reference import Meta, Slots, empty_planes, meta_block_nbytes, meta_views  # noqa: F401  (part of the API)

BACKENDS = ("reference", "triton")


def quantize_split(kv: torch.Tensor, anchor_bits: int, group_size: int, out=None, backend: str | None = None):
    """kv [2, L, T, H, D] -> (anchor, residual, meta): INT8 codes split into Anchor and Residual planes,
    and their Meta, written into out (tensors of those shapes, see empty_planes) if given."""
    return _backend(backend, kv).quantize_split(kv, anchor_bits, group_size, out)


def dequant_anchor(anchor, meta, table, num_tokens: int, dtype=torch.float32, out=None,
                   backend: str | None = None):
    """Anchor-only reconstruction -> kv_hat [2, L, num_tokens, H, D] of dtype (into out, if given: such
    a tensor, or Slots of a KV pool of dtype). table: one for all blocks, or one per block."""
    return _backend(backend, anchor).dequant_anchor(anchor, meta, table, num_tokens, dtype, out)


def merge_dequant(anchor, residual, meta, num_tokens: int, dtype=torch.float32, out=None,
                  backend: str | None = None):
    """Anchor + Residual -> the exact INT8 dequantization, kv_hat [2, L, num_tokens, H, D] of dtype
    (into out, if given: such a tensor, or Slots of a KV pool of dtype)."""
    return _backend(backend, anchor).merge_dequant(anchor, residual, meta, num_tokens, dtype, out)


def split_stages(residual, stage_bits, backend: str | None = None) -> list:
    """Residual planes [..., R, n] -> one set of planes [..., b, n] per later stage of a progressive plan
    (stage_bits, summing to R): the next b bits of every Residual code, high bits first."""
    return _backend(backend, residual).split_stages(residual, stage_bits)


def merge_stages(stages, stage_bits, backend: str | None = None):
    """The Residual planes from the stages landed so far (a prefix of stage_bits): bit for bit once all
    have; until then each code's missing low bits stand at the middle of their range."""
    return _backend(backend, stages[0]).merge_stages(stages, stage_bits)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _backend(name: str | None, tensor: torch.Tensor):
    if name is None:
        name = "triton" if tensor.is_cuda and triton_available() else "reference"
    if name == "reference":
        return reference
    if name == "triton":
        from . import triton_kernels  # imported on demand: triton is optional on CPU-only machines

        return triton_kernels
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None (automatic); got {name!r}")
