"""Chapter 3's figures (quantlab.studies.outliers computes what they show): where the outlier
channels sit, what they do to one token's int8 codes, SmoothQuant's alpha, rotation, and W8A8 end
to end. Each takes tensors or rows and returns a go.Figure whose dropdowns and sliders are
plotly's own."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from quantlab.studies.outliers import kurtosis
from quantlab.viz.book import COLORS, dropdown


def channel_heatmap_figure(maps: dict[str, Tensor], top: float = 32.0) -> go.Figure:
    """maps: label -> (layers, K) per-channel absmax. A heatmap of absmax / each layer's median
    channel (rows: layers, columns: channels) on a log2 color scale from 1x to `top`x, shared by
    all labels (picked with a dropdown) so models and tensors compare at a glance."""
    fig, groups, titles = go.Figure(), {}, {}
    ticks = [2.0**k for k in range(int(math.log2(top)) + 1)]
    for i, (label, amax) in enumerate(maps.items()):
        ratio = amax / amax.median(dim=1, keepdim=True).values
        fig.add_trace(go.Heatmap(
            z=ratio.clamp(min=1).log2().tolist(), zmin=0, zmax=math.log2(top),
            colorscale="Inferno", customdata=torch.stack([amax, ratio], -1).tolist(),
            colorbar=dict(title="x median", tickvals=[math.log2(t) for t in ticks],
                          ticktext=[f"{t:g}" for t in ticks]),
            hovertemplate="layer %{y}, channel %{x}<br>absmax %{customdata[0]:.3g} = "
                          "%{customdata[1]:.1f} x the median<extra></extra>"))
        groups[label] = [i]
        titles[label] = (f"{label}: largest channel {float(ratio.max()):.1f}x the median "
                         f"(channel {int(ratio.max(0).values.argmax())})")
    dropdown(fig, groups, title_of=titles.get)
    fig.update_layout(template="plotly_white", height=420, xaxis_title="channel",
                      yaxis_title="layer", yaxis_dtick=1)
    return fig


def token_heatmap_figure(maps: dict[str, Tensor], tokens: list[str]) -> go.Figure:
    """maps: label -> (T, K) activations of one sentence's T tokens (named by tokens). A
    heatmap of |x| (rows: tokens, columns: channels), one per label, picked with a dropdown."""
    fig, groups, titles = go.Figure(), {}, {}
    ylab = [f"{i} {t}" for i, t in enumerate(tokens)]
    for i, (label, x) in enumerate(maps.items()):
        a = x.abs()
        t, c = divmod(int(a.argmax()), a.shape[1])
        fig.add_trace(go.Heatmap(z=a.tolist(), y=ylab, colorscale="Inferno", colorbar_title="|x|",
                                 hovertemplate="%{y}, channel %{x}: |x| = %{z:.3g}"
                                               "<extra></extra>"))
        groups[label] = [i]
        titles[label] = (f"|x| per token and channel, {label}: largest {float(a.max()):.1f} "
                         f"at token {tokens[t]}, channel {c}")
    dropdown(fig, groups, title_of=titles.get)
    fig.update_layout(template="plotly_white", height=440, xaxis_title="channel",
                      yaxis_autorange="reversed")
    return fig


def token_codes_figure(codes: dict[str, Tensor]) -> go.Figure:
    """codes: label -> (K,) integer codes of one token's K channels under some int8 quantizer.
    One bar chart per label, picked with a dropdown; the y axis spans int8's range."""
    fig, groups, titles = go.Figure(), {}, {}
    for i, (label, c) in enumerate(codes.items()):
        fig.add_trace(go.Bar(y=c.tolist(), marker_color=COLORS[i % len(COLORS)],
                             hovertemplate="channel %{x}: code %{y}<extra></extra>"))
        groups[label] = [i]
        mags = c.abs().sort(descending=True).values
        titles[label] = (f"One token's int8 codes, {label}: largest |code| {int(mags[0])}, "
                         f"the next {int(mags[1])}, median {int(mags[len(c) // 2])}")
    dropdown(fig, groups, title_of=titles.get)
    fig.update_layout(template="plotly_white", height=440, bargap=0, showlegend=False,
                      yaxis_range=[-130, 130], xaxis_title="channel", yaxis_title="int8 code")
    return fig


def alpha_slider_figure(rows: list[dict], top: int = 3) -> go.Figure:
    """rows from alpha_sweep. A slider over alpha: per-channel absmax of the activations x / s
    (top) and of the weight columns w * s (bottom), each over its own median, on one fixed log
    axis; the title gives the three SQNRs. The `top` largest activation channels (without
    smoothing) are drawn in red in both."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        subplot_titles=("activations x / s: absmax per channel / median",
                                        "weights w * s: absmax per column / median"))
    hot = set(rows[0]["x_amax"].topk(top).indices.tolist())
    lo, hi = 1.0, 1.0
    for k, r in enumerate(rows):
        for row, key in ((1, "x_amax"), (2, "w_amax")):
            a = r[key] / r[key].median()
            lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
            base = COLORS[0] if row == 1 else COLORS[2]
            fig.add_trace(go.Bar(y=a.tolist(), visible=k == 0, showlegend=False,
                                 marker_color=[COLORS[1] if j in hot else base
                                               for j in range(len(a))],
                                 hovertemplate="channel %{x}: %{y:.2f} x median<extra></extra>"),
                          row=row, col=1)

    def title(r):
        a = "none (s = 1)" if r["alpha"] is None else f"{r['alpha']:.1f}"
        return (f"alpha {a}: activations {r['activation SQNR dB']:.1f} dB, weights "
                f"{r['weight SQNR dB']:.1f} dB, output {r['output SQNR dB']:.1f} dB")

    steps = [dict(method="update", label="none" if r["alpha"] is None else f"{r['alpha']:.1f}",
                  args=[{"visible": [j // 2 == k for j in range(2 * len(rows))]},
                        {"title.text": title(r)}]) for k, r in enumerate(rows)]
    fig.update_layout(title=title(rows[0]), template="plotly_white", height=580, bargap=0,
                      sliders=[dict(active=0, steps=steps, pad=dict(t=40),
                                    currentvalue=dict(prefix="alpha: "))])
    for row in (1, 2):  # one fixed range for every alpha, so the bars can be compared
        fig.update_yaxes(type="log", dtick=1, range=[math.log10(lo) - 0.1, math.log10(hi) + 0.1],
                         row=row, col=1)
    fig.update_xaxes(title_text="input channel j (red: the largest activation channels)", row=2,
                     col=1)
    return fig


def alpha_sqnr_figure(sweeps: dict[str, list[dict]]) -> go.Figure:
    """sweeps: layer label -> rows from alpha_sweep. Activation, weight and output SQNR (dB)
    against alpha, one set of lines per layer (dropdown); "no smoothing" as dotted levels."""
    fig, groups = go.Figure(), {}
    keys = ("activation SQNR dB", "weight SQNR dB", "output SQNR dB")
    for label, rows in sweeps.items():
        groups[label] = []
        base, rest = rows[0], rows[1:]
        for i, key in enumerate(keys):
            groups[label] += [len(fig.data), len(fig.data) + 1]
            fig.add_trace(go.Scatter(x=[r["alpha"] for r in rest], y=[r[key] for r in rest],
                                     mode="lines+markers", name=key.split()[0],
                                     line=dict(color=COLORS[i]),
                                     hovertemplate="alpha %{x}: %{y:.1f} dB<extra></extra>"))
            fig.add_trace(go.Scatter(x=[0, 1], y=[base[key]] * 2, mode="lines",
                                     name=key.split()[0] + ", no smoothing", showlegend=False,
                                     line=dict(color=COLORS[i], dash="dot"),
                                     hovertemplate="no smoothing: %{y:.1f} dB<extra></extra>"))
    dropdown(fig, groups, title_of=lambda lab: f"W8A8 SQNR against SmoothQuant's alpha: {lab}")
    fig.update_layout(template="plotly_white", height=460, xaxis_title="alpha (migration "
                      "strength)", yaxis_title="SQNR (dB); dotted: no smoothing")
    return fig


def rotation_histogram_figure(pairs: dict[str, tuple[Tensor, Tensor]], bins: int = 121
                              ) -> go.Figure:
    """pairs: label -> (tensor before, tensor after rotation). Overlaid histograms of the values
    divided by their RMS (log counts), one pair per label (dropdown); kurtosis in the legend."""
    fig, groups = go.Figure(), {}
    for label, (before, after) in pairs.items():
        groups[label] = []
        lim = float(max(before.abs().max(), after.abs().max()) / before.pow(2).mean().sqrt())
        for i, (what, t) in enumerate((("before", before), ("after", after))):
            v = (t / t.pow(2).mean().sqrt()).flatten().double()
            counts = torch.histc(v, bins=bins, min=-lim, max=lim)
            edges = torch.linspace(-lim, lim, bins + 1)
            groups[label].append(len(fig.data))
            fig.add_trace(go.Bar(x=((edges[1:] + edges[:-1]) / 2).tolist(), y=counts.tolist(),
                                 name=f"{what} rotation (kurtosis {kurtosis(t):.1f})",
                                 marker_color=COLORS[i], opacity=0.6, width=2 * lim / bins,
                                 hovertemplate="%{x:.2f} x RMS: %{y}<extra></extra>"))
    dropdown(fig, groups,
             title_of=lambda lab: f"Values / RMS before and after a Hadamard rotation: {lab}")
    fig.update_layout(template="plotly_white", height=460, barmode="overlay", bargap=0,
                      yaxis_type="log", yaxis_dtick=1, xaxis_title="value / RMS",
                      yaxis_title="count (log)",
                      legend=dict(x=0.99, xanchor="right", y=0.99))
    return fig


def end_to_end_figure(results: dict[str, dict[str, float]], axis: dict[str, str]) -> go.Figure:
    """results: case -> {method: error}; axis: case -> y-axis title. One bar per method
    (linear axis, value on top; colored by family: RTN, SmoothQuant..., rotation), one case at
    a time (dropdown); lower is better."""
    family = lambda m: next((i for i, f in enumerate(("RTN", "SmoothQuant", "rotation"))
                             if m.startswith(f)), 3)
    fig, groups = go.Figure(), {}
    for k, (case, errs) in enumerate(results.items()):
        groups[case] = [k]
        fig.add_trace(go.Bar(x=list(errs), y=list(errs.values()),
                             text=[f"{v:.2g}" for v in errs.values()], textposition="outside",
                             marker_color=[COLORS[family(m)] for m in errs],
                             hovertemplate="%{x}: %{y:.3g}<extra></extra>"))
    fig.update_layout(template="plotly_white", height=440, showlegend=False)
    dropdown(fig, groups, title_of=lambda c: f"W8A8 end to end: {c}",
             extra={c: {"yaxis.title.text": axis[c]} for c in results})
    return fig
