"""Chapter 10's panel: GPU, model, context, batch and budget -> the recommended format."""

from __future__ import annotations

import html

import ipywidgets as W

from quantlab.studies.deploy import GPUS, MODELS, TOY_SOURCE, recommend
from quantlab.viz.deploy import memory_figure
from quantlab.widgets._common import _show

# Choices of the recommender panel (chapter 10).
CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BUDGETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0)


def recommend_panel(costs: dict[str, float], cost_source: str = TOY_SOURCE) -> W.VBox:
    """GPU, model, context, batch and budget -> quantlab.studies.deploy.recommend's choice, its
    reasons, the commands and the memory bars of the choice. costs: {scheme: %}
    (deploy.measure_costs rows), measured on cost_source (its "source")."""
    gpu = W.Dropdown(options=list(GPUS), value="H100", description="GPU")
    model = W.Dropdown(options=list(MODELS), value="Llama-3-8B", description="model")
    ctx = W.SelectionSlider(options=list(CONTEXTS), value=8192, description="context")
    batch = W.SelectionSlider(options=list(BATCHES), value=32, description="batch")
    budget = W.SelectionSlider(options=list(BUDGETS), value=1.0, description="budget %")
    text, out = W.HTML(), W.Output()

    def redraw(*_):
        r = recommend(gpu.value, model.value, ctx.value, batch.value, budget.value, costs=costs,
                      cost_source=cost_source)
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
