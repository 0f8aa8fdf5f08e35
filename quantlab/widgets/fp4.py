"""Chapter 6's panel: a 4-bit flavour (NVFP4, MXFP4, INT4, NF4) and its block size -> the error
histogram, bits per weight and SQNR of one weight."""

from __future__ import annotations

import ipywidgets as W
from torch import Tensor

from quantlab.schemes import TensorScheme
from quantlab.viz.schemes import error_histogram_slider, scheme_rows
from quantlab.widgets._common import _show

# flavour -> (element, scale format, scale rule): what each stores, at any block size.
FP4_FLAVOURS = {"NVFP4": ("e2m1", "e4m3", "nvfp4"), "MXFP4 (FLOOR)": ("e2m1", "e8m0", "mx_floor"),
                "MXFP4 (RCEIL)": ("e2m1", "e8m0", "mx_rceil"),
                "INT4 group": ("int4", "fp16", "absmax"), "NF4": ("nf4", "fp32", "absmax")}
BLOCK_SIZES = (16, 32, 64, 128)
NATIVE = {"NVFP4": 16, "MXFP4 (FLOOR)": 32, "MXFP4 (RCEIL)": 32, "INT4 group": 128, "NF4": 64}


def fp4_scheme(flavour: str, block: int) -> TensorScheme:
    """A 4-bit TensorScheme: flavour (a key of FP4_FLAVOURS) with `block` elements per scale
    along K. The formats' own sizes are in NATIVE; other sizes are what-ifs."""
    if flavour not in FP4_FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; pick one of {list(FP4_FLAVOURS)}")
    element, scale_format, rule = FP4_FLAVOURS[flavour]
    return TensorScheme(element, "group", group_size=block, scale_format=scale_format,
                        scale_rule=rule)


def fp4_panel(weights: dict[str, Tensor]) -> W.VBox:
    """weights: label -> (N, K) float weight, K a multiple of 128. Dropdowns for the weight, the
    4-bit flavour and the block size; shows that choice's error histogram, bits per weight and
    SQNR (in the title)."""
    bad = {lab: tuple(w.shape) for lab, w in weights.items() if w.dim() != 2 or w.shape[1] % 128}
    if not weights or bad:
        raise ValueError(f"need (N, K) weights with K a multiple of 128 (every block size "
                         f"{BLOCK_SIZES} must divide it); got {bad or 'none'}")
    which = W.Dropdown(options=list(weights), description="weight")
    flav = W.Dropdown(options=list(FP4_FLAVOURS), value="NVFP4", description="flavour")
    block = W.Dropdown(options=list(BLOCK_SIZES), value=16, description="block")
    out = W.Output()

    def redraw(*_):
        w = weights[which.value]
        native = " (its own)" if NATIVE[flav.value] == block.value else " (what-if)"
        label = f"{flav.value}, blocks of {block.value}{native}"
        fig = error_histogram_slider(w, scheme_rows(w, {label: fp4_scheme(flav.value,
                                                                          block.value)}))
        fig.layout.sliders = ()  # one scheme: the panel's dropdowns choose
        _show(out, fig)

    for c in (which, flav, block):
        c.observe(redraw, "value")
    redraw()
    return W.VBox([W.HBox([which, flav, block]), out])
