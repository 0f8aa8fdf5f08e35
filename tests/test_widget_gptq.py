"""Chapter 4's panel: GPTQ's knobs on one layer redraw its output error against RTN."""

import pytest
import torch

pytest.importorskip("ipywidgets")


def _layer(n=512, K=64, N=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with uneven channel energies: GPTQ has something to exploit
    x = torch.randn(n, K, generator=g) @ torch.randn(K, K, generator=g) / K**0.5
    return torch.randn(N, K, generator=g), x


def test_gptq_panel_redraws_and_gptq_beats_rtn_on_its_own_tokens():
    from quantlab.studies.calibrated import hessian
    from quantlab.widgets import gptq_panel

    w, x = _layer()
    panel = gptq_panel(w, x, hessian(x[256:]), tokens=(64, 128, 256))
    (pd, grp, ntok), text, out = panel.children[0].children, panel.children[1], panel.children[2]
    assert list(grp.options) == ["32", "64", "per channel"]  # only sizes that divide K = 64
    assert grp.value == "per channel" and ntok.value == 256
    first = (text.value, out.outputs[0]["data"]["application/vnd.plotly.v1+json"])
    assert "GPTQ minus RTN: <b>+" in text.value  # fitted tokens: GPTQ is ahead of RTN
    pd.value = 10.0
    assert text.value != first[0] and "percdamp 10" in str(out.outputs[0]["data"])
    grp.value, ntok.value = "32", 64
    assert "64 calibration tokens" in str(out.outputs[0]["data"])


def test_gptq_panel_refuses_mismatched_inputs():
    from quantlab.widgets import gptq_panel

    w, x = _layer()
    with pytest.raises(ValueError, match="one K"):
        gptq_panel(w, x[:, :32], torch.eye(64))
    with pytest.raises(ValueError, match="capture more"):
        gptq_panel(w, x[:100], torch.eye(64), tokens=(256,))
