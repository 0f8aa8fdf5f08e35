"""Scale rules: how each group's scale (and the codes) follow from its values, as small objects.

- absmax: scale = amax / format max, rounded to the scale format; with symmetric=False the
  min-max rule: scale = (max - min) / (qmax - qmin) and an integer zero point, the range always
  holding 0. Both accept a static (calibrated) scale instead.
- mx_floor: OCP MX v1.0 6.3, X = 2**(floor(log2 amax) - emax_elem); mx_rceil: 2**ceil(log2(amax
  / max)), never clipping (what cuBLAS uses on Blackwell).
- nvfp4: fp32 global = amax(tensor) / (448 * 6), multiplied on decode; E4M3 block scale =
  amax(block) / 6 / global.
- gguf_q8_0 / gguf_q4_0: llama.cpp's reference quantizers (ggml-quants.c), op for op.

`get_scale_rule` resolves TensorScheme's spelling (name and symmetric). A rule equals its name
(`MX_FLOOR == "mx_floor"`), so code written against the strings keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from quantlab.formats import E2M1, E4M3, E8M0, get_format

if TYPE_CHECKING:
    from quantlab.schemes import TensorScheme

NVFP4_GLOBAL_DENOM = 448.0 * 6.0  # E4M3 max * E2M1 max
SCALE_RULES = ("absmax", "mx_floor", "mx_rceil", "nvfp4", "gguf_q8_0", "gguf_q4_0")


def round_scale(s: Tensor, scale_format: str) -> Tensor:
    """Round float32 scales to their storage format, returned as float32."""
    if scale_format == "fp32":
        return s
    if scale_format in ("fp16", "bf16"):
        dt = torch.float16 if scale_format == "fp16" else torch.bfloat16
        return s.to(dt).float()
    fmt = get_format(scale_format)
    return fmt.decode(fmt.encode(s))


def _div_const(t: Tensor, c: float) -> Tensor:
    """t / c correctly rounded on any device. (On CUDA, PyTorch divides a tensor by a Python
    scalar as t * (1 / c), which is 1 ulp off for some t: a scale 1 ulp off moves codes.)"""
    return t / torch.full((), c, dtype=t.dtype, device=t.device)


def _safe_div(x: Tensor, s: Tensor) -> Tensor:
    """x / s with x / 0 = 0: a zero scale means the whole group was zero (or underflowed)."""
    return torch.where(s == 0, torch.zeros_like(x), x / torch.where(s == 0, 1.0, s))


def _fit(scale: Tensor, g: Tensor, sshape) -> Tensor:
    """A static scale of shape sshape (or one value) -> (..., n_groups, 1) beside g."""
    scale = torch.as_tensor(scale, dtype=torch.float32)
    if tuple(scale.shape) != tuple(sshape) and scale.numel() != 1:
        raise ValueError(f"static scale has shape {tuple(scale.shape)}, expected {tuple(sshape)}")
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise ValueError(f"static scale must be finite and positive, got values from "
                         f"{scale.min().item():.3g} to {scale.max().item():.3g} (a scale of 0 "
                         "turns every value into 0, NaN/inf every value into NaN); recalibrate "
                         "it: amax of the inputs / format max, clamped to at least 1e-12")
    return scale.reshape(-1).expand(g.shape[:-1].numel()).reshape(*g.shape[:-1], 1) \
        if scale.numel() == 1 else scale.reshape(*g.shape[:-1], 1)


def _round_half_away(v: Tensor) -> Tensor:
    """Round half away from zero exactly as gguf's np_roundf: floor(a) + floor(2 (a - floor a))."""
    a = v.abs()
    fl = torch.floor(a)
    return torch.sign(v) * (fl + torch.floor(2 * (a - fl)))


def _inverse(d: Tensor) -> Tensor:
    """1 / d with 1 / 0 = 0, as ggml's reference quantizers take it."""
    return torch.where(d == 0, 0.0, 1 / torch.where(d == 0, 1.0, d))


@dataclass(frozen=True, eq=False)
class ScaleRule:
    """Base. quantize: x float32, g its (..., n_groups, group_elems) view -> (codes like g,
    scales (..., n_groups, 1) float32 holding the stored values, zero points like the scales
    (int32) or None, global scale (fp32 scalar) or None). decode: codes -> element values."""

    name: ClassVar[str]
    suffix: ClassVar[str] = ""  # what TensorScheme.describe adds after the scale format
    static: ClassVar[bool] = False  # accepts a static (calibrated) scale
    zero_points: ClassVar[bool] = False  # one integer zero point per scale, element-sized
    global_scale_bits: ClassVar[int] = 0  # a per-tensor scale on top of the group scales
    ggml_type: ClassVar[str | None] = None  # the llama.cpp tensor type it reproduces

    def __eq__(self, other) -> bool:
        if isinstance(other, str):
            return other == self.name
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(self.name)

    def __str__(self) -> str:
        return self.name

    def validate(self, ts: TensorScheme) -> None:
        """Raise ValueError, naming the fix, when ts's other fields do not fit this rule."""

    def quantize(self, x: Tensor, g: Tensor, ts: TensorScheme, scale: Tensor | None = None
                 ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        raise NotImplementedError

    def decode(self, codes: Tensor, fmt) -> Tensor:
        return fmt.decode(codes)


@dataclass(frozen=True, eq=False)
class Absmax(ScaleRule):
    """Symmetric: scale = amax / format max, codes = encode(x / scale)."""

    name: ClassVar[str] = "absmax"
    static: ClassVar[bool] = True

    def validate(self, ts: TensorScheme) -> None:
        if ts.element.kind == "int" and not ts.element.signed:
            raise ValueError(
                f"symmetric codes are signed: use {ts.format[1:]}, not {ts.format}")

    def quantize(self, x, g, ts, scale=None):
        fmt = ts.element
        s = _div_const(g.abs().amax(-1, keepdim=True), fmt.max) if scale is None else \
            _fit(scale, g, ts.granularity.scale_shape(x.shape))
        s = round_scale(s, ts.scale_format)
        v = _safe_div(g, s)
        codes = fmt.encode(v, overflow="saturate") if fmt.kind == "float" else fmt.encode(v)
        return codes, s, None, None


@dataclass(frozen=True, eq=False)
class MinMax(Absmax):
    """Asymmetric (spelled absmax with symmetric=False): the range [min(lo, 0), max(hi, 0)] maps
    onto [qmin, qmax] with an integer zero point, so zero is exactly representable."""

    zero_points: ClassVar[bool] = True

    def validate(self, ts: TensorScheme) -> None:
        pass  # TensorScheme checks that asymmetric codes are unsigned integers

    def quantize(self, x, g, ts, scale=None):
        fmt = ts.element
        lo = torch.clamp(g.amin(-1, keepdim=True), max=0.0)
        hi = torch.clamp(g.amax(-1, keepdim=True), min=0.0)
        s = (hi - lo) / (fmt.qmax - fmt.qmin) if scale is None else \
            _fit(scale, g, ts.granularity.scale_shape(x.shape))
        s = round_scale(s, ts.scale_format)
        zp = torch.clamp(torch.round(fmt.qmin - _safe_div(lo, s)), fmt.qmin, fmt.qmax)
        codes = fmt.encode(torch.round(_safe_div(g, s)) + zp)
        return codes, s, zp.to(torch.int32), None


@dataclass(frozen=True, eq=False)
class MX(ScaleRule):
    """OCP MX: a power-of-two E8M0 scale per block, elements RNE and saturating."""

    def validate(self, ts: TensorScheme) -> None:
        if ts.scale_format != "e8m0":
            raise ValueError("MX scale rules produce E8M0 scales: set scale_format='e8m0'")

    def exponent(self, amax: Tensor, fmt) -> Tensor:
        raise NotImplementedError

    def scales(self, amax: Tensor, fmt) -> Tensor:
        """amax: float32 block absolute maxima -> float32 E8M0 scales (powers of two). Exponents
        are clamped to E8M0's [-127, 127]; an all-zero block gets 2**-127."""
        e = self.exponent(amax, fmt)
        e = torch.where(amax == 0, torch.full_like(e, -127), torch.clamp(e, -127, 127))
        return torch.ldexp(torch.ones_like(amax), e.float())

    def quantize(self, x, g, ts, scale=None):
        s = self.scales(g.abs().amax(-1, keepdim=True), ts.element)
        return ts.element.encode(g / s, overflow="saturate"), s, None, None


@dataclass(frozen=True, eq=False)
class MXFloor(MX):
    """The spec's rule (OCP MX v1.0, 6.3): 2**(floor(log2 amax) - emax_elem); may clip."""

    name: ClassVar[str] = "mx_floor"
    suffix: ClassVar[str] = " (FLOOR)"

    def exponent(self, amax, fmt):
        return E8M0.floor_log2(amax) - fmt.emax


@dataclass(frozen=True, eq=False)
class MXRceil(MX):
    """The smallest power of two X with amax / X <= element max: never clips."""

    name: ClassVar[str] = "mx_rceil"
    suffix: ClassVar[str] = " (RCEIL)"

    def exponent(self, amax, fmt):
        r = _div_const(amax, fmt.max)
        _, e = torch.frexp(r)
        m, _ = torch.frexp(r)
        return torch.where(m == 0.5, e - 1, e)  # r = 2**(e-1) exactly: no rounding up


def nvfp4_global_scale(amax: Tensor) -> Tensor:
    """The NVFP4 per-tensor scale from a float32 amax: amax / (448 * 6) correctly rounded on any
    device, 1 for amax 0 (an all-zero tensor). Multiplied on decode."""
    glob = _div_const(amax, NVFP4_GLOBAL_DENOM)
    return torch.where(glob == 0, torch.ones_like(glob), glob)


def nvfp4_block_scales(g: Tensor, glob: Tensor) -> Tensor:
    """g: (..., n_blocks, 16) float32 blocks, glob: the global scale -> E4M3 block scales as
    float32 (..., n_blocks, 1): amax / 6 / glob, each division correctly rounded, saturating."""
    return E4M3.round(_div_const(g.abs().amax(-1, keepdim=True), 6.0) / glob,
                      overflow="saturate")


def nvfp4_scales(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """x: the float32 tensor; g: its (..., n_blocks, 16) view -> (global fp32 scalar, E4M3 block
    scales as float32 (..., n_blocks, 1)). global = amax / (448 * 6), multiplied on decode."""
    glob = nvfp4_global_scale(x.abs().amax())
    return glob, nvfp4_block_scales(g, glob)


@dataclass(frozen=True, eq=False)
class NVFP4Rule(ScaleRule):
    """NVIDIA NVFP4: E4M3 block scales relative to an fp32 per-tensor scale (ModelOpt's
    weight_scale_2, multiplied; compressed-tensors stores its reciprocal and divides)."""

    name: ClassVar[str] = "nvfp4"
    suffix: ClassVar[str] = " + fp32 global"
    global_scale_bits: ClassVar[int] = 32

    def validate(self, ts: TensorScheme) -> None:
        if ts.scale_format != "e4m3" or ts.format != "e2m1":
            raise ValueError("the nvfp4 rule needs format='e2m1' and scale_format='e4m3'")

    def quantize(self, x, g, ts, scale=None):
        glob, s = nvfp4_scales(x, g)
        return E2M1.encode(_safe_div(g, s * glob)), s, None, glob


@dataclass(frozen=True, eq=False)
class GGUF(ScaleRule):
    """llama.cpp's reference quantizers: fp16 scale d, codes from x * (1 / d)."""


@dataclass(frozen=True, eq=False)
class GGUFQ8_0(GGUF):
    """Q8_0: d = amax / 127, q = round half away from zero (x / d)."""

    name: ClassVar[str] = "gguf_q8_0"
    suffix: ClassVar[str] = " (gguf Q8_0)"
    ggml_type: ClassVar[str] = "Q8_0"

    def quantize(self, x, g, ts, scale=None):
        d = _div_const(g.abs().amax(-1, keepdim=True), 127)
        codes = _round_half_away(g * _inverse(d)).to(torch.int8)
        return codes, round_scale(d, "fp16"), None, None


@dataclass(frozen=True, eq=False)
class GGUFQ4_0(GGUF):
    """Q4_0: d = (signed value of largest magnitude) / -8, q = min(15, trunc(x / d + 8.5)),
    decoded as q - 8."""

    name: ClassVar[str] = "gguf_q4_0"
    suffix: ClassVar[str] = " (gguf Q4_0)"
    ggml_type: ClassVar[str] = "Q4_0"

    def quantize(self, x, g, ts, scale=None):
        idx = g.abs().argmax(-1, keepdim=True)  # first index of the largest magnitude
        d = torch.gather(g, -1, idx) / -8
        codes = torch.clamp(torch.trunc(g * _inverse(d) + 8.5), 0, 15).to(torch.uint8)
        return codes, round_scale(d, "fp16"), None, None

    def decode(self, codes: Tensor, fmt) -> Tensor:
        return fmt.decode(codes) - 8


ABSMAX, MINMAX = Absmax(), MinMax()
MX_FLOOR, MX_RCEIL = MXFloor(), MXRceil()
NVFP4 = NVFP4Rule()
GGUF_Q8_0, GGUF_Q4_0 = GGUFQ8_0(), GGUFQ4_0()
_BY_NAME = {r.name: r for r in (ABSMAX, MX_FLOOR, MX_RCEIL, NVFP4, GGUF_Q8_0, GGUF_Q4_0)}


def get_scale_rule(spec: str | ScaleRule, symmetric: bool = True) -> ScaleRule:
    """TensorScheme's spelling (a name in SCALE_RULES, or a rule) -> its object; "absmax" with
    symmetric=False is the min-max rule."""
    name = spec.name if isinstance(spec, ScaleRule) else spec
    if not isinstance(name, str) or name not in _BY_NAME:
        raise ValueError(f"scale_rule={spec!r}; use one of {SCALE_RULES}")
    rule = _BY_NAME[name]
    return MINMAX if rule == ABSMAX and not symmetric else rule


def mx_scale(amax: Tensor, fmt, rule: str | MX = "mx_floor") -> Tensor:
    """amax: float32 block absolute maxima -> float32 E8M0 scales under an MX rule (see MX)."""
    return get_scale_rule(rule).scales(amax, fmt)
