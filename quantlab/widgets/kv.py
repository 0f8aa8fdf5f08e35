"""Chapter 7's panel: a model shape, a KV codec, a context and a batch -> the cache's memory
(and how many such sequences a GPU holds) beside the codec's measured accuracy row."""

from __future__ import annotations

import html

import ipywidgets as W

from quantlab.kv import capacity, get_codec
from quantlab.viz.kv import kv_memory_figure
from quantlab.widgets._common import _show

CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
BATCHES = (1, 4, 16, 32, 64, 128, 256)


def kv_text(shape: tuple, codec: str, context: int, batch: int, acc: dict | None,
            gpu_gb: float = 80) -> str:
    """shape: (layers, kv_heads, head_dim, parameters); acc: the codec's row of
    quantlab.studies.kv (or None). The panel's numbers as HTML."""
    L, H, D, P = shape
    c = get_codec(codec)
    kv_gb = (L * (batch * c.bytes_for(context, H, D) + c.fixed_bytes)) / 1e9
    bf16_gb = L * batch * get_codec("bf16").bytes_for(context, H, D) / 1e9
    lines = [f"KV cache for {batch} x {context:,} tokens: <b>{kv_gb:.1f} GB</b> "
             f"({kv_gb / bf16_gb:.0%} of bf16's {bf16_gb:.1f} GB); "
             f"bf16 weights {P * 2 / 1e9:.1f} GB"]
    try:
        cap = capacity(L, H, D, gpu_bytes=gpu_gb * 1e9, n_params=P, weight_bits=16, codec=c,
                       seq_len=context)
        lines.append(f"one {gpu_gb:g} GB GPU (90% budget, bf16 weights) holds {cap.sequences} "
                     "such sequences")
    except ValueError as err:  # the weights alone overflow the budget: say so, do not raise
        lines.append(html.escape(str(err)))
    if acc is None:
        lines.append(f"{codec}: not measured on stdlib-llama (python -m quantlab.studies.kv)")
    else:
        lines.append(f"measured on stdlib-llama: perplexity {acc['perplexity_delta']:+.4f}, "
                     f"greedy agreement {acc['greedy_agreement']:.0%}, worst layer output SQNR "
                     f"{acc['min_output_sqnr_db']:.1f} dB")
    return "<br>".join(lines)


def kv_panel(acc_rows: list[dict], models: dict[str, tuple]) -> W.VBox:
    """acc_rows: quantlab.studies.kv's codec rows (data/bench/kv-accuracy-*.json "codecs");
    models: name -> (layers, kv_heads, head_dim, parameters). Dropdowns for model and codec,
    sliders for context and batch; shows kv_text and the memory against context of the
    chosen codec beside bf16's."""
    if not acc_rows or not models:
        raise ValueError("kv_panel needs accuracy rows and at least one model shape")
    acc = {r["codec"]: r for r in acc_rows}
    model = W.Dropdown(options=list(models), value=next(iter(models)), description="model")
    codec = W.Dropdown(options=list(acc), value="int8_per_token_head" if
                       "int8_per_token_head" in acc else next(iter(acc)), description="codec")
    ctx = W.SelectionSlider(options=list(CONTEXTS), value=8192, description="context")
    batch = W.SelectionSlider(options=list(BATCHES), value=32, description="batch")
    text, out = W.HTML(), W.Output()

    def redraw(*_):
        shape = models[model.value]
        text.value = kv_text(shape, codec.value, ctx.value, batch.value, acc.get(codec.value))
        shown = list(dict.fromkeys(["bf16", codec.value]))
        _show(out, kv_memory_figure(shape[:3], shown, list(CONTEXTS), [batch.value],
                                    weights_gb=shape[3] * 2 / 1e9))

    for w in (model, codec, ctx, batch):
        w.observe(redraw, "value")
    redraw()
    return W.VBox([W.HBox([model, codec]), W.HBox([ctx, batch]), text, out])
