"""Plotly figures for the report, the notebooks and the book.

Each function takes tensors or rows and returns a go.Figure; its sliders and dropdowns are
plotly's own, so they work in the static book with no kernel. The rule: a module here draws
what the analysis module of the same topic computes and imports from it, never the reverse
(data flows one way: analysis -> viz; no analysis module imports plotly). Live ipywidgets
panels, which need a kernel, are in quantlab.widgets.

    book         COLORS, use_book_renderer, markdown_table, dropdown, glue: shared by every chapter
    compare      `quantlab compare --report`: perplexity against bits, per-layer SQNR, HTML
    formats      chapter 1: value grids, relative steps, the bits of a code
    schemes      chapters 2 and 6: one weight under many schemes, 4-bit levels, MX scale rules
    outliers     chapter 3 (quantlab.studies.outliers)
    calibrated   chapter 4 (quantlab.studies.calibrated)
    fp8          chapter 5 (quantlab.studies.fp8)
    kv           chapter 7 (quantlab.studies.kv)
    kernels      chapter 8 (quantlab.kernels.bench results)
    deploy       chapters 9 and 10 (quantlab.studies.deploy)

The functions of book, compare, formats, schemes, kv and kernels are re-exported here, as they
were when viz was one module (viz.markdown_table, viz.kv_channel_figure, ...); those of the four
chapter modules are reached through them: viz.outliers.channel_heatmap_figure(...).
"""

from quantlab.viz import calibrated, deploy, fp8, outliers
from quantlab.viz.book import (
    COLORS,
    dropdown,
    glue,
    markdown_table,
    rounded,
    use_book_renderer,
)
from quantlab.viz.compare import html_report, layer_sqnr_heatmap, perplexity_vs_bits
from quantlab.viz.formats import (
    bit_explorer_figure,
    explain_code,
    relative_step_figure,
    value_grid_figure,
)
from quantlab.viz.kernels import (
    decode_throughput_figure,
    kernel_shapes_figure,
    roofline_figure,
)
from quantlab.viz.kv import kv_accuracy_figure, kv_channel_figure, kv_speedup_figure
from quantlab.viz.schemes import (
    block_values_figure,
    error_histogram_slider,
    granularity_figure,
    levels_figure,
    mx_rule_figure,
    scheme_rows,
    sqnr_vs_bits_figure,
)

__all__ = [
    "COLORS", "block_values_figure", "bit_explorer_figure", "calibrated",
    "decode_throughput_figure", "deploy", "dropdown",
    "error_histogram_slider", "explain_code", "fp8", "glue", "granularity_figure", "html_report",
    "kernel_shapes_figure", "kv_accuracy_figure", "kv_channel_figure", "kv_speedup_figure",
    "layer_sqnr_heatmap", "levels_figure", "markdown_table", "mx_rule_figure", "outliers",
    "perplexity_vs_bits", "relative_step_figure", "roofline_figure", "rounded", "scheme_rows",
    "sqnr_vs_bits_figure", "use_book_renderer", "value_grid_figure",
]
