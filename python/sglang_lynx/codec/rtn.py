"""Plain round-to-nearest quantization with any rectangular grouping: what Lynx is measured against.

``fake_quantize(kv, group_tokens, group_channels, bits)`` quantizes every group of ``group_tokens``
consecutive tokens x ``group_channels`` consecutive channels of one head with the same metadata format
and rounding as the Lynx codec (float16 zero and 8-bit scale per group, one scale exponent per head over
a block of G = group_tokens * group_channels tokens), and returns the dequantized float32 tensor:

    fake_quantize(kv, G, 1, 8)   # INT8 as Lynx groups it: what Lynx's merged planes decode to, bit for bit
    fake_quantize(kv, G, 1, 4)   # int4: the honest 4-bit competitor, same grouping and metadata
    fake_quantize(kv, 1, D, 4)   # int4_naive: per token over the whole head dimension

Every shape of G elements has the same metadata bits (``metadata_bits(G, D)`` per element): 3 bytes
per group and 1 per G x D elements.
"""

from __future__ import annotations

import torch

from lynx_kernels.reference import decode_scale, dequantize, group_metadata, meta_block_nbytes, pad_tokens, quantize


def fake_quantize(kv: torch.Tensor, group_tokens: int, group_channels: int, bits: int) -> torch.Tensor:
    """kv [2, L, T, H, D] -> its quantize-dequantize round trip, float32, same shape."""
    _, L, T, H, D = kv.shape
    if D % group_channels:
        raise ValueError(f"group_channels ({group_channels}) must divide head_dim ({D})")
    G = group_tokens * group_channels  # the tokens of a block that shares one scale exponent per head
    padded = -(-T // G) * G
    x = pad_tokens(kv.reshape(2 * L, T, H, D), padded)
    x = x.reshape(2 * L, padded // G, group_channels, group_tokens, H, D // group_channels, group_channels)
    zero, scale_code, exponent = group_metadata(x.amin((3, 6), keepdim=True), x.amax((3, 6), keepdim=True),
                                                bits, (2, 5))
    scale = decode_scale(scale_code, exponent)
    x_hat = dequantize(quantize(x, scale, zero), scale, zero)
    return x_hat.view(2 * L, padded, H, D)[:, :T].reshape(2, L, T, H, D)


def metadata_bits(group_elements: int, head_dim: int) -> float:
    """Metadata bits per element of groups of group_elements: as the codec's, whose groups are one
    channel over a block of group_elements tokens."""
    return meta_block_nbytes(1, 1, head_dim) * 8 / (2 * group_elements * head_dim)
