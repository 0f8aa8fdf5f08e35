"""Chapter 6's panel: the 4-bit flavour and block size redraw one weight's error."""

import pytest
import torch

pytest.importorskip("ipywidgets")


def _title(panel):
    return panel.children[1].outputs[0]["data"]["application/vnd.plotly.v1+json"]["layout"][
        "title"]["text"]


def test_fp4_panel_redraws_on_flavour_block_and_weight():
    from quantlab.widgets import fp4_panel

    g = torch.Generator().manual_seed(0)
    panel = fp4_panel({"w": torch.randn(32, 256, generator=g),
                       "v": torch.randn(16, 128, generator=g)})
    which, flav, block = panel.children[0].children
    assert "NVFP4, blocks of 16 (its own), 4.504" in _title(panel)  # + 32 bits / 8192
    flav.value = "MXFP4 (FLOOR)"
    assert "MXFP4 (FLOOR), blocks of 16 (what-if), 4.500" in _title(panel)  # e8m0 per 16
    block.value = 32
    assert "blocks of 32 (its own), 4.250" in _title(panel)
    flav.value, block.value = "INT4 group", 128
    assert "4.125 bits/weight" in _title(panel)
    before = _title(panel)
    which.value = "v"
    assert _title(panel) != before


def test_fp4_scheme_and_panel_refuse_bad_input():
    from quantlab.widgets import fp4_panel, fp4_scheme

    assert fp4_scheme("NVFP4", 16).scale_rule == "nvfp4"
    with pytest.raises(ValueError, match="pick one of"):
        fp4_scheme("fp4", 16)
    with pytest.raises(ValueError, match="multiple of 128"):
        fp4_panel({"w": torch.randn(4, 100)})
