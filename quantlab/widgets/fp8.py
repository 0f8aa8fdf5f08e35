"""Chapter 5's panel: a static activation scale times 2^e -> where an input's values land among
the FP8 codes (saturated, normal, subnormal, zero) and what it costs against a dynamic scale."""

from __future__ import annotations

import math

import ipywidgets as W
from torch import Tensor

from quantlab.formats import get_format
from quantlab.studies.fp8 import code_regions, dynamic_sqnr, static_sweep
from quantlab.viz.fp8 import static_scale_slider
from quantlab.widgets._common import _show

FP8_FORMATS = ("e4m3", "e5m2")


def static_scale_panel(acts: dict[str, Tensor], amax: dict[str, float],
                       exponents: tuple[int, int] = (-4, 16)) -> W.VBox:
    """acts: label -> held-out inputs (T, K) of a layer; amax: label -> the largest |x| seen on
    calibration text (what a static scale maps to the format's max). A dropdown picks the input
    and the FP8 format, a slider the scale multiplier 2^e; shows the histogram of the values on
    the format's fixed windows, the SQNR and the dynamic per-token SQNR of the same input."""
    if not acts or set(acts) != set(amax):
        raise ValueError(f"acts and amax need the same labels; got {sorted(acts)} and "
                         f"{sorted(amax)}")
    bad = [lab for lab, a in amax.items() if not math.isfinite(float(a)) or float(a) <= 0]
    if bad:
        raise ValueError(f"calibrated amax must be finite and > 0; not for {bad}: "
                         "calibrate on text that reaches these layers")
    inp = W.Dropdown(options=list(acts), description="input")
    fmt = W.Dropdown(options=list(FP8_FORMATS), value="e4m3", description="format")
    e = W.IntSlider(min=exponents[0], max=exponents[1], value=0, description="log2 mult",
                    continuous_update=False)
    text, out = W.HTML(), W.Output()
    dynamic: dict[tuple[str, str], float] = {}  # (input, format) -> per-token SQNR, made once

    def redraw(*_):
        x, f = acts[inp.value], get_format(fmt.value)
        scale = float(amax[inp.value]) / f.max  # the calibrated static scale for this format
        if (inp.value, fmt.value) not in dynamic:
            dynamic[inp.value, fmt.value] = dynamic_sqnr(x, "token", fmt.value)
        sq = static_sweep(x, scale, [2.0**e.value], fmt.value)[0]
        reg = code_regions(x, scale * 2.0**e.value, fmt.value)
        text.value = (f"scale x 2^{e.value}: SQNR <b>{sq:.2f} dB</b> (dynamic per-token scale: "
                      f"{dynamic[inp.value, fmt.value]:.2f} dB); saturated "
                      f"{reg['saturated']:.2f}%, subnormal {reg['subnormal']:.2f}%, "
                      f"zero {reg['zero']:.2f}%")
        top = math.ceil(math.log2(f.max)) + 3  # room right of the saturation window
        fig = static_scale_slider(x, scale, [e.value], fmt.value, bins=(-22.0, top, 0.25))
        fig.layout.sliders = ()  # the panel's own slider replaces plotly's
        _show(out, fig)

    for c in (inp, fmt, e):
        c.observe(redraw, "value")
    redraw()
    return W.VBox([W.HBox([inp, fmt, e]), text, out])
