"""Chapter 5's figures (quantlab.studies.fp8 measures what they show): held-out tokens against a
static scale, where the values land among E4M3's codes as the scale moves, SQNR sweeps, layer
by layer SQNR, E4M3 against E5M2, the whole model, and the FP8 GEMM kernels."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from quantlab.formats import get_format
from quantlab.studies.fp8 import code_regions, static_sweep
from quantlab.viz.book import COLORS, dropdown, rounded
from quantlab.viz.formats import log_axis
from quantlab.viz.kernels import kernel_shapes_figure


def token_amax_figure(token_amax: dict[str, Tensor], calibrated: dict[str, float]) -> go.Figure:
    """token_amax: label -> (T,) largest |x| of each held-out token; calibrated: label -> the
    calibrated amax (static scale x 448). Per label a line over the tokens and the calibrated
    amax as a dashed line: tokens above it saturate. A dropdown picks the label."""
    fig, groups = go.Figure(), {}
    for lab, a in token_amax.items():
        groups[lab] = [len(fig.data), len(fig.data) + 1, len(fig.data) + 2]
        cal = calibrated[lab]
        over = (a > cal).nonzero().flatten()
        fig.add_trace(go.Scatter(y=rounded(a), mode="lines", name="token amax", line=dict(
            color=COLORS[0], width=1), hovertemplate="token %{x}: %{y:.3f}<extra></extra>"))
        fig.add_trace(go.Scatter(x=[0, len(a) - 1], y=[cal, cal], mode="lines",
                                 name="calibrated amax (maps to 448)",
                                 line=dict(color=COLORS[1], dash="dash")))
        fig.add_trace(go.Scatter(x=over.tolist(), y=rounded(a[over]), mode="markers",
                                 name="saturates", marker=dict(color=COLORS[1], size=7),
                                 hovertemplate="token %{x}: %{y:.3f}<extra></extra>"))
    title = lambda lab: f"Held-out tokens against the calibrated scale: {lab}"
    dropdown(fig, groups, title_of=title)
    fig.update_layout(template="plotly_white", height=460,
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
    centers = rounded((edges[1:] + edges[:-1]) / 2)
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
                      yaxis_title="values (log)", yaxis_type="log", yaxis_dtick=1,  # 10^k only
                      xaxis_range=[lo, hi],
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
        fig.add_trace(go.Bar(x=rounded(torch.arange(lo, 0, step) + step / 2), y=counts.tolist(),
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
    fig.update_layout(template="plotly_white", height=520,
                      bargap=0)
    fig.update_yaxes(title_text="values (log)", type="log", dtick=1, row=1, col=1)  # 10^k only
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
    # log axes labelled on clean values only (plotly's own labels on a short one read 5 6 7 ..)
    ticks = {lab: log_axis(min(ys), max(ys)) if log else {} for lab, ys in metrics.items()}
    extra = {lab: {"yaxis.title.text": axis(lab), **{f"yaxis.{k}": v for k, v in t.items()}}
             for lab, t in ticks.items()}
    dropdown(fig, groups, title_of=title, extra=extra)
    fig.update_layout(title=title("perplexity increase"), template="plotly_white", height=480,
                      yaxis_title=axis("perplexity increase"), showlegend=False)
    fig.update_yaxes(**ticks["perplexity increase"])
    return fig


def fp8_kernel_figure(bench: dict) -> go.Figure:
    """bench: data/bench/kernels-*.json. kernel_shapes_figure over the FP8 GEMM rows (ours
    and torch._scaled_mm, per tensor / row / 128-block), restyled: one color per granularity,
    solid for ours, dashed for _scaled_mm."""
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
