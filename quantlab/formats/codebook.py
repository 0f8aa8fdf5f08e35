"""Codebook formats: a 4-bit index into a fixed table of values in [-1, 1] (NF4)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

# bitsandbytes' NF4 table (functional.py, get_4bit_type("nf4")): quantiles of N(0, 1) scaled to
# [-1, 1] with an exact zero; float32 constants as bitsandbytes holds them.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@dataclass(frozen=True)
class CodebookFormat:
    """Index into `values` (sorted ascending). Encode picks the nearest value; a value exactly
    on a midpoint goes to the lower entry, as bitsandbytes' comparison tree (`x > mid`) does."""

    name: str
    values: tuple[float, ...]
    kind = "codebook"
    torch_dtype = None
    nan_code = None

    @property
    def bits(self) -> int:
        return (len(self.values) - 1).bit_length()

    @property
    def max(self) -> float:
        return float(max(abs(v) for v in self.values))

    @cached_property
    def table(self) -> Tensor:
        return torch.tensor(self.values, dtype=torch.float32)

    @cached_property
    def midpoints(self) -> Tensor:
        t = self.table
        return (t[1:] + t[:-1]) / 2

    @property
    def min_subnormal(self) -> float:
        return float(self.table.abs()[self.table != 0].min())

    min_normal = min_subnormal

    def grid(self) -> Tensor:
        return self.table.clone()

    def describe(self) -> dict:
        return {"name": self.name, "bits": self.bits, "max": self.max,
                "min_nonzero": self.min_subnormal, "has_inf": False, "has_nan": False,
                "overflow": "saturate", "values": len(self.values)}

    def encode(self, x: Tensor) -> Tensor:
        """x: float, normally in [-1, 1] -> uint8 index of the nearest value (saturating)."""
        x = x.float()
        if bool(torch.isnan(x).any()):
            raise ValueError(f"{self.name} has no NaN code but x holds NaN values")
        return torch.bucketize(x, self.midpoints.to(x.device), right=False).to(torch.uint8)

    def decode(self, codes: Tensor) -> Tensor:
        return self.table.to(codes.device)[codes.long()]

    def round(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))
