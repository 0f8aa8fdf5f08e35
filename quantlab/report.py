"""Weight-level comparison of schemes: quantize real weight tensors and measure the error."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from quantlab.eval import sqnr_db
from quantlab.quantize import dequantize, quantize
from quantlab.schemes import get_scheme


@dataclass
class WeightRow:
    """One scheme over a set of weight tensors. sqnr_db is over all elements together."""

    scheme: str
    bits_per_weight: float
    nbytes: int
    sqnr_db: float
    worst_layer: str
    worst_sqnr_db: float
    max_abs_error: float
    cosine: float


def linear_weights(path: str | Path) -> dict[str, Tensor]:
    """The 2-D weight matrices of a safetensors checkpoint (file or directory), as float32,
    skipping embeddings (they are gathered, not multiplied, and usually kept in 16 bits)."""
    from safetensors.torch import load_file

    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no .safetensors file at {path}")
    out = {}
    for f in files:
        for name, t in load_file(str(f)).items():
            if t.ndim == 2 and name.endswith(".weight") and "embed" not in name:
                out[name] = t.float()
    if not out:
        raise ValueError(f"{path} holds no 2-D '.weight' tensors to quantize")
    return out


def compare_weights(weights: dict[str, Tensor], schemes: list[str]) -> list[WeightRow]:
    """Quantize every tensor with each scheme's weight format; one row per scheme."""
    rows = []
    for name in schemes:
        ts = get_scheme(name).weights
        sig = noise = dot = na = nb = 0.0
        bits = numel = 0
        worst, worst_db, max_err = "", math.inf, 0.0
        for wname, w in weights.items():
            q = quantize(w, ts)
            d = dequantize(q, torch.float32)
            w64, d64 = w.double(), d.double()
            sig += float((w64**2).sum())
            noise += float(((w64 - d64) ** 2).sum())
            dot += float((w64 * d64).sum())
            na += float((w64**2).sum())
            nb += float((d64**2).sum())
            max_err = max(max_err, float((w64 - d64).abs().max()))
            bits += q.storage_bits
            numel += q.numel
            db = sqnr_db(w, d)
            if db < worst_db:
                worst, worst_db = wname, db
        total_db = math.inf if noise == 0 else 10 * math.log10(sig / noise)
        cos = dot / math.sqrt(na * nb) if na and nb else 1.0
        rows.append(WeightRow(name, bits / numel, math.ceil(bits / 8), total_db, worst,
                              worst_db, max_err, cos))
    return rows


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows: dicts; columns: (key, header, format spec). A plain aligned text table."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([format(r[k], spec) if spec else str(r[k]) for k, _, spec in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if not columns[i][2] else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
