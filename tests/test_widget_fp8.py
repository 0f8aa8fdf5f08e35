"""Chapter 5's panel: the static activation scale's multiplier redraws where the values land."""

import pytest
import torch

pytest.importorskip("ipywidgets")


def test_static_scale_panel_redraws_on_the_multiplier_and_format():
    from quantlab.widgets import static_scale_panel

    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(0))
    amax = float(x.abs().max())
    panel = static_scale_panel({"a": x, "b": 2 * x}, {"a": amax, "b": 2 * amax})
    (inp, fmt, e), text, out = panel.children[0].children, panel.children[1], panel.children[2]
    assert "saturated 0.00%" in text.value and not out.outputs[0]["data"][
        "application/vnd.plotly.v1+json"]["layout"].get("sliders")
    e.value = -3  # a scale 8x too small: the largest values saturate, SQNR drops
    assert "saturated 0.00%" not in text.value
    before = text.value
    fmt.value = "e5m2"
    assert text.value != before and "e5m2" in str(out.outputs[0]["data"])
    at_a = text.value
    inp.value = "b"  # the same values twice as large, with a scale twice as large: same codes
    assert text.value == at_a and "e5m2" in str(out.outputs[0]["data"])


def test_static_scale_panel_refuses_bad_calibration():
    from quantlab.widgets import static_scale_panel

    x = torch.randn(8, 16)
    with pytest.raises(ValueError, match="same labels"):
        static_scale_panel({"a": x}, {"b": 1.0})
    with pytest.raises(ValueError, match="> 0"):
        static_scale_panel({"a": x}, {"a": 0.0})
