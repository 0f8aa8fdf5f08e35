"""Chapter 1 (number formats): where each format puts its values, and what a code's bits mean."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from quantlab.formats import get_format
from quantlab.viz.book import COLORS


def _positive_values(name: str) -> torch.Tensor:
    g = get_format(name).grid()
    return g[g > 0]


def _tick_label(v: float, base: float) -> str:
    if 1e-3 <= v < 1e5:
        return f"{v:g}"
    return f"{base:g}<sup>{round(math.log(v, base))}</sup>"


def log_axis(lo: float, hi: float, max_ticks: int = 12) -> dict:
    """Layout for a log axis covering [lo, hi] (both > 0) with labels on clean values only:
    powers of two when the range spans under two decades (E2M1's 0.5 .. 6: 0.5, 1, 2, 4),
    powers of ten otherwise. Plotly's own labels on a short log axis include the minor digits
    (5 6 7 8 9 1 2 ...), which read as values."""
    if not 0 < lo <= hi:
        raise ValueError(f"log_axis needs 0 < lo <= hi, got lo={lo}, hi={hi}")
    base = 2.0 if hi / lo < 100 else 10.0
    k0, k1 = math.floor(math.log(lo, base) + 1e-9), math.ceil(math.log(hi, base) - 1e-9)
    step = max(1, math.ceil((k1 - k0 + 1) / max_ticks))
    vals = [base**k for k in range(k0 // step * step, k1 + 1, step)]
    return dict(type="log", tickvals=vals, ticktext=[_tick_label(v, base) for v in vals])


def value_grid_figure(names: list[str]) -> go.Figure:
    """Every positive value of each format on a log axis, one row per format. A dropdown
    switches between absolute values and values scaled so each format's max is 1 (what a
    scale that maps a block's amax to the top code gives)."""
    fig, lo, hi = go.Figure(), math.inf, 0.0
    for scaled in (False, True):
        for i, name in enumerate(names):
            v = _positive_values(name)
            x = (v / v.max()) if scaled else v
            lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
            fig.add_trace(go.Scatter(
                x=x.tolist(), y=[name] * len(v), mode="markers", visible=not scaled,
                marker=dict(symbol="line-ns-open", size=14, color=COLORS[i % 10]),
                name=name, showlegend=False, customdata=v.tolist(),
                hovertemplate=name + ": %{customdata:.6g}<br>x = %{x:.6g}<extra></extra>"))
    n = len(names)
    buttons = [dict(label=lab, method="update",
                    args=[{"visible": [s == scaled for s in (False, True) for _ in names]},
                          {"xaxis.title.text": xt}])
               for lab, scaled, xt in (("absolute values", False, "value (log scale)"),
                                       ("scaled to max = 1", True, "value / max (log scale)"))]
    fig.update_layout(
        title="Where each format puts its positive values", template="plotly_white",
        height=120 + 45 * n, xaxis=log_axis(lo, hi), xaxis_title="value (log scale)",
        yaxis=dict(autorange="reversed"), margin=dict(l=80),
        updatemenus=[dict(buttons=buttons, x=1.0, xanchor="right", y=1.15, yanchor="bottom")])
    return fig


def relative_step_figure(names: list[str]) -> go.Figure:
    """Gap to the next value divided by the value (the relative rounding step, 2x the worst
    relative rounding error) against value / max, log-log, one line per format."""
    fig, xs, ys = go.Figure(), [], []
    for i, name in enumerate(names):
        v = _positive_values(name)
        rel = (v[1:] - v[:-1]) / v[:-1]
        xs, ys = xs + [v[0] / v.max(), v[-2] / v.max()], ys + [rel.min(), rel.max()]
        fig.add_trace(go.Scatter(
            x=(v[:-1] / v.max()).tolist(), y=rel.tolist(), mode="lines+markers", name=name,
            line=dict(shape="hv", color=COLORS[i % 10]), marker=dict(size=4),
            hovertemplate=name + ": step/value %{y:.4g} at value/max %{x:.4g}<extra></extra>"))
    fig.update_layout(title="Relative step (gap to the next value / value)",
                      template="plotly_white", height=460,
                      xaxis=log_axis(float(min(xs)), float(max(xs))),
                      yaxis=log_axis(float(min(ys)), float(max(ys))),
                      xaxis_title="value / max (log)", yaxis_title="relative step (log)")
    return fig


def explain_code(name: str, code: int) -> str:
    """One line: a code's bits split into fields and the value they give."""
    fmt = get_format(name)
    bits = format(code, f"0{fmt.bits}b")
    value = float(fmt.decode(torch.tensor([code]))[0]) if fmt.kind != "int" \
        else float(fmt.table[code])
    if fmt.kind == "int":
        return f"{bits} (two's complement) = {value:g}"
    if fmt.kind == "codebook":
        return f"index {bits} = table[{code}] = {value:.6g}"
    s, e, m = bits[0], bits[1:1 + fmt.ebits], bits[1 + fmt.ebits:]
    ei, mi, sign = int(e, 2), int(m, 2), "-" if s == "1" else "+"
    if math.isnan(value) or math.isinf(value):
        return f"{s} {e} {m}: {value}"
    if ei == 0:
        return (f"{s} {e} {m}: subnormal {sign}2^{fmt.emin} x {mi}/{1 << fmt.mbits}"
                f" = {value:.6g}")
    return (f"{s} {e} {m}: {sign}2^({ei}-{fmt.bias}) x (1 + {mi}/{1 << fmt.mbits})"
            f" = {value:.6g}")


def _field_row(name: str, code: int) -> tuple[list[int], list[str]]:
    fmt = get_format(name)
    bits = format(code, f"0{fmt.bits}b")
    if fmt.kind == "float":
        field = [0] + [1] * fmt.ebits + [2] * fmt.mbits
    elif fmt.kind == "int":
        field = [0] + [2] * (fmt.bits - 1)
    else:
        field = [2] * fmt.bits
    return field, list(bits)


def bit_explorer_figure(name: str = "e4m3") -> go.Figure:
    """A slider over every code of a format: the bits (sign / exponent / mantissa) on top, the
    code's magnitude (star) among all the format's positive values (log axis) below."""
    fmt = get_format(name)
    n = 1 << fmt.bits
    table = fmt.table
    pos = _positive_values(name)
    fig = make_subplots(rows=2, cols=1, row_heights=[0.35, 0.65], vertical_spacing=0.12)
    field, text = _field_row(name, 0)
    scale = [[0, "#f4a582"], [0.5, "#92c5de"], [1, "#d1e5a0"]]
    fig.add_trace(go.Heatmap(z=[field], text=[text], texttemplate="%{text}", zmin=0, zmax=2,
                             colorscale=scale, showscale=False, hoverinfo="skip",
                             textfont=dict(size=22), xgap=3), row=1, col=1)
    fig.add_trace(go.Scatter(x=pos.tolist(), y=[0] * len(pos), mode="markers",
                             marker=dict(symbol="line-ns-open", size=12, color="#888"),
                             showlegend=False, hovertemplate="%{x:.6g}<extra></extra>"),
                  row=2, col=1)
    fig.add_trace(go.Scatter(x=[None], y=[0], mode="markers", showlegend=False,
                             marker=dict(symbol="star", size=18, color="#d62728"),
                             hovertemplate="|value| %{x:.6g}<extra></extra>"), row=2, col=1)
    steps = []
    for code in range(n):
        v = float(table[code])
        field, text = _field_row(name, code)
        star = [abs(v)] if math.isfinite(v) and v != 0 else [None]
        steps.append(dict(
            method="update", label=f"0x{code:02X}",
            args=[{"z": [[field], None], "text": [[text], None], "x": [None, star]},
                  {"title.text": f"{name} code 0x{code:02X}: {explain_code(name, code)}"},
                  [0, 2]]))
    start = int(fmt.encode(torch.tensor([1.0]))[0]) if fmt.kind != "int" else 1
    steps[start]["args"][0]["x"] = [None, [abs(float(table[start]))]]
    field, text = _field_row(name, start)
    fig.data[0].z, fig.data[0].text = [field], [text]
    fig.data[2].x = [abs(float(table[start]))]
    fig.update_layout(
        title=f"{name} code 0x{start:02X}: {explain_code(name, start)}",
        template="plotly_white", height=420, margin=dict(t=70),
        sliders=[dict(active=start, steps=steps, pad=dict(t=40),
                      currentvalue=dict(prefix="code ", font=dict(size=14, color="#444")),
                      font=dict(color="rgba(0,0,0,0)"), ticklen=0, minorticklen=0)])
    fig.update_xaxes(visible=False, row=1, col=1)
    fig.update_yaxes(visible=False, row=1, col=1)
    fig.update_xaxes(title_text="|value| (log scale)", row=2, col=1,
                     **log_axis(float(pos.min()), float(pos.max())))
    fig.update_yaxes(visible=False, row=2, col=1)
    return fig
