"""Plain round-to-nearest quantization with any rectangular grouping: what Lynx is measured against.

``fake_quantize(kv, group_tokens, group_channels, bits)`` quantizes every group of ``group_tokens``
consecutive tokens x ``group_channels`` consecutive channels of one head with the same float16
(scale, zero) metadata and rounding as the Lynx codec, and returns the dequantized float32 tensor:

    fake_quantize(kv, G, 1, 8)   # INT8 as Lynx groups it: what Lynx's merged planes decode to, bit for bit
    fake_quantize(kv, G, 1, 4)   # int4: the honest 4-bit competitor, same grouping and metadata
    fake_quantize(kv, 1, D, 4)   # int4_naive: per token over the whole head dimension
"""

from __future__ import annotations

import torch

from lynx_kernels.reference import dequantize, pad_tokens, quantize, scale_zero


def fake_quantize(kv: torch.Tensor, group_tokens: int, group_channels: int, bits: int) -> torch.Tensor:
    """kv [2, L, T, H, D] -> its quantize-dequantize round trip, float32, same shape."""
    _, L, T, H, D = kv.shape
    if D % group_channels:
        raise ValueError(f"group_channels ({group_channels}) must divide head_dim ({D})")
    padded = -(-T // group_tokens) * group_tokens
    x = pad_tokens(kv.reshape(2 * L, T, H, D), padded)
    x = x.reshape(2 * L, padded // group_tokens, group_tokens, H, D // group_channels, group_channels)
    scale, zero = scale_zero(x.amin((2, 5), keepdim=True), x.amax((2, 5), keepdim=True), bits)
    x_hat = dequantize(quantize(x, scale, zero), scale, zero)
    return x_hat.view(2 * L, padded, H, D)[:, :T].reshape(2, L, T, H, D)
