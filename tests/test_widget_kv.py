"""Chapter 7's panel (codec x context x batch -> memory and the measured accuracy row) and the
figures of viz.kv it draws with."""

import json

import pytest

from quantlab.models import data_dir
from quantlab.viz.kv import kv_channel_figure, kv_memory_figure
from quantlab.widgets.kv import kv_text

LLAMA_8B = (32, 8, 128, 8.03e9)
ACC = json.loads((data_dir() / "bench" / "kv-accuracy-stdlib-llama.json").read_text())["codecs"]


def test_kv_text_counts_bytes_and_capacity():
    int8 = next(r for r in ACC if r["codec"] == "int8_per_token_head")
    t = kv_text(LLAMA_8B, "int8_per_token_head", 8192, 32, int8)
    # 32 layers x 32 sequences x 8192 tokens x 2112 bytes (chapter 7's formula)
    assert f"{32 * 32 * 8192 * 2112 / 1e9:.1f} GB" in t and "52% of bf16's 34.4 GB" in t
    assert "greedy agreement 100%" in t
    assert "not measured" in kv_text(LLAMA_8B, "fp16", 1024, 1, None)
    big = kv_text((80, 8, 128, 70.6e9), "bf16", 1024, 1, None)  # 141 GB of weights
    assert "no memory" in big


def test_kv_panel_redraws():
    from quantlab.widgets import kv_panel

    panel = kv_panel(ACC, {"Llama 3.1 8B": LLAMA_8B, "Qwen2.5 7B": (28, 4, 128, 7.62e9)})
    (model, codec), (ctx, batch) = panel.children[0].children, panel.children[1].children
    text, out = panel.children[2], panel.children[3]
    before = text.value
    fig = out.outputs[0]["data"]["application/vnd.plotly.v1+json"]
    codec.value = "kivi_2"
    assert text.value != before and "kivi_2" not in before
    ctx.value, batch.value = 131072, 256
    assert "256 x 131,072 tokens" in text.value and "holds 17 such sequences" in text.value
    assert out.outputs[0]["data"]["application/vnd.plotly.v1+json"] != fig
    model.value = "Qwen2.5 7B"  # half the KV heads, 28 layers: more sequences fit
    assert "holds 40 such sequences" in text.value
    with pytest.raises(ValueError, match="accuracy rows"):
        kv_panel([], {"m": LLAMA_8B})


def test_channel_figure_opens_on_the_chosen_layer():
    import torch

    amax = {i: (torch.full((2, 4), float(i + 1)), torch.ones(2, 4)) for i in range(3)}
    fig = kv_channel_figure(amax, start=1)
    assert [tr.visible for tr in fig.data] == [False, False, True, True, False, False]
    assert fig.layout.sliders[0].active == 1
    with pytest.raises(ValueError, match="pick one of"):
        kv_channel_figure(amax, start=7)


def test_memory_figure_adds_weights_and_cache():
    fig = kv_memory_figure(LLAMA_8B[:3], ["bf16", "int8_per_token_head"], [8192], [32, 1],
                           weights_gb=16.06)
    assert fig.data[0].y[0] == pytest.approx(16.06 + 32 * 32 * 8192 * 4096 / 1e9)
    assert len(fig.data) == 4 and [tr.visible for tr in fig.data] == [True, True, False, False]
