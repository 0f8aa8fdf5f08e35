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


# --- layer by layer: a model that does not fit in memory -----------------------------------------

SEQUENTIAL_ALGORITHMS = ("rtn", "gptq")


def _fits_in_memory(model_dir, device: str) -> bool:
    """Whether the in-memory compare (the float32 model plus one quantized copy, about 8 bytes
    per parameter, and the activations) fits in half the available memory: RAM, or the GPU's
    when device is cuda (quantlab.sequential builds the parameter count from config.json)."""
    from quantlab.sequential import skeleton

    need = 8 * sum(p.numel() for p in skeleton(model_dir).parameters())
    if str(device).startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info()
        return need < free / 2
    with open("/proc/meminfo") as f:  # Linux; elsewhere, assume it fits
        info = dict(line.split(":", 1) for line in f)
    avail = int(info.get("MemAvailable", "0 kB").split()[0]) * 1024
    return need < avail / 2 if avail else True


def choose_pipeline(pipeline: str, model: str | None, device: str) -> str:
    """--pipeline auto -> "sequential" for a local model directory whose float32 copies would
    not fit comfortably in memory, else "in-memory" (the embedded model, a hub id)."""
    from pathlib import Path

    if pipeline not in ("auto", "sequential", "in-memory"):
        raise ValueError(f"--pipeline {pipeline!r}: use auto, sequential or in-memory")
    if model is not None and not str(model).strip():  # Path('') is the working folder
        raise ValueError("the model name is empty: give a Hugging Face id or a local directory, "
                         "or leave --model out for the embedded model")
    if pipeline != "auto":
        return pipeline
    if model is None or not Path(model).is_dir():
        return "in-memory"
    return "in-memory" if _fits_in_memory(model, device) else "sequential"


def _run(layer: nn.Module, hidden, kwargs: dict, batch: int):
    """layer on hidden (B, T, d) in chunks of `batch` windows (bounded temporaries), kwargs
    tensors with a batch dimension sliced alongside."""
    import torch

    from quantlab.algorithms.calibration import run_layer

    B, outs = hidden.shape[0], []
    for i in range(0, B, batch):
        kw = {k: v[i:i + batch] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == B > 1
              else v for k, v in kwargs.items()}
        outs.append(run_layer(layer, hidden[i:i + batch], kw))
    return torch.cat(outs)


def _size_bits(module: nn.Module) -> tuple[int, int, int]:
    """(storage bits as model_size_bytes counts them, QuantLinear weight bits, their weight
    count) of a module: QuantLinears at their exact bits, other parameters at 16."""
    from quantlab.nn import QuantLinear

    bits = wbits = wnum = 0
    inside = set()
    for name, m in module.named_modules():
        if isinstance(m, QuantLinear):
            bits += m.storage_bits
            wbits += m.weight_bits
            wnum += m.weight_numel
            inside.update(f"{name}.{p}" if name else p for p, _ in m.named_parameters())
    bits += 16 * sum(p.numel() for n, p in module.named_parameters() if n not in inside)
    return bits, wbits, wnum


class _FirstRows:
    """An input hook's store: each linear's first `n` input rows (rows, K) in float32, over
    however many chunks they arrive in."""

    def __init__(self, n: int):
        self.n, self.rows = n, {}

    def add(self, name: str, x) -> None:
        import torch

        x = x.reshape(-1, x.shape[-1]).float()
        have = self.rows.get(name)
        if have is None:
            self.rows[name] = x[: self.n]
        elif len(have) < self.n:
            self.rows[name] = torch.cat([have, x[: self.n - len(have)]])


def _layer_error_rows(flayer: nn.Module, qlayer: nn.Module, prefix: str, xs: dict) -> list[dict]:
    """eval.lm.layer_errors for one decoder layer: xs {linear: the float model's inputs (rows,
    K) on the calibration windows it uses}."""
    from quantlab.eval.metrics import sqnr_db
    from quantlab.nn import QuantLinear

    rows = []
    for n, q in qlayer.named_modules():
        if not isinstance(q, QuantLinear):
            continue
        w = flayer.get_submodule(n).weight.detach().float()
        x = xs[n]
        y_ref = x @ w.T
        y = q.quantize_input(x) @ q.weight.float().T
        rel = float((y - y_ref).norm() / y_ref.norm().clamp(min=1e-30))
        rows.append({"layer": prefix + n, "weight_sqnr_db": sqnr_db(w, q.weight),
                     "output_rel_error": rel, "output_sqnr_db": sqnr_db(y_ref, y)})
    return rows


def compare_sequential(model_dir, tokenizer, eval_text: str, calib_text: str,
                       schemes: list[str | Scheme], algorithms: list[str] = ("rtn",),
                       seq_len: int = 256, eval_tokens: int = 8192, calib_tokens: int = 1024,
                       kl_tokens: int = 2048, device: str | None = None, batch_size: int = 8,
                       progress: bool | None = None, log=print) -> tuple[dict, list[CompareRow]]:
    """compare() one decoder layer at a time, for a safetensors checkpoint in model_dir that does
    not fit in memory: the embeddings run, then each decoder layer is read (float32, on device),
    run on the carried hidden states (B, T, d) of the reference and of every (scheme,
    algorithm), quantized per scheme (rtn: with static activation scales from the float
    stream; gptq: its Hessians from that scheme's own quantized stream, as algorithms.gptq),
    and released; the final norm and lm_head run last, over `batch_size` windows at a time.
    Memory: one layer in float32 (two while a copy is quantized) plus the hidden states of the
    eval and calibration tokens for the reference and each job. Returns what compare() does,
    the same numbers within float rounding (tests/test_streaming_eval.py)."""
    import torch
    from tqdm.auto import tqdm as _tqdm

    from quantlab.algorithms.calibration import check_calibration, input_hooks
    from quantlab.algorithms.gptq import gptq_layer
    from quantlab.eval.lm import _kl_terms
    from quantlab.io.stream import LazyCheckpoint
    from quantlab.sequential import (
        amax_hooks,
        checkpoint_names,
        default_device,
        first_hidden,
        layer_list,
        materialize,
        release,
        rtn_layer,
        skeleton,
        static_scales,
        targets,
    )

    for a in algorithms:
        if a not in SEQUENTIAL_ALGORITHMS:
            raise ValueError(f"algorithm {a!r} is not layer-sequential (compare --pipeline "
                             f"sequential runs {', '.join(SEQUENTIAL_ALGORITHMS)}); use "
                             "--pipeline in-memory for it")
    device = device or default_device()
    resolved = [get_scheme(s) for s in schemes]
    windows = token_windows(tokenizer, eval_text, seq_len, eval_tokens)
    calib = token_windows(tokenizer, calib_text, seq_len, calib_tokens)
    n_kl = max(1, kl_tokens // seq_len)
    if "gptq" in algorithms:
        check_calibration(calib)
    model = skeleton(model_dir)
    layers_name, layers = layer_list(model)
    ckpt = LazyCheckpoint(model_dir)
    checkpoint_names(model, ckpt, model_dir)
    ignore = ("lm_head",)
    jobs = []  # (scheme, algorithm, {linear: scheme})
    for scheme in resolved:
        quant, _ = targets(model, scheme, ignore)
        outer = [n for n in quant if not n.startswith(layers_name + ".")]
        if outer:
            raise ValueError(f"{outer} lie outside the decoder layers; compare quantizes only "
                             "the decoder layers' linears (lm_head is ignored)")
        jobs += [(scheme, algo, quant) for algo in algorithms]
    n_params = sum(p.numel() for p in model.parameters())
    inner_params = sum(p.numel() for p in layers.parameters())
    ids = torch.cat([windows, calib]).to(device)
    h, kwargs = first_hidden(model, ckpt, ids, torch.float32, device)
    ref, ref_calib = h[: len(windows)], h[len(windows):]
    del h
    streams = [ref.clone() for _ in jobs]  # each job's eval hidden states
    calib_streams = [ref_calib.clone() if algo == "gptq" else None for _, algo, _ in jobs]
    sizes = [[0, 0, 0] for _ in jobs]
    errors: list[list[dict]] = [[] for _ in jobs]
    t_job = [0.0] * len(jobs)
    bar = dict(disable=None if progress is None else not progress, dynamic_ncols=True)
    for i in _tqdm(range(len(layers)), desc="layers", unit="layer", **bar):
        prefix = f"{layers_name}.{i}."
        flayer = layers[i]
        materialize(flayer, prefix, ckpt, torch.float32, device)
        lins = {n: m for n, m in flayer.named_modules() if isinstance(m, nn.Linear)
                and prefix + n not in ignore}
        amax: dict = {}
        xs = _FirstRows(min(2, len(calib)) * seq_len)  # layer_errors' calib[:2]
        with amax_hooks(lins, amax), input_hooks(lins, xs.add):
            ref_calib = _run(flayer, ref_calib, kwargs, batch_size)
        ref = _run(flayer, ref, kwargs, batch_size)
        for j, (scheme, algo, quant) in enumerate(jobs):
            t0 = time.perf_counter()
            qlayer = copy.deepcopy(flayer)
            if algo == "gptq":
                gptq_layer(qlayer, prefix, calib_streams[j], kwargs, scheme, ignore, 0.1, 128,
                           False)
                calib_streams[j] = _run(qlayer, calib_streams[j], kwargs, batch_size)
            else:
                act = scheme.activations
                static = act is not None and not act.dynamic
                rtn_layer(qlayer, prefix, quant, static_scales(
                    {n: a for n, a in amax.items() if prefix + n in quant}, act) if static else {})
            streams[j] = _run(qlayer, streams[j], kwargs, batch_size)
            for k, v in enumerate(_size_bits(qlayer)):
                sizes[j][k] += v
            if algo in SAME_FLOAT_WEIGHTS:
                errors[j] += _layer_error_rows(flayer, qlayer, prefix, xs.rows)
            del qlayer
            t_job[j] += time.perf_counter() - t0
        release(layers, i)
    # the head: final norm and lm_head (float32, tied to the embeddings when the config says so)
    inner = model.get_submodule(layers_name.rpartition(".")[0])
    norm_prefix = next(n for n, m in model.named_modules() if m is inner.norm) + "."
    materialize(inner.norm, norm_prefix, ckpt, torch.float32, device)
    head = model.get_output_embeddings()
    head_name = next(n for n, m in model.named_modules() if m is head)
    src = f"{head_name}.weight"
    if src not in ckpt:  # tied: the embedding's tensor
        emb = model.get_input_embeddings()
        src = next(n for n, m in model.named_modules() if m is emb) + ".weight"
    head.load_state_dict({"weight": ckpt.load([src])[src].to(device).float()}, assign=True)
    vocab = head.out_features
    chunk = max(1, min(batch_size, 2**24 // (seq_len * vocab)))  # logits <= 64 MB a chunk
    targets_ = windows.to(device)
    nll = [0.0] * (len(jobs) + 1)
    kl = [0.0] * len(jobs)
    with torch.inference_mode():
        for s in range(0, len(windows), chunk):
            y = targets_[s:s + chunk, 1:].reshape(-1)

            def logprobs(h, s=s):
                lg = head(inner.norm(h[s:s + chunk])).float()
                return torch.log_softmax(lg, -1), lg

            lp_ref, lg = logprobs(ref)
            nll[0] += float(torch.nn.functional.cross_entropy(
                lg[:, :-1].reshape(-1, vocab), y, reduction="sum"))
            for j in range(len(jobs)):
                lp, lg = logprobs(streams[j])
                nll[j + 1] += float(torch.nn.functional.cross_entropy(
                    lg[:, :-1].reshape(-1, vocab), y, reduction="sum"))
                if s < n_kl:
                    keep = min(chunk, n_kl - s)
                    kl[j] += float(_kl_terms(lp_ref[:keep], lp[:keep]).sum())
    count = windows[:, 1:].numel()
    kl_count = windows[:n_kl].numel()
    base_ppl = math.exp(nll[0] / count)
    outer_params = n_params - inner_params
    baseline = {"perplexity": base_ppl, "size_mib": n_params * 2 / 2**20,
                "eval_tokens": windows.numel(), "seq_len": seq_len}
    rows = []
    for j, (scheme, algo, _) in enumerate(jobs):
        ppl = math.exp(nll[j + 1] / count)
        bits, wbits, wnum = sizes[j]
        layer_rows = errors[j]
        worst = min(layer_rows, key=lambda r: r["output_sqnr_db"]) if layer_rows else \
            {"layer": "n/a (weights transformed)", "output_sqnr_db": math.nan}
        rows.append(CompareRow(scheme.name, algo, wbits / wnum,
                               math.ceil((bits + 16 * outer_params) / 8) / 2**20, ppl,
                               ppl - base_ppl, kl[j] / kl_count, worst["layer"],
                               worst["output_sqnr_db"], t_job[j], layer_rows))
        if log:
            log(f"  {scheme.name:<14} {algo:<6} ppl {ppl:8.3f}  ({t_job[j]:.1f} s, layers)")
    return baseline, rows
