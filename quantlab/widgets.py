"""ipywidgets panels for JupyterLab: controls that redraw plotly figures from a live kernel.

The static book cannot run a kernel, so each chapter also shows the same idea as a plotly
figure with its own slider or dropdown (quantlab.viz); these panels are the live versions.

    >>> from quantlab.widgets import bit_explorer
    >>> panel = bit_explorer()          # displays in JupyterLab
    >>> panel.children[0].value         # the format dropdown
    'e4m3'
"""

from __future__ import annotations

import html
import math

import ipywidgets as W
import plotly.graph_objects as go
import torch

from quantlab.formats import get_format
from quantlab.scales import ABSMAX, MX_FLOOR
from quantlab.schemes import TensorScheme
from quantlab.studies.deploy import GPUS, MODELS, recommend
from quantlab.viz.book import _BookRenderer
from quantlab.viz.deploy import memory_figure
from quantlab.viz.formats import _field_row, explain_code
from quantlab.viz.schemes import error_histogram_slider, scheme_rows

BIT_FORMATS = ("e4m3", "e5m2", "e3m2", "e2m3", "e2m1", "int8", "int4", "nf4")
FIELD_COLORS = ("#f4a582", "#92c5de", "#d1e5a0")  # sign, exponent, mantissa


def _bits_html(name: str, code: int) -> str:
    field, bits = _field_row(name, code)
    boxes = "".join(
        f"<span style='display:inline-block;width:2em;text-align:center;margin:1px;"
        f"font:bold 1.4em monospace;background:{FIELD_COLORS[f]}'>{b}</span>"
        for f, b in zip(field, bits, strict=True))
    return f"<div>{boxes}</div><pre>{explain_code(name, code)}</pre>"


def _show(out: W.Output, fig: go.Figure | None = None, text: str | None = None) -> None:
    """Replace what `out` shows by setting its outputs as widget state, not by capturing display
    messages: capture (`with out:`) can stall headless executors (nbclient) for their timeout."""
    if fig is not None:
        item = {"output_type": "display_data", "metadata": {},
                "data": _BookRenderer().to_mimebundle(fig.to_plotly_json())}
    else:
        item = {"output_type": "stream", "name": "stdout", "text": text + "\n"}
    out.outputs = (item,)


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
                      xaxis=dict(type="log", title="|value| (log scale)"),
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


GROUPINGS = {"per tensor": ("tensor", None), "per channel": ("channel", None),
             "group 128": ("group", 128), "group 64": ("group", 64), "group 32": ("group", 32),
             "group 16": ("group", 16)}
ELEMENTS = ("int8", "int4", "e4m3", "e2m3", "e2m1", "nf4")


def tensor_scheme(element: str, grouping: str, scale_format: str = "fp32") -> TensorScheme:
    """A symmetric TensorScheme from panel choices; scale_format 'e8m0' uses the MX FLOOR rule."""
    gran, g = GROUPINGS[grouping]
    if scale_format == "e8m0" and get_format(element).kind != "float":
        raise ValueError(f"E8M0 (MX) scales need a minifloat element, not {element}; "
                         "pick e4m3, e2m3 or e2m1, or another scale format")
    rule = MX_FLOOR if scale_format == "e8m0" else ABSMAX
    return TensorScheme(element, gran, group_size=g, scale_format=scale_format, scale_rule=rule)


def quantize_panel(w: torch.Tensor) -> W.VBox:
    """w: (N, K) float weight. Dropdowns for element format, grouping and scale format; shows
    the error histogram, bits per weight and SQNR of that choice."""
    el = W.Dropdown(options=list(ELEMENTS), value="int4", description="element")
    grp = W.Dropdown(options=list(GROUPINGS), value="group 128", description="scales")
    sf = W.Dropdown(options=["fp32", "fp16", "e4m3", "e8m0"], value="fp16",
                    description="scale fmt")
    out = W.Output()

    def redraw(*_):
        try:
            ts = tensor_scheme(el.value, grp.value, sf.value)
        except ValueError as err:  # e.g. E8M0 scales with an integer element
            _show(out, text=str(err))
            return
        label = f"{el.value}, {grp.value}, {sf.value} scale"
        _show(out, error_histogram_slider(w, scheme_rows(w, {label: ts})))

    for c in (el, grp, sf):
        c.observe(redraw, "value")
    redraw()
    return W.VBox([W.HBox([el, grp, sf]), out])


# Choices of the recommender panel (chapter 10).
CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BUDGETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0)


def recommend_panel(costs: dict[str, float]) -> W.VBox:
    """GPU, model, context, batch and budget -> quantlab.studies.deploy.recommend's choice, its
    reasons and the memory bars of the choice. costs: {scheme: %} (deploy.measure_costs rows)."""
    gpu = W.Dropdown(options=list(GPUS), value="H100", description="GPU")
    model = W.Dropdown(options=list(MODELS), value="Llama-3-8B", description="model")
    ctx = W.SelectionSlider(options=list(CONTEXTS), value=8192, description="context")
    batch = W.SelectionSlider(options=list(BATCHES), value=32, description="batch")
    budget = W.SelectionSlider(options=list(BUDGETS), value=1.0, description="budget %")
    text, out = W.HTML(), W.Output()

    def redraw(*_):
        r = recommend(gpu.value, model.value, ctx.value, batch.value, budget.value, costs=costs)
        head = f"<b>{r.weight_scheme or 'nothing fits'}</b>" + (
            f", --kv-cache-dtype <b>{r.kv_cache_dtype}</b>" if r.kv_cache_dtype else "")
        text.value = (head + "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in r.reasons)
                      + f"</ul><pre>{html.escape(r.command)}</pre>")
        kvd = r.kv_cache_dtype or "auto"
        _show(out, memory_figure({f"{model.value}, {batch.value} x {ctx.value} tokens": (
            model.value, ctx.value, batch.value, kvd)}, [gpu.value]))

    for w in (gpu, model, ctx, batch, budget):
        w.observe(redraw, "value")
    redraw()
    return W.VBox([W.HBox([gpu, model]), W.HBox([ctx, batch, budget]), text, out])
