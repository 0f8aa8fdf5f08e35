"""What every chapter's figures share: the colors, the renderer that makes a figure show in
JupyterLab and in the static book, Markdown tables, and the dropdown that switches traces."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.io._base_renderers import MimetypeRenderer, PlotlyRenderer

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")


class _BookRenderer(MimetypeRenderer):
    """Plotly JSON (JupyterLab's plotly extension renders it) plus an HTML div that calls the
    page's own Plotly (the book serves plotly.min.js from _static): no CDN, no MathJax, and no
    4 MB copy of plotly.js inside every page."""

    def to_mimebundle(self, fig_dict):
        import plotly.io as pio

        bundle = PlotlyRenderer().to_mimebundle(fig_dict)
        bundle["text/html"] = pio.to_html(
            fig_dict, include_plotlyjs=False, include_mathjax=False, full_html=False,
            default_width="100%", default_height=480, validate=False)
        return bundle


def use_book_renderer() -> None:
    """Make plotly figures display for both JupyterLab and the static book (call once per
    notebook)."""
    import plotly.io as pio

    pio.renderers["quantlab"] = _BookRenderer()
    pio.renderers.default = "quantlab"


def markdown_table(rows: list[dict], floatfmt: str = ".3g"):
    """rows of equal keys -> an IPython Markdown table (rendered as a real table in the book)."""
    from IPython.display import Markdown

    cols = list(rows[0])
    cell = lambda v: format(v, floatfmt) if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return Markdown("\n".join(lines))


def dropdown(fig: go.Figure, groups: dict, title_of=None, extra: dict | None = None) -> None:
    """groups: button label -> indices of the traces it shows (the others hidden); the first
    group is shown initially, with its title and layout. title_of: label -> figure title for
    that button (optional); extra: label -> more layout updates for that button. The menu sits
    above the plot, left, under the title."""
    n = len(fig.data)
    buttons = []
    for lab, idx in groups.items():
        vis = [i in idx for i in range(n)]
        layout = {"title.text": title_of(lab)} if title_of else {}
        layout |= (extra or {}).get(lab, {})
        buttons.append(dict(label=lab, method="update", args=[{"visible": vis}, layout]))
    first = set(next(iter(groups.values())))
    for i, tr in enumerate(fig.data):
        tr.visible = i in first
    fig.update_layout(buttons[0]["args"][1])
    fig.update_layout(updatemenus=[dict(buttons=buttons, x=0.0, xanchor="left", y=1.02,
                                        yanchor="bottom")], margin=dict(t=110))


def rounded(t, digits: int = 4) -> list[float]:
    """A tensor's values as a list, each to `digits` significant digits: plotly writes every
    float in full, and a figure with thousands of points would otherwise weigh megabytes in the
    book."""
    return [float(f"{v:.{digits}g}") for v in t.tolist()]


def glue(name: str, value) -> None:
    """Hand a computed number to the chapter's prose: {glue:text}`name:.2f` in the markdown shows
    it in the book (myst-nb), so the text quotes this run's result, never a copied one. Prints
    nothing; a no-op without myst-nb (JupyterLab shows the role's source instead)."""
    try:
        from myst_nb import glue as _glue
    except ImportError:
        return
    _glue(name, value, display=False)
