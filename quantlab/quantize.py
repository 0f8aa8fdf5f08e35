"""Reference quantizers in plain torch: quantize(x, scheme) -> QuantizedTensor, and back.

Every fast path (Triton kernels, exporters) must reproduce these codes and scales exactly.
Layout: codes have x's shape, one code per element, unpacked (uint8 bit patterns for float and
codebook formats, int8 for signed integers, uint8 for unsigned). Scales are float32 holding the
exact stored values: shape () per tensor, (..., 1) per channel/token, (..., K // g) per group,
(ceil(N / bn), ceil(K / bk)) per 2-D block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Re-exported: the scale rules' helpers lived here before quantlab.scales.
from quantlab.scales import NVFP4_GLOBAL_DENOM, mx_scale, nvfp4_scales, round_scale
from quantlab.schemes import Scheme, TensorScheme, get_scheme

__all__ = ["NVFP4_GLOBAL_DENOM", "QuantizedTensor", "dequantize", "fake_quantize", "mx_scale",
           "nvfp4_scales", "quantize", "round_scale"]


@dataclass
class QuantizedTensor:
    """codes: x.shape; scales: float32 (see module doc); zero_points: like scales, int32, or None;
    global_scale: NVFP4's fp32 per-tensor scale (multiplied, ModelOpt's weight_scale_2), or None."""

    codes: Tensor
    scales: Tensor
    scheme: TensorScheme
    shape: torch.Size
    dtype: torch.dtype
    zero_points: Tensor | None = None
    global_scale: Tensor | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def storage_bits(self) -> int:
        """Exact bits to store this tensor: codes, scales, zero points and global scale."""
        bits = self.numel * self.scheme.element_bits + self.scales.numel() * self.scheme.scale_bits
        if self.zero_points is not None:
            bits += self.zero_points.numel() * self.scheme.element_bits
        if self.global_scale is not None:
            bits += 32
        return bits

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per element, scale overhead included."""
        return self.storage_bits / self.numel

    @property
    def nbytes(self) -> int:
        return math.ceil(self.storage_bits / 8)

    def dequantize(self) -> Tensor:
        return dequantize(self)


def _as_tensor_scheme(scheme: str | Scheme | TensorScheme) -> TensorScheme:
    if isinstance(scheme, TensorScheme):
        return scheme
    return get_scheme(scheme).weights


def _check_input(x: Tensor, ts: TensorScheme) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or not x.is_floating_point():
        raise TypeError(f"x must be a real floating-point tensor (float32/16, bf16), got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}): nothing to quantize")
    if x.ndim == 0:
        raise ValueError("x is a 0-d scalar: give it at least one dimension")
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        raise ValueError(
            f"x holds {n_nan} NaN and {n_inf} inf values; a scale from amax would be NaN/inf and "
            "poison its whole group. Find where they come from (fp16 overflow?) or replace them "
            "(torch.nan_to_num) before quantizing")
    ts.granularity.check(x.shape)


def quantize(x: Tensor, scheme: str | Scheme | TensorScheme, scale: Tensor | None = None
             ) -> QuantizedTensor:
    """x: (..., K) float -> QuantizedTensor. scheme: preset name, Scheme (its weights are used)
    or TensorScheme. scale: a static (calibrated) scale of the scheme's scale shape, absmax
    rule only; None computes it from x. NaN/inf in x raise ValueError."""
    ts = _as_tensor_scheme(scheme)
    _check_input(x, ts)
    if scale is not None and not ts.scale_rule.static:
        raise ValueError(f"a static scale only applies to the absmax rule, not {ts.scale_rule}")
    xf = x.detach().float()
    codes, s, zp, glob = ts.scale_rule.quantize(xf, ts.granularity.groups(xf), ts, scale)
    sshape = ts.granularity.scale_shape(xf.shape)
    zp = None if zp is None else zp.reshape(sshape)
    return QuantizedTensor(ts.granularity.ungroup(codes, xf.shape), s.reshape(sshape), ts,
                           x.shape, x.dtype, zp, glob)


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None) -> Tensor:
    """QuantizedTensor -> tensor of q.shape in `dtype` (default: the original dtype)."""
    ts = q.scheme
    vals = ts.scale_rule.decode(q.codes, ts.element)
    if q.zero_points is not None:
        vals = vals - ts.granularity.expand(q.zero_points.float(), q.shape)
    out = vals * ts.granularity.expand(q.scales, q.shape)
    if q.global_scale is not None:
        out = out * q.global_scale
    return out.to(dtype or q.dtype)


def fake_quantize(x: Tensor, scheme: str | Scheme | TensorScheme) -> Tensor:
    """dequantize(quantize(x, scheme)) in x's dtype: the values a quantized model computes with."""
    return dequantize(quantize(x, scheme))
