"""Chapter 3's panel: pick a layer, a token and a channel to see an outlier, and slide
SmoothQuant's migration strength alpha to see the activation and weight ranges trade places."""

from __future__ import annotations

import math

import ipywidgets as W
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from quantlab.algorithms.smoothquant import smoothing_scales
from quantlab.studies.outliers import channel_absmax, distinct_inputs, smooth, w8a8_errors
from quantlab.viz.book import COLORS
from quantlab.viz.formats import log_axis
from quantlab.widgets._common import _show

ALPHAS = (None, *(a / 10 for a in range(11)))  # None: no smoothing (s = 1)


def _smoothed(x: Tensor, w: Tensor, alpha: float | None) -> dict:
    """One alpha_sweep row (quantlab.studies.outliers) for one alpha: W8A8 SQNRs of the smoothed
    pair and the per-channel absmax of x / s and w * s."""
    xs, ws = smooth(x, w, alpha)
    return {"alpha": alpha, **w8a8_errors(xs, ws), "x_amax": channel_absmax(xs),
            "w_amax": channel_absmax(ws)}


def _range(x: Tensor, w: Tensor) -> tuple[float, float]:
    """The smallest and largest absmax / median of x / s and w * s over every alpha: one fixed
    log axis for the layer, so that bars compare across the slider (s from the absmax alone)."""
    xa, wa, r = channel_absmax(x), channel_absmax(w), []
    for alpha in ALPHAS[1:]:
        s = smoothing_scales(xa, [w], alpha)
        r += [(v / v.median()).aminmax() for v in (xa / s, wa * s)]
    return min(float(lo) for lo, _ in r) / 1.5, max(float(hi) for _, hi in r) * 1.5


def _figure(x: Tensor, row: dict, t: int, c: int, tokens: list[str], yr: tuple) -> go.Figure:
    """x: (T, K) one layer's input; row: one alpha_sweep row; yr: _range. Four bar charts:
    token t's |x| per channel, channel c's |x| per token, and the per-channel absmax of x / s and
    of w * s over their medians (log axis), with channel c (or token t) in red."""
    fig = make_subplots(rows=2, cols=2, vertical_spacing=0.2, horizontal_spacing=0.08,
                        subplot_titles=(f"token {t} {tokens[t]!r}: |x| per channel",
                                        f"channel {c}: |x| per token",
                                        "x / s: absmax per channel / median",
                                        "w * s: absmax per column / median"))
    a = x.abs()
    panels = ((1, 1, a[t], c, COLORS[0], "channel"), (1, 2, a[:, c], t, COLORS[4], "token"),
              (2, 1, row["x_amax"] / row["x_amax"].median(), c, COLORS[0], "channel"),
              (2, 2, row["w_amax"] / row["w_amax"].median(), c, COLORS[2], "channel"))
    for r, col, v, i, base, what in panels:  # numpy arrays and one color per trace: plotly
        v = v.float().numpy()  # validates long lists item by item, seconds for 1536 bars
        names = tokens if what == "token" else None
        hover = what + " %{x} %{customdata}: %{y:.3g}<extra></extra>" if names else \
            what + " %{x}: %{y:.3g}<extra></extra>"
        fig.add_trace(go.Bar(y=v, marker_color=base, showlegend=False, customdata=names,
                             hovertemplate=hover), row=r, col=col)
        fig.add_trace(go.Bar(x=[i], y=[float(v[i])], marker_color=COLORS[1], showlegend=False,
                             width=max(1, len(v) // 100), hoverinfo="skip"), row=r, col=col)
        fig.update_xaxes(title_text=what, row=r, col=col)
    axis = log_axis(*yr)
    for col in (1, 2):
        fig.update_yaxes(range=[math.log10(yr[0]), math.log10(yr[1])], row=2, col=col, **axis)
    alpha = "none (s = 1)" if row["alpha"] is None else f"{row['alpha']:.1f}"
    step, others = float(a[t].max()) / 127, torch.cat([a[t, :c], a[t, c + 1:]])
    fig.update_layout(
        title=f"alpha {alpha}: W8A8 SQNR activations {row['activation SQNR dB']:.1f} dB, "
              f"weights {row['weight SQNR dB']:.1f} dB, output {row['output SQNR dB']:.1f} dB<br>"
              f"<sub>per-token int8 on token {t}: step {step:.3g}; channel {c} "
              f"({float(a[t, c]):.3g}) is code {round(float(a[t, c]) / step)}, the others "
              f"reach code {round(float(others.max()) / step)} at most</sub>",
        template="plotly_white", height=620, bargap=0, barmode="overlay", margin=dict(t=110))
    return fig


def outlier_panel(inputs: dict[str, Tensor], weights: dict[str, Tensor],
                  tokens: list[str] | None = None, sweeps: dict | None = None) -> W.VBox:
    """inputs: layer name -> its input (T, K), as quantlab.studies.outliers.linear_inputs records
    them (layers reading one tensor shown once); weights: layer name -> its weight (N, K);
    tokens: the T token strings (optional). Dropdown (layer), sliders (token, channel, alpha):
    the outlier and what SmoothQuant's alpha does to that layer's activation and weight ranges.
    Picking a layer jumps to its largest channel and the token where it peaks. sweeps: layer
    name -> alpha_sweep(x, w, alphas) rows the chapter already has; any other (layer, alpha) is
    computed on first view (one W8A8 pass) and kept, so a redraw after that only draws."""
    inputs = distinct_inputs(inputs)
    if not inputs:
        raise ValueError("inputs is empty: pass linear_inputs(model, batch) of a model run")
    for name, x in inputs.items():
        if name not in weights:
            raise ValueError(f"no weight for layer {name!r}; pass weights for every layer of "
                             "inputs, e.g. {n: model.get_submodule(n).weight for n in inputs}")
        if x.ndim != 2 or weights[name].ndim != 2 or weights[name].shape[1] != x.shape[1]:
            raise ValueError(f"{name}: input {tuple(x.shape)} and weight "
                             f"{tuple(weights[name].shape)} must be (T, K) and (N, K)")
    rows = {x.shape[0] for x in inputs.values()}
    tokens = list(tokens) if tokens is not None else [f"#{i}" for i in range(max(rows))]
    if rows != {len(tokens)}:
        raise ValueError(f"the inputs have {sorted(rows)} rows and there are {len(tokens)} "
                         "tokens: pass the inputs of one batch and its real_tokens()")

    layer = W.Dropdown(options=list(inputs), description="layer",
                       layout=W.Layout(width="460px"))
    token = W.IntSlider(min=0, max=len(tokens) - 1, description="token",
                        continuous_update=False)
    channel = W.IntSlider(min=0, max=1, description="channel", continuous_update=False)
    alpha = W.SelectionSlider(options=["none", *(f"{a:.1f}" for a in ALPHAS[1:])], value="0.5",
                              description="alpha", continuous_update=False)
    out, busy, ranges = W.Output(), [False], {}
    rows = {(n, r["alpha"]): r for n, rs in (sweeps or {}).items() for r in rs}

    def redraw(*_):
        if busy[0]:
            return
        a = None if alpha.value == "none" else float(alpha.value)
        key, x = (layer.value, a), inputs[layer.value].detach().float()
        w = weights[layer.value].detach().float()
        if key not in rows:
            rows[key] = _smoothed(x, w, a)
        if layer.value not in ranges:
            ranges[layer.value] = _range(x, w)
        _show(out, _figure(x, rows[key], token.value, channel.value, tokens, ranges[layer.value]))

    def pick_layer(*_):
        x = inputs[layer.value]
        c = int(channel_absmax(x).argmax())
        busy[0] = True
        channel.max, channel.value = x.shape[1] - 1, c
        token.value = int(x[:, c].abs().argmax())
        busy[0] = False
        redraw()

    layer.observe(pick_layer, "value")
    for w in (token, channel, alpha):
        w.observe(redraw, "value")
    pick_layer()
    return W.VBox([layer, W.HBox([token, channel, alpha]), out])
