"""quantlab.widgets.choose.recommend_panel (chapter 10): moving a control changes the
recommendation it shows."""

from __future__ import annotations

from tests.test_deploy import COSTS


def test_recommend_panel_redraws():
    from quantlab.widgets import recommend_panel  # ipywidgets: the notebooks extra

    panel = recommend_panel(COSTS)
    (gpu, model), (ctx, batch, budget) = panel.children[0].children, panel.children[1].children
    text = panel.children[2]
    assert "fp8_dynamic" in text.value and "toy model" in text.value
    model.value = "Llama-3-70B"
    budget.value = 1.0
    assert "nothing fits" in text.value
    gpu.value = "H200"
    assert "nothing fits" not in text.value
    batch.value, ctx.value = 1, 131072
    assert "fp8_dynamic</b>, --kv-cache-dtype <b>auto" in text.value
    assert "--max-model-len 131072" in text.value and "--model &lt;your Llama-3-70B dir&gt;" \
        in text.value
    assert "application/vnd.plotly.v1+json" in panel.children[3].outputs[0]["data"]
