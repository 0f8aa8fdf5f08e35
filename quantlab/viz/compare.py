"""Figures of `quantlab compare` and its self-contained HTML report (quantlab.cli)."""

from __future__ import annotations

import html

import plotly.graph_objects as go


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
