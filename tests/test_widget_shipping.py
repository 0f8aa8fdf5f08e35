"""quantlab.widgets.shipping.shipping_panel (chapter 9, "your GPU and model"): each control
changes the verdict, the memory fit or the commands it shows."""

from __future__ import annotations

import time


def test_shipping_panel_redraws():
    from quantlab.widgets import shipping_panel  # ipywidgets: the notebooks extra

    panel = shipping_panel()
    (gpu, model), (scheme, kv), (ctx, batch) = (h.children for h in panel.children[:3])
    text, out = panel.children[3], panel.children[4]
    assert "w4a16 on the H100: served natively" in text.value and "<b>fits</b>" in text.value
    assert "quantlab export --model &lt;your Llama-3-8B dir&gt; --scheme w4a16" in text.value
    scheme.value = "nvfp4_a16"
    assert "served through a fallback" in text.value and "native support for FP4" in text.value
    t0 = time.perf_counter()
    gpu.value = "V100"
    assert time.perf_counter() - t0 < 2  # a redraw stays interactive on a 2-core CPU
    assert "not served" in text.value and "no command" in text.value
    gpu.value, model.value, scheme.value = "H100", "Llama-3-70B", "bf16"
    assert "does not fit" in text.value
    scheme.value, kv.value, batch.value, ctx.value = "w4a16", "int8_per_token_head", 1, 131072
    assert "--kv-cache-dtype int8_per_token_head" in text.value
    assert "--max-model-len 131072" in text.value
    batch.value = 256
    assert "does not fit" in text.value
    assert "application/vnd.plotly.v1+json" in out.outputs[0]["data"]


def test_shipping_panel_takes_your_model_and_directory():
    from quantlab.studies.deploy import MODELS, ModelShape
    from quantlab.widgets import shipping_panel

    mine = ModelShape("my-8b", 32, 4096, 14336, 32, 8, 128, 128256)
    panel = shipping_panel({"my-8b": mine, **MODELS}, model_dir="/data/my-8b")
    assert "--model /data/my-8b" in panel.children[3].value
