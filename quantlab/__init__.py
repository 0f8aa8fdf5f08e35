"""quantlab: see, measure and ship LLM quantization.

    >>> import torch, quantlab as ql
    >>> q = ql.quantize(torch.randn(256, 256), "w4a16")
    >>> round(q.bits_per_weight, 3)
    4.125
"""

from quantlab.formats import FORMATS, get_format
from quantlab.quantize import QuantizedTensor, dequantize, fake_quantize, quantize
from quantlab.schemes import PRESETS, Scheme, TensorScheme, get_scheme

__version__ = "0.1.0"
__all__ = ["FORMATS", "PRESETS", "QuantizedTensor", "Scheme", "TensorScheme", "dequantize",
           "fake_quantize", "get_format", "get_scheme", "quantize"]
