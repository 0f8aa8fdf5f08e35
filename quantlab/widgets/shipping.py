"""Chapter 9's panel, "your GPU and model": GPU, model, weight scheme, KV-cache dtype, context
and batch -> whether and how vLLM serves the scheme on that GPU, whether weights and KV cache fit,
and the export and serve commands."""

from __future__ import annotations

import html

import ipywidgets as W

from quantlab.studies.deploy import (
    GPUS,
    KV_CHOICES,
    MODELS,
    SCHEMES,
    fit,
    get_gpu,
    serve_command,
    serving_path,
)
from quantlab.viz.deploy import memory_figure
from quantlab.widgets._common import _show

CONTEXTS = (1024, 4096, 8192, 16384, 32768, 65536, 131072)
BATCHES = (1, 4, 8, 16, 32, 64, 128, 256)


def _verdict(gpu: str, model, scheme: str, kvd: str, ctx: int, batch: int,
             model_dir: str | None) -> str:
    """The panel's text, as HTML: serving path, memory fit, commands."""
    p, f = serving_path(scheme, gpu), fit(gpu, model, scheme, kvd, ctx, batch)
    how = ("served natively" if p.native else "served through a fallback") if p.ok else \
        "not served"
    lines = [f"<b>{html.escape(scheme)} on the {gpu}: {how}</b> ({html.escape(p.compute)}). "
             f"{html.escape(p.note)}.",
             f"Memory: {f['weights_gb']:.1f} GB weights + {f['kv_gb']:.1f} GB KV ({kvd}) for "
             f"{batch} x {ctx:,} tokens, budget {f['budget_gb']:.1f} GB (0.9 x "
             f"{get_gpu(gpu).memory_gb:g} GB): <b>{'fits' if f['fits'] else 'does not fit'}"
             f"</b>; up to {f['max_context']:,} tokens per sequence at this batch."]
    cmd = serve_command(scheme, kvd, ctx, batch, getattr(model, "name", model), model_dir) \
        if p.ok and f["fits"] else "(no command: pick a scheme vLLM serves here that fits)"
    return "<br>".join(lines) + f"<pre>{html.escape(cmd)}</pre>"


def shipping_panel(models: dict | None = None, model_dir: str | None = None) -> W.VBox:
    """Dropdowns for GPU, model, weight scheme and --kv-cache-dtype, sliders for context and
    batch: the verdict (served natively, through a fallback, or not; fits or not) and the
    commands, with the memory bars against that GPU's budget. models: name -> ModelShape
    (default deploy.MODELS); model_dir: the local directory the export command names."""
    models = models or MODELS
    gpu = W.Dropdown(options=list(GPUS), value="H100", description="GPU")
    model = W.Dropdown(options=list(models), value=next(iter(models)), description="model")
    scheme = W.Dropdown(options=list(SCHEMES), value="w4a16", description="weights")
    kv = W.Dropdown(options=list(KV_CHOICES), value="auto", description="KV cache")
    ctx = W.SelectionSlider(options=list(CONTEXTS), value=8192, description="context")
    batch = W.SelectionSlider(options=list(BATCHES), value=8, description="batch")
    text, out = W.HTML(), W.Output()

    def redraw(*_):
        m = models[model.value]
        text.value = _verdict(gpu.value, m, scheme.value, kv.value, ctx.value, batch.value,
                              model_dir)
        _show(out, memory_figure({f"{model.value}, {batch.value} x {ctx.value} tokens": (
            m, ctx.value, batch.value, kv.value)}, [gpu.value]))

    for w in (gpu, model, scheme, kv, ctx, batch):
        w.observe(redraw, "value")
    redraw()
    return W.VBox([W.HBox([gpu, model]), W.HBox([scheme, kv]), W.HBox([ctx, batch]), text, out])
