"""Outliers (chapter 3): where activation and weight outliers sit in real models, why they make
W8A8 hard, and the two fixes that move them out of the way: SmoothQuant and rotation.

W8A8 quantizes both operands of y = x W^T to int8: weights per output channel (one scale per row
of W), activations per token (one scale per row of x, computed on the fly). A value 10-30x larger
than the rest of its token (an outlier channel, or a "massive activation" such as MiniLM's
channel 99 on [CLS]) sets that token's scale, so its other channels get a handful of int8
levels. Two exact rewrites of x W^T fix that:
- SmoothQuant: (x / s)(W s)^T with s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha), per channel;
- rotation: (x H)(W H)^T with H an orthonormal Hadamard matrix, which spreads each outlier over
  every channel.
For a pre-norm Llama, quantlab.algorithms folds both into the weights (smoothquant, quarot). A
post-norm BERT such as MiniLM feeds the same LayerNorm output to the next linear and to the
residual, so here the input transform runs in front of each linear instead (`ScaledInput`,
`HadamardInput`): the same arithmetic, applied online. The chapter's figures are in
quantlab.viz.outliers.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import Tensor, nn

from quantlab.algorithms.rotation import HadamardInput, hadamard_transform
from quantlab.algorithms.smoothquant import migrate_scales, smoothing_scales
from quantlab.eval.metrics import sqnr_db
from quantlab.nn import quantize_model
from quantlab.quantize import fake_quantize, quantize
from quantlab.schemes import Scheme, TensorScheme, get_scheme

PER_TOKEN_INT8 = TensorScheme("int8", "token")  # W8A8's activations: one scale per row of x
PER_CHANNEL_INT8 = TensorScheme("int8", "channel")  # W8A8's weights: one scale per row of W

# Sentences for MiniLM: the first set calibrates (SmoothQuant's max|x_j|), the second evaluates.
CALIB_SENTENCES = (
    "The cat sat quietly on the warm windowsill.",
    "Interest rates rose again this quarter, surprising most analysts.",
    "She plays the violin in a small community orchestra.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "The train to Berlin was delayed by two hours because of snow.",
    "He forgot his umbrella and got soaked on the way home.",
    "Quantization stores each weight of a network in fewer bits.",
    "A good night's sleep helps the brain consolidate memories.",
    "The committee postponed its decision until next spring.",
    "Fresh bread smells wonderful early in the morning.",
    "Volcanic eruptions can reshape an island within days.",
    "My phone battery dies before lunch every single day.",
)
EVAL_SENTENCES = (
    "A kitten is sleeping on a sunny ledge.",
    "The central bank raised borrowing costs for the third time this year.",
    "Our local choir is looking for new tenors.",
    "Plants convert light energy into chemical energy.",
    "Heavy snowfall caused long delays on the railway.",
    "Without an umbrella, she was drenched by the storm.",
    "Storing numbers with fewer bits makes models smaller and faster.",
    "Lack of sleep makes it harder to remember things.",
    "The board will vote on the merger next month.",
    "The bakery on the corner sells croissants until noon.",
    "Lava flows destroyed several roads near the summit.",
    "I need a charger that works with my old laptop.",
)


# --- finding outliers --------------------------------------------------------------------------


@torch.no_grad()
def linear_inputs(model: nn.Module, batch: dict,
                  skip: tuple[str, ...] = ("pooler", "lm_head")) -> dict[str, Tensor]:
    """Run model(**batch) once; every nn.Linear's input as (tokens, K) float32, keyed by the
    layer's name (names containing a `skip` string are left out). Rows where
    batch["attention_mask"] (B, T) is 0 (padding) are dropped, so with a mask every recorded
    linear must read (B, T, K) inputs. Linears that read the same tensor (query/key/value) share
    one stored tensor."""
    mask = batch.get("attention_mask")
    keep = mask.reshape(-1).bool() if mask is not None else None
    seen: dict[str, Tensor] = {}
    by_id: dict[int, tuple[Tensor, Tensor]] = {}  # holds x too, so that its id is not reused

    def grab(name: str, x: Tensor) -> None:
        if id(x) not in by_id:
            rows = x.detach().reshape(-1, x.shape[-1]).float()
            by_id[id(x)] = (x, rows[keep] if keep is not None else rows)
        seen[name] = by_id[id(x)][1]

    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not any(s in n for s in skip)}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: grab(n, args[0]))
               for n, m in linears.items()]
    try:
        model(**batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def distinct_inputs(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """inputs from linear_inputs, keeping the first layer of each group that reads the same
    tensor (query for query/key/value, gate_proj for gate/up)."""
    out, ids = {}, set()
    for name, x in inputs.items():
        if id(x) not in ids:
            ids.add(id(x))
            out[name] = x
    return out


def channel_absmax(x: Tensor) -> Tensor:
    """x: (tokens, K) -> (K,) float32: each channel's largest magnitude over the tokens."""
    return x.detach().abs().amax(0).float()


def outlier_channels(amax: Tensor, ratio: float = 6.0) -> Tensor:
    """amax: (K,) per-channel absmax. The channels whose absmax exceeds `ratio` times the median
    channel's, as int64 indices sorted by decreasing absmax."""
    idx = torch.nonzero(amax > ratio * amax.median()).flatten()
    return idx[amax[idx].argsort(descending=True)]


def kurtosis(x: Tensor) -> float:
    """E[(x - mean)^4] / std^4 over all elements: 3 for a Gaussian, 1.8 for a uniform, in the
    hundreds when a few values are far larger than the rest."""
    x = x.detach().double().flatten()
    z = (x - x.mean()) / x.std(unbiased=False)
    return float((z**4).mean())


def layer_map(tensors: dict[str, Tensor], suffix: str) -> Tensor:
    """tensors: name -> (rows, K) (linear inputs, or weights (N, K)). The channel absmax of
    every `<prefix>.<layer index>.<suffix>` name, stacked in name order: (layers, K) float32.
    ("output.dense" picks BERT's FFN out, not "attention.output.dense".)"""
    pat = re.compile(r"\.\d+\." + re.escape(suffix) + "$")
    maps = [channel_absmax(t) for n, t in tensors.items() if pat.search(n)]
    if not maps:
        raise ValueError(f"no name ends with .<layer index>.{suffix}; the names look like "
                         f"{next(iter(tensors), '(none)')!r}")
    return torch.stack(maps)


def outlier_rows(inputs: dict[str, Tensor], ratio: float = 6.0) -> list[dict]:
    """One row per distinct linear input: median and largest channel absmax, their ratio, the
    largest channel, how many channels exceed `ratio` x the median, and the kurtosis."""
    rows = []
    for name, x in distinct_inputs(inputs).items():
        amax = channel_absmax(x)
        med = float(amax.median())
        rows.append({"input of": name, "K": x.shape[1], "median absmax": med,
                     "max absmax": float(amax.max()), "ratio": float(amax.max()) / med,
                     "top channel": int(amax.argmax()),
                     "outlier channels": len(outlier_channels(amax, ratio)),
                     "kurtosis": kurtosis(x)})
    return rows


def worst_per_kind(rows: list[dict]) -> list[dict]:
    """rows from outlier_rows -> one row per kind of input (the layer index in the name
    replaced by N): the row with the largest ratio, and the largest kurtosis over the layers."""
    kinds: dict[str, list[dict]] = {}
    for r in rows:
        kinds.setdefault(re.sub(r"\.\d+\.", ".N.", r["input of"]), []).append(r)
    out = []
    for kind, rs in kinds.items():
        w = max(rs, key=lambda r: r["ratio"])
        layer = re.search(r"\.(\d+)\.", w["input of"])
        out.append({"input of": kind, "worst ratio": w["ratio"],
                    "in layer": int(layer.group(1)) if layer else None,
                    "channel": w["top channel"], "max absmax": w["max absmax"],
                    "max kurtosis": max(r["kurtosis"] for r in rs)})
    return out


def weight_rows(model: nn.Module, names: list[str]) -> list[dict]:
    """Per named nn.Linear: its largest input column (max |W[:, j]|) over the median column,
    which column, the kurtosis of all weights, and the SQNR (dB) of W8A8's per-output-channel
    int8 weights."""
    rows = []
    for name in names:
        w = model.get_submodule(name).weight.detach().float()  # (N, K)
        col = channel_absmax(w)
        rows.append({"weight": name, "column ratio": float(col.max() / col.median()),
                     "top column": int(col.argmax()), "kurtosis": kurtosis(w),
                     "int8 per-channel SQNR dB": sqnr_db(w, fake_quantize(w, PER_CHANNEL_INT8))})
    return rows


def real_tokens(tokenizer, batch: dict) -> list[str]:
    """The token strings of batch's non-padding positions, in the row order of linear_inputs."""
    ids = batch["input_ids"].reshape(-1)
    if "attention_mask" in batch:
        ids = ids[batch["attention_mask"].reshape(-1).bool()]
    return tokenizer.convert_ids_to_tokens(ids.tolist())


# --- why per-token int8 suffers ----------------------------------------------------------------


def token_codes(x: Tensor, scheme: TensorScheme = PER_TOKEN_INT8) -> Tensor:
    """x: (tokens, K) -> the integer codes (tokens, K) float32 that the quantizer stores."""
    return quantize(x, scheme).codes.float()


def inlier_reach(x: Tensor, channels: Tensor, qmax: int = 127) -> Tensor:
    """x: (tokens, K); channels: outlier indices. Per token (tokens,): the largest code the
    other channels reach under a per-token absmax scale (qmax when the outliers are not the
    token's largest values; small when they set the scale)."""
    rest = torch.ones(x.shape[1], dtype=torch.bool)
    rest[channels] = False
    return x[:, rest].abs().amax(1) / x.abs().amax(1) * qmax


def inlier_sqnr_rows(x: Tensor, channels: Tensor, schemes: dict[str, TensorScheme],
                     tokens: dict[str, Tensor]) -> list[dict]:
    """x: (tokens, K); channels: outlier indices; tokens: label -> bool mask (tokens,) of a
    group of tokens. For each scheme, two rows: the SQNR (dB) of the non-outlier channels in
    each token group when the outliers share their scales, and when the outliers are taken out
    first (kept in 16 bits, as LLM.int8() does), so the scales fit the other channels alone."""
    rest = torch.ones(x.shape[1], dtype=torch.bool)
    rest[channels] = False
    inl = x[:, rest].contiguous()
    rows = []
    for label, scheme in schemes.items():
        for outl, xq in (("share the scale", fake_quantize(x, scheme)[:, rest]),
                         ("kept in 16 bits", fake_quantize(inl, scheme))):
            rows.append({"activations": label, "outlier channels": outl,
                         **{f"SQNR dB, {g}": sqnr_db(inl[m], xq[m]) for g, m in tokens.items()}})
    return rows


# --- SmoothQuant and rotation on one layer -----------------------------------------------------


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: SmoothQuant's migration strength lies in [0, 1] "
                         "(0.5 is the paper's default; 1 moves all the spread into the weights)")


def smooth(x: Tensor, w: Tensor, alpha: float | None) -> tuple[Tensor, Tensor]:
    """x: (tokens, K), w: (N, K) -> (x / s, w * s) with SmoothQuant's s (K,) for this alpha
    (alpha=None: s = 1, no smoothing). The product (x / s)(w s)^T equals x w^T."""
    if alpha is None:
        return x, w
    _check_alpha(alpha)
    s = smoothing_scales(channel_absmax(x), [w], alpha)
    return x / s, w * s


def rotate(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """x: (tokens, K), w: (N, K) -> (x H, w H) with H the orthonormal (K, K) Hadamard matrix
    (quantlab.algorithms.hadamard_transform); (x H)(w H)^T equals x w^T."""
    return (hadamard_transform(x.double()).float(), hadamard_transform(w.double()).float())


def w8a8_errors(x: Tensor, w: Tensor) -> dict:
    """SQNR (dB) of W8A8 on one layer: activations (per-token int8), weights (per-channel int8)
    and the layer's output Q(x) Q(w)^T against x w^T."""
    xq, wq = fake_quantize(x, PER_TOKEN_INT8), fake_quantize(w, PER_CHANNEL_INT8)
    return {"activation SQNR dB": sqnr_db(x, xq), "weight SQNR dB": sqnr_db(w, wq),
            "output SQNR dB": sqnr_db(x @ w.T, xq @ wq.T)}


def alpha_sweep(x: Tensor, w: Tensor, alphas: tuple[float, ...]) -> list[dict]:
    """x: (tokens, K), w: (N, K). One row per alpha (first a row with alpha None: no smoothing):
    w8a8_errors of the smoothed pair, and the per-channel absmax (K,) of x / s and of w * s."""
    rows = []
    for alpha in (None, *alphas):
        xs, ws = smooth(x, w, alpha)
        rows.append({"alpha": alpha, **w8a8_errors(xs, ws), "x_amax": channel_absmax(xs),
                     "w_amax": channel_absmax(ws)})
    return rows


# --- whole models ------------------------------------------------------------------------------


class ScaledInput(nn.Module):
    """y = linear(x / s): SmoothQuant's division applied in front of a linear whose weight
    columns were multiplied by s (K,). The wrapped layer is `.linear`."""

    def __init__(self, linear: nn.Linear, s: Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("inv_s", (1 / s).float())

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x * self.inv_s)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def smooth_linears(model: nn.Module, inputs: dict[str, Tensor], alpha: float = 0.5
                   ) -> nn.Module:
    """In place: each linear named in inputs (name -> its calibration inputs (tokens, K)) gets
    W[:, j] *= s_j and runs behind ScaledInput(s). The float model computes the same function."""
    _check_alpha(alpha)
    for name, x in inputs.items():
        lin = model.get_submodule(name)
        s = smoothing_scales(channel_absmax(x), [lin.weight], alpha)
        lin.weight.mul_(s)
        _replace(model, name, ScaledInput(lin, s))
    return model


@torch.no_grad()
def rotate_linears(model: nn.Module, names: list[str]) -> nn.Module:
    """In place: each named linear gets W <- W H and runs behind HadamardInput (x -> x H), so
    both operands its quantizer sees are rotated. The float model computes the same function."""
    for name in names:
        lin = model.get_submodule(name)
        lin.weight.copy_(hadamard_transform(lin.weight.double()).float())
        _replace(model, name, HadamardInput(lin))
    return model


def w8a8_variants(model: nn.Module, inputs: dict[str, Tensor], alphas: tuple[float, ...] = (0.5,),
                  scheme: Scheme | str = "int8_w8a8") -> dict[str, nn.Module]:
    """Quantized copies of a model (any architecture with nn.Linear layers; inputs: name ->
    calibration inputs of each linear to quantize, from linear_inputs): "RTN" (round to
    nearest), "SmoothQuant <alpha>" (smooth_linears) per alpha and "rotation" (rotate_linears),
    all quantized with scheme; the other linears stay in float."""
    scheme, names = get_scheme(scheme), list(inputs)
    made = {"RTN": copy.deepcopy(model)}
    made |= {f"SmoothQuant {a}": smooth_linears(copy.deepcopy(model), inputs, a) for a in alphas}
    made["rotation"] = rotate_linears(copy.deepcopy(model), names)
    for label, m in made.items():
        targets = names if label == "RTN" else [n + ".linear" for n in names]
        quantize_model(m, scheme, ignore=(), overrides={n: scheme for n in targets} | {"*": None})
    return made


@torch.no_grad()
def plant_outlier_channels(model: nn.Module, channels: tuple[int, ...] = (3, 77, 150),
                           factor: float = 30.0) -> nn.Module:
    """A copy of a Llama-style model whose RMSNorm outputs carry outlier channels (x factor),
    undone in the columns of the linears reading them: the same function, with the activation
    outliers of large LLMs that a small model may lack (tests/test_algorithms.py does the same)."""
    model = copy.deepcopy(model)
    s = torch.ones(model.config.hidden_size)
    s[list(channels)] = 1 / factor
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        migrate_scales(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj], s)
        migrate_scales(layer.post_attention_layernorm, [m.gate_proj, m.up_proj], s)
    return model


def embedding_errors(models: dict[str, nn.Module], tokenizer, sentences: list[str],
                     ref: Tensor) -> dict[str, float]:
    """models: label -> sentence encoder; ref: (N, hidden) the float model's unit embeddings of
    sentences. Per label: mean over sentences of 1 - cos(embedding, ref) (0 = identical),
    computed in float64 so that errors near fp32's resolution (1e-7) still read true."""
    from quantlab.models import sentence_embeddings

    r = ref.double() / ref.double().norm(dim=-1, keepdim=True)
    out = {}
    for k, m in models.items():
        e = sentence_embeddings(m, tokenizer, sentences).double()
        out[k] = float(1 - ((e / e.norm(dim=-1, keepdim=True)) * r).sum(-1).mean())
    return out


def causal_lm_w8a8_kl(ref: nn.Module, model: nn.Module, calib: Tensor, windows: Tensor,
                      scheme: Scheme | str = "int8_w8a8") -> dict[str, float]:
    """A Llama-style model quantized three ways with quantlab's own algorithms: "RTN"
    (quantize_model), "SmoothQuant" (algorithms.smoothquant, alpha 0.5) and "rotation"
    (algorithms.quarot with round to nearest). calib, windows: (B, T) int64 token ids. Returns
    each one's next-token KL from ref (nats per token) on windows."""
    from quantlab.algorithms import quarot, smoothquant
    from quantlab.eval.lm import next_token_kl

    made = {"RTN": quantize_model(copy.deepcopy(model), scheme),
            "SmoothQuant": smoothquant(copy.deepcopy(model), scheme, calib),
            "rotation": quarot(copy.deepcopy(model), scheme, calib)}
    return {k: next_token_kl(ref, m, windows) for k, m in made.items()}
