"""Where anchor-only decoding puts each Anchor value inside the bin of codes it stands for.

Anchor value ``a`` stands for the INT8 codes ``a * 2**R`` to ``a * 2**R + 2**R - 1`` (R residual bits).
The codes inside a bin are not spread evenly: every group's minimum and maximum land exactly on codes
0 and 255 (which INT4 represents exactly and a bin centre does not), pulling the mean of the lowest
bin down and of the highest bin up, while inside the other bins codes lean towards the middle of the
range. Rebuilding each bin at the mean code offset seen in it (one table of ``2**A`` offsets per
layer, for K and V apart, sent in the metadata header) lowers the anchor-only error below the bin
centre's (measured numbers in docs/codec.md).
"""

from __future__ import annotations

import torch

# Offsets are multiples of 1/16 code: exact in float16, and (16 * code) * scale stays exact in float32.
RESOLUTION = 16
CODE_VALUES = 256


def estimate_table(anchor: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Mean code offset inside every Anchor bin, per (K/V, layer): float16 [2, L, 2**A].

    anchor [nb, 2, L, A, n] and residual [nb, 2, L, R, n] as the kernels produce them. The mean is
    taken over stripe 0 of every segment (the first G / 8 tokens of each block: one code in 8), which
    byte-plane 0 holds in its low bits; that sample is plenty and costs little.
    """
    A, R = anchor.shape[-2], residual.shape[-2]
    slices = anchor.shape[1] * anchor.shape[2]
    codes = ((anchor[..., 0, :] & (2**A - 1)) << R) | (residual[..., 0, :] & (2**R - 1))
    index = codes.int().view(codes.shape[0], slices, -1)
    index += (torch.arange(slices, device=index.device, dtype=torch.int32) * CODE_VALUES).view(1, -1, 1)
    hist = torch.bincount(index.view(-1), minlength=slices * CODE_VALUES).view(slices, 2**A, 2**R)
    count = hist.sum(-1)
    offsets = (hist * torch.arange(2**R, device=hist.device)).sum(-1) / count.clamp(min=1)
    offsets = torch.where(count > 0, offsets, (2**R - 1) / 2)  # an empty bin falls back to its centre
    table = (offsets * RESOLUTION).round() / RESOLUTION
    return table.to(torch.float16).view(anchor.shape[1], anchor.shape[2], 2**A)


def centre_table(num_layers: int, anchor_bits: int, device=None) -> torch.Tensor:
    """Every bin rebuilt at its centre: the plain rule, for comparison."""
    residual_bits = 8 - anchor_bits
    return torch.full((2, num_layers, 2**anchor_bits), (2**residual_bits - 1) / 2, dtype=torch.float16,
                      device=device)
