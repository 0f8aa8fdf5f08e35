"""Chapter 4's figures (quantlab.studies.calibrated measures what they show): where RTN's error
lands, GPTQ's error while it quantizes column by column and its gain over RTN, GPTQ's damping,
AWQ's scale exponent, and the whole model."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots
from torch import Tensor

from quantlab.viz.book import COLORS, dropdown, rounded


def _first(d: dict, first: str | None) -> dict:
    """d with key `first` moved to the front (the figure a dropdown shows initially)."""
    return d if first is None else {first: d[first], **{k: v for k, v in d.items() if k != first}}


def blind_spot_figure(shares: dict[str, dict[str, Tensor]], first: str | None = None
                      ) -> go.Figure:
    """shares: layer label -> error_shares(...). Top: activation RMS per input channel; bottom:
    each channel's share of the weight error and of the output error. A dropdown picks the
    layer (`first` is shown initially; default: the first of `shares`)."""
    shares = _first(shares, first)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("input activation RMS per channel",
                                        "share of RTN's error per input channel"))
    groups = {}
    for lab, s in shares.items():
        groups[lab] = list(range(len(fig.data), len(fig.data) + 3))
        fig.add_trace(go.Bar(y=rounded(s["act_rms"], 3), marker_color="#888",
                             name="activation RMS", showlegend=False,
                             hovertemplate="channel %{x}: RMS %{y:.3f}<extra></extra>"),
                      row=1, col=1)
        for j, (key, name) in enumerate((("weight_share", "weight error"),
                                         ("output_share", "output error"))):
            fig.add_trace(go.Scatter(y=rounded(s[key], 3), mode="lines", name=name,
                                     line=dict(color=COLORS[j], width=1.2),
                                     hovertemplate=f"channel %{{x}}: %{{y:.2%}} of the {name}"
                                                   "<extra></extra>"), row=2, col=1)
    dropdown(fig, groups, title_of=lambda lab: f"RTN (w4a16) on {lab}: where the error lands")
    fig.update_layout(template="plotly_white", height=560, bargap=0,
                      title=f"RTN (w4a16) on {next(iter(shares))}: where the error lands",
                      legend=dict(x=1.0, xanchor="right", y=0.42))
    fig.update_yaxes(tickformat=".1%", row=2, col=1)
    fig.update_xaxes(title_text="input channel k", row=2, col=1)
    return fig


def trace_figure(traces: dict[str, dict]) -> go.Figure:
    """traces: layer label -> error_traces(...). One line per curve, in % of the output energy,
    against columns quantized; a dropdown picks the layer."""
    fig, groups = go.Figure(), {}
    for lab, tr in traces.items():
        curves = {c: y for c, y in tr.items() if c != "columns"}
        groups[lab] = list(range(len(fig.data), len(fig.data) + len(curves)))
        for i, (c, y) in enumerate(curves.items()):
            fig.add_trace(go.Scatter(
                x=tr["columns"], y=(100 * y).tolist(), mode="lines", name=c,
                line=dict(color=COLORS[i]), hovertemplate=c + "<br>%{x} columns quantized<br>"
                "output error %{y:.3f}% of the output energy<extra></extra>"))
    title = lambda lab: f"Output error while quantizing {lab} column by column (w4a16)"
    dropdown(fig, groups, title_of=title)
    fig.update_layout(template="plotly_white", height=480,
                      xaxis_title="columns quantized (in processing order)",
                      yaxis_title="output error (% of output energy, calibration inputs)")
    return fig


def gain_figure(rows: list[dict]) -> go.Figure:
    """gain_rows: GPTQ's gain over RTN (dB), one bar per (layer, inputs label), grouped by
    layer."""
    fig = go.Figure()
    short = [r["layer"].replace("layers.", "").replace("self_attn.", "").replace("mlp.", "")
             for r in rows]  # "2.down_proj"
    for i, lab in enumerate(k for k in rows[0] if k != "layer"):
        fig.add_trace(go.Bar(x=short, y=[r[lab] for r in rows], name=lab,
                             marker_color=COLORS[i],
                             hovertemplate="%{x}<br>" + lab + ": %{y:+.2f} dB<extra></extra>"))
    fig.update_layout(title="GPTQ's output SQNR gain over RTN (w4a16), measured on three sets "
                            "of inputs", template="plotly_white", height=480, barmode="group",
                      yaxis_title="output SQNR gain over RTN (dB)", xaxis_tickangle=-45,
                      xaxis_title="decoder layer . linear layer",
                      legend=dict(orientation="h", x=0, y=1.0, yanchor="bottom"))
    return fig


def damping_figure(sweeps: dict[str, list[dict]]) -> go.Figure:
    """sweeps: layer label -> damping_sweep rows. GPTQ's output SQNR gain over RTN (dB) against
    calibration tokens (log), solid on held-out inputs and dotted on the calibration inputs, one
    color per percdamp; a dropdown picks the layer."""
    fig, groups = go.Figure(), {}
    for lab, rows in sweeps.items():
        groups[lab] = []
        for i, pd in enumerate(dict.fromkeys(r["percdamp"] for r in rows)):
            sel = [r for r in rows if r["percdamp"] == pd]
            for key, dash in (("held-out gain dB", "solid"), ("calibration gain dB", "dot")):
                groups[lab].append(len(fig.data))
                where = key.split(" gain")[0]
                fig.add_trace(go.Scatter(
                    x=[r["tokens"] for r in sel], y=[r[key] for r in sel], mode="lines+markers",
                    name=f"percdamp {pd:g}, {where}", line=dict(color=COLORS[i], dash=dash),
                    hovertemplate=f"percdamp {pd:g}<br>%{{x}} calibration tokens<br>{where}: "
                                  "%{y:+.2f} dB over RTN<extra></extra>"))
    title = lambda lab: f"GPTQ's gain over RTN on {lab}: calibration vs held-out inputs"
    dropdown(fig, groups, title_of=title)
    fig.update_layout(template="plotly_white", height=500,
                      xaxis_type="log", xaxis_title="calibration tokens (log)",
                      xaxis_tickvals=sorted({r["tokens"] for rows in sweeps.values()
                                             for r in rows}),
                      yaxis_title="output SQNR gain over RTN (dB)")
    fig.add_hline(y=0, line_dash="dot", line_color="#888")
    return fig


def alpha_figure(curves: dict[str, dict[str, dict[str, Tensor]]], first: str | None = None
                 ) -> go.Figure:
    """curves: group label -> scheme label -> awq_alpha_curve(...) with Hs labels "calibration"
    and "held out". Output error relative to RTN's (alpha = 0) against alpha, solid on held-out
    inputs, dotted on calibration inputs, a star at each curve's minimum on calibration inputs
    (the alpha AWQ picks); a dropdown picks the group (`first` is shown initially)."""
    curves = _first(curves, first)
    fig, groups = go.Figure(), {}
    for lab, by_scheme in curves.items():
        groups[lab] = []
        for i, (sch, c) in enumerate(by_scheme.items()):
            a = c["alpha"].tolist()
            for where, dash in (("held out", "solid"), ("calibration", "dot")):
                y = (c[where] / c[where][0]).tolist()
                groups[lab].append(len(fig.data))
                fig.add_trace(go.Scatter(
                    x=a, y=y, mode="lines", name=f"{sch}, {where}",
                    line=dict(color=COLORS[i], dash=dash),
                    hovertemplate=f"{sch}, {where}<br>alpha %{{x:.1f}}: %{{y:.3f}} x RTN's "
                                  "output error<extra></extra>"))
            best = int(c["calibration"].argmin())
            groups[lab].append(len(fig.data))
            fig.add_trace(go.Scatter(
                x=[a[best]], y=[float(c["held out"][best] / c["held out"][0])], mode="markers",
                marker=dict(symbol="star", size=14, color=COLORS[i]), showlegend=False,
                hovertemplate=f"{sch}: AWQ picks alpha %{{x:.1f}}<extra></extra>"))
    title = lambda lab: f"AWQ's scale exponent on {lab}: output error relative to RTN"
    dropdown(fig, groups, title_of=title)
    fig.update_layout(template="plotly_white", height=500,
                      xaxis_title="alpha (s = mean|x|^alpha)",
                      yaxis_title="output error / RTN's output error")
    fig.add_hline(y=1, line_dash="dot", line_color="#888")
    return fig


def model_figure(rows: list[dict]) -> go.Figure:
    """summary_rows: grouped bars, one group per scheme, one bar per algorithm; a dropdown
    switches between next-token KL and perplexity increase."""
    fig, groups = go.Figure(), {}
    algos = list(dict.fromkeys(r["algorithm"] for r in rows))
    for key, fmt in (("KL", ".4f"), ("perplexity increase", ".3f")):
        groups[key] = []
        for i, a in enumerate(algos):
            sel = [r for r in rows if r["algorithm"] == a]
            groups[key].append(len(fig.data))
            fig.add_trace(go.Bar(x=[r["scheme"] for r in sel], y=[r[key] for r in sel], name=a,
                                 marker_color=COLORS[i], text=[format(r[key], fmt) for r in sel],
                                 textposition="outside",
                                 hovertemplate=f"{a}<br>%{{x}}<br>{key} %{{y:{fmt}}}"
                                               "<extra></extra>"))
    title = lambda key: f"stdlib-llama, RTN against GPTQ and AWQ: {key} on held-out text"
    dropdown(fig, groups, title_of=title,
              extra={k: {"yaxis.title.text": t} for k, t in
                     (("KL", "next-token KL from the float model (nats/token)"),
                      ("perplexity increase", "perplexity - float model's"))})
    fig.update_layout(title=title("KL"), template="plotly_white", height=480, barmode="group",
                      yaxis_title="next-token KL from the float model (nats/token)")
    return fig
