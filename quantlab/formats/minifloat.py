"""Small floating-point formats (FP8 E4M3FN/E5M2, FP6 E2M3/E3M2, FP4 E2M1): exact encode and decode.

A code is the format's bit pattern in the low bits of a uint8: sign | exponent | mantissa.
Encoding rounds to nearest, ties to even mantissa (IEEE 754 roundTiesToEven), on the value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

OVERFLOW_RULES = ("saturate", "inf", "nan")


@dataclass(frozen=True)
class FloatFormat:
    """A sign-exponent-mantissa format with `ebits` exponent and `mbits` mantissa bits.

    special: which top-exponent codes are not finite numbers:
      "ieee" (E5M2): exponent all ones is inf (mantissa 0) or NaN;
      "fn"   (E4M3FN): only S.1111.111 is NaN, no inf;
      "none" (FP6, FP4): every code is a finite number.
    overflow: what encode does with a finite value that rounds past the largest finite value
      (and with +-inf): "saturate" clamps to +-max, "inf" gives +-inf, "nan" gives NaN.
    """

    name: str
    ebits: int
    mbits: int
    bias: int
    special: str
    overflow: str
    torch_dtype: torch.dtype | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.special not in ("ieee", "fn", "none"):
            raise ValueError(f"special={self.special!r}; use 'ieee', 'fn' or 'none'")
        if self.overflow not in OVERFLOW_RULES:
            raise ValueError(f"overflow={self.overflow!r}; use one of {OVERFLOW_RULES}")

    kind = "float"

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number (unbiased)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite number (unbiased): the MX spec's emax_elem."""
        top = (1 << self.ebits) - 1 - self.bias
        return top - 1 if self.special == "ieee" else top

    @property
    def max(self) -> float:
        """Largest finite value."""
        mant_max = (1 << self.mbits) - 1
        if self.special == "fn":
            mant_max -= 1  # S.1111.111 is NaN
        return math.ldexp(1 + mant_max / (1 << self.mbits), self.emax)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        return math.ldexp(1.0, self.emin - self.mbits)

    @property
    def nan_code(self) -> int | None:
        """Positive quiet-NaN code (the one torch produces), or None if the format has no NaN."""
        if self.special == "none":
            return None
        return (1 << (self.bits - 1)) - 1  # S=0, all exponent and mantissa bits set

    @property
    def inf_code(self) -> int | None:
        if self.special != "ieee":
            return None
        return ((1 << self.ebits) - 1) << self.mbits

    @cached_property
    def table(self) -> Tensor:
        """(2**bits,) float32: the value of every code, NaN/inf where the format says."""
        vals = [_decode_bits(c, self) for c in range(1 << self.bits)]
        return torch.tensor(vals, dtype=torch.float32)

    def grid(self) -> Tensor:
        """Sorted distinct finite values, both signs, one zero: float32."""
        t = self.table
        return torch.unique(t[torch.isfinite(t)])

    def describe(self) -> dict:
        return {
            "name": self.name, "bits": self.bits, "exponent_bits": self.ebits,
            "mantissa_bits": self.mbits, "bias": self.bias, "max": self.max,
            "min_normal": self.min_normal, "min_subnormal": self.min_subnormal,
            "has_inf": self.special == "ieee", "has_nan": self.special != "none",
            "overflow": self.overflow, "values": int(self.grid().numel()),
        }

    def decode(self, codes: Tensor) -> Tensor:
        """codes: integer tensor of bit patterns -> float32 of the same shape."""
        return self.table.to(codes.device)[codes.long() & ((1 << self.bits) - 1)]

    def encode(self, x: Tensor, overflow: str | None = None) -> Tensor:
        """x: float tensor -> uint8 codes of the same shape, round-to-nearest-even.

        overflow: override the format's rule for values past max and for +-inf.
        NaN becomes the NaN code (sign kept); a format without NaN raises ValueError.
        Saturating FP8 goes through torch's cast after a clamp (fast; the tests check it equals
        encode_exact bit for bit); everything else is encode_exact.
        """
        rule = self.overflow if overflow is None else overflow
        if rule == "saturate" and self.torch_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            x = x.float()
            return x.clamp(-self.max, self.max).to(self.torch_dtype).view(torch.uint8)
        return self.encode_exact(x, rule)

    def encode_exact(self, x: Tensor, overflow: str | None = None) -> Tensor:
        """encode() in explicit arithmetic: round |x| on the grid, then assemble the bits."""
        rule = self.overflow if overflow is None else overflow
        if rule not in OVERFLOW_RULES:
            raise ValueError(f"overflow={rule!r}; use one of {OVERFLOW_RULES}")
        if rule == "inf" and self.special != "ieee":
            raise ValueError(f"{self.name} has no inf; use overflow='saturate' or 'nan'")
        if rule == "nan" and self.special == "none":
            raise ValueError(f"{self.name} has no NaN; use overflow='saturate'")
        x = x.float()
        nan = torch.isnan(x)
        if self.special == "none" and bool(nan.any()):
            raise ValueError(f"{self.name} has no NaN code but x holds {int(nan.sum())} NaN values")
        sign = torch.signbit(x)
        a = x.abs()
        q = round_to_grid(torch.where(nan, 0.0, a), self.mbits, self.emin)
        over = q > self.max  # includes +inf
        mag = _magnitude_code(torch.where(over, 0.0, q), self)
        if rule == "saturate":
            mag = torch.where(over, _magnitude_code(torch.tensor(self.max), self), mag)
        elif rule == "inf":
            mag = torch.where(over, torch.tensor(self.inf_code, dtype=torch.int32), mag)
        else:
            mag = torch.where(over, torch.tensor(self.nan_code, dtype=torch.int32), mag)
        if self.special != "none":
            mag = torch.where(nan, torch.tensor(self.nan_code, dtype=torch.int32), mag)
        code = mag | (sign.to(torch.int32) << (self.bits - 1))
        return code.to(torch.uint8)

    def round(self, x: Tensor, overflow: str | None = None) -> Tensor:
        """x rounded to the nearest value of this format (fake quantization), float32."""
        return self.decode(self.encode(x, overflow))


def round_to_grid(a: Tensor, mbits: int, emin: int) -> Tensor:
    """Round |x| (float32, >= 0) to `mbits` mantissa bits, ties to even, unbounded exponent range
    above `emin` and a fixed step 2**(emin - mbits) below it (subnormals). float32 out."""
    _, e = torch.frexp(a)  # a = m * 2**e with m in [0.5, 1): floor(log2 a) = e - 1
    e = torch.clamp(e - 1, min=emin)
    step = torch.ldexp(torch.ones_like(a), (e - mbits).float())
    # a / step and the product are exact (powers of two); torch.round is half-to-even.
    return torch.round(a / step) * step


def _magnitude_code(q: Tensor, fmt: FloatFormat) -> Tensor:
    """q: float32 magnitudes already on the grid and <= max -> int32 codes without sign."""
    _, e = torch.frexp(q)
    e = e - 1
    normal = q >= fmt.min_normal
    e = torch.where(normal, e, torch.full_like(e, fmt.emin))
    mant_scale = torch.ldexp(torch.ones_like(q), (fmt.mbits - e).float())
    mant = (q * mant_scale).to(torch.int32)  # normal: 2**mbits + m; subnormal: m
    exp_field = torch.where(normal, e + fmt.bias, torch.zeros_like(e))
    mant = torch.where(normal, mant - (1 << fmt.mbits), mant)
    return (exp_field << fmt.mbits) | mant


def _decode_bits(code: int, fmt: FloatFormat) -> float:
    sign = -1.0 if code >> (fmt.bits - 1) & 1 else 1.0
    exp = (code >> fmt.mbits) & ((1 << fmt.ebits) - 1)
    mant = code & ((1 << fmt.mbits) - 1)
    top = (1 << fmt.ebits) - 1
    if fmt.special == "ieee" and exp == top:
        return sign * math.inf if mant == 0 else math.nan
    if fmt.special == "fn" and exp == top and mant == (1 << fmt.mbits) - 1:
        return math.nan
    if exp == 0:
        return sign * math.ldexp(mant, fmt.emin - fmt.mbits)
    return sign * math.ldexp(1 + mant / (1 << fmt.mbits), exp - fmt.bias)
