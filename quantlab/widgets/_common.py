"""What every panel shares: replacing a panel's output with a figure or a line of text."""

from __future__ import annotations

import ipywidgets as W
import plotly.graph_objects as go

from quantlab.viz.book import _BookRenderer


def _show(out: W.Output, fig: go.Figure | None = None, text: str | None = None) -> None:
    """Replace what `out` shows by setting its outputs as widget state, not by capturing display
    messages: capture (`with out:`) can stall headless executors (nbclient) for their timeout."""
    if fig is not None:
        item = {"output_type": "display_data", "metadata": {},
                "data": _BookRenderer().to_mimebundle(fig.to_plotly_json())}
    else:
        item = {"output_type": "stream", "name": "stdout", "text": text + "\n"}
    out.outputs = (item,)
