"""Chapter 8 (kernels and throughput): kernel time against M per layer shape, and rooflines."""

from __future__ import annotations

import plotly.graph_objects as go

from quantlab.viz.book import COLORS, dropdown


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
    fig.update_layout(template="plotly_white", height=500,
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


def decode_throughput_figure(e2e: dict, model: str = "8b", kv: str = "bf16",
                             context: int = 512) -> go.Figure:
    """e2e: a data/bench/e2e-<device>.json. Decode tokens/s against batch (log-log) for each
    scheme of `model` with a `kv` cache holding `context` positions, solid, with its byte floor
    (weights + KV read per step at the measured copy bandwidth) dotted in the same colour."""
    rows = [r for r in e2e["rows"] if r["model"] == model and r["kind"] == "decode"
            and r["kv"] == kv and r["context"] == context]
    fig = go.Figure()
    for i, scheme in enumerate(dict.fromkeys(r["scheme"] for r in rows)):
        rs = sorted((r for r in rows if r["scheme"] == scheme), key=lambda r: r["batch"])
        b = [r["batch"] for r in rs]
        color = COLORS[i % len(COLORS)]
        fig.add_trace(go.Scatter(x=b, y=[r["tokens_per_s"] for r in rs], mode="lines+markers",
                                 name=scheme, line=dict(color=color),
                                 hovertemplate=scheme + "<br>batch %{x}<br>%{y:.4g} tok/s"
                                 "<extra></extra>"))
        fig.add_trace(go.Scatter(x=b, y=[r["floor_tokens_per_s"] for r in rs], mode="lines",
                                 name=f"{scheme} floor", line=dict(color=color, dash="dot"),
                                 hovertemplate=scheme + " floor<br>batch %{x}<br>%{y:.4g} tok/s"
                                 "<extra></extra>"))
    scaled = " (times scaled from fewer layers)" if rows and rows[0]["scaled"] else ""
    fig.update_layout(title=f"{model}: decode tokens/s on {e2e['device']}{scaled}",
                      template="plotly_white", height=460, xaxis_type="log", yaxis_type="log",
                      xaxis_tickvals=sorted({r["batch"] for r in rows}),
                      xaxis_title="batch (sequences decoded together, log)",
                      yaxis_title="tokens/s (log)")
    return fig
