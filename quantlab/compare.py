"""The main job: quantize a causal LM with each scheme (and algorithm), measure what it costs.

One row per (scheme, algorithm): bits per weight, model size, held-out perplexity and its change
from the unquantized model, next-token KL divergence, and the worst layer by output error.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

from torch import nn

from quantlab.algorithms.calibration import rtn
from quantlab.eval.lm import layer_errors, mean_nll, next_token_kl, token_windows
from quantlab.nn import bits_per_weight, model_size_bytes
from quantlab.schemes import Scheme, get_scheme


@dataclass
class CompareRow:
    scheme: str
    algorithm: str
    bits_per_weight: float  # over the quantized linear layers, scales included
    size_mib: float  # whole model: quantized layers + everything else in bf16
    perplexity: float
    delta_ppl: float  # perplexity - unquantized perplexity
    kl: float  # mean KL(P_ref || P_quant) per token, nats
    worst_layer: str
    worst_output_sqnr_db: float
    seconds: float
    layers: list[dict] = field(default_factory=list, repr=False)


def _algorithms() -> dict:
    from quantlab.algorithms import ALGORITHMS as CALIBRATED

    return {"rtn": rtn, **CALIBRATED}


ALGORITHMS = _algorithms()
# Algorithms that leave every float weight as it was: their per-layer error can be measured
# against the unquantized model's layers. AWQ, SmoothQuant and rotation rescale or rotate the float
# weights first, so a layer-by-layer comparison with the original model means nothing.
SAME_FLOAT_WEIGHTS = ("rtn", "gptq")


def compare(model: nn.Module, tokenizer, eval_text: str, calib_text: str,
            schemes: list[str | Scheme], algorithms: list[str] = ("rtn",), seq_len: int = 256,
            eval_tokens: int = 8192, calib_tokens: int = 1024, kl_tokens: int = 2048,
            log=print) -> tuple[dict, list[CompareRow]]:
    """Run every (scheme, algorithm) on a copy of `model`. Returns (baseline dict, rows).
    schemes: preset names or Scheme objects (the CLI passes them resolved)."""
    for a in algorithms:
        if a not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {a!r}; known: {', '.join(ALGORITHMS)}")
    resolved = [get_scheme(s) for s in schemes]
    windows = token_windows(tokenizer, eval_text, seq_len, eval_tokens)
    calib = token_windows(tokenizer, calib_text, seq_len, calib_tokens)
    kl_windows = windows[: max(1, kl_tokens // seq_len)]
    base_ppl = math.exp(mean_nll(model, windows))
    n_params = sum(p.numel() for p in model.parameters())
    baseline = {"perplexity": base_ppl, "size_mib": n_params * 2 / 2**20,
                "eval_tokens": windows.numel(), "seq_len": seq_len}
    rows = []
    for scheme in resolved:
        for algo in algorithms:
            t0 = time.perf_counter()
            qmodel = ALGORITHMS[algo](copy.deepcopy(model), scheme, calib)
            ppl = math.exp(mean_nll(qmodel, windows))
            kl = next_token_kl(model, qmodel, kl_windows)
            layers = layer_errors(model, qmodel, calib[:2]) if algo in SAME_FLOAT_WEIGHTS else []
            worst = min(layers, key=lambda r: r["output_sqnr_db"]) if layers else \
                {"layer": "n/a (weights transformed)", "output_sqnr_db": math.nan}
            row = CompareRow(scheme.name, algo, bits_per_weight(qmodel),
                             model_size_bytes(qmodel) / 2**20,
                             ppl, ppl - base_ppl, kl, worst["layer"], worst["output_sqnr_db"],
                             time.perf_counter() - t0, layers)
            rows.append(row)
            if log:
                log(f"  {scheme.name:<14} {algo:<6} ppl {ppl:8.3f}  ({row.seconds:.1f} s)")
    return baseline, rows
