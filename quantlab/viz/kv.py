"""Chapter 7 (the KV cache): per-channel key/value ranges, codec accuracy against bytes per
token, and the decode-attention speedups."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from quantlab.viz.book import COLORS, dropdown


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
    """rows from quantlab.studies.kv (codec, bytes_per_token, perplexity_delta,
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
