"""Schemes: what a quantized tensor is made of, as data.

A `TensorScheme` says how one tensor is quantized: element format, granularity (which elements
share a scale), scale format and scale rule, symmetric or not. A `Scheme` is what a serving engine
calls a quantization scheme: one TensorScheme for the weights and, for W8A8/W4A4, one for the
input activations. Presets carry the names vLLM and llm-compressor users know.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

from quantlab.formats import SCALE_BITS, Format, get_format
from quantlab.granularity import GRANULARITIES, Granularity, get_granularity
from quantlab.scales import ABSMAX, SCALE_RULES, ScaleRule, get_scale_rule

__all__ = ["GRANULARITIES", "PRESETS", "SCALE_RULES", "Scheme", "TensorScheme", "get_scheme"]


def _positive_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1


def _check_sizes(group_size, block) -> None:
    """group_size a positive int, block two positive ints: else a ValueError saying so (a float
    group or a 0-row block would fail deep inside quantize with a bare ZeroDivisionError)."""
    if group_size is not None and not _positive_int(group_size):
        raise ValueError(f"group_size={group_size!r} must be a positive integer dividing K, "
                         "e.g. 32 or 128")
    if block is not None and not (isinstance(block, (tuple, list)) and len(block) == 2
                                  and all(_positive_int(b) for b in block)):
        raise ValueError(f"block={block!r} must be (rows, cols), two positive integers, "
                         "e.g. (128, 128)")


@dataclass(frozen=True)
class TensorScheme:
    """How one tensor is quantized.

    format: element format name (quantlab.formats); resolved once to `element`, the format
    object. granularity: "tensor" (one scale), "channel" / "token" (one scale per row of a
    (..., K) tensor: output channel of a weight, token of an activation), "group" (group_size
    consecutive elements along the last dim), "block" (block=(rows, cols) tiles of a 2-D tensor;
    edge tiles may be partial), or a quantlab.granularity object. scale_format: "fp32", "fp16",
    "bf16", "e4m3" or "e8m0"; scales are rounded to it before the elements are computed, except
    where a scale rule says otherwise (gguf). scale_rule: a name in SCALE_RULES or a
    quantlab.scales object. Both are held resolved, as objects that equal their names.
    dynamic: activations only; True = scale computed from each input, False = static scale
    passed in (calibrated).
    """

    format: str
    granularity: Granularity  # or its name
    group_size: int | None = None
    block: tuple[int, int] | None = None
    symmetric: bool = True
    scale_format: str = "fp32"
    scale_rule: ScaleRule = ABSMAX  # or its name
    dynamic: bool = True

    def __post_init__(self):
        element: Format = get_format(self.format)
        _check_sizes(self.group_size, self.block)
        gran = get_granularity(self.granularity, self.group_size, self.block)
        _check_sizes(gran.group_size, gran.block)  # a Group / Block object's own sizes
        rule = get_scale_rule(self.scale_rule, self.symmetric)
        for name, value in (("element", element), ("granularity", gran), ("scale_rule", rule),
                            ("group_size", gran.group_size), ("block", gran.block)):
            object.__setattr__(self, name, value)
        if self.scale_format not in SCALE_BITS:
            raise ValueError(f"scale_format={self.scale_format!r}; use one of {tuple(SCALE_BITS)}")
        if not self.symmetric and element.kind != "int":
            raise ValueError(f"asymmetric quantization needs an integer format, not {self.format}")
        if not self.symmetric and element.signed:
            raise ValueError(
                f"asymmetric codes are unsigned: use u{self.format}, not {self.format}")
        rule.validate(self)

    def __deepcopy__(self, memo) -> TensorScheme:
        return self  # immutable, and `element` is the formats module's own object

    def __repr__(self) -> str:  # the spelled names, as TensorScheme(...) is written
        spelled = {"granularity": self.granularity.name, "scale_rule": self.scale_rule.name}
        args = ", ".join(f"{f.name}={spelled.get(f.name, getattr(self, f.name))!r}"
                         for f in fields(self))
        return f"TensorScheme({args})"

    @property
    def element_bits(self) -> int:
        return self.element.bits

    @property
    def scale_bits(self) -> int:
        return SCALE_BITS[self.scale_format]

    def storage_bits(self, shape: tuple[int, ...]) -> int:
        """Exact bits of a tensor of `shape` under this scheme: codes, scales, zero points and
        the global scale, what quantize(x, self).storage_bits counts, without quantizing."""
        n_scales = self.granularity.n_scales(shape)
        bits = math.prod(shape) * self.element_bits + n_scales * self.scale_bits
        if self.scale_rule.zero_points:
            bits += n_scales * self.element_bits
        return bits + self.scale_rule.global_scale_bits

    def describe(self) -> str:
        sym = "sym" if self.symmetric else "asym"
        kind = "" if self.dynamic else ", static"
        return (f"{self.format} {self.granularity.describe()}, {self.scale_format} scale"
                f"{self.scale_rule.suffix}, {sym}{kind}")


@dataclass(frozen=True)
class Scheme:
    """A named quantization scheme: weights and, optionally, input activations."""

    name: str
    weights: TensorScheme
    activations: TensorScheme | None = None
    description: str = ""


def _ts(fmt, gran, **kw) -> TensorScheme:
    return TensorScheme(fmt, gran, **kw)


FP8_TENSOR = _ts("e4m3", "tensor")
MX_KW = dict(group_size=32, scale_format="e8m0", scale_rule="mx_floor")
NVFP4_KW = dict(group_size=16, scale_format="e4m3", scale_rule="nvfp4")

PRESETS: dict[str, Scheme] = {s.name: s for s in (
    Scheme("fp8_per_tensor", FP8_TENSOR, _ts("e4m3", "tensor", dynamic=False),
           "FP8 W8A8, one fp32 scale per tensor, static (calibrated) activation scale"),
    Scheme("fp8_dynamic", _ts("e4m3", "channel"), _ts("e4m3", "token"),
           "FP8 per-channel weights, dynamic per-token activations (llm-compressor FP8_DYNAMIC)"),
    Scheme("fp8_block", _ts("e4m3", "block", block=(128, 128)),
           _ts("e4m3", "group", group_size=128),
           "FP8 128x128 weight blocks, 1x128 dynamic activation groups (DeepSeek-V3 style)"),
    Scheme("int8_w8a8", _ts("int8", "channel"), _ts("int8", "token"),
           "INT8 per-channel weights, dynamic per-token activations (SmoothQuant family)"),
    Scheme("w8a16", _ts("int8", "channel"), None, "INT8 per-channel weights, 16-bit activations"),
    Scheme("w4a16", _ts("int4", "group", group_size=128, scale_format="fp16"), None,
           "INT4 symmetric, groups of 128 along K (GPTQ/AWQ checkpoints, Marlin kernels)"),
    Scheme("w4a16_asym", _ts("uint4", "group", group_size=128, symmetric=False,
                             scale_format="fp16"), None,
           "INT4 asymmetric with zero points, groups of 128 along K"),
    Scheme("nf4", _ts("nf4", "group", group_size=64), None,
           "bitsandbytes NF4: 16-value normal-float codebook, absmax blocks of 64"),
    Scheme("mxfp8", _ts("e4m3", "group", **MX_KW), _ts("e4m3", "group", **MX_KW),
           "OCP MXFP8 (E4M3 elements, E8M0 scale per 32), weights and activations"),
    Scheme("mxfp6", _ts("e2m3", "group", **MX_KW), _ts("e2m3", "group", **MX_KW),
           "OCP MXFP6 (E2M3 elements, E8M0 scale per 32), weights and activations"),
    Scheme("mxfp6_e3m2", _ts("e3m2", "group", **MX_KW), _ts("e3m2", "group", **MX_KW),
           "OCP MXFP6 with E3M2 elements (more range, less precision)"),
    Scheme("mxfp4", _ts("e2m1", "group", **MX_KW), _ts("e2m1", "group", **MX_KW),
           "OCP MXFP4 (E2M1 elements, E8M0 scale per 32), weights and activations"),
    Scheme("mxfp4_a16", _ts("e2m1", "group", **MX_KW), None, "MXFP4 weights, 16-bit activations"),
    Scheme("nvfp4", _ts("e2m1", "group", **NVFP4_KW), _ts("e2m1", "group", **NVFP4_KW),
           "NVIDIA NVFP4: E2M1, E4M3 scale per 16, fp32 per-tensor scale (W4A4)"),
    Scheme("nvfp4_a16", _ts("e2m1", "group", **NVFP4_KW), None,
           "NVFP4 weights, 16-bit activations (llm-compressor NVFP4A16)"),
    Scheme("gguf_q8_0", _ts("int8", "group", group_size=32, scale_format="fp16",
                            scale_rule="gguf_q8_0"), None,
           "llama.cpp Q8_0: blocks of 32, fp16 scale amax/127"),
    Scheme("gguf_q4_0", _ts("uint4", "group", group_size=32, scale_format="fp16",
                            scale_rule="gguf_q4_0"), None,
           "llama.cpp Q4_0: blocks of 32, fp16 scale (signed max)/-8, codes offset by 8"),
)}


def get_scheme(name: str | Scheme) -> Scheme:
    """A preset by name (case-insensitive, '-' or '_'), or the Scheme itself."""
    if isinstance(name, Scheme):
        return name
    key = str(name).lower().replace("-", "_")
    if key not in PRESETS:
        raise ValueError(f"unknown scheme {name!r}; known schemes: {', '.join(PRESETS)}")
    return PRESETS[key]
