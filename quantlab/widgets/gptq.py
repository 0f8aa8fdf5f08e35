"""Chapter 4's panel: GPTQ's dampening, group size and calibration tokens on one layer -> its
output error against round to nearest (RTN), on the tokens it fitted and on held-out text."""

from __future__ import annotations

import ipywidgets as W
import plotly.graph_objects as go
import torch
from torch import Tensor

from quantlab.algorithms import gptq_quantize
from quantlab.quantize import fake_quantize
from quantlab.schemes import TensorScheme
from quantlab.studies.calibrated import hessian, output_sqnr_db
from quantlab.viz.book import COLORS
from quantlab.widgets._common import _show

PERCDAMPS = (0.001, 0.01, 0.1, 1.0, 10.0)
GROUPS = {"32": 32, "64": 64, "128": 128, "256": 256, "per channel": None}
TOKENS = (256, 512, 1024, 2048, 4096, 8192)


def int4_scheme(group_size: int | None) -> TensorScheme:
    """W4A16's weights (symmetric INT4, fp16 scales) with groups of group_size along K, or one
    scale per output channel for None."""
    if group_size is None:
        return TensorScheme("int4", "channel", scale_format="fp16")
    return TensorScheme("int4", "group", group_size=group_size, scale_format="fp16")


def gptq_vs_rtn(w: Tensor, h_cal: Tensor, h_eval: Tensor, ts: TensorScheme, percdamp: float
                ) -> dict[str, float]:
    """w (N, K); h_cal, h_eval (K, K) Hessians of the calibration and held-out inputs. Output
    SQNR (dB) of RTN and of GPTQ (calibrated on h_cal) on both sets of inputs."""
    rtn = fake_quantize(w, ts)
    gq = gptq_quantize(w, h_cal, ts, percdamp=percdamp).dequantize()
    return {f"{name}, {where}": output_sqnr_db(w, q, h)
            for name, q in (("RTN", rtn), ("GPTQ", gq))
            for where, h in (("calibration", h_cal), ("held out", h_eval))}


def _figure(r: dict[str, float], label: str) -> go.Figure:
    fig = go.Figure()
    for i, name in enumerate(("RTN", "GPTQ")):
        ys = [r[f"{name}, calibration"], r[f"{name}, held out"]]
        fig.add_trace(go.Bar(x=["tokens GPTQ fitted", "held-out text"], y=ys, name=name,
                             marker_color=COLORS[i], text=[f"{y:.2f}" for y in ys],
                             textposition="outside"))
    lo = min(r.values())
    fig.update_layout(title=label, template="plotly_white", height=380, barmode="group",
                      yaxis_title="output SQNR (dB)", yaxis_range=[lo - 2, max(r.values()) + 1])
    return fig


def gptq_panel(w: Tensor, x_calib: Tensor, h_eval: Tensor, tokens: tuple[int, ...] = TOKENS
               ) -> W.VBox:
    """w (N, K) float weight of one linear layer; x_calib (n, K) its calibration inputs,
    captured once; h_eval (K, K) the Hessian of its held-out inputs. Sliders for GPTQ's percdamp,
    the INT4 group size and how many calibration tokens (the first rows of x_calib) GPTQ sees;
    shows the output SQNR of RTN and GPTQ on those tokens and on the held-out inputs."""
    if w.dim() != 2 or x_calib.dim() != 2 or x_calib.shape[1] != w.shape[1] or \
            h_eval.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"need w (N, K), x_calib (n, K) and h_eval (K, K) with one K; got "
                         f"{tuple(w.shape)}, {tuple(x_calib.shape)}, {tuple(h_eval.shape)}")
    counts = [n for n in tokens if n <= len(x_calib)]
    if not counts:
        raise ValueError(f"x_calib has {len(x_calib)} tokens, fewer than the smallest count in "
                         f"tokens={tokens}; capture more calibration tokens or pass smaller ones")
    sizes = [lab for lab, g in GROUPS.items() if g is None or w.shape[1] % g == 0]
    pd = W.SelectionSlider(options=list(PERCDAMPS), value=0.1, description="percdamp")
    grp = W.Dropdown(options=sizes, value="128" if "128" in sizes else "per channel",
                     description="INT4 group")
    ntok = W.SelectionSlider(options=counts, value=min(2048, counts[-1]), description="tokens")
    text, out = W.HTML(), W.Output()
    hess: dict[int, Tensor] = {}  # tokens -> H: the one costly step, made once per count

    def redraw(*_):
        if ntok.value not in hess:
            hess[ntok.value] = hessian(x_calib[:ntok.value])
        with torch.no_grad():
            ts = int4_scheme(GROUPS[grp.value])
            r = gptq_vs_rtn(w, hess[ntok.value], h_eval, ts, pd.value)
        gain = {k: r[f"GPTQ, {k}"] - r[f"RTN, {k}"] for k in ("calibration", "held out")}
        text.value = (f"GPTQ minus RTN: <b>{gain['calibration']:+.2f} dB</b> on the "
                      f"{ntok.value} tokens it fitted, <b>{gain['held out']:+.2f} dB</b> on "
                      "held-out text")
        label = (f"INT4 group {grp.value}, percdamp {pd.value:g}, "
                 f"{ntok.value} calibration tokens")
        _show(out, _figure(r, label))

    for c in (pd, grp, ntok):
        c.observe(redraw, "value")
    redraw()
    return W.VBox([W.HBox([pd, grp, ntok]), text, out])
