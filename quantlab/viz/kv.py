"""Chapter 7 (the KV cache): per-channel key/value ranges, codec accuracy against bytes per
token, cache memory against context, and the decode-attention speedups."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from quantlab.viz.book import COLORS, dropdown


def kv_channel_figure(amax: dict, start: int | None = None) -> go.Figure:
    """amax: layer -> (key absmax (H, D), value absmax (H, D)) over tokens. One bar per channel
    (head-major), keys above and values below; a slider steps through the layers, starting at
    layer `start` (default: the first)."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("keys: absmax per channel", "values: absmax per channel"))
    layers = sorted(amax)
    start = layers[0] if start is None else start
    if start not in amax:
        raise ValueError(f"start={start}: not a layer of amax; pick one of {layers}")
    for layer in layers:
        for row, t in enumerate(amax[layer], start=1):
            fig.add_trace(go.Bar(y=t.flatten().tolist(), marker_color=COLORS[row - 1],
                                 name=("keys", "values")[row - 1], showlegend=False,
                                 visible=layer == start,
                                 hovertemplate="channel %{x}<br>absmax %{y:.3f}<extra></extra>"),
                          row=row, col=1)
    steps = [dict(label=str(layer), method="update",
                  args=[{"visible": [j // 2 == i for j in range(2 * len(layers))]}])
             for i, layer in enumerate(layers)]
    fig.update_layout(sliders=[dict(steps=steps, active=layers.index(start),
                                    currentvalue=dict(prefix="layer "), pad=dict(t=40))],
                      title="Per-channel absmax of keys and values (x: head x head_dim + channel)",
                      template="plotly_white", height=560, bargap=0)
    fig.update_xaxes(title_text="channel", row=2, col=1)
    return fig


SYMBOLS = ("circle", "x", "diamond", "square", "triangle-up", "cross", "star",
           "triangle-down", "pentagon", "hexagon")


def kv_accuracy_figure(rows: list[dict]) -> go.Figure:
    """rows from quantlab.studies.kv (codec, bytes_per_token, perplexity_delta,
    greedy_agreement): bytes per token (x, log) against the perplexity increase or, through a
    dropdown, the greedy agreement with bf16 (y). One marker per codec, named in the legend
    (codecs of equal bytes sit on one x: labels on the plot would overlap)."""
    fig, groups = go.Figure(), {}
    for metric, lab in (("perplexity_delta", "perplexity increase"),
                        ("greedy_agreement", "greedy agreement")):
        groups[lab] = []
        for i, r in enumerate(sorted(rows, key=lambda r: -r["bytes_per_token"])):
            groups[lab].append(len(fig.data))
            fig.add_trace(go.Scatter(
                x=[r["bytes_per_token"]], y=[r[metric]], mode="markers", name=r["codec"],
                marker=dict(size=12, color=COLORS[i % len(COLORS)],
                            symbol=SYMBOLS[i % len(SYMBOLS)], line=dict(width=1)),
                hovertemplate=r["codec"] + "<br>%{x} bytes/token<br>%{y:.4f}<extra></extra>"))
    title = lambda lab: f"KV codecs on stdlib-llama: {lab} against bytes per token"
    dropdown(fig, groups, title_of=title,
             extra={lab: {"yaxis.title.text": lab} for lab in groups})
    fig.update_layout(template="plotly_white", height=500, xaxis_type="log",
                      xaxis_title="KV bytes per token, all layers (log)")
    return fig


def kv_memory_figure(shape: tuple[int, int, int], codecs: list[str], contexts: list[int],
                     batches: list[int], weights_gb: float, gpu_gb: float = 80,
                     gpu_util: float = 0.9) -> go.Figure:
    """shape: (layers, kv_heads, head_dim). KV-cache GB (weights_gb added) against context (x,
    log) for each codec, one line each; a dropdown picks the batch. A dotted line marks vLLM's
    budget, gpu_util x gpu_gb. The static book's version of widgets.kv_panel."""
    from quantlab.kv import get_codec

    L, H, D = shape
    fig, groups = go.Figure(), {}
    for b in batches:
        groups[f"batch {b}"] = []
        for i, name in enumerate(codecs):
            c = get_codec(name)
            gb = [weights_gb + (L * (b * c.bytes_for(t, H, D) + c.fixed_bytes)) / 1e9
                  for t in contexts]
            groups[f"batch {b}"].append(len(fig.data))
            fig.add_trace(go.Scatter(x=list(contexts), y=gb, mode="lines+markers", name=name,
                                     line=dict(color=COLORS[i % len(COLORS)]),
                                     hovertemplate=name + "<br>%{x} tokens<br>%{y:.1f} GB"
                                     "<extra></extra>"))
    title = lambda lab: f"Weights + KV cache, {lab} (GB)"
    dropdown(fig, groups, title_of=title)
    fig.add_hline(y=gpu_util * gpu_gb, line_dash="dot", line_color="#888",
                  annotation_text=f"{gpu_util:.0%} of {gpu_gb:g} GB")
    fig.update_layout(template="plotly_white", height=480, xaxis_type="log",
                      xaxis_tickvals=list(contexts), xaxis_title="context (tokens, log)",
                      yaxis_title="GB")
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
