"""Chapters 9 and 10's figures: memory per scheme against each GPU's budget, the longest
context that fits, measured accuracy costs against a budget, the recommender's choice per GPU and
context, FP8 KV scales, and what an exported checkpoint holds. quantlab.studies.deploy computes
what they show."""

from __future__ import annotations

import math

import plotly.graph_objects as go

from quantlab.studies.deploy import (
    GB,
    SCHEMES,
    VLLM_MIN_SM,
    fit,
    get_gpus,
    get_model,
    kv_bytes_per_token,
    recommendation_grid,
    serving_path,
    weight_bytes,
    within_budget,
)
from quantlab.viz.book import COLORS, dropdown


def _budget_labels(fig: go.Figure, budgets: dict[float, list[str]], top: float) -> None:
    """Dotted line per budget (GB) and its label in the right margin, labels pushed apart so that
    none overlaps the next (close budgets, e.g. 14.4 / 21.6 / 28.8 GB, share the scale)."""
    gap, last, ys = 0.05 * top, -math.inf, []
    for b in sorted(budgets):
        last = max(b, last + gap)
        ys.append(last)
    shift = max(0.0, ys[-1] - top) if ys else 0.0  # keep the highest label inside the axis
    for b, y in zip(sorted(budgets), ys, strict=True):
        fig.add_hline(y=b, line_dash="dot", line_color="#666")
        fig.add_annotation(xref="paper", x=1.01, xanchor="left", y=y - shift, yanchor="middle",
                           showarrow=False, font=dict(size=11),
                           text=f"{' / '.join(budgets[b])}: {b:g} GB")


def memory_figure(scenarios: dict, gpus=None) -> go.Figure:
    """scenarios: label -> (model, context_len, batch, kv_dtype). Stacked bars per scheme:
    quantized weights, bf16 weights, KV cache; a dropdown picks the scenario; dotted lines mark
    each GPU's budget (0.9 x memory), labelled in the right margin. gpus: None for every GPU
    vLLM serves on (sm >= 7.5). One y scale for all scenarios, so that they compare."""
    fig, groups, c, top = go.Figure(), {}, COLORS, 0.0
    for lab, (model, ctx, batch, kvd) in scenarios.items():
        groups[lab] = []
        w = {s: weight_bytes(model, s) for s in SCHEMES}
        kv_gb = batch * ctx * kv_bytes_per_token(model, kvd) / GB
        top = max(top, max(w[s]["total"] / GB for s in SCHEMES) + kv_gb)
        parts = (("quantized Linears", [w[s]["quantized"] / GB for s in SCHEMES], c[0]),
                 ("bf16 embeddings, lm_head, norms", [w[s]["other"] / GB for s in SCHEMES], c[1]),
                 (f"KV cache ({kvd})", [kv_gb] * len(SCHEMES), c[2]))
        for name, ys, col in parts:
            groups[lab].append(len(fig.data))
            fig.add_trace(go.Bar(x=list(SCHEMES), y=ys, name=name, marker_color=col,
                                 hovertemplate=name + ": %{y:.1f} GB<extra></extra>"))
    budgets: dict[float, list[str]] = {}
    chosen = get_gpus(gpus) if gpus else [g for g in get_gpus() if g.sm >= VLLM_MIN_SM]
    for g in chosen:  # one line per distinct budget (A100 and H100 share 72 GB)
        budgets.setdefault(round(0.9 * g.memory_gb, 1), []).append(g.name)
    top = 1.05 * max([top, *budgets])
    _budget_labels(fig, budgets, top)
    dropdown(fig, groups, title_of=lambda lab: f"GPU memory: {lab}")
    fig.update_layout(title=f"GPU memory: {next(iter(scenarios))}", barmode="stack",
                      template="plotly_white", height=520, yaxis_title="GB",
                      yaxis_range=[0, top], xaxis_title="weight format",
                      margin=dict(r=170), legend=dict(orientation="h", y=-0.22))
    return fig


def max_context_figure(models, batch: int, gpus=None) -> go.Figure:
    """Max tokens per sequence at `batch` (log y) per scheme, one line per GPU; a dropdown picks
    (model, KV dtype). 0 (the weights alone do not fit) is drawn at the bottom; a scheme vLLM
    does not serve on a GPU leaves a gap in its line."""
    fig, groups, c = go.Figure(), {}, COLORS
    for model in models:
        for kvd in ("auto", "int8_per_token_head"):
            lab = f"{get_model(model).name}, KV {kvd}"
            groups[lab] = []
            for i, g in enumerate(get_gpus(gpus)):
                ys = [fit(g, model, s, kvd, 1024, batch)["max_context"]
                      if serving_path(s, g).ok else None for s in SCHEMES]
                groups[lab].append(len(fig.data))
                fig.add_trace(go.Scatter(
                    x=list(SCHEMES), y=[None if y is None else max(y, 1) for y in ys],
                    mode="lines+markers", name=g.name, marker_color=c[i % 10], customdata=ys,
                    line_dash=("solid", "dot")[i % 2],  # A100 and H100 share a line
                    hovertemplate=g.name + ": %{customdata:,} tokens<extra></extra>"))
    title = lambda lab: f"Longest context per sequence at batch {batch}: {lab}"
    dropdown(fig, groups, title_of=title)
    fig.update_layout(template="plotly_white", height=500,
                      yaxis_type="log", yaxis_title="tokens per sequence (log; 1 = no room)",
                      xaxis_title="weight format")
    return fig


def cost_figure(measured: dict, budgets=(0.1, 0.5, 1, 2, 5, 10)) -> go.Figure:
    """measured: measure_costs() output. Perplexity increase (%) against bits per weight; a
    slider moves the budget and colors each scheme within it (green) or over it (red)."""
    rows, src = measured["rows"], measured.get("source", "stdlib-llama").split(",")[0]
    names = list(rows)
    x = [rows[n]["bits_per_weight"] for n in names]
    y = [rows[n]["ppl_increase_pct"] for n in names]
    fig = go.Figure()
    for b in budgets:
        ok = [within_budget(v, b) for v in y]
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="markers+text", text=names,
            textposition=[("top center", "bottom center")[i % 2] for i in range(len(names))],
            visible=b == budgets[0], showlegend=False,
            marker=dict(size=12, color=["#2ca02c" if o else "#d62728" for o in ok]),
            hovertemplate="%{text}: %{x:.3f} bits/weight, %{y:+.2f}%<extra></extra>"))
    steps = [dict(method="update", label=f"{b:g}%", args=[
        {"visible": [j == i for j in range(len(budgets))]},
        {"title.text": f"Measured cost on {src}; budget {b:g}% (green: within)",
         "shapes": [dict(type="line", xref="paper", x0=0, x1=1, y0=b, y1=b,
                         line=dict(dash="dot", color="#666"))]}])
        for i, b in enumerate(budgets)]
    fig.update_layout(title=f"Measured cost on {src}; budget {budgets[0]:g}% (green: within)",
                      template="plotly_white", height=480,
                      xaxis_title="bits per weight (scales included)",
                      yaxis_title="perplexity increase (%)",
                      shapes=[dict(type="line", xref="paper", x0=0, x1=1, y0=budgets[0],
                                   y1=budgets[0], line=dict(dash="dot", color="#666"))],
                      sliders=[dict(active=0, steps=steps, currentvalue=dict(prefix="budget: "),
                                    pad=dict(t=50))])
    return fig


KV_SHORT = {"auto": "bf16", "int8_per_token_head": "int8/token-head",
            "fp8_per_token_head": "fp8/token-head"}  # heatmap cells are narrow


def grid_figure(models, contexts, budgets, costs, batch=1, grids=None) -> go.Figure:
    """Heatmap of the recommended weight scheme per GPU (rows) and context (columns), the KV
    dtype in the cell text; a dropdown picks (model, accuracy budget). grids: {(model, budget):
    recommendation_grid rows} already computed (else computed here)."""
    code = {s: i for i, s in enumerate(("none",) + SCHEMES)}
    fig, groups = go.Figure(), {}
    for model in models:
        for b in budgets:
            rows = (grids or {}).get((model, b)) or recommendation_grid(model, contexts, b,
                                                                         costs, batch)
            gpus = list(dict.fromkeys(r["gpu"] for r in rows))
            at = {(r["gpu"], r["context"]): r for r in rows}
            z = [[code[at[g, c]["format"]] for c in contexts] for g in gpus]
            text = [[f"{at[g, c]['format']}<br>KV {KV_SHORT.get(at[g, c]['kv'], at[g, c]['kv'])}"
                     for c in contexts]
                    for g in gpus]
            groups[f"{get_model(model).name}, budget {b:g}%"] = [len(fig.data)]
            fig.add_trace(go.Heatmap(
                z=z, x=[f"{c // 1024}k" for c in contexts], y=gpus, text=text,
                texttemplate="%{text}", zmin=0, zmax=len(code) - 1, showscale=False,
                colorscale="Viridis", hovertemplate="%{y}, %{x}: %{text}<extra></extra>"))
    title = lambda lab: f"What to ship at batch {batch}: {lab}"
    dropdown(fig, groups, title_of=title)
    fig.update_layout(template="plotly_white", height=480,
                      xaxis_title="context length (tokens per sequence)",
                      yaxis_autorange="reversed")
    return fig


def kv_scale_figure(sweeps: dict) -> go.Figure:
    """sweeps: role -> kv_scale_sweep(...). SQNR against the tensor's amax (log x); a dropdown
    picks keys or values. Shaded: where the real tensors of stdlib-llama sit (factor 1)."""
    fig, groups, c = go.Figure(), {}, COLORS
    for role, s in sweeps.items():
        groups[role] = []
        for i, lab in enumerate(k for k in s if k != "amax"):
            groups[role].append(len(fig.data))
            fig.add_trace(go.Scatter(x=s["amax"], y=s[lab], mode="lines+markers", name=lab,
                                     marker_color=c[i],
                                     hovertemplate=lab + "<br>amax %{x:.3g}: %{y:.1f} dB"
                                     "<extra></extra>"))
    for v, t in ((448, "E4M3 max 448"), (2 ** -6, "E4M3 smallest normal")):
        fig.add_vline(x=v, line_dash="dot", line_color="#888")
        fig.add_annotation(x=math.log10(v), y=1, yref="paper", text=t, showarrow=False,
                           yanchor="bottom")  # annotations on a log axis take log10(x)
    title = lambda lab: f"FP8 {lab} of stdlib-llama layer 1, rescaled: SQNR against amax"
    dropdown(fig, groups, title_of=title)
    fig.update_layout(template="plotly_white", height=480,
                      xaxis_type="log", xaxis_title="amax of the tensor (log)",
                      yaxis_title="SQNR (dB)")
    return fig


def sizes_figure(sizes: dict[str, int], reference_bytes: int) -> go.Figure:
    """Bar per role of an exported checkpoint (MiB) beside the bf16 original's total."""
    names = list(sizes) + ["bf16 original (total)"]
    ys = [v / 2**20 for v in sizes.values()] + [reference_bytes / 2**20]
    fig = go.Figure(go.Bar(x=names, y=ys, marker_color=[COLORS[0]] * len(sizes) + ["#999"],
                           text=[f"{y:.2f}" for y in ys], textposition="outside",
                           hovertemplate="%{x}: %{y:.3f} MiB<extra></extra>"))
    fig.update_layout(title="What the exported checkpoint holds (MiB)", template="plotly_white",
                      height=420, yaxis_title="MiB")
    return fig
