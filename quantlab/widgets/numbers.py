"""Chapter 1's panel: a number format's bits, their meaning and the value's place on the line."""

from __future__ import annotations

import math

import ipywidgets as W
import plotly.graph_objects as go

from quantlab.formats import get_format
from quantlab.viz.formats import _field_row, explain_code, log_axis
from quantlab.widgets._common import _show

BIT_FORMATS = ("e4m3", "e5m2", "e3m2", "e2m3", "e2m1", "int8", "int4", "nf4")
FIELD_COLORS = ("#f4a582", "#92c5de", "#d1e5a0")  # sign, exponent, mantissa


def _bits_html(name: str, code: int) -> str:
    field, bits = _field_row(name, code)
    boxes = "".join(
        f"<span style='display:inline-block;width:2em;text-align:center;margin:1px;"
        f"font:bold 1.4em monospace;background:{FIELD_COLORS[f]}'>{b}</span>"
        for f, b in zip(field, bits, strict=True))
    return f"<div>{boxes}</div><pre>{explain_code(name, code)}</pre>"


def _number_line(name: str, code: int) -> go.Figure:
    fmt = get_format(name)
    grid = fmt.grid()
    pos = grid[grid > 0]
    v = float(fmt.table[code])
    fig = go.Figure(go.Scatter(x=pos.tolist(), y=[0] * len(pos), mode="markers",
                               marker=dict(symbol="line-ns-open", size=12, color="#888"),
                               hovertemplate="%{x:.6g}<extra></extra>", showlegend=False))
    if math.isfinite(v) and v != 0:
        fig.add_trace(go.Scatter(x=[abs(v)], y=[0], mode="markers", showlegend=False,
                                 marker=dict(symbol="star", size=18, color="#d62728")))
    fig.update_layout(template="plotly_white", height=180, margin=dict(t=20, b=40),
                      xaxis=dict(log_axis(float(pos.min()), float(pos.max())),
                                 title="|value| (log scale)"),
                      yaxis=dict(visible=False))
    return fig


def bit_explorer(formats: tuple[str, ...] = BIT_FORMATS) -> W.VBox:
    """Dropdown (format) + slider (code): the code's bits, their meaning and its value's place
    among the format's positive values. Returns the panel (displayed by JupyterLab)."""
    fmt_dd = W.Dropdown(options=list(formats), value=formats[0], description="format")
    code = W.IntSlider(min=0, max=255, value=0x38, description="code",
                       continuous_update=False, readout_format="d")
    bits = W.HTML()
    out = W.Output()

    def redraw(*_):
        n = 1 << get_format(fmt_dd.value).bits
        code.max = n - 1
        bits.value = _bits_html(fmt_dd.value, code.value)
        _show(out, _number_line(fmt_dd.value, code.value))

    fmt_dd.observe(redraw, "value")
    code.observe(redraw, "value")
    redraw()
    return W.VBox([fmt_dd, code, bits, out])
