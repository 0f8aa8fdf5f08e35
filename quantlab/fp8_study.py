"""Chapter 5 (FP8 end to end): the measurements and plotly figures behind notebooks/05-fp8.md.

Four questions, one block of functions each:
- what an FP8 W8A8 layer computes (`fp8_linear`: E4M3 codes through `torch._scaled_mm`, scales
  outside the sum over K, or per 128-deep slice of K for block scales);
- static (calibrated) against dynamic activation scales: saturation, headroom, subnormals
  (`calibration_rows`, `static_sweep`, `flat_range` and their figures);
- who shares a scale, layer by layer on a real model (`layer_sqnr_rows`, `max_energy_share`);
- E4M3 against E5M2 on activation- and gradient-like ranges (`output_grads`, `range_row`);
- the whole model: perplexity, KL and top-1 agreement (`reference_logprobs`, `lm_metrics`).
Every tensor here is float32 on the CPU; SQNRs are in dB, KL in nats per token.
"""

from __future__ import annotations

import copy
import math

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor, nn

from quantlab.eval.metrics import sqnr_db
from quantlab.formats import get_format
from quantlab.nn import quantize_model
from quantlab.quantize import dequantize, quantize
from quantlab.schemes import Scheme, TensorScheme, get_scheme
from quantlab.viz import COLORS, dropdown

# The four distinct inputs of a Llama decoder layer: q/k/v share one, gate/up share one.
INPUTS = {"attention in": "self_attn.q_proj", "o_proj in": "self_attn.o_proj",
          "MLP in": "mlp.gate_proj", "down_proj in": "mlp.down_proj"}


# Per-tensor activations with a scale computed from each input: separates "static or dynamic"
# from "per tensor or per token" (no preset serves it; vLLM's dynamic FP8 is per token).
FP8_TENSOR_DYNAMIC = Scheme("fp8_tensor_dynamic", TensorScheme("e4m3", "tensor"),
                            TensorScheme("e4m3", "tensor"), "FP8 per tensor, dynamic activations")


def layer_inputs(n_layers: int) -> dict[str, str]:
    """label ("layer 0 MLP in") -> the linear layer whose input it is, for every decoder layer."""
    return {f"layer {i} {lab}": f"model.layers.{i}.{mod}"
            for i in range(n_layers) for lab, mod in INPUTS.items()}


# ---------------------------------------------------------------------------------------------
# What an FP8 layer computes.
# ---------------------------------------------------------------------------------------------


def _mm8(a8: Tensor, b8: Tensor, sa: Tensor, sb: Tensor) -> Tensor:
    """a8 (M, K), b8 (N, K) float8_e4m3fn; sa (M, 1) or (), sb (1, N) or () float32 -> (M, N)
    float32 = (a8 @ b8.T) * sa * sb, by torch._scaled_mm (cuBLASLt on a GPU, a CPU path here)."""
    try:
        return torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError):  # older torch: no CPU FP8 GEMM; same math
        return (a8.float() @ b8.float().t()) * sa * sb


def fp8_linear(x: Tensor, w: Tensor, scheme: str | Scheme, act_scale: Tensor | None = None
               ) -> Tensor:
    """x (M, K) float activations, w (N, K) float weights -> (M, N) float32, computed as an FP8
    GEMM does: both operands encoded to E4M3, multiplied as float8_e4m3fn tensors with fp32
    accumulation, scales applied to the result. Per tensor / token / channel, the scales do not
    change along K, so they multiply the finished sum; block scales (1x128 activation groups,
    128x128 weight blocks) do, so each 128-deep slice of K is a separate product, rescaled.
    act_scale: the static activation scale (a scalar) of schemes such as fp8_per_tensor."""
    s = get_scheme(scheme)
    if s.activations is None or s.weights.format != "e4m3" or s.activations.format != "e4m3":
        raise ValueError(f"{s.name} is not an FP8 W8A8 scheme; use fp8_per_tensor, fp8_dynamic "
                         "or fp8_block")
    qx = quantize(x, s.activations, scale=None if s.activations.dynamic else act_scale)
    qw = quantize(w, s.weights)
    x8, w8 = qx.codes.view(torch.float8_e4m3fn), qw.codes.view(torch.float8_e4m3fn)
    M, N = x.shape[0], w.shape[0]
    if s.weights.granularity == "block":
        bn, bk = s.weights.block
        if s.activations.group_size != bk or x.shape[1] % bk:
            raise ValueError(f"block scales need activation groups of {bk} = the weight block's "
                             f"K side and K a multiple of it; got K={x.shape[1]}")
        sw = qw.scales.repeat_interleave(bn, 0)[:N]  # (N, K / bk): each row's block scales
        out = torch.zeros(M, N)
        for j in range(x.shape[1] // bk):
            k = slice(j * bk, (j + 1) * bk)
            out += _mm8(x8[:, k].contiguous(), w8[:, k].contiguous(),
                        qx.scales[:, j:j + 1].contiguous(), sw[:, j].reshape(1, N).contiguous())
        return out
    sa, sb = qx.scales.float(), qw.scales.float()
    if sa.numel() > 1 or sb.numel() > 1:  # rowwise scaling: both as (M, 1) and (1, N)
        sa = sa.reshape(-1, 1).expand(M, 1).contiguous()
        sb = sb.reshape(1, -1).expand(1, N).contiguous()
    return _mm8(x8, w8, sa, sb)


def fake_quant_linear(x: Tensor, w: Tensor, scheme: str | Scheme,
                      act_scale: Tensor | None = None) -> Tensor:
    """The reference for fp8_linear (and what quantlab.nn.QuantLinear computes): dequantize both
    operands, multiply in float32. x (M, K), w (N, K) -> (M, N) float32."""
    s = get_scheme(scheme)
    xq = dequantize(quantize(x, s.activations, None if s.activations.dynamic else act_scale))
    return xq.float() @ dequantize(quantize(w, s.weights)).float().T


def relative_error(ref: Tensor, approx: Tensor) -> float:
    """||approx - ref|| / ||ref|| (Frobenius), in float64."""
    return float((approx.double() - ref.double()).norm() / ref.double().norm())


def preset_rows(w: Tensor, x: Tensor, presets: tuple[str, ...], act_scale: Tensor) -> list[dict]:
    """w (N, K), x (T, K): per FP8 preset, what its weights and activations store, how many
    scales each carries for these tensors, and the weights' bits per element (scales included).
    act_scale: the static scale for presets with static activations."""
    rows = []
    for name in presets:
        s = get_scheme(name)
        qw = quantize(w, s.weights)
        qx = quantize(x, s.activations, scale=None if s.activations.dynamic else act_scale)
        rows.append({"preset": name, "weights": s.weights.describe(),
                     "activations": s.activations.describe(),
                     "weight scales": qw.scales.numel(), "activation scales": qx.scales.numel(),
                     "bits/weight": qw.bits_per_weight})
    return rows


def scaled_mm_calls(scheme: str | Scheme, K: int) -> int:
    """How many FP8 products (and fp32 rescales) fp8_linear runs for inner dimension K: one,
    or one per 128-deep slice of K when the scales change along K (blocks, groups)."""
    s = get_scheme(scheme)
    return K // s.weights.block[1] if s.weights.granularity == "block" else 1


# ---------------------------------------------------------------------------------------------
# Static against dynamic activation scales.
# ---------------------------------------------------------------------------------------------


def calibration_rows(acts: dict[str, Tensor], scales: dict[str, Tensor],
                     fmt: str = "e4m3") -> list[dict]:
    """acts: label -> held-out inputs (T, K); scales: label -> calibrated static scale (a scalar,
    calibration amax / format max). Per label: calibrated amax, held-out amax and their ratio, the
    share of held-out tokens with an element past the calibrated amax (these saturate at the
    format max), and the median token amax / calibrated amax."""
    fmax = get_format(fmt).max
    rows = []
    for lab, x in acts.items():
        cal = float(scales[lab]) * fmax
        tok = x.abs().amax(-1)
        rows.append({"input": lab, "calibrated amax": cal, "held-out amax": float(tok.max()),
                     "held-out / calibrated": float(tok.max()) / cal,
                     "tokens past it %": 100 * float((tok > cal).float().mean()),
                     "median token amax / calibrated": float(tok.median()) / cal})
    return rows


def static_sweep(x: Tensor, scale: Tensor | float, multipliers: list[float],
                 fmt: str = "e4m3") -> list[float]:
    """x (T, K): SQNR (dB) of x quantized per tensor with the static scale `scale * m` for each
    multiplier m. m < 1 saturates more values at the format max; m > 1 leaves headroom and, far
    enough, pushes values into the subnormals and to zero."""
    return [_sqnr32(x, _fake_quant_static(x, float(scale) * m, fmt)) for m in multipliers]


def _fake_quant_static(x: Tensor, scale: float, fmt: str) -> Tensor:
    """dequantize(quantize(x, per-tensor fmt, scale=scale)), through torch's saturating FP8
    cast where the format has a torch dtype (several times faster; the tests check it equals the
    reference bit for bit)."""
    f = get_format(fmt)
    if f.torch_dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and scale > 0:
        return (x.float() / scale).clamp(-f.max, f.max).to(f.torch_dtype).float() * scale
    ts = TensorScheme(fmt, "tensor", dynamic=False)
    return dequantize(quantize(x, ts, scale=torch.tensor(scale)))


def dynamic_sqnr(x: Tensor, granularity: str = "token", fmt: str = "e4m3") -> float:
    """x (T, K): SQNR (dB) with dynamic absmax scales ("tensor", "token" or "group" of 128)."""
    kw = {"group_size": 128} if granularity == "group" else {}
    return _sqnr32(x, dequantize(quantize(x, TensorScheme(fmt, granularity, **kw))))


def flat_range(multipliers: list[float], sqnr: list[float], tol_db: float = 1.0
               ) -> tuple[float, float]:
    """The smallest and largest multiplier of the contiguous run around the best SQNR whose SQNR
    stays within tol_db of the best: how far a static scale may be off at little cost."""
    best = max(range(len(sqnr)), key=lambda i: sqnr[i])
    lo = hi = best
    while lo > 0 and sqnr[lo - 1] >= sqnr[best] - tol_db:
        lo -= 1
    while hi < len(sqnr) - 1 and sqnr[hi + 1] >= sqnr[best] - tol_db:
        hi += 1
    return multipliers[lo], multipliers[hi]


def code_regions(x: Tensor, scale: float, fmt: str = "e4m3") -> dict[str, float]:
    """Where the elements of x / scale land in the format, in % of x's nonzero elements:
    'saturated' (past the max, clipped to it), 'normal', 'subnormal' (rounded to a nonzero value
    below the smallest normal) and 'zero' (rounded to 0)."""
    f = get_format(fmt)
    a = (x.abs() / scale)[x != 0].float()
    q = f.round(a, overflow="saturate")  # the value each element is stored as
    share = lambda m: 100 * float(m.sum()) / max(a.numel(), 1)
    over = a > f.max
    return {"saturated": share(over), "normal": share((q >= f.min_normal) & ~over),
            "subnormal": share((q > 0) & (q < f.min_normal)), "zero": share(q == 0)}


# ---------------------------------------------------------------------------------------------
# Who shares a scale: layer by layer.
# ---------------------------------------------------------------------------------------------


def layer_sqnr_rows(weights: dict[str, Tensor], acts: dict[str, Tensor],
                    schemes: dict[str, Scheme], static_scales: dict[str, Tensor] | None = None
                    ) -> list[dict]:
    """weights: layer name -> (N, K); acts: layer name -> its inputs (T, K); schemes: label ->
    FP8 scheme; static_scales: layer name -> scale, for schemes with static activations. One row
    per (layer, scheme): weight, activation and layer output (x W^T) SQNR in dB. Layers that
    share an input (q/k/v, gate/up) share its quantized copy."""
    rows, cache = [], {}
    y_ref = {name: acts[name] @ w.T for name, w in weights.items()}
    for label, s in schemes.items():
        for name, w in weights.items():
            x = acts[name]
            key = (label, x.data_ptr())
            if key not in cache:
                scale = None if s.activations.dynamic else (static_scales or {})[name]
                xq = dequantize(quantize(x, s.activations, scale=scale))
                cache[key] = xq, _sqnr32(x, xq)
            (xq, act_db), wq = cache[key], dequantize(quantize(w, s.weights))
            rows.append({"layer": name, "scheme": label, "weight_sqnr_db": sqnr_db(w, wq),
                         "act_sqnr_db": act_db, "output_sqnr_db": _sqnr32(y_ref[name], xq @ wq.T)})
    return rows


def _sqnr32(ref: Tensor, approx: Tensor) -> float:
    """sqnr_db from float32 norms: 3x faster on large tensors, equal to about 1e-5 dB."""
    noise = float(torch.linalg.vector_norm(ref - approx))
    return math.inf if noise == 0 else 20 * math.log10(float(torch.linalg.vector_norm(ref)) / noise)


def scheme_summary(rows: list[dict]) -> list[dict]:
    """rows from layer_sqnr_rows -> one row per scheme: mean and worst output SQNR (dB) over all
    layers, and the mean over down_proj layers and over the others."""
    out = []
    for s in dict.fromkeys(r["scheme"] for r in rows):
        sel = [r["output_sqnr_db"] for r in rows if r["scheme"] == s]
        down = [r["output_sqnr_db"] for r in rows if r["scheme"] == s and "down_proj" in r["layer"]]
        rest = [r["output_sqnr_db"] for r in rows
                if r["scheme"] == s and "down_proj" not in r["layer"]]
        out.append({"scheme": s, "mean dB": sum(sel) / len(sel), "worst dB": min(sel),
                    "down_proj mean dB": sum(down) / len(down),
                    "other layers mean dB": sum(rest) / len(rest)})
    return out


def max_energy_share(x: Tensor, group: int | None = None) -> float:
    """x (T, K): the share of sum(x^2) held by each token's (group=None) or each group's largest
    |x|. That element maps to the format max, which is exact: the share of the energy a finer
    scale stores without error."""
    g = x.reshape(x.shape[0], -1, group or x.shape[1]).double()
    return float((g.abs().amax(-1) ** 2).sum() / (g**2).sum())


# ---------------------------------------------------------------------------------------------
# E4M3 against E5M2.
# ---------------------------------------------------------------------------------------------


def output_grads(model: nn.Module, windows: Tensor, names: list[str]) -> dict[str, Tensor]:
    """windows (B, T) int64 token ids: one forward and backward pass of the mean next-token loss;
    returns the gradient reaching each named linear layer's output, (B*T, N) float32: what the
    backward GEMMs of FP8 training would quantize."""
    grads: dict[str, Tensor] = {}
    hooks = [model.get_submodule(n).register_full_backward_hook(
        lambda m, gin, gout, n=n: grads.__setitem__(n, gout[0].detach().reshape(
            -1, gout[0].shape[-1]).float())) for n in names]
    try:
        model.zero_grad(set_to_none=True)
        model(input_ids=windows, labels=windows, use_cache=False).loss.backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    return grads


def range_row(t: Tensor, fmt: str) -> dict:
    """t: any float tensor, quantized to fmt with one absmax scale. SQNR (dB), the share of its
    nonzero elements that land in the subnormals or round to zero (%), and its spread: log2 of
    amax over the median nonzero magnitude (octaves)."""
    x = t.reshape(-1, t.shape[-1]).float()
    q = quantize(x, TensorScheme(fmt, "tensor"))
    reg = code_regions(x, float(q.scales), fmt)
    nz = x.abs()[x != 0]
    return {"format": fmt, "sqnr_db": sqnr_db(x, dequantize(q)),
            "subnormal %": reg["subnormal"], "flushed to zero %": reg["zero"],
            "spread (octaves)": math.log2(float(nz.max()) / float(nz.median()))}


def weight_grad_sqnr(grad_out: Tensor, inputs: Tensor, fmt: str) -> float:
    """grad_out (T, N), inputs (T, K): SQNR (dB) of the weight gradient grad_out^T inputs (N, K)
    when grad_out is quantized to fmt with one absmax scale (inputs kept exact)."""
    gq = dequantize(quantize(grad_out, TensorScheme(fmt, "tensor")))
    return sqnr_db(grad_out.T @ inputs, gq.T @ inputs)


def format_rows(formats: tuple[str, ...] = ("e4m3", "e5m2")) -> list[dict]:
    """The numbers that decide between FP8 formats: mantissa bits, largest value, smallest normal
    and subnormal, and the octaves of normal values (log2 max / min normal)."""
    rows = []
    for name in formats:
        f = get_format(name)
        rows.append({"format": name, "mantissa bits": f.mbits, "max": f.max,
                     "min normal": f.min_normal, "min subnormal": f.min_subnormal,
                     "normal octaves": math.log2(f.max / f.min_normal),
                     "relative step": 2.0 ** -f.mbits})
    return rows


# ---------------------------------------------------------------------------------------------
# The whole model.
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def reference_logprobs(model: nn.Module, windows: Tensor, batch_size: int = 8) -> Tensor:
    """windows (B, T) -> (B, T, vocab) float32 next-token log-probabilities."""
    return torch.cat([torch.log_softmax(model(input_ids=b, use_cache=False).logits.float(), -1)
                      for b in windows.split(batch_size)])


def metrics_from_logprobs(lp: Tensor, windows: Tensor, ref_lp: Tensor) -> dict:
    """lp, ref_lp (B, T, vocab) log-probs of windows (B, T): perplexity of the next tokens
    (positions 0..T-2 predict 1..T-1), mean KL(P_ref || P) in nats per position (every position)
    and the share of positions whose top-1 token matches the reference's."""
    nll = -lp[:, :-1].gather(-1, windows[:, 1:, None]).mean()
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).mean()
    top1 = (lp.argmax(-1) == ref_lp.argmax(-1)).float().mean()
    return {"perplexity": math.exp(float(nll)), "kl": float(kl), "top1_agreement": float(top1)}


def lm_metrics(model: nn.Module, windows: Tensor, ref_lp: Tensor, batch_size: int = 8) -> dict:
    """metrics_from_logprobs of model's own log-probs on windows (B, T) against ref_lp."""
    return metrics_from_logprobs(reference_logprobs(model, windows, batch_size), windows, ref_lp)


def quantized_copy(model: nn.Module, scheme: str | Scheme,
                   act_scales: dict[str, Tensor] | None = None, multiplier: float = 1.0
                   ) -> nn.Module:
    """A deep copy of model with every linear layer but lm_head quantized; static activation
    scales (if any) multiplied by `multiplier` (< 1: more saturation, > 1: headroom)."""
    scales = {k: v * multiplier for k, v in (act_scales or {}).items()}
    return quantize_model(copy.deepcopy(model), scheme, act_scales=scales or None)


# ---------------------------------------------------------------------------------------------
# Figures.
# ---------------------------------------------------------------------------------------------


def _r(v: Tensor, digits: int = 4) -> list[float]:
    """Rounded list: keeps the page's JSON small."""
    return [float(f"{x:.{digits}g}") for x in v.tolist()]


def token_amax_figure(token_amax: dict[str, Tensor], calibrated: dict[str, float]) -> go.Figure:
    """token_amax: label -> (T,) largest |x| of each held-out token; calibrated: label -> the
    calibrated amax (static scale x 448). Per label a line over the tokens and the calibrated
    amax as a dashed line: tokens above it saturate. A dropdown picks the label."""
    fig, groups = go.Figure(), {}
    for lab, a in token_amax.items():
        groups[lab] = [len(fig.data), len(fig.data) + 1, len(fig.data) + 2]
        cal = calibrated[lab]
        over = (a > cal).nonzero().flatten()
        fig.add_trace(go.Scatter(y=_r(a), mode="lines", name="token amax", line=dict(
            color=COLORS[0], width=1), hovertemplate="token %{x}: %{y:.3f}<extra></extra>"))
        fig.add_trace(go.Scatter(x=[0, len(a) - 1], y=[cal, cal], mode="lines",
                                 name="calibrated amax (maps to 448)",
                                 line=dict(color=COLORS[1], dash="dash")))
        fig.add_trace(go.Scatter(x=over.tolist(), y=_r(a[over]), mode="markers",
                                 name="saturates", marker=dict(color=COLORS[1], size=7),
                                 hovertemplate="token %{x}: %{y:.3f}<extra></extra>"))
    title = lambda lab: f"Held-out tokens against the calibrated scale: {lab}"
    dropdown(fig, groups, title_of=title)
    fig.update_layout(title=title(next(iter(groups))), template="plotly_white", height=460,
                      xaxis_title="held-out token", yaxis_title="largest |x| in the token",
                      yaxis_rangemode="tozero",
                      legend=dict(orientation="h", y=-0.2))
    return fig


def static_scale_slider(x: Tensor, scale: float, exponents: list[int], fmt: str = "e4m3",
                        bins: tuple[float, float, float] = (-22.0, 12.0, 0.25)) -> go.Figure:
    """x (T, K) held-out activations; scale: the calibrated static scale. A slider over
    multipliers 2**e of the scale; each step shows the histogram of log2(|x| / (scale 2**e)) on
    the format's fixed windows: saturated, normal, subnormal, rounded to zero."""
    f = get_format(fmt)
    lo, hi, step = bins
    edges = torch.arange(lo, hi + step, step)
    centers = _r((edges[1:] + edges[:-1]) / 2)
    lx = torch.log2(x.abs()[x != 0].double())
    fig, labels = go.Figure(), []
    for i, e in enumerate(exponents):
        v = (lx - math.log2(scale) - e).clamp(lo, hi - 1e-9)
        counts = torch.histc(v, bins=len(centers), min=lo, max=hi)
        fig.add_trace(go.Bar(x=centers, y=counts.tolist(), width=step, visible=i == 0,
                             marker_color=COLORS[0], showlegend=False,
                             hovertemplate="log2 |x|/s = %{x}: %{y} values<extra></extra>"))
        reg = code_regions(x, scale * 2.0**e, fmt)
        sq = static_sweep(x, scale, [2.0**e], fmt)[0]
        labels.append(f"scale x 2^{e}: SQNR {sq:.1f} dB; saturated {reg['saturated']:.2f}%, "
                      f"subnormal {reg['subnormal']:.2f}%, zero {reg['zero']:.2f}%")
    zones = ((math.log2(f.max), hi, "saturate at max", "#d62728"),
             (math.log2(f.min_normal), math.log2(f.max), "normal", "#2ca02c"),
             (math.log2(f.min_subnormal / 2), math.log2(f.min_normal), "subnormal", "#ff7f0e"),
             (lo, math.log2(f.min_subnormal / 2), "zero", "#7f7f7f"))
    for x0, x1, text, color in zones:
        fig.add_vrect(x0=x0, x1=x1, fillcolor=color, opacity=0.08, line_width=0,
                      annotation_text=text, annotation_position="top left")
    steps = [dict(method="update", label=f"2^{e}",
                  args=[{"visible": [j == i for j in range(len(exponents))]},
                        {"title.text": labels[i]}]) for i, e in enumerate(exponents)]
    start = exponents.index(0) if 0 in exponents else 0
    for j, tr in enumerate(fig.data):
        tr.visible = j == start
    fig.update_layout(title=labels[start], template="plotly_white", height=460, bargap=0,
                      xaxis_title=f"log2(|x| / scale): where the values land among {fmt}'s codes",
                      yaxis_title="values (log)", yaxis_type="log", xaxis_range=[lo, hi],
                      sliders=[dict(active=start, steps=steps, pad=dict(t=50),
                                    currentvalue=dict(prefix="static scale multiplier: "))])
    return fig


def sweep_figure(multipliers: list[float], curves: dict[str, list[float]],
                 reference: dict[str, float] | None = None,
                 title: str = "Static scale: SQNR against the scale multiplier",
                 xaxis_title: str = "log2(scale / calibrated scale): left saturates, right leaves "
                                    "headroom", at_zero: str = "calibrated") -> go.Figure:
    """curves: label -> SQNR (dB) per multiplier (log2 x axis); reference: label -> a dotted
    horizontal line (e.g. the dynamic per-token SQNR of the same tensor); at_zero labels x = 0."""
    fig = go.Figure()
    x = [math.log2(m) for m in multipliers]
    for i, (lab, ys) in enumerate(curves.items()):
        fig.add_trace(go.Scatter(x=x, y=ys, mode="lines+markers", name=lab,
                                 line=dict(color=COLORS[i % 10]),
                                 hovertemplate=lab + "<br>x 2^%{x}: %{y:.2f} dB<extra></extra>"))
    for i, (lab, y) in enumerate((reference or {}).items()):
        fig.add_trace(go.Scatter(x=[x[0], x[-1]], y=[y, y], mode="lines", name=lab,
                                 line=dict(color=COLORS[i % 10], dash="dot")))
    fig.add_vline(x=0, line_dash="dot", line_color="#888", annotation_text=at_zero)
    fig.update_layout(title=title, template="plotly_white", height=460,
                      xaxis_title=xaxis_title, yaxis_title="SQNR (dB)")
    return fig


def layer_sqnr_figure(rows: list[dict], metric: str = "output_sqnr_db") -> go.Figure:
    """rows from layer_sqnr_rows: grouped bars, one group per projection of a decoder layer, one
    bar per scheme; a dropdown picks the decoder layer."""
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    by_block: dict[str, list[str]] = {}
    for name in layers:
        by_block.setdefault(name.split(".")[2], []).append(name)
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    at = {(r["layer"], r["scheme"]): r[metric] for r in rows}
    fig, groups = go.Figure(), {}
    for block, names in by_block.items():
        groups[f"layer {block}"] = []
        for i, s in enumerate(schemes):
            groups[f"layer {block}"].append(len(fig.data))
            fig.add_trace(go.Bar(x=[n.split(".", 3)[3] for n in names],
                                 y=[at[n, s] for n in names], name=s,
                                 marker_color=COLORS[i % 10], showlegend=block == "0",
                                 hovertemplate=s + "<br>%{x}: %{y:.2f} dB<extra></extra>"))
    lows = min(at.values())
    dropdown(fig, groups, title_of=lambda lab: f"FP8 layer output SQNR, decoder {lab}")
    fig.update_layout(title=f"FP8 layer output SQNR, decoder {next(iter(groups))}",
                      template="plotly_white", height=480, barmode="group",
                      yaxis_range=[math.floor(lows) - 1, math.ceil(max(at.values())) + 1],
                      yaxis_title="output SQNR (dB)", legend=dict(orientation="h", y=-0.2))
    return fig


def format_window_figure(tensors: dict[str, Tensor], formats: tuple[str, ...] = ("e4m3", "e5m2"),
                         step: float = 0.5) -> go.Figure:
    """tensors: label -> any tensor. Top: histogram of log2(|t| / amax) (nonzero elements; 0 is
    the largest). Bottom: the window each format covers once one absmax scale maps amax to the
    format max: normal values (dark), subnormals (light), below them everything rounds to 0.
    A dropdown picks the tensor."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.75, 0.25],
                        vertical_spacing=0.04)
    groups, lo = {}, -40.0
    for i, (lab, t) in enumerate(tensors.items()):
        a = t.abs().flatten().double()
        v = torch.log2(a[a > 0] / a.max()).clamp(min=lo)
        counts = torch.histc(v, bins=int(-lo / step), min=lo, max=0)
        groups[lab] = [i]
        fig.add_trace(go.Bar(x=_r(torch.arange(lo, 0, step) + step / 2), y=counts.tolist(),
                             width=step, marker_color=COLORS[0], showlegend=False, name=lab,
                             hovertemplate="log2 |t|/amax = %{x}: %{y}<extra></extra>"),
                      row=1, col=1)
    n = len(fig.data)
    for j, name in enumerate(formats):
        f = get_format(name)
        normal = math.log2(f.min_normal / f.max)
        sub = math.log2(f.min_subnormal / 2 / f.max)
        for base, width, op, what in ((normal, -normal, 0.9, "normal"),
                                      (sub, normal - sub, 0.35, "subnormal")):
            fig.add_trace(go.Bar(y=[name], x=[width], base=[base], orientation="h",
                                 marker_color=COLORS[j + 1], opacity=op, showlegend=False,
                                 hovertemplate=f"{name} {what}: 2^{base:.1f} .. "
                                               f"2^{base + width:.1f} x amax<extra></extra>"),
                          row=2, col=1)
    groups = {lab: idx + list(range(n, len(fig.data))) for lab, idx in groups.items()}
    title = lambda lab: f"{lab}: magnitudes relative to amax, and what each format keeps"
    dropdown(fig, groups, title_of=title)
    fig.update_layout(title=title(next(iter(groups))), template="plotly_white", height=520,
                      bargap=0)
    fig.update_yaxes(title_text="values (log)", type="log", row=1, col=1)
    fig.update_xaxes(title_text="log2(|value| / amax)", range=[lo, 0.5], row=2, col=1)
    return fig


def model_metrics_figure(rows: list[dict], baseline_ppl: float) -> go.Figure:
    """rows with config, perplexity, kl, top1_agreement: one bar per config; a dropdown switches
    between perplexity increase, KL and top-1 disagreement."""
    metrics = {"perplexity increase": [r["perplexity"] - baseline_ppl for r in rows],
               "KL (nats/token)": [r["kl"] for r in rows],
               "top-1 disagreement %": [100 * (1 - r["top1_agreement"]) for r in rows]}
    fig, groups = go.Figure(), {}
    for i, (lab, ys) in enumerate(metrics.items()):
        groups[lab] = [i]
        fig.add_trace(go.Bar(x=[r["config"] for r in rows], y=ys, name=lab,
                             marker_color=COLORS[i], text=[f"{y:.3g}" for y in ys],
                             textposition="outside",
                             hovertemplate="%{x}<br>%{y:.4g}<extra></extra>"))
    title = lambda lab: f"stdlib-llama with FP8 layers: {lab} against the float model"
    log = all(y > 0 for ys in metrics.values() for y in ys)  # one bad config dwarfs the rest
    axis = lambda lab: lab + (" (log)" if log else "")
    dropdown(fig, groups, title_of=title,
              extra={lab: {"yaxis.title.text": axis(lab)} for lab in metrics})
    fig.update_layout(title=title("perplexity increase"), template="plotly_white", height=480,
                      yaxis_title=axis("perplexity increase"), yaxis_type="log" if log else None,
                      showlegend=False)
    return fig


def fp8_kernel_figure(bench: dict) -> go.Figure:
    """bench: data/bench/kernels-*.json. viz.kernel_shapes_figure over the FP8 GEMM rows (ours
    and torch._scaled_mm, per tensor / row / 128-block), restyled: one color per granularity,
    solid for ours, dashed for _scaled_mm."""
    from quantlab.viz import kernel_shapes_figure

    grans = {"tensor": "per tensor", "row": "per row", "block": "128-block"}
    kernels = {f"{k}_{g}": f"{who}, {lab}" for k, who in (("ours_fp8", "ours"),
                                                        ("scaled_mm", "_scaled_mm"))
               for g, lab in grans.items()}
    fig = kernel_shapes_figure(bench, kernels, what="FP8 GEMM time")
    for tr in fig.data:
        g = next(i for i, lab in enumerate(grans.values()) if tr.name.endswith(lab))
        tr.line.color = COLORS[g]
        tr.line.dash = "dash" if tr.name.startswith("_scaled_mm") else "solid"
        tr.marker.color = COLORS[g]
    return fig
