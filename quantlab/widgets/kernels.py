"""Chapter 8's panel: a layer shape (N, K), a batch M and a scheme -> its roofline on the GPU of
a benchmark file: arithmetic intensity, byte and compute floors, and the measured times of our
kernel and of the peers the file measured beside it, if the file has that shape."""

from __future__ import annotations

import ipywidgets as W

from quantlab.viz.kernels import (
    ROOFLINE_SCHEMES,
    W4A16_KERNELS,
    layer_roofline_figure,
    roofline_point,
)
from quantlab.widgets._common import _show

MS = tuple(2 ** i for i in range(13))  # 1 .. 4096: every M the benchmark sweeps is a power of 2


def _shapes(bench: dict) -> dict[str, tuple[int, int]]:
    """'8b gate_up' -> (N, K) for every model layer the file measured."""
    return {f"{r['model']} {r['layer']}": (r["N"], r["K"]) for r in bench["rows"]
            if r.get("model")}


def roofline_text(bench: dict, scheme: str, M: int, N: int, K: int) -> str:
    """One line per number of roofline_point, as the panel shows them (HTML); the peers' times
    only for the peers the file measured at this shape and M."""
    p = roofline_point(bench, scheme, M, N, K)
    ridge = f"{p['ridge_M']:.0f}" if p["ridge_M"] else "never (a token's bytes outweigh it)"
    lines = [f"arithmetic intensity: {p['intensity']:.1f} FLOP per byte",
             f"byte floor {p['memory_ms']:.4f} ms, compute floor {p['compute_ms']:.4f} ms: "
             f"<b>{p['bound']}-bound</b>; the floors cross at M = {ridge}"]
    m = p["measured"]
    lines.append(f"measured ({m['kernel']}): {m['ms']:.4f} ms, "
                 f"{max(p['memory_ms'], p['compute_ms']) / m['ms']:.0%} of the floor" if m else
                 "not measured at this shape and M in this file")
    lines += [f"{W4A16_KERNELS.get(k, k)}: {r['ms']:.4f} ms"
              + (f", {m['ms'] / r['ms']:.2f}x our speed" if m else "")
              for k, r in p["peers"].items()]
    return "<br>".join(lines)


def roofline_panel(bench: dict) -> W.VBox:
    """bench: a data/bench/kernels-*.json. Controls: a measured layer shape (fills N and K), N,
    K, M and the scheme; shows the numbers and the figure of viz.kernels.layer_roofline_figure."""
    shapes = _shapes(bench)
    if not shapes:
        raise ValueError("this bench file has no model-layer rows; pick a kernels-*.json")
    first = next(iter(shapes))
    shape = W.Dropdown(options=list(shapes), value=first, description="layer")
    n = W.BoundedIntText(value=shapes[first][0], min=16, max=262144, description="N")
    k = W.BoundedIntText(value=shapes[first][1], min=16, max=262144, description="K")
    m = W.SelectionSlider(options=list(MS), value=16, description="M")
    scheme = W.Dropdown(options=list(ROOFLINE_SCHEMES), value="w4a16 (int4, fp16 scale per 128)",
                        description="scheme", layout=W.Layout(width="22em"))
    text, out = W.HTML(), W.Output()

    def fill(*_):
        n.value, k.value = shapes[shape.value]  # each assignment redraws once

    def redraw(*_):
        text.value = roofline_text(bench, scheme.value, m.value, n.value, k.value)
        _show(out, layer_roofline_figure(bench, scheme.value, n.value, k.value, m.value))

    shape.observe(fill, "value")
    for c in (n, k, m, scheme):
        c.observe(redraw, "value")
    redraw()
    return W.VBox([W.HBox([shape, scheme]), W.HBox([n, k, m]), text, out])
