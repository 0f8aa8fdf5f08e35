"""QuantLinear and quantize_model: run a transformers model with quantized weights (and
activations) the way a serving engine computes it, in plain torch.

Weights are stored quantized (codes, scales, zero points: tensors safetensors can save) and
dequantized once into a float cache for the matmul. Activations of W8A8/W4A4 schemes are
fake-quantized on every call: dynamic (per token / per group, computed from the input) or static
(one calibrated per-tensor scale), as vLLM does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantlab.layers import matches
from quantlab.quantize import QuantizedTensor, dequantize, quantize
from quantlab.schemes import Scheme, get_scheme


class QuantLinear(nn.Module):
    """y = fake_quant_act(x) @ dequant(W).T + b. in_features K, out_features N."""

    def __init__(self, qweight: QuantizedTensor, bias: Tensor | None, scheme: Scheme,
                 act_scale: Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.scheme = scheme
        self.out_features, self.in_features = qweight.shape
        self.qweight = qweight
        # The tensors a checkpoint would hold, registered so state_dict / safetensors see them.
        self.register_buffer("weight_codes", qweight.codes)
        self.register_buffer("weight_scales", qweight.scales)
        if qweight.zero_points is not None:
            self.register_buffer("weight_zero_points", qweight.zero_points)
        if qweight.global_scale is not None:
            self.register_buffer("weight_global_scale", qweight.global_scale)
        self.register_buffer("weight", dequantize(qweight, dtype), persistent=False)
        self.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False) \
            if bias is not None else None
        if act_scale is not None:
            self.register_buffer("input_scale", torch.as_tensor(act_scale, dtype=torch.float32))
        else:
            self.input_scale = None
        act = scheme.activations
        if act is not None and not act.dynamic and act_scale is None:
            raise ValueError(f"{scheme.name} quantizes activations with a static scale: pass "
                             "act_scale (calibrate it, e.g. amax of the layer's inputs / 448)")

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Scheme | str,
                    qweight: QuantizedTensor | None = None,
                    act_scale: Tensor | None = None) -> QuantLinear:
        """Quantize linear.weight with scheme.weights (round to nearest) unless qweight is given
        (e.g. chosen by GPTQ)."""
        scheme = get_scheme(scheme)
        if qweight is None:
            qweight = quantize(linear.weight.detach(), scheme.weights)
        if tuple(qweight.shape) != tuple(linear.weight.shape):
            raise ValueError(f"qweight shape {tuple(qweight.shape)} does not match the layer's "
                             f"weight {tuple(linear.weight.shape)}")
        return cls(qweight, linear.bias, scheme, act_scale, linear.weight.dtype)

    def quantize_input(self, x: Tensor) -> Tensor:
        """Fake-quantize activations (..., K) per the scheme; identity for weight-only schemes."""
        act = self.scheme.activations
        if act is None:
            return x
        q = quantize(x, act, scale=self.input_scale if not act.dynamic else None)
        return dequantize(q)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.weight, self.bias)

    @property
    def storage_bits(self) -> int:
        bits = self.qweight.storage_bits
        if self.bias is not None:
            bits += self.bias.numel() * 16
        return bits

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme.name}, bits/weight={self.qweight.bits_per_weight:.3f}")


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of the model by qualified name (QuantLinear excluded)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_model(model: nn.Module, scheme: Scheme | str,
                   ignore: tuple[str, ...] = ("lm_head",),
                   overrides: dict[str, Scheme | str | None] | None = None,
                   act_scales: dict[str, Tensor] | None = None) -> nn.Module:
    """Replace nn.Linear layers by QuantLinear, in place; returns the model.

    ignore: names or glob patterns left in full precision (lm_head by default, as llm-compressor).
    overrides: {pattern: scheme or None} for mixed precision; the first match wins, None = skip.
    act_scales: {layer name: static activation scale} for schemes with static activations.
    """
    scheme = get_scheme(scheme)  # names resolved here, once: Scheme objects go down
    overrides = {p: None if s is None else get_scheme(s) for p, s in (overrides or {}).items()}
    layers = linear_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to quantize (GPT-2's "
                         "Conv1D layers are not nn.Linear: convert them first)")
    for name, layer in layers.items():
        chosen = scheme
        for pattern, s in overrides.items():
            if matches(name, pattern):
                chosen = s
                break
        else:
            if any(matches(name, p) for p in ignore):
                chosen = None
        if chosen is None:
            continue
        K = layer.in_features
        g = chosen.weights.group_size
        if g and K % g:
            raise ValueError(f"{name}: in_features={K} is not a multiple of {chosen.name}'s group "
                             f"size {g}; add it to ignore=, or override it with a per-channel "
                             "scheme (e.g. w8a16)")
        scale = (act_scales or {}).get(name)
        _set_module(model, name, QuantLinear.from_linear(layer, chosen, act_scale=scale))
    return model


def bits_per_weight(model: nn.Module) -> float:
    """Stored bits per weight over the model's QuantLinear weights, scales included."""
    qlayers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return sum(m.qweight.storage_bits for m in qlayers) / sum(m.qweight.numel for m in qlayers)


def model_size_bytes(model: nn.Module, embedding_bits: int = 16) -> int:
    """Bytes to store the model as quantized: QuantLinear layers at their exact bits, every other
    parameter at `embedding_bits` (16: bf16)."""
    bits = 0
    quantized = set()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            bits += m.storage_bits
            quantized.update(f"{name}.{p}" for p, _ in m.named_parameters())
    seen = set()
    for name, p in model.named_parameters():
        if name in quantized or id(p) in seen:
            continue
        seen.add(id(p))
        bits += p.numel() * embedding_bits
    return math.ceil(bits / 8)
