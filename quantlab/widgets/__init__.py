"""ipywidgets panels for JupyterLab: controls that redraw plotly figures from a live kernel.

The static book cannot run a kernel, so each chapter also shows the same idea as a plotly
figure with its own slider or dropdown (quantlab.viz); these panels are the live versions.
One module per chapter's panel; import them from here.

    >>> from quantlab.widgets import bit_explorer
    >>> panel = bit_explorer()          # displays in JupyterLab
    >>> panel.children[0].value         # the format dropdown
    'e4m3'
"""

from quantlab.widgets.choose import recommend_panel
from quantlab.widgets.fp4 import FP4_FLAVOURS, fp4_panel, fp4_scheme
from quantlab.widgets.fp8 import static_scale_panel
from quantlab.widgets.gptq import gptq_panel
from quantlab.widgets.kernels import roofline_panel
from quantlab.widgets.kv import kv_panel
from quantlab.widgets.layer import quantize_panel, tensor_scheme
from quantlab.widgets.numbers import BIT_FORMATS, bit_explorer
from quantlab.widgets.outliers import outlier_panel
from quantlab.widgets.shipping import shipping_panel

__all__ = ["BIT_FORMATS", "FP4_FLAVOURS", "bit_explorer", "fp4_panel", "fp4_scheme", "gptq_panel",
           "kv_panel", "outlier_panel", "quantize_panel", "recommend_panel", "roofline_panel",
           "shipping_panel", "static_scale_panel", "tensor_scheme"]
