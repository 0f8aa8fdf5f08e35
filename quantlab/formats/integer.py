"""Integer formats: signed (two's complement) and unsigned b-bit integers."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


@dataclass(frozen=True)
class IntFormat:
    """b-bit integer. Encode rounds half to even (torch.round) and saturates to [qmin, qmax]."""

    name: str
    bits: int
    signed: bool
    kind = "int"
    torch_dtype = None

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def max(self) -> float:
        return float(self.qmax)

    @property
    def min_subnormal(self) -> float:
        return 1.0

    min_normal = min_subnormal
    nan_code = None

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.signed else torch.uint8

    @cached_property
    def table(self) -> Tensor:
        """Value of every bit pattern 0 .. 2**bits - 1 (two's complement for signed)."""
        codes = torch.arange(1 << self.bits)
        if self.signed:
            codes = torch.where(codes >= (1 << (self.bits - 1)), codes - (1 << self.bits), codes)
        return codes.float()

    def grid(self) -> Tensor:
        return torch.arange(self.qmin, self.qmax + 1, dtype=torch.float32)

    def describe(self) -> dict:
        return {"name": self.name, "bits": self.bits, "signed": self.signed,
                "min": self.qmin, "max": self.qmax, "has_inf": False, "has_nan": False,
                "overflow": "saturate", "values": 1 << self.bits}

    def encode(self, x: Tensor) -> Tensor:
        """float x -> integer codes (int8 if signed else uint8), half-to-even, saturating."""
        x = x.float()
        if bool(torch.isnan(x).any()):
            raise ValueError(f"{self.name} has no NaN code but x holds NaN values")
        return torch.clamp(torch.round(x), self.qmin, self.qmax).to(self.code_dtype)

    def decode(self, codes: Tensor) -> Tensor:
        return codes.float()

    def round(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))
