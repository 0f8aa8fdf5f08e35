"""Calibrated quantization algorithms for Llama-style causal LMs, each a readable version of its
paper: GPTQ (error-compensating rounding), AWQ (activation-aware scales), SmoothQuant (moving
activation outliers into weights, for W8A8) and Hadamard rotation (QuaRot, for W4A4).

The model-level entry points share one signature, `algorithm(model, scheme, calib) -> model`
(calib: (B, T) int64 calibration token ids), and quantize in place with QuantLinear layers:
    gptq, awq, smoothquant, quarot
The float transforms they build on keep the model's outputs and can be studied on their own:
    awq_scale_model, smooth_model, rotate_model, fuse_rmsnorms
"""

from quantlab.algorithms.awq import awq, awq_scale_model, search_clip, search_scales
from quantlab.algorithms.gptq import gptq, gptq_quantize
from quantlab.algorithms.rotation import (
    HadamardInput,
    fuse_rmsnorms,
    fwht,
    hadamard_matrix,
    hadamard_transform,
    paley_hadamard,
    quarot,
    random_hadamard,
    rotate_model,
)
from quantlab.algorithms.smoothquant import (
    migrate_scales,
    smooth_model,
    smoothing_scales,
    smoothquant,
)

ALGORITHMS = {"gptq": gptq, "awq": awq, "smoothquant": smoothquant, "quarot": quarot}

__all__ = ["ALGORITHMS", "gptq", "gptq_quantize", "awq", "awq_scale_model", "search_scales",
           "search_clip", "smoothquant", "smooth_model", "smoothing_scales", "migrate_scales",
           "quarot", "rotate_model", "fuse_rmsnorms", "HadamardInput", "fwht",
           "hadamard_transform", "hadamard_matrix", "paley_hadamard", "random_hadamard"]
