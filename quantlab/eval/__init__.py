"""Measurement: error metrics for tensor pairs (metrics.py) and language-model evaluation (lm.py:
token windows, NLL and perplexity, KL against a reference, per-layer error)."""

from quantlab.eval.lm import (
    LMScore,
    layer_errors,
    lm_metrics,
    mean_nll,
    metrics_from_logprobs,
    next_token_kl,
    next_token_logprobs,
    perplexity,
    score_text,
    token_kl,
    token_nll,
    token_windows,
    window_nll,
    window_scores,
)
from quantlab.eval.metrics import (
    cosine_similarity,
    error_histogram,
    error_report,
    max_abs_error,
    mse,
    sqnr_db,
)

__all__ = ["mse", "sqnr_db", "max_abs_error", "cosine_similarity", "error_histogram",
           "error_report", "token_windows", "mean_nll", "score_text", "perplexity", "LMScore",
           "next_token_logprobs", "next_token_kl", "token_kl", "token_nll", "window_nll",
           "window_scores", "metrics_from_logprobs", "lm_metrics", "layer_errors"]
