"""Chapters 2 (one layer) and 6 (4-bit floats): one weight under many schemes: error
histograms, SQNR against bits per weight, scale granularity, 4-bit levels and MX scale rules."""

from __future__ import annotations

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from quantlab.eval.metrics import sqnr_db
from quantlab.quantize import dequantize, quantize
from quantlab.viz.book import COLORS


def scheme_rows(w: torch.Tensor, schemes: dict) -> list[dict]:
    """w: (N, K) float; schemes: label -> preset name or TensorScheme. One row per scheme:
    bits per weight (scales included), SQNR in dB and the dequantized tensor."""
    rows = []
    for label, scheme in schemes.items():
        q = quantize(w, scheme)
        wq = dequantize(q)
        rows.append(dict(scheme=label, bits_per_weight=q.bits_per_weight,
                         sqnr_db=sqnr_db(w, wq), dequantized=wq))
    return rows


def error_histogram_slider(w: torch.Tensor, rows: list[dict], bins: int = 121,
                           title: str = "Quantization error") -> go.Figure:
    """rows from scheme_rows(w, ...): a slider steps through the schemes, showing the histogram
    of (dequantized - w) / max|w| (log counts). Each scheme gets its own symmetric x range (8-bit
    errors are ~100x narrower than 4-bit ones): read the axis."""
    amax = float(w.abs().max())
    fig, lims = go.Figure(), []
    for i, r in enumerate(rows):
        e = ((r["dequantized"] - w) / amax).double()
        lim = float(e.abs().max()) or 1e-12
        edges = torch.linspace(-lim, lim, bins + 1, dtype=torch.float64)
        counts = torch.histc(e, bins=bins, min=-lim, max=lim)
        lims.append(lim * 1.05)
        fig.add_trace(go.Bar(x=((edges[1:] + edges[:-1]) / 2).tolist(), y=counts.tolist(),
                             visible=i == 0, name=r["scheme"], marker_color=COLORS[i % 10],
                             width=2 * lim / bins,
                             hovertemplate="error %{x:.3g} x max|w|: %{y} weights<extra></extra>"))
    label = lambda r: f"{title}: {r['scheme']}, {r['bits_per_weight']:.3f} bits/weight, " \
                      f"SQNR {r['sqnr_db']:.1f} dB"
    steps = [dict(method="update", label=r["scheme"],
                  args=[{"visible": [j == i for j in range(len(rows))]},
                        {"title.text": label(r), "xaxis.range": [-lims[i], lims[i]]}])
             for i, r in enumerate(rows)]
    fig.update_layout(title=label(rows[0]), template="plotly_white", height=460, bargap=0,
                      xaxis_range=[-lims[0], lims[0]],
                      yaxis_type="log", yaxis_title="weights (log)", showlegend=False,
                      xaxis_title="error / max|w|",
                      sliders=[dict(active=0, steps=steps, pad=dict(t=50),
                                    currentvalue=dict(prefix="scheme: "))])
    return fig


# Label placement for scatter plots: the plot area of a 520-px-high figure in a ~1000-px page,
# and the size of 10-px text, in pixels (plotly places text in pixels, the data in axis units).
_PLOT_PX, _CHAR_PX, _LINE_PX = (760.0, 380.0), 6.2, 14.0
_SPOTS = {  # plotly textposition -> the label's lower-left corner for a point at px, py (y up)
    "middle right": lambda px, py, w, h: (px + 8, py - h / 2),
    "middle left": lambda px, py, w, h: (px - 8 - w, py - h / 2),
    "top center": lambda px, py, w, h: (px - w / 2, py + 7),
    "bottom center": lambda px, py, w, h: (px - w / 2, py - 7 - h),
    "top right": lambda px, py, w, h: (px + 5, py + 5),
    "bottom left": lambda px, py, w, h: (px - 5 - w, py - 5 - h)}


def _place_labels(xs: list, ys: list, names: list[str], xr: tuple, yr: tuple) -> list:
    """A plotly textposition per point (None: no room, the name shows on hover only) so that no
    label overlaps another label or a marker in the view x in xr, y in yr; points placed from
    the top down, each at the first free spot of _SPOTS."""
    sx, sy = _PLOT_PX[0] / (xr[1] - xr[0]), _PLOT_PX[1] / (yr[1] - yr[0])
    pts = [((x - xr[0]) * sx, (y - yr[0]) * sy) for x, y in zip(xs, ys, strict=True)]
    taken = [(px - 6, py - 6, px + 6, py + 6) for px, py in pts]  # the markers
    hit = lambda a, b: a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
    out = [None] * len(pts)
    for i in sorted(range(len(pts)), key=lambda i: -ys[i]):
        (px, py), w, h = pts[i], len(names[i]) * _CHAR_PX, _LINE_PX
        if not (0 <= px <= _PLOT_PX[0] and 0 <= py <= _PLOT_PX[1]):
            continue
        for pos, spot in _SPOTS.items():
            x0, y0 = spot(px, py, w, h)
            box = (x0, y0, x0 + w, y0 + h)
            inside = x0 >= 0 and y0 >= 0 and box[2] <= _PLOT_PX[0] and box[3] <= _PLOT_PX[1]
            if inside and not any(hit(box, t) for j, t in enumerate(taken) if j != i):
                out[i] = pos
                taken.append(box)
                break
    return out


def sqnr_vs_bits_figure(rows: list[dict], title: str = "SQNR against bits per weight",
                        zooms: dict | None = None) -> go.Figure:
    """rows with scheme, bits_per_weight, sqnr_db (and optional family): one point per row,
    colored by family, named on hover and, where there is room, by a label that overlaps no
    other. zooms: button label -> (x range, y range), shown as a dropdown after an "all" entry,
    for crowded clusters; each view labels the points it has room for."""
    fig = go.Figure()
    families = list(dict.fromkeys(r.get("family", "") for r in rows))
    groups = [[j for j, r in enumerate(rows) if r.get("family", "") == fam] for fam in families]
    xs, ys = [r["bits_per_weight"] for r in rows], [r["sqnr_db"] for r in rows]
    names = [r["scheme"] for r in rows]
    pad = lambda v: (min(v) - 0.08 * (max(v) - min(v) or 1), max(v) + 0.08 * (max(v) - min(v) or 1))
    views = {"all": (pad(xs), pad(ys)), **(zooms or {})}

    def labels(xr, yr):  # per trace: the label texts and their positions in this view
        pos = _place_labels(xs, ys, names, xr, yr)
        return ([[names[j] if pos[j] else "" for j in idx] for idx in groups],
                [[pos[j] or "middle right" for j in idx] for idx in groups])

    text, where = labels(*views["all"])
    for i, (fam, idx) in enumerate(zip(families, groups, strict=True)):
        fig.add_trace(go.Scatter(
            x=[xs[j] for j in idx], y=[ys[j] for j in idx], mode="markers+text", text=text[i],
            textposition=where[i], customdata=[names[j] for j in idx],
            name=fam or "schemes", marker=dict(size=10, color=COLORS[i % 10]),
            textfont=dict(size=10),
            hovertemplate="%{customdata}<br>%{x:.3f} bits/weight<br>SQNR %{y:.2f} dB"
                          "<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white", height=520,
                      xaxis=dict(range=list(views["all"][0]),
                                 title="bits per weight (scales included)"),
                      yaxis=dict(range=list(views["all"][1]), title="SQNR (dB)"))
    if zooms:
        buttons = []
        for lab, (xr, yr) in views.items():
            text, where = labels(xr, yr)
            buttons.append(dict(label=lab, method="update",
                                args=[{"text": text, "textposition": where},
                                      {"xaxis.range": list(xr), "yaxis.range": list(yr)}]))
        fig.update_layout(updatemenus=[dict(buttons=buttons, x=1.0, xanchor="right", y=1.12,
                                            yanchor="bottom")])
    return fig


def granularity_figure(rows: list[dict]) -> go.Figure:
    """rows with format, granularity, bits_per_weight, sqnr_db: grouped bars, one group per
    granularity, one bar per element format."""
    fig = go.Figure()
    for i, fmt in enumerate(dict.fromkeys(r["format"] for r in rows)):
        sel = [r for r in rows if r["format"] == fmt]
        fig.add_trace(go.Bar(
            x=[r["granularity"] for r in sel], y=[r["sqnr_db"] for r in sel], name=fmt,
            marker_color=COLORS[i % 10], customdata=[r["bits_per_weight"] for r in sel],
            text=[f"{r['bits_per_weight']:.3f} b" for r in sel], textposition="outside",
            hovertemplate="%{x}<br>SQNR %{y:.2f} dB<br>%{customdata:.4f} bits/weight"
                          "<extra></extra>"))
    fig.update_layout(title="Finer scales, less error (labels: bits per weight)",
                      template="plotly_white", height=480, barmode="group",
                      yaxis_title="SQNR (dB)", xaxis_title="who shares one scale")
    return fig


def levels_figure(w_over_amax: torch.Tensor, levels: dict, bins: int = 101) -> go.Figure:
    """Histogram of weights divided by their block's absmax (in [-1, 1]; each block's max
    itself, always +-1, left out) with, below it, where each 4-bit scheme puts its levels on
    that same axis (levels: label -> 1-D tensor)."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.6, 0.4],
                        vertical_spacing=0.05)
    inner = w_over_amax.float()
    counts = torch.histc(inner[inner.abs() < 1], bins=bins, min=-1, max=1)
    centers = torch.linspace(-1, 1, bins + 1)
    centers = ((centers[1:] + centers[:-1]) / 2).tolist()
    fig.add_trace(go.Bar(x=centers, y=counts.tolist(), marker_color="#999", name="weights",
                         width=2 / bins, showlegend=False,
                         hovertemplate="w / block amax %{x:.3f}: %{y}<extra></extra>"),
                  row=1, col=1)
    for i, (label, lv) in enumerate(levels.items()):
        fig.add_trace(go.Scatter(x=lv.tolist(), y=[label] * len(lv), mode="markers",
                                 marker=dict(symbol="line-ns-open", size=16, color=COLORS[i]),
                                 name=label, showlegend=False,
                                 hovertemplate=label + ": %{x:.4f}<extra></extra>"),
                      row=2, col=1)
    fig.update_layout(title="The 4-bit levels against the weights, both relative to the block's"
                            " absmax", template="plotly_white", height=520, bargap=0)
    fig.update_yaxes(title_text="weights", row=1, col=1)
    fig.update_yaxes(autorange="reversed", row=2, col=1)
    fig.update_xaxes(title_text="value / block absmax", row=2, col=1)
    return fig


def mx_rule_figure(mantissa: torch.Tensor, sqnr_floor: torch.Tensor, sqnr_rceil: torch.Tensor
                   ) -> go.Figure:
    """Per MX block: x = amax / 2**floor(log2 amax) in [1, 2), y = the block's SQNR under the
    FLOOR and RCEIL scale rules. FLOOR clips the block's largest values where x > 1.5."""
    fig = go.Figure()
    for i, (lab, y) in enumerate((("FLOOR (OCP spec)", sqnr_floor), ("RCEIL", sqnr_rceil))):
        fig.add_trace(go.Scattergl(x=mantissa.tolist(), y=y.tolist(), mode="markers", name=lab,
                                   marker=dict(size=4, opacity=0.5, color=COLORS[i]),
                                   hovertemplate=lab + "<br>amax mantissa %{x:.3f}<br>block "
                                   "SQNR %{y:.1f} dB<extra></extra>"))
    fig.add_vrect(x0=1.5, x1=2.0, fillcolor="#d62728", opacity=0.08, line_width=0,
                  annotation_text="FLOOR clips: amax / X > 6", annotation_position="top left")
    fig.update_layout(title="MXFP4 block SQNR against where the block's amax falls in its octave",
                      template="plotly_white", height=480,
                      xaxis_title="amax / 2^floor(log2 amax)", yaxis_title="block SQNR (dB)")
    return fig


def block_values_figure(block: torch.Tensor, versions: dict) -> go.Figure:
    """One block's values (x: index in the block) and its dequantized versions (label -> tensor),
    to see which elements a scale rule clips."""
    fig = go.Figure(go.Scatter(x=list(range(len(block))), y=block.tolist(), mode="markers",
                               name="original", marker=dict(size=12, color="#444",
                                                            symbol="circle-open")))
    for i, (lab, v) in enumerate(versions.items()):
        fig.add_trace(go.Scatter(x=list(range(len(v))), y=v.tolist(), mode="markers", name=lab,
                                 marker=dict(size=7, color=COLORS[i])))
    fig.update_layout(title="One MXFP4 block: original and dequantized values",
                      template="plotly_white", height=420, xaxis_title="index in the block",
                      yaxis_title="weight")
    return fig
