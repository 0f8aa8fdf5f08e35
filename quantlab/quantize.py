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
    if x.is_meta:
        raise ValueError(f"x (shape {tuple(x.shape)}) is on the meta device and holds no "
                         "values; load the real weights first (from_pretrained without "
                         "device_map='meta' / init_empty_weights, or load_state_dict(assign=True))")
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
    if x.dtype == torch.float64:  # scales are computed in float32: 1e300 would become inf
        amax, f32max = float(x.detach().abs().max()), torch.finfo(torch.float32).max
        if amax > f32max:
            raise ValueError(f"x is float64 with |x| up to {amax:.3g}, beyond float32's "
                             f"{f32max:.3g}, the precision quantlab computes scales in; "
                             "divide x by a power of two (and multiply it back after "
                             "dequantizing) or clip it before quantizing")
    ts.granularity.check(x.shape)


def _check_scales(xf: Tensor, ts: TensorScheme, s: Tensor, glob: Tensor | None) -> None:
    """Raise when a scale overflowed its storage format (inf/NaN would decode its whole group
    to NaN): say which values caused it and what holds them."""
    if bool(torch.isfinite(s).all()) and (glob is None or bool(torch.isfinite(glob).all())):
        return
    g = ts.granularity.groups(xf)
    bad = ~torch.isfinite(s.reshape(*g.shape[:-1], 1).expand_as(g))
    amax = float(g.abs()[bad].max()) if bool(bad.any()) else float(xf.abs().max())
    n = int((~torch.isfinite(s)).sum())
    sf = ts.scale_format
    limit = {"fp16": 65504.0, "bf16": 3.39e38, "fp32": 3.4e38}.get(sf)
    cap = f" (at most {limit:.6g})" if limit else ""
    raise ValueError(f"{n} group scale(s) overflow the {sf} scale format{cap}: a group holds "
                     f"|x| up to {amax:.3g}; its scale does not fit {sf}, so the group would "
                     "dequantize to NaN. Find the outlier (a diverged weight?), clip it, divide "
                     "the tensor by a power of two, or use a scheme with bf16/fp32 scales "
                     f"(e.g. TensorScheme(..., scale_format='bf16'))")


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
    _check_scales(xf, ts, s, glob)
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
