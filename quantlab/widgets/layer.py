"""Chapter 2's panel: element format x grouping x scale format -> the error of one layer."""

from __future__ import annotations

import ipywidgets as W
import torch

from quantlab.formats import get_format
from quantlab.scales import ABSMAX, MX_FLOOR
from quantlab.schemes import TensorScheme
from quantlab.viz.schemes import error_histogram_slider, scheme_rows
from quantlab.widgets._common import _show

GROUPINGS = {"per tensor": ("tensor", None), "per channel": ("channel", None),
             "group 128": ("group", 128), "group 64": ("group", 64), "group 32": ("group", 32),
             "group 16": ("group", 16)}
ELEMENTS = ("int8", "int4", "e4m3", "e2m3", "e2m1", "nf4")


def tensor_scheme(element: str, grouping: str, scale_format: str = "fp32") -> TensorScheme:
    """A symmetric TensorScheme from panel choices; scale_format 'e8m0' uses the MX FLOOR rule."""
    gran, g = GROUPINGS[grouping]
    if scale_format == "e8m0" and get_format(element).kind != "float":
        raise ValueError(f"E8M0 (MX) scales need a minifloat element, not {element}; "
                         "pick e4m3, e2m3 or e2m1, or another scale format")
    rule = MX_FLOOR if scale_format == "e8m0" else ABSMAX
    return TensorScheme(element, gran, group_size=g, scale_format=scale_format, scale_rule=rule)


def quantize_panel(w: torch.Tensor) -> W.VBox:
    """w: (N, K) float weight. Dropdowns for element format, grouping and scale format; shows
    the error histogram, bits per weight and SQNR of that choice."""
    el = W.Dropdown(options=list(ELEMENTS), value="int4", description="element")
    grp = W.Dropdown(options=list(GROUPINGS), value="group 128", description="scales")
    sf = W.Dropdown(options=["fp32", "fp16", "e4m3", "e8m0"], value="fp16",
                    description="scale fmt")
    out = W.Output()

    def redraw(*_):
        try:
            ts = tensor_scheme(el.value, grp.value, sf.value)
        except ValueError as err:  # e.g. E8M0 scales with an integer element
            _show(out, text=str(err))
            return
        label = f"{el.value}, {grp.value}, {sf.value} scale"
        _show(out, error_histogram_slider(w, scheme_rows(w, {label: ts})))

    for c in (el, grp, sf):
        c.observe(redraw, "value")
    redraw()
    return W.VBox([W.HBox([el, grp, sf]), out])
