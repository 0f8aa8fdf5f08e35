"""Plotly figures used by the report, the notebooks and the book."""

from __future__ import annotations

import html
import math

import plotly.graph_objects as go
import torch
from plotly.io._base_renderers import MimetypeRenderer, PlotlyRenderer
from plotly.subplots import make_subplots


def perplexity_vs_bits(baseline: dict, rows) -> go.Figure:
    """Scatter: bits per weight (x) against held-out perplexity (y), one point per row."""
    fig = go.Figure()
    for algo in sorted({r.algorithm for r in rows}):
        sel = [r for r in rows if r.algorithm == algo]
        fig.add_trace(go.Scatter(
            x=[r.bits_per_weight for r in sel], y=[r.perplexity for r in sel],
            mode="markers+text", name=algo, text=[r.scheme for r in sel],
            textposition="top center",
            hovertemplate="%{text}<br>%{x:.3f} bits/weight<br>perplexity %{y:.3f}<extra></extra>"))
    fig.add_hline(y=baseline["perplexity"], line_dash="dot",
                  annotation_text=f"unquantized {baseline['perplexity']:.3f}")
    fig.update_layout(title="Perplexity against bits per weight", xaxis_title="bits per weight",
                      yaxis_title="held-out perplexity", template="plotly_white", height=480)
    return fig


def layer_sqnr_heatmap(rows) -> go.Figure:
    """Heatmap of each layer's output SQNR (dB) under each (scheme, algorithm)."""
    rows = [r for r in rows if r.layers]  # rows whose algorithm transformed weights have none
    layers = [r["layer"] for r in rows[0].layers] if rows else []
    names = [f"{r.scheme} / {r.algorithm}" for r in rows]
    z = [[next((x["output_sqnr_db"] for x in r.layers if x["layer"] == name), None)
          for r in rows] for name in layers]
    fig = go.Figure(go.Heatmap(z=z, x=names, y=layers, colorscale="Viridis",
                               colorbar_title="dB",
                               hovertemplate="%{y}<br>%{x}<br>%{z:.1f} dB<extra></extra>"))
    fig.update_layout(title="Per-layer output SQNR on calibration inputs",
                      template="plotly_white", height=max(400, 18 * len(layers)),
                      yaxis_autorange="reversed")
    return fig


def html_report(path: str, title: str, table_text: str, figures: list[go.Figure]) -> None:
    """One self-contained HTML file: the text table and the figures, plotly.js inlined once."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             "</title></head><body style='font-family:sans-serif;max-width:1200px;margin:auto'>",
             f"<h1>{html.escape(title)}</h1><pre>{html.escape(table_text)}</pre>"]
    for i, fig in enumerate(figures):
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False))
    parts.append("</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))


# ---------------------------------------------------------------------------------------------
# Chapters: number formats (01), one layer (02), 4-bit floats (06). Each function takes tensors
# or rows and returns a go.Figure; sliders and dropdowns are plotly's own, so they work in the
# static book with no kernel.
# ---------------------------------------------------------------------------------------------

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")


class _BookRenderer(MimetypeRenderer):
    """Plotly JSON (JupyterLab's plotly extension renders it) plus an HTML div that calls the
    page's own Plotly (the book serves plotly.min.js from _static): no CDN, no MathJax, and no
    4 MB copy of plotly.js inside every page."""

    def to_mimebundle(self, fig_dict):
        import plotly.io as pio

        bundle = PlotlyRenderer().to_mimebundle(fig_dict)
        bundle["text/html"] = pio.to_html(
            fig_dict, include_plotlyjs=False, include_mathjax=False, full_html=False,
            default_width="100%", default_height=480, validate=False)
        return bundle


def use_book_renderer() -> None:
    """Make plotly figures display for both JupyterLab and the static book (call once per
    notebook)."""
    import plotly.io as pio

    pio.renderers["quantlab"] = _BookRenderer()
    pio.renderers.default = "quantlab"


def markdown_table(rows: list[dict], floatfmt: str = ".3g"):
    """rows of equal keys -> an IPython Markdown table (rendered as a real table in the book)."""
    from IPython.display import Markdown

    cols = list(rows[0])
    cell = lambda v: format(v, floatfmt) if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return Markdown("\n".join(lines))


def _positive_values(name: str) -> torch.Tensor:
    from quantlab.formats import get_format

    g = get_format(name).grid()
    return g[g > 0]


def value_grid_figure(names: list[str]) -> go.Figure:
    """Every positive value of each format on a log axis, one row per format. A dropdown
    switches between absolute values and values scaled so each format's max is 1 (what a
    scale that maps a block's amax to the top code gives)."""
    fig = go.Figure()
    for scaled in (False, True):
        for i, name in enumerate(names):
            v = _positive_values(name)
            x = (v / v.max()) if scaled else v
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
        height=120 + 45 * n, xaxis_type="log", xaxis_title="value (log scale)",
        yaxis=dict(autorange="reversed"), margin=dict(l=80),
        updatemenus=[dict(buttons=buttons, x=1.0, xanchor="right", y=1.15, yanchor="bottom")])
    return fig


def relative_step_figure(names: list[str]) -> go.Figure:
    """Gap to the next value divided by the value (the relative rounding step, 2x the worst
    relative rounding error) against value / max, log-log, one line per format."""
    fig = go.Figure()
    for i, name in enumerate(names):
        v = _positive_values(name)
        rel = (v[1:] - v[:-1]) / v[:-1]
        fig.add_trace(go.Scatter(
            x=(v[:-1] / v.max()).tolist(), y=rel.tolist(), mode="lines+markers", name=name,
            line=dict(shape="hv", color=COLORS[i % 10]), marker=dict(size=4),
            hovertemplate=name + ": step/value %{y:.4g} at value/max %{x:.4g}<extra></extra>"))
    fig.update_layout(title="Relative step (gap to the next value / value)",
                      template="plotly_white", height=460, xaxis_type="log", yaxis_type="log",
                      xaxis_title="value / max (log)", yaxis_title="relative step (log)")
    return fig


def explain_code(name: str, code: int) -> str:
    """One line: a code's bits split into fields and the value they give."""
    from quantlab.formats import get_format

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
    from quantlab.formats import get_format

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
    from quantlab.formats import get_format

    fmt = get_format(name)
    n = 1 << fmt.bits
    table = fmt.table if fmt.kind != "codebook" else fmt.table
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
    fig.update_xaxes(type="log", title_text="|value| (log scale)", row=2, col=1)
    fig.update_yaxes(visible=False, row=2, col=1)
    return fig


def scheme_rows(w: torch.Tensor, schemes: dict) -> list[dict]:
    """w: (N, K) float; schemes: label -> preset name or TensorScheme. One row per scheme:
    bits per weight (scales included), SQNR in dB and the dequantized tensor."""
    from quantlab.eval.metrics import sqnr_db
    from quantlab.quantize import dequantize, quantize

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


def sqnr_vs_bits_figure(rows: list[dict], title: str = "SQNR against bits per weight",
                        zooms: dict | None = None) -> go.Figure:
    """rows with scheme, bits_per_weight, sqnr_db (and optional family): one labelled point per
    row, colored by family. zooms: button label -> (x range, y range), shown as a dropdown
    after an "all" entry, for crowded clusters."""
    fig = go.Figure()
    families = list(dict.fromkeys(r.get("family", "") for r in rows))
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["bits_per_weight"],
                                                    rows[i]["sqnr_db"]))
    where = {i: ("top center", "bottom center", "middle right")[k % 3]
             for k, i in enumerate(order)}
    for i, fam in enumerate(families):
        idx = [j for j, r in enumerate(rows) if r.get("family", "") == fam]
        sel = [rows[j] for j in idx]
        fig.add_trace(go.Scatter(
            x=[r["bits_per_weight"] for r in sel], y=[r["sqnr_db"] for r in sel],
            mode="markers+text", text=[r["scheme"] for r in sel],
            textposition=[where[j] for j in idx],
            name=fam or "schemes", marker=dict(size=10, color=COLORS[i % 10]),
            textfont=dict(size=10),
            hovertemplate="%{text}<br>%{x:.3f} bits/weight<br>SQNR %{y:.2f} dB<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white", height=520,
                      xaxis_title="bits per weight (scales included)", yaxis_title="SQNR (dB)")
    if zooms:
        buttons = [dict(label="all", method="relayout",
                        args=[{"xaxis.autorange": True, "yaxis.autorange": True}])]
        buttons += [dict(label=lab, method="relayout",
                         args=[{"xaxis.range": list(xr), "yaxis.range": list(yr)}])
                    for lab, (xr, yr) in zooms.items()]
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


# ---------------------------------------------------------------------------------------------
# Chapters 7 (the KV cache) and 8 (kernels and throughput).
# ---------------------------------------------------------------------------------------------


def dropdown(fig: go.Figure, groups: dict, title_of=None, extra: dict | None = None) -> None:
    """groups: button label -> indices of the traces it shows (the others hidden); the first
    group is shown initially. title_of: label -> figure title for that button (optional);
    extra: label -> more layout updates for that button. The menu sits above the plot, left,
    under the title."""
    n = len(fig.data)
    buttons = []
    for lab, idx in groups.items():
        vis = [i in idx for i in range(n)]
        layout = {"title.text": title_of(lab)} if title_of else {}
        layout |= (extra or {}).get(lab, {})
        buttons.append(dict(label=lab, method="update", args=[{"visible": vis}, layout]))
    first = set(next(iter(groups.values())))
    for i, tr in enumerate(fig.data):
        tr.visible = i in first
    fig.update_layout(updatemenus=[dict(buttons=buttons, x=0.0, xanchor="left", y=1.02,
                                        yanchor="bottom")], margin=dict(t=110))


def kv_channel_figure(amax: dict) -> go.Figure:
    """amax: layer -> (key absmax (H, D), value absmax (H, D)) over tokens. One bar per channel
    (head-major), keys above and values below; a slider steps through the layers."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("keys: absmax per channel", "values: absmax per channel"))
    layers = sorted(amax)
    for layer in layers:
        for row, t in enumerate(amax[layer], start=1):
            fig.add_trace(go.Bar(y=t.flatten().tolist(), marker_color=COLORS[row - 1],
                                 name=("keys", "values")[row - 1], showlegend=False,
                                 visible=layer == layers[0],
                                 hovertemplate="channel %{x}<br>absmax %{y:.3f}<extra></extra>"),
                          row=row, col=1)
    steps = [dict(label=str(layer), method="update",
                  args=[{"visible": [j // 2 == i for j in range(2 * len(layers))]}])
             for i, layer in enumerate(layers)]
    fig.update_layout(sliders=[dict(steps=steps, currentvalue=dict(prefix="layer "),
                                    pad=dict(t=40))],
                      title="Per-channel absmax of keys and values (x: head x head_dim + channel)",
                      template="plotly_white", height=560, bargap=0)
    fig.update_xaxes(title_text="channel", row=2, col=1)
    return fig


def kv_accuracy_figure(rows: list[dict]) -> go.Figure:
    """rows from quantlab.kv.evaluate (codec, bytes_per_token, perplexity_delta,
    greedy_agreement): bytes per token (x) against perplexity increase (y, symlog-like via a
    dropdown between the two metrics)."""
    fig = go.Figure()
    for metric, lab in (("perplexity_delta", "perplexity increase"),
                        ("greedy_agreement", "greedy agreement with bf16")):
        fig.add_trace(go.Scatter(
            x=[r["bytes_per_token"] for r in rows], y=[r[metric] for r in rows],
            mode="markers+text", text=[r["codec"] for r in rows],
            textposition=[("top center", "bottom center", "middle right", "middle left")[
                sorted(range(len(rows)), key=lambda j: rows[j]["bytes_per_token"]).index(i) % 4]
                for i in range(len(rows))],
            name=lab, marker=dict(size=10, color=COLORS[0 if metric[0] == "p" else 1]),
            textfont=dict(size=10),
            hovertemplate="%{text}<br>%{x} bytes/token<br>%{y:.4f}<extra></extra>"))
    fig.update_layout(template="plotly_white", height=500, xaxis_type="log",
                      xaxis_title="KV bytes per token, all layers (log)",
                      yaxis_title="perplexity increase")
    dropdown(fig, {"perplexity increase": [0], "greedy agreement": [1]},
              title_of=lambda lab: f"KV codecs on stdlib-llama: {lab} against bytes per token",
              extra={lab: {"yaxis.title.text": lab} for lab in ("perplexity increase",
                                                                 "greedy agreement")})
    fig.update_layout(title="KV codecs on stdlib-llama: perplexity increase against bytes per "
                            "token")
    return fig


def kv_speedup_figure(bench: dict) -> go.Figure:
    """bench: data/bench/kv-*.json ({header, rows}). Decode attention speedup over SDPA bf16 (y)
    against context (x, log), one line per implementation; a dropdown picks the batch."""
    h, rows = bench["header"], bench["rows"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, groups = go.Figure(), {}
    for b in batches:
        groups[f"batch {b}"] = []
        for i, impl in enumerate(impls):
            sel = sorted((r for r in rows if r["batch"] == b and r["impl"] == impl),
                         key=lambda r: r["context"])
            groups[f"batch {b}"].append(len(fig.data))
            fig.add_trace(go.Scatter(
                x=[r["context"] for r in sel], y=[r["speedup_vs_sdpa_bf16"] for r in sel],
                mode="lines+markers", name=impl, marker=dict(color=COLORS[i]),
                customdata=[[r["ms"], r["floor_frac"]] for r in sel],
                hovertemplate=impl + "<br>context %{x}<br>%{y:.2f}x SDPA<br>"
                "%{customdata[0]:.4f} ms, %{customdata[1]:.0%} of the byte floor<extra></extra>"))
    title = lambda lab: (f"Decode attention, {lab}: speedup over SDPA bf16 "
                         f"({h['device']}, {h['date']})")
    dropdown(fig, groups, title_of=title)
    fig.update_layout(title=title(f"batch {batches[0]}"), template="plotly_white", height=480,
                      xaxis_type="log", xaxis_title="context (tokens, log)",
                      xaxis_tickvals=sorted({r["context"] for r in rows}),
                      yaxis_title="speedup over SDPA bf16")
    fig.add_hline(y=1, line_dash="dot", line_color="#888")
    return fig


def kernel_shapes_figure(bench: dict, kernels: dict, floor_of: str | None = None,
                         ratio_to: dict | None = None, what: str = "") -> go.Figure:
    """bench: data/bench/kernels-*.json. kernels: row kernel name -> legend label. One line per
    kernel against M (log); a dropdown picks the (model, layer) shape. y: time in ms (log), plus a
    'floor' line = max(bytes floor, compute floor) of kernel floor_of; or, with ratio_to (kernel
    -> its peer kernel), the peer's time divided by the kernel's (above 1: faster than it)."""
    h = bench["header"]
    rows = [r for r in bench["rows"] if "ms" in r and r.get("model")]
    shapes = list(dict.fromkeys((r["model"], r["layer"], r["N"], r["K"]) for r in rows
                                if r["kernel"] in kernels))
    fig, groups = go.Figure(), {}
    for m, layer, N, K in shapes:
        lab = f"{m} {layer} (N={N}, K={K})"
        groups[lab] = []
        here = [r for r in rows if r["model"] == m and r["layer"] == layer]
        at = lambda k, here=here: {r["M"]: r for r in here if r["kernel"] == k}
        series = []
        for k, label in kernels.items():
            ref = at(ratio_to[k]) if ratio_to else {}
            series.append((label, {M: (ref[M]["ms"] / r["ms"] if ratio_to else r["ms"])
                                   for M, r in at(k).items() if not ratio_to or M in ref}))
        if floor_of:
            series.append(("floor", {M: max(r["floor_ms"], r["compute_ms"])
                                     for M, r in at(floor_of).items()}))
        for i, (label, pts) in enumerate(series):
            groups[lab].append(len(fig.data))
            Ms = sorted(pts)
            fig.add_trace(go.Scatter(
                x=Ms, y=[pts[M] for M in Ms], mode="lines+markers", name=label,
                line=dict(color="#444" if label == "floor" else COLORS[i],
                          dash="dot" if label == "floor" else "solid"),
                hovertemplate=label + "<br>M=%{x}<br>%{y:.4g}<extra></extra>"))
    title = lambda lab: f"{what}: {lab} ({h['device']}, {h['date']})"
    dropdown(fig, groups, title_of=title)
    fig.update_layout(title=title(next(iter(groups))), template="plotly_white", height=500,
                      xaxis_type="log", xaxis_title="M (tokens in the batch, log)",
                      xaxis_tickvals=sorted({r["M"] for r in rows}),
                      yaxis_type=None if ratio_to else "log",
                      yaxis_title=("speed relative to the peer (its time / ours)" if ratio_to
                                   else "time (ms, log)"))
    if ratio_to:
        fig.add_hline(y=1, line_dash="dot", line_color="#888")
    return fig


def roofline_figure(M: list[int], series: dict, title: str) -> go.Figure:
    """series: label -> list of ms per M (e.g. the byte floor, the compute floor, a measured
    kernel). Lines on log-log axes: where the byte and compute floors cross is the ridge."""
    fig = go.Figure()
    for i, (lab, ys) in enumerate(series.items()):
        fig.add_trace(go.Scatter(x=list(M), y=list(ys), mode="lines+markers", name=lab,
                                 line=dict(color=COLORS[i]),
                                 hovertemplate=lab + "<br>M=%{x}<br>%{y:.4g} ms<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white", height=460, xaxis_type="log",
                      xaxis_tickvals=list(M),
                      legend=dict(x=0.99, xanchor="right", y=0.01, yanchor="bottom"),
                      yaxis_type="log", xaxis_title="M (tokens in the batch, log)",
                      yaxis_title="time (ms, log)")
    return fig
