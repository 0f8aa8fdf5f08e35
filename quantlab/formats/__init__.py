"""Element and scale formats, each exact: encode (round to nearest even), decode, value grid.

    >>> from quantlab.formats import get_format
    >>> get_format("e2m1").grid().tolist()[8:]
    [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
"""

from __future__ import annotations

import torch

from quantlab.formats.codebook import NF4_VALUES, CodebookFormat
from quantlab.formats.integer import IntFormat
from quantlab.formats.minifloat import FloatFormat, round_to_grid
from quantlab.formats.scale import E8M0Format

# OCP 8-bit Floating Point (OFP8) and OCP Microscaling v1.0, section 5.3: E4M3 has no inf and
# one NaN code per sign; E5M2 follows IEEE 754. torch 2.13 saturates float32 -> E4M3FN casts
# (inf -> +-448), so that is the default rule here too; E5M2 overflows to inf like IEEE.
E4M3 = FloatFormat("e4m3", 4, 3, 7, "fn", "saturate", torch.float8_e4m3fn)
E5M2 = FloatFormat("e5m2", 5, 2, 15, "ieee", "inf", torch.float8_e5m2)
# MX FP6 and FP4 elements (OCP MX v1.0, 5.3.2-5.3.3) have no inf or NaN: conversions saturate.
E2M3 = FloatFormat("e2m3", 2, 3, 1, "none", "saturate")
E3M2 = FloatFormat("e3m2", 3, 2, 3, "none", "saturate")
E2M1 = FloatFormat("e2m1", 2, 1, 1, "none", "saturate", torch.float4_e2m1fn_x2)
E8M0 = E8M0Format()
INT8 = IntFormat("int8", 8, True)
UINT8 = IntFormat("uint8", 8, False)
INT4 = IntFormat("int4", 4, True)
UINT4 = IntFormat("uint4", 4, False)
INT2 = IntFormat("int2", 2, True)
UINT2 = IntFormat("uint2", 2, False)
NF4 = CodebookFormat("nf4", NF4_VALUES)

FORMATS = {f.name: f for f in (E4M3, E5M2, E2M3, E3M2, E2M1, E8M0,
                               INT8, UINT8, INT4, UINT4, INT2, UINT2, NF4)}
ALIASES = {"fp8_e4m3": "e4m3", "e4m3fn": "e4m3", "fp8_e5m2": "e5m2", "fp6_e2m3": "e2m3",
           "fp6_e3m2": "e3m2", "fp4": "e2m1", "fp4_e2m1": "e2m1", "ue8m0": "e8m0"}

# Formats used only as scale storage (not element formats), with their storage bits.
SCALE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "e4m3": 8, "e8m0": 8}

Format = FloatFormat | IntFormat | CodebookFormat | E8M0Format


def get_format(name: str) -> Format:
    """Look a format up by name (e.g. "e4m3", "fp8_e4m3", "int4", "nf4")."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in FORMATS:
        raise ValueError(f"unknown format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[key]


__all__ = ["FORMATS", "SCALE_BITS", "E4M3", "E5M2", "E2M3", "E3M2", "E2M1", "E8M0", "INT8",
           "UINT8", "INT4", "UINT4", "INT2", "UINT2", "NF4", "FloatFormat", "IntFormat",
           "CodebookFormat", "E8M0Format", "Format", "get_format", "round_to_grid"]
