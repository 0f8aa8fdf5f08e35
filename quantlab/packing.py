"""Bit packing: int4/fp4 nibbles into bytes, and llama.cpp's GGUF block layouts.

GGUF blocks (ggml-common.h): Q8_0 = fp16 d then 32 int8; Q4_0 = fp16 d then 16 bytes where
byte j holds weight j in its low nibble and weight j + 16 in its high nibble.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantlab.quantize import QuantizedTensor
from quantlab.scales import GGUF_Q4_0, GGUF_Q8_0, ScaleRule


def pack_nibbles(codes: Tensor) -> Tensor:
    """(..., K) uint8 codes < 16, K even -> (..., K // 2) uint8; element 2i low, 2i + 1 high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles needs an even last dimension, got {codes.shape[-1]}")
    c = codes.to(torch.uint8) & 0xF
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of pack_nibbles: (..., K // 2) uint8 -> (..., K) uint8."""
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _check_gguf(q: QuantizedTensor, rule: ScaleRule) -> None:
    if q.scheme.scale_rule != rule:
        raise ValueError(f"expected a tensor quantized with {rule}, got {q.scheme.scale_rule}")


def gguf_q8_0_blocks(q: QuantizedTensor) -> Tensor:
    """Q8_0 tensor -> (n_blocks, 34) uint8 exactly as ggml stores it, row-major over blocks."""
    _check_gguf(q, GGUF_Q8_0)
    d = q.scales.reshape(-1, 1).to(torch.float16).view(torch.uint8).reshape(-1, 2)
    qs = q.codes.reshape(-1, 32).view(torch.uint8)
    return torch.cat([d, qs], dim=1)


def gguf_q4_0_blocks(q: QuantizedTensor) -> Tensor:
    """Q4_0 tensor -> (n_blocks, 18) uint8 exactly as ggml stores it, row-major over blocks."""
    _check_gguf(q, GGUF_Q4_0)
    d = q.scales.reshape(-1, 1).to(torch.float16).view(torch.uint8).reshape(-1, 2)
    c = q.codes.reshape(-1, 32)
    qs = c[:, :16] | (c[:, 16:] << 4)
    return torch.cat([d, qs], dim=1)
