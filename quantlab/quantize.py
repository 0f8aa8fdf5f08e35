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

from quantlab.formats import E2M1, E4M3, E8M0, get_format
from quantlab.schemes import Scheme, TensorScheme, get_scheme

NVFP4_GLOBAL_DENOM = 448.0 * 6.0  # E4M3 max * E2M1 max


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
    K = x.shape[-1]
    if ts.granularity == "group" and K % ts.group_size:
        divisors = [d for d in range(1, K + 1) if K % d == 0 and d <= 256][-4:]
        raise ValueError(
            f"group_size={ts.group_size} does not divide the last dimension K={K}; pad K to "
            f"{-(-K // ts.group_size) * ts.group_size} or pick a group size in {tuple(divisors)}")
    if ts.granularity == "block" and x.ndim != 2:
        raise ValueError(f"2-D block quantization needs a 2-D tensor, got shape {tuple(x.shape)}")


def _groups(x: Tensor, ts: TensorScheme) -> Tensor:
    """x -> (..., n_groups, group_elems) view whose last dim shares one scale (block: padded)."""
    if ts.granularity == "tensor":
        return x.reshape(1, -1)
    if ts.granularity in ("channel", "token"):
        return x.unsqueeze(-2)
    if ts.granularity == "group":
        return x.reshape(*x.shape[:-1], x.shape[-1] // ts.group_size, ts.group_size)
    bn, bk = ts.block
    N, K = x.shape
    nb, kb = -(-N // bn), -(-K // bk)
    xp = torch.nn.functional.pad(x, (0, kb * bk - K, 0, nb * bn - N))  # zeros: amax unchanged
    return xp.reshape(nb, bn, kb, bk).permute(0, 2, 1, 3).reshape(nb, kb, bn * bk)


def _ungroup(g: Tensor, shape: torch.Size, ts: TensorScheme) -> Tensor:
    if ts.granularity != "block":
        return g.reshape(shape)
    bn, bk = ts.block
    nb, kb = g.shape[:2]
    full = g.reshape(nb, kb, bn, bk).permute(0, 2, 1, 3).reshape(nb * bn, kb * bk)
    return full[: shape[0], : shape[1]]


def _scale_shape(x: Tensor, ts: TensorScheme) -> tuple[int, ...]:
    if ts.granularity == "tensor":
        return ()
    if ts.granularity in ("channel", "token"):
        return (*x.shape[:-1], 1)
    if ts.granularity == "group":
        return (*x.shape[:-1], x.shape[-1] // ts.group_size)
    return tuple(-(-n // b) for n, b in zip(x.shape, ts.block, strict=True))


def round_scale(s: Tensor, scale_format: str) -> Tensor:
    """Round float32 scales to their storage format, returned as float32."""
    if scale_format == "fp32":
        return s
    if scale_format in ("fp16", "bf16"):
        dt = torch.float16 if scale_format == "fp16" else torch.bfloat16
        return s.to(dt).float()
    return get_format(scale_format).decode(get_format(scale_format).encode(s))


def _safe_div(x: Tensor, s: Tensor) -> Tensor:
    """x / s with x / 0 = 0: a zero scale means the whole group was zero (or underflowed)."""
    return torch.where(s == 0, torch.zeros_like(x), x / torch.where(s == 0, 1.0, s))


def quantize(x: Tensor, scheme: str | Scheme | TensorScheme, scale: Tensor | None = None
             ) -> QuantizedTensor:
    """x: (..., K) float -> QuantizedTensor. scheme: preset name, Scheme (its weights are used)
    or TensorScheme. scale: a static (calibrated) scale of the scheme's scale shape, absmax
    rule only; None computes it from x. NaN/inf in x raise ValueError."""
    ts = _as_tensor_scheme(scheme)
    _check_input(x, ts)
    fmt = get_format(ts.format)
    xf = x.detach().float()
    g = _groups(xf, ts)
    sshape = _scale_shape(xf, ts)
    zp = glob = None
    if scale is not None and ts.scale_rule != "absmax":
        raise ValueError(f"a static scale only applies to the absmax rule, not {ts.scale_rule}")
    rule = ts.scale_rule
    if rule == "absmax" and ts.symmetric:
        s = g.abs().amax(-1, keepdim=True) / fmt.max if scale is None else _fit(scale, g, sshape)
        s = round_scale(s, ts.scale_format)
        codes = _encode(fmt, _safe_div(g, s))
    elif rule == "absmax":
        lo = torch.clamp(g.amin(-1, keepdim=True), max=0.0)  # the range always holds 0, so
        hi = torch.clamp(g.amax(-1, keepdim=True), min=0.0)  # zero is exactly representable
        s = (hi - lo) / (fmt.qmax - fmt.qmin) if scale is None else _fit(scale, g, sshape)
        s = round_scale(s, ts.scale_format)
        zp = torch.clamp(torch.round(fmt.qmin - _safe_div(lo, s)), fmt.qmin, fmt.qmax)
        codes = fmt.encode(torch.round(_safe_div(g, s)) + zp)
        zp = zp.to(torch.int32).reshape(sshape)
    elif rule in ("mx_floor", "mx_rceil"):
        s = mx_scale(g.abs().amax(-1, keepdim=True), fmt, rule)
        codes = fmt.encode(g / s, overflow="saturate")
    elif rule == "nvfp4":
        glob, s = nvfp4_scales(xf, g)
        codes = E2M1.encode(_safe_div(g, s * glob))
    elif rule == "gguf_q8_0":
        d = g.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d == 0, 0.0, 1 / torch.where(d == 0, 1.0, d))
        codes = _round_half_away(g * inv).to(torch.int8)
        s = round_scale(d, "fp16")
    else:  # gguf_q4_0
        idx = g.abs().argmax(-1, keepdim=True)  # first index of the largest magnitude
        d = torch.gather(g, -1, idx) / -8
        inv = torch.where(d == 0, 0.0, 1 / torch.where(d == 0, 1.0, d))
        codes = torch.clamp(torch.trunc(g * inv + 8.5), 0, 15).to(torch.uint8)
        s = round_scale(d, "fp16")
    codes = _ungroup(codes, xf.shape, ts)
    return QuantizedTensor(codes, s.reshape(sshape), ts, x.shape, x.dtype, zp, glob)


def _encode(fmt, v: Tensor) -> Tensor:
    return fmt.encode(v, overflow="saturate") if fmt.kind == "float" else fmt.encode(v)


def _fit(scale: Tensor, g: Tensor, sshape) -> Tensor:
    scale = torch.as_tensor(scale, dtype=torch.float32)
    if tuple(scale.shape) != tuple(sshape) and scale.numel() != 1:
        raise ValueError(f"static scale has shape {tuple(scale.shape)}, expected {tuple(sshape)}")
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise ValueError("static scale must be finite and non-negative")
    return scale.reshape(-1).expand(g.shape[:-1].numel()).reshape(*g.shape[:-1], 1) \
        if scale.numel() == 1 else scale.reshape(*g.shape[:-1], 1)


def _round_half_away(v: Tensor) -> Tensor:
    """Round half away from zero exactly as gguf's np_roundf: floor(a) + floor(2 (a - floor a))."""
    a = v.abs()
    fl = torch.floor(a)
    return torch.sign(v) * (fl + torch.floor(2 * (a - fl)))


def mx_scale(amax: Tensor, fmt, rule: str = "mx_floor") -> Tensor:
    """amax: float32 block absolute maxima -> float32 E8M0 scales (powers of two).

    mx_floor (OCP MX v1.0, 6.3): 2**(floor(log2 amax) - emax_elem); mx_rceil: the smallest power of
    two X with amax / X <= element max (what cuBLAS uses on Blackwell). Exponents are clamped to
    E8M0's [-127, 127]; an all-zero block gets 2**-127.
    """
    if rule == "mx_floor":
        e = E8M0.floor_log2(amax) - fmt.emax
    else:
        r = amax / fmt.max
        _, e = torch.frexp(r)
        m, _ = torch.frexp(r)
        e = torch.where(m == 0.5, e - 1, e)  # r = 2**(e-1) exactly: no rounding up
    e = torch.where(amax == 0, torch.full_like(e, -127), torch.clamp(e, -127, 127))
    return torch.ldexp(torch.ones_like(amax), e.float())


def nvfp4_scales(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """x: the float32 tensor; g: its (..., n_blocks, 16) view -> (global fp32 scalar, E4M3 block
    scales as float32 (..., n_blocks, 1)). global = amax / (448 * 6), multiplied on decode."""
    amax = x.abs().amax()
    glob = amax / NVFP4_GLOBAL_DENOM
    glob = torch.where(glob == 0, torch.ones_like(glob), glob)
    s = g.abs().amax(-1, keepdim=True) / 6.0 / glob
    return glob, E4M3.round(s, overflow="saturate")


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None) -> Tensor:
    """QuantizedTensor -> tensor of q.shape in `dtype` (default: the original dtype)."""
    ts = q.scheme
    fmt = get_format(ts.format)
    vals = fmt.decode(q.codes)
    if ts.scale_rule == "gguf_q4_0":
        vals = vals - 8
    s = q.scales
    if ts.granularity == "block":
        bn, bk = ts.block
        s = s.repeat_interleave(bn, 0)[: q.shape[0]].repeat_interleave(bk, 1)[:, : q.shape[1]]
    elif ts.granularity == "group":
        s = s.repeat_interleave(ts.group_size, -1)
    if q.zero_points is not None:
        zp = q.zero_points.float()
        if ts.granularity == "group":
            zp = zp.repeat_interleave(ts.group_size, -1)
        vals = vals - zp
    out = vals * s
    if q.global_scale is not None:
        out = out * q.global_scale
    return out.to(dtype or q.dtype)


def fake_quantize(x: Tensor, scheme: str | Scheme | TensorScheme) -> Tensor:
    """dequantize(quantize(x, scheme)) in x's dtype: the values a quantized model computes with."""
    return dequantize(quantize(x, scheme))
