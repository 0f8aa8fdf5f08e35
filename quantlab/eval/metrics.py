"""Error metrics between a reference tensor and its approximation. All computed in float64."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _pair(ref: Tensor, approx: Tensor) -> tuple[Tensor, Tensor]:
    if ref.shape != approx.shape:
        raise ValueError(f"shapes differ: ref {tuple(ref.shape)} vs approx {tuple(approx.shape)}")
    if ref.numel() == 0:
        raise ValueError("empty tensors: no error to measure")
    return ref.detach().double(), approx.detach().double()


def mse(ref: Tensor, approx: Tensor) -> float:
    """Mean squared error, in the tensors' units squared."""
    r, a = _pair(ref, approx)
    return float(((r - a) ** 2).mean())


def sqnr_db(ref: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(sum ref^2 / sum (ref - approx)^2), in dB.
    inf when the approximation is exact; -inf when ref is all zeros but approx is not."""
    r, a = _pair(ref, approx)
    noise = float(((r - a) ** 2).sum())
    signal = float((r**2).sum())
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def max_abs_error(ref: Tensor, approx: Tensor) -> float:
    r, a = _pair(ref, approx)
    return float((r - a).abs().max())


def cosine_similarity(ref: Tensor, approx: Tensor) -> float:
    """Cosine of the angle between the flattened tensors; 1.0 if both are all zeros."""
    r, a = _pair(ref, approx)
    nr, na = float(r.norm()), float(a.norm())
    if nr == 0 and na == 0:
        return 1.0
    if nr == 0 or na == 0:
        return 0.0
    return float((r.flatten() @ a.flatten()) / (nr * na))


def error_histogram(ref: Tensor, approx: Tensor, bins: int = 101,
                    relative: bool = False) -> tuple[Tensor, Tensor]:
    """Histogram of approx - ref (or (approx - ref) / max|ref| if relative).
    Returns (counts (bins,) int64, edges (bins + 1,) float64), symmetric around zero."""
    r, a = _pair(ref, approx)
    err = a - r
    if relative:
        err = err / max(float(r.abs().max()), 1e-300)
    lim = float(err.abs().max()) or 1.0
    counts = torch.histc(err, bins=bins, min=-lim, max=lim).to(torch.int64)
    edges = torch.linspace(-lim, lim, bins + 1, dtype=torch.float64)
    return counts, edges


def error_report(ref: Tensor, approx: Tensor) -> dict[str, float]:
    """All scalar metrics in one dict: mse, sqnr_db, max_abs_error, cosine."""
    return {"mse": mse(ref, approx), "sqnr_db": sqnr_db(ref, approx),
            "max_abs_error": max_abs_error(ref, approx),
            "cosine": cosine_similarity(ref, approx)}
