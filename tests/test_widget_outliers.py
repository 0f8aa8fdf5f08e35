"""quantlab.widgets.outliers.outlier_panel (chapter 3): picking a layer jumps to its outlier
channel, and moving the token, channel or alpha control redraws what the panel shows."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from quantlab.studies import outliers as ol

T = 20


def layers():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(T, 32, generator=g), torch.randn(T, 48, generator=g)
    x1[3, 5], x2[:, 7] = 60.0, x2[:, 7] * 25  # one massive value; one outlier channel
    inputs = {"a": x1, "b": x1, "c": x2}  # a and b read one tensor, as q/k/v do
    weights = {"a": torch.randn(16, 32, generator=g), "c": torch.randn(8, 48, generator=g)}
    return inputs, weights, [f"tok{i}" for i in range(T)]


def shown(panel) -> dict:
    return panel.children[2].outputs[0]["data"]["application/vnd.plotly.v1+json"]


def values(y) -> torch.Tensor:
    """A trace's y as plotly writes it: a list, or numpy data as {"dtype", "bdata": base64}."""
    if isinstance(y, dict):
        return torch.from_numpy(np.frombuffer(base64.b64decode(y["bdata"]), y["dtype"]).copy())
    return torch.tensor(y)


def test_outlier_panel_jumps_to_the_outlier_and_redraws():
    from quantlab.widgets import outlier_panel  # ipywidgets: the notebooks extra

    inputs, weights, tokens = layers()
    panel = outlier_panel(inputs, weights, tokens)
    layer, (token, channel, alpha) = panel.children[0], panel.children[1].children
    assert layer.options == ("a", "c")  # b shares a's input: shown once
    assert (channel.value, token.value, alpha.value) == (5, 3, "0.5")
    first = shown(panel)
    assert "channel 5 (60) is code 127" in first["layout"]["title"]["text"]
    alpha.value = "1.0"  # alpha = 1: x / s has absmax 1 in every channel
    fig = shown(panel)
    assert fig != first and fig["layout"]["title"]["text"].startswith("alpha 1.0")
    assert torch.allclose(values(fig["data"][4]["y"]).float(), torch.ones(32), atol=1e-5)
    alpha.value = "none"
    assert values(shown(panel)["data"][4]["y"]).max() > 10  # the outlier, unsmoothed
    token.value = 4
    assert "token 4 'tok4'" in str(shown(panel)["layout"]["annotations"])
    layer.value = "c"
    assert (channel.max, channel.value) == (47, 7)
    assert shown(panel)["data"][1]["x"] == [7]  # the red bar marks the chosen channel
    channel.value = 0
    assert shown(panel)["data"][1]["x"] == [0]


def test_outlier_panel_uses_the_chapters_sweeps():
    from quantlab.widgets import outlier_panel

    inputs, weights, tokens = layers()
    rows = ol.alpha_sweep(inputs["a"], weights["a"], (0.5,))
    rows[1]["activation SQNR dB"] = 123.4  # a marker: the panel shows it, so it did not recompute
    panel = outlier_panel(inputs, weights, tokens, sweeps={"a": rows})
    assert "activations 123.4 dB" in shown(panel)["layout"]["title"]["text"]


def test_outlier_panel_explains_bad_input():
    from quantlab.widgets import outlier_panel

    inputs, weights, tokens = layers()
    with pytest.raises(ValueError, match="no weight for layer 'c'"):
        outlier_panel(inputs, {"a": weights["a"]}, tokens)
    with pytest.raises(ValueError, match=r"must be \(T, K\) and \(N, K\)"):
        outlier_panel(inputs, {**weights, "c": weights["a"]}, tokens)
    with pytest.raises(ValueError, match="real_tokens"):
        outlier_panel(inputs, weights, tokens[:-1])
    with pytest.raises(ValueError, match="empty"):
        outlier_panel({}, weights)
