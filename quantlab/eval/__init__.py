"""Measurement: error metrics for tensor pairs, and model-level errors (KL, per-layer)."""

from quantlab.eval.lm import capture_linear_io, layer_errors, next_token_kl, next_token_logprobs
from quantlab.eval.metrics import (
    cosine_similarity,
    error_histogram,
    error_report,
    max_abs_error,
    mse,
    sqnr_db,
)

__all__ = ["mse", "sqnr_db", "max_abs_error", "cosine_similarity", "error_histogram",
           "error_report", "next_token_kl", "next_token_logprobs", "layer_errors",
           "capture_linear_io"]
