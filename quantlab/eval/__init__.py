"""Measurement: error metrics for tensor pairs (and, as they land, perplexity and throughput)."""

from quantlab.eval.metrics import (
    cosine_similarity, error_histogram, error_report, max_abs_error, mse, sqnr_db,
)

__all__ = ["mse", "sqnr_db", "max_abs_error", "cosine_similarity", "error_histogram",
           "error_report"]
