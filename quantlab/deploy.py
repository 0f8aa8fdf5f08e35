"""Choosing a format to ship on vLLM (chapter 10): accuracy costs measured on stdlib-llama, and a
recommender that picks a weight format and --kv-cache-dtype for a GPU, a model, a context, a
batch and an accuracy budget, and says why. The GPU, format and memory tables it draws on are
quantlab.serving; quantlab.viz.deploy draws its choices.

    >>> from quantlab.deploy import recommend
    >>> r = recommend("H100", "Llama-3-8B", context_len=8192, batch=32, accuracy_budget=1.0,
    ...               costs={"fp8_dynamic": 0.03, "w4a16": 2.1})
    >>> r.weight_format, r.kv_cache_dtype
    ('fp8_dynamic', 'auto')

Bracketed tags ([auto], [kv]) point to the vLLM sources listed in quantlab.serving's docstring;
one more:
[marlin] IST-DASLab/marlin README: near-ideal 4x speedups "up to batchsizes of 16-32 tokens".
Rules of thumb (not measurements) are marked as such where they are used.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from quantlab.serving import (
    FORMATS,
    GB,
    GPU,
    GPUS,
    ModelShape,
    fit,
    get_gpu,
    get_model,
    serving_path,
    weight_bytes,
)

# ---------------------------------------------------------------------------- accuracy costs

NOISE_PCT = 0.25  # perplexity changes below this are noise at 2048 eval tokens. Measured (RTN,
# stdlib-llama) over ATEN_CPU_CAPABILITY default/avx2/avx512 x 1-2 threads x torch 2.11/2.13:
# fp8_dynamic +0.02% to +0.12%, int8_w8a8 -0.05% to +0.05%, the same format on the same weights;
# scripts/check_spread.py reruns it.


def measure_costs(schemes=FORMATS[1:], eval_tokens: int = 2048, calib_tokens: int = 256,
                  log=None) -> dict:
    """Round to nearest on the embedded stdlib-llama, measured as quantlab.compare measures it
    (256-token windows, KL on the first). Returns {baseline perplexity, eval_tokens,
    rows: {scheme: {bits_per_weight, perplexity, ppl_increase_pct, kl}}}."""
    from quantlab import models
    from quantlab.algorithms.calibration import rtn
    from quantlab.eval.lm import mean_nll, next_token_kl, token_windows
    from quantlab.nn import bits_per_weight
    from quantlab.schemes import get_scheme

    model, tok = models.load_causal_lm()
    windows = token_windows(tok, models.eval_text(), 256, eval_tokens)
    calib = token_windows(tok, models.calib_text(), 256, calib_tokens)
    p = math.exp(mean_nll(model, windows))
    rows = {}
    for scheme in [get_scheme(s) for s in schemes]:
        q = rtn(copy.deepcopy(model), scheme, calib)
        ppl = math.exp(mean_nll(q, windows))
        rows[scheme.name] = {"bits_per_weight": bits_per_weight(q), "perplexity": ppl,
                             "ppl_increase_pct": 100 * (ppl - p) / p,
                             "kl": next_token_kl(model, q, windows[:1])}
        if log:
            log(f"  {scheme.name:<14} ppl {ppl:8.3f}")
    return {"perplexity": p, "eval_tokens": windows.numel(), "rows": rows}


def kv_costs(path: str | Path | None = None) -> dict[str, float]:
    """Perplexity increase (%) per --kv-cache-dtype from the committed KV measurement
    (data/bench/kv-accuracy-stdlib-llama.json; fp8 = static calibrated per-layer E4M3 scales)."""
    from quantlab.models import data_dir

    path = Path(path) if path else data_dir() / "bench" / "kv-accuracy-stdlib-llama.json"
    rows = {r["codec"]: r for r in json.loads(path.read_text())["codecs"]}
    base = rows["bf16"]["perplexity"]
    return {"auto": 0.0, "fp8": 100 * rows["fp8_e4m3"]["perplexity_delta"] / base}


def effective_cost(pct: float) -> float:
    """A measured perplexity increase (%), with changes inside the noise counted as 0."""
    return 0.0 if abs(pct) < NOISE_PCT else pct


# ------------------------------------------------------------------------------ recommending

MEMORY_BOUND_BATCH = 32  # [marlin]: weight-only 4-bit keeps its speedup up to batch 16-32


@dataclass
class Recommendation:
    """weight_format / kv_cache_dtype: None when nothing fits. memory: fit() of the choice.
    cost_pct: weight + KV perplexity increase (added: a rule of thumb). options: one row per
    format with why it was or was not chosen."""

    gpu: str
    model: str
    context_len: int
    batch: int
    accuracy_budget: float
    weight_format: str | None
    kv_cache_dtype: str | None
    memory: dict
    cost_pct: float
    command: str
    reasons: list[str] = field(default_factory=list)
    options: list[dict] = field(default_factory=list)


def preference(gpu: str | GPU, batch: int, costs: dict[str, float] | None = None) -> list[str]:
    """Formats in the order we try them (rule of thumb): native low-bit compute first (NVFP4 W4A4,
    Blackwell only); then, at small batch (decode reads every weight per step: memory-bound) 4-bit
    weights before 8-bit, at large batch (compute-bound) W8A8 before weight-only; bf16 last.
    Within a tier, the lower measured cost (costs: {format: %}) comes first."""
    g = get_gpu(gpu)
    w8 = ["fp8_dynamic", "int8_w8a8"] if g.fp8 else ["int8_w8a8", "fp8_dynamic"]
    w4 = ["nvfp4_a16", "w4a16"]
    if costs:  # stable: equal costs keep the order above
        w8, w4 = (sorted(t, key=lambda f: effective_cost(costs.get(f, math.inf)))
                  for t in (w8, w4))
    mid = w4 + w8 if batch <= MEMORY_BOUND_BATCH else w8 + w4
    return ["nvfp4"] + mid + ["bf16"]  # recommend() skips nvfp4 (W4A4) without FP4 cores


def _check(context_len: int, batch: int, accuracy_budget: float, gpu_util: float) -> None:
    for name, v in (("context_len", context_len), ("batch", batch)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer (tokens / sequences)")
    if isinstance(accuracy_budget, bool) or not (isinstance(accuracy_budget, int | float)
                                                 and 0 <= accuracy_budget < math.inf):
        raise ValueError(f"accuracy_budget={accuracy_budget!r}: give the perplexity increase "
                         "you accept, in percent (e.g. 1.0), >= 0")
    if not 0 < gpu_util <= 1:
        raise ValueError(f"gpu_util={gpu_util} must be in (0, 1] (vLLM's default is 0.9)")


def serve_command(fmt: str | None, kv: str | None, context_len: int, batch: int) -> str:
    """The export and serve lines for a choice ([auto]: no --quantization for our exports)."""
    if fmt is None:
        return "(nothing fits: see the reasons)"
    serve = "vllm serve ./model" if fmt == "bf16" else \
        f"quantlab export --scheme {fmt} --out ./model-{fmt}\nvllm serve ./model-{fmt}"
    extra = "" if kv == "auto" else f" --kv-cache-dtype {kv}"
    return f"{serve}{extra} --max-model-len {context_len} --max-num-seqs {batch}"


def recommend(gpu: str | GPU, model: str | ModelShape, context_len: int, batch: int = 1,
              accuracy_budget: float = 1.0, *, costs: dict[str, float],
              kv: dict[str, float] | None = None, gpu_util: float = 0.9) -> Recommendation:
    """Weight format and --kv-cache-dtype for one GPU, a model, batch sequences of context_len
    tokens and an accuracy budget (perplexity increase in %, on our stdlib-llama proxy).
    costs: {format: measured perplexity increase %} (measure_costs); formats missing from it
    are skipped. kv: {kv dtype: %} (default kv_costs(): the committed KV measurement)."""
    g, m = get_gpu(gpu), get_model(model)
    _check(context_len, batch, accuracy_budget, gpu_util)
    kv = kv_costs() if kv is None else kv
    costs = {"bf16": 0.0, **costs}
    regime = "memory-bound: fewer weight bytes first" if batch <= MEMORY_BOUND_BATCH else \
        "compute-bound: W8A8 tensor-core formats first"
    reasons = [f"{g.name} ({g.arch}, sm{g.sm}, {g.memory_gb:g} GB): tensor cores take "
               f"{g.tensor_formats}.",
               f"batch {batch} ({regime}; rule of thumb: Marlin keeps its 4-bit speedup up to "
               f"batch {MEMORY_BOUND_BATCH}).",
               "Accuracy costs: perplexity increase on the 6.8M-parameter stdlib-llama, weights "
               "and KV added; a rule of thumb says larger models lose less to the same format, "
               "so read them as a ranking."]
    options, choice = [], None
    for fmt in preference(g, batch, costs):
        path = serving_path(fmt, g)
        row = {"format": fmt, "compute": path.compute, "weights GB": weight_bytes(m, fmt)["total"]
               / GB, "cost %": costs.get(fmt, math.nan), "status": ""}
        options.append(row)
        if not path.ok:
            row["status"] = f"not served: {path.note}"
            continue
        if fmt == "nvfp4" and not g.fp4:
            row["status"] = "no FP4 tensor cores: served weight-only, so export nvfp4_a16"
            continue
        if fmt not in costs:
            row["status"] = "no accuracy measurement given"
            continue
        cw = effective_cost(costs[fmt])
        if cw > accuracy_budget:
            row["status"] = f"costs {costs[fmt]:.2f}% > budget {accuracy_budget:g}%"
            continue
        fits = {kvd: fit(g, m, fmt, kvd, context_len, batch, gpu_util) for kvd in ("auto", "fp8")}
        allowed = [k for k in fits if cw + effective_cost(kv[k]) <= accuracy_budget]  # auto always
        ok = [k for k in allowed if fits[k]["fits"]]
        if not ok:
            f = fits[allowed[-1]]
            row["status"] = (f"does not fit: {f['weights_gb']:.1f} GB weights + "
                             f"{f['kv_gb']:.1f} GB KV ({allowed[-1]}) > {f['budget_gb']:.1f} GB")
            continue
        row["status"] = f"chosen, --kv-cache-dtype {ok[0]}" if choice is None else "fits"
        if choice is None:
            choice = (fmt, ok[0], fits[ok[0]], cw + effective_cost(kv[ok[0]]))
    if choice is None:
        reasons.append(_nothing_fits(g, m, context_len, batch, accuracy_budget, costs, kv,
                                     gpu_util))
        return Recommendation(g.name, m.name, context_len, batch, accuracy_budget, None, None,
                              {}, math.nan, serve_command(None, None, 0, 0), reasons, options)
    fmt, kvd, f, cost = choice
    reasons += _why(g, m, fmt, kvd, f, cost, costs, kv, context_len, batch, accuracy_budget,
                    gpu_util)
    return Recommendation(g.name, m.name, context_len, batch, accuracy_budget, fmt, kvd, f, cost,
                          serve_command(fmt, kvd, context_len, batch), reasons, options)


def _why(g, m, fmt, kvd, f, cost, costs, kv, context_len, batch, budget, gpu_util) -> list[str]:
    p = serving_path(fmt, g)
    out = [f"Weights: {fmt} ({p.compute}), {f['weights_gb']:.1f} GB; measured cost "
           f"{costs[fmt]:+.2f}%" + (f" (inside the ±{NOISE_PCT}% noise)"
                                     if effective_cost(costs[fmt]) == 0 and fmt != "bf16" else "")
           + f". {p.note}."]
    kv_line = (f"KV cache: {kvd}, {f['kv_gb']:.1f} GB for {batch} x {context_len} tokens; "
               f"{f['free_gb']:.1f} GB of the {f['budget_gb']:.1f} GB budget "
               f"({gpu_util:g} x memory) left; up to {f['max_context']:,} tokens per sequence "
               "at this batch.")
    if kvd == "auto":
        alt = fit(g, m, fmt, "fp8", context_len, batch, gpu_util)
        kv_line += (f" fp8 would allow {alt['max_context']:,} at a measured "
                    f"{kv['fp8']:.2f}% (static calibrated scales).")
    else:
        auto = fit(g, m, fmt, "auto", context_len, batch, gpu_util)
        kv_line += (f" bf16 KV ({auto['kv_gb']:.1f} GB) does not fit; fp8 halves it at a "
                    f"measured {kv['fp8']:.2f}% with scales calibrated per layer: calibrate "
                    "them (llm-compressor), vLLM's uncalibrated default scale is 1.0.")
        if context_len > 8192:
            kv_line += (" Our KV measurement used 512-token windows; fp8 KV accuracy at long "
                        "context is reported to vary (vllm-project/vllm#23813): check it.")
    out.append(kv_line)
    out.append(f"Total cost {cost:.2f}% <= budget {budget:g}%. vLLM also keeps activation "
               "memory (profiled at startup): leave a few GB of headroom.")
    return out


def _nothing_fits(g, m, context_len, batch, budget, costs, kv, gpu_util) -> str:
    ok = [f for f in preference(g, batch, costs) if serving_path(f, g).ok and f in costs
          and effective_cost(costs[f]) <= budget and not (f == "nvfp4" and not g.fp4)]
    if not ok:
        return f"No format is within the {budget:g}% budget."
    best = max(((f, kvd, fit(g, m, f, kvd, context_len, batch, gpu_util)) for f in ok
                for kvd in ("auto", "fp8")
                if effective_cost(costs[f]) + effective_cost(kv[kvd]) <= budget),
               key=lambda t: (t[2]["max_batch"], -t[2]["weights_gb"]))
    f, kvd, r = best
    if r["max_batch"] == 0:
        return (f"Nothing fits one {g.name} within the {budget:g}% budget: the most compact "
                f"format within it, {f}, needs {r['weights_gb']:.1f} GB for its weights alone, "
                f"more than the {r['budget_gb']:.1f} GB budget. Shard with "
                "--tensor-parallel-size 2 or more, or loosen the budget.")
    return (f"Nothing fits one {g.name} within the {budget:g}% budget. Closest: {f} with {kvd} "
            f"KV holds {r['max_batch']} sequences of {context_len} tokens: lower "
            "--max-num-seqs or --max-model-len, shard with --tensor-parallel-size, or loosen "
            "the budget.")


def recommendation_grid(model, contexts, budget, costs, batch=1, gpus=None) -> list[dict]:
    """recommend() for every GPU x context: rows {gpu, context, format, kv} ('none', '-' when
    nothing fits)."""
    rows, kv = [], kv_costs()
    for g in gpus or list(GPUS):
        for c in contexts:
            r = recommend(g, model, c, batch, budget, costs=costs, kv=kv)
            rows.append({"gpu": g, "context": c, "format": r.weight_format or "none",
                         "kv": r.kv_cache_dtype or "-"})
    return rows
