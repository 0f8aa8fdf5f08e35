"""KV-cache quantization: codecs, a transformers cache holding codes, decode attention, capacity.

    >>> from quantlab.kv import CODECS, get_codec
    >>> get_codec("int8_per_token_head").bytes_per_token(n_kv_heads=8, head_dim=128)
    2112

codecs and capacity import with torch alone; the cache needs transformers and the kernel triton
(each imported on first use). Measurements: quantlab.studies.kv and quantlab.kv.bench.
"""

from quantlab.kv.capacity import capacity
from quantlab.kv.codecs import CODECS, KVCodec, get_codec

_LAZY = {"QuantizedKVCache": "cache", "QuantizedKVLayer": "cache",
         "decode_attention": "attention", "decode_attention_ref": "attention"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"quantlab.kv.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'quantlab.kv' has no attribute {name!r}")


__all__ = ["CODECS", "KVCodec", "get_codec", "capacity", *_LAZY]
