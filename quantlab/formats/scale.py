"""E8M0: the MX spec's shared scale, an unsigned power of two 2**(code - 127); code 0xFF is NaN."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


@dataclass(frozen=True)
class E8M0Format:
    """Exponent-only scale format (OCP MX v1.0, section 5.4.1). No sign, no zero, no inf."""

    name: str = "e8m0"
    bits: int = 8
    bias: int = 127
    kind = "exponent"
    torch_dtype = torch.float8_e8m0fnu

    @property
    def max(self) -> float:
        return math.ldexp(1.0, 254 - self.bias)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, -self.bias)

    min_subnormal = min_normal  # no subnormals: the smallest value is 2**-127
    nan_code = 0xFF

    @cached_property
    def table(self) -> Tensor:
        vals = [math.ldexp(1.0, c - self.bias) for c in range(255)] + [math.nan]
        return torch.tensor(vals, dtype=torch.float32)

    def grid(self) -> Tensor:
        return self.table[:255].clone()

    def describe(self) -> dict:
        return {"name": self.name, "bits": 8, "exponent_bits": 8, "mantissa_bits": 0,
                "bias": self.bias, "max": self.max, "min_normal": self.min_normal,
                "min_subnormal": self.min_subnormal, "has_inf": False, "has_nan": True,
                "overflow": "nan", "values": 255}

    def decode(self, codes: Tensor) -> Tensor:
        """uint8 codes -> float32 powers of two (NaN for 0xFF)."""
        return self.table[codes.long() & 0xFF]

    def encode(self, x: Tensor) -> Tensor:
        """float -> uint8 code of the nearest power of two, bit for bit as torch's cast.

        Rule (c10's float -> float8_e8m0fnu): the sign is ignored; the float32 exponent field is
        kept and rounded up when the dropped mantissa is at least one half (strictly more than
        one half for float32 subnormals, whose implicit bit is 0); 0 and values under 2**-127
        give code 0; NaN, inf and values rounding past 2**127 give 0xFF (NaN).
        """
        bits = x.float().view(torch.int32)
        exp = (bits >> 23) & 0xFF
        mant = bits & 0x7FFFFF
        guard = (mant & 0x400000) != 0
        rest = (mant & 0x3FFFFF) != 0
        up = guard & ((exp > 0) | rest)
        code = exp + up.to(torch.int32)
        code = torch.where(exp == 0xFF, torch.full_like(code, 0xFF), code)
        return torch.clamp(code, max=0xFF).to(torch.uint8)

    def floor_log2(self, x: Tensor) -> Tensor:
        """int32 floor(log2 |x|) for finite nonzero float32 x (exact, subnormals included)."""
        _, e = torch.frexp(x.float())
        return e - 1
