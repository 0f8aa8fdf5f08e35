"""QuantLinear and quantize_model: run a transformers model with quantized weights (and
activations) the way a serving engine computes it.

Two backends (`BACKENDS`):
  reference  plain torch: weights stored quantized (codes, scales, zero points: tensors
             safetensors can save) and dequantized once into a float cache for the matmul;
             activations of W8A8/W4A4 schemes fake-quantized on every call: dynamic (per token /
             per group, computed from the input) or static (one calibrated per-tensor scale), as
             vLLM does.
  triton     the weight packed as the kernel registry (quantlab.kernels.registry) says, no float
             copy kept, and the registry's kernel as the matmul (activations quantized by the
             quantize kernels). Runs on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1.
"auto" picks triton on a CUDA device when a kernel serves the scheme, reference otherwise.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantlab.layers import matches
from quantlab.quantize import QuantizedTensor, dequantize, quantize
from quantlab.schemes import Scheme, get_scheme

BACKENDS = ("auto", "reference", "triton")


def resolve_backend(backend: str, scheme: Scheme, device: torch.device | str) -> str:
    """"reference" or "triton" for a layer of `scheme` on `device`; "triton" where no kernel
    serves the scheme falls back to "reference" with a warning that says so."""
    from quantlab.kernels.registry import find

    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; use one of {BACKENDS}")
    served = find(scheme) is not None
    if backend == "auto":
        return "triton" if served and torch.device(device).type == "cuda" else "reference"
    if backend == "triton" and not served:
        from quantlab.kernels.registry import served_schemes

        warnings.warn(f"no Triton kernel serves {scheme.name}: it runs on the reference "
                      f"(dequantize + F.linear) path. Kernels serve {', '.join(served_schemes())}",
                      stacklevel=3)
        return "reference"
    return backend


class QuantLinear(nn.Module):
    """y = fake_quant_act(x) @ dequant(W).T + b. in_features K, out_features N.

    backend: "reference", "triton" or "auto" (module doc); self.backend holds the one chosen.
    """

    def __init__(self, qweight: QuantizedTensor, bias: Tensor | None, scheme: Scheme,
                 act_scale: Tensor | None = None, dtype: torch.dtype = torch.float32,
                 backend: str = "reference"):
        super().__init__()
        self.scheme = scheme
        self.out_features, self.in_features = qweight.shape
        self.backend = resolve_backend(backend, scheme, qweight.codes.device)
        self.weight_numel = qweight.numel
        self.weight_bits = qweight.storage_bits
        self.bits_per_weight = qweight.bits_per_weight
        if self.backend == "triton":
            from quantlab.kernels.registry import find

            # Only the packed tensors are kept: no codes, no float copy (qweight is None).
            self.kernel = find(scheme)
            self.qweight = None
            self._packed = list(self.kernel.pack(qweight).items())
            for name, t in self._packed:
                self.register_buffer(f"packed_{name}", t)
        else:
            self.kernel = None
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
            self.register_buffer("input_scale", torch.as_tensor(
                act_scale, dtype=torch.float32, device=qweight.codes.device))
        else:
            self.input_scale = None
        act = scheme.activations
        if act is not None and not act.dynamic and act_scale is None:
            raise ValueError(f"{scheme.name} quantizes activations with a static scale: pass "
                             "act_scale (calibrate it, e.g. amax of the layer's inputs / 448)")

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Scheme | str,
                    qweight: QuantizedTensor | None = None,
                    act_scale: Tensor | None = None, backend: str = "reference") -> QuantLinear:
        """Quantize linear.weight with scheme.weights (round to nearest) unless qweight is given
        (e.g. chosen by GPTQ)."""
        scheme = get_scheme(scheme)
        if qweight is None:
            qweight = quantize(linear.weight.detach(), scheme.weights)
        if tuple(qweight.shape) != tuple(linear.weight.shape):
            raise ValueError(f"qweight shape {tuple(qweight.shape)} does not match the layer's "
                             f"weight {tuple(linear.weight.shape)}")
        return cls(qweight, linear.bias, scheme, act_scale, linear.weight.dtype, backend)

    def quantize_input(self, x: Tensor) -> Tensor:
        """Fake-quantize activations (..., K) per the scheme; identity for weight-only schemes."""
        act = self.scheme.activations
        if act is None:
            return x
        q = quantize(x, act, scale=self.input_scale if not act.dynamic else None)
        return dequantize(q)

    def packed(self) -> dict[str, Tensor]:
        """The triton backend's packed weight tensors, by the registry's names."""
        return {name: getattr(self, f"packed_{name}") for name, _ in self._packed}

    def forward(self, x: Tensor) -> Tensor:
        if self.backend == "reference":
            return F.linear(self.quantize_input(x), self.weight, self.bias)
        y = self.kernel.matmul(x, self.packed(), self.scheme, self.input_scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @property
    def storage_bits(self) -> int:
        bits = self.weight_bits
        if self.bias is not None:
            bits += self.bias.numel() * 16
        return bits

    def extra_repr(self) -> str:
        why = ""
        if self.backend == "reference":
            from quantlab.kernels.registry import find

            why = "" if find(self.scheme) else " (no Triton kernel serves this scheme)"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme.name}, bits/weight={self.bits_per_weight:.3f}, "
                f"backend={self.backend}{why}")


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
                   act_scales: dict[str, Tensor] | None = None,
                   backend: str = "reference") -> nn.Module:
    """Replace nn.Linear layers by QuantLinear, in place; returns the model.

    ignore: names or glob patterns left in full precision (lm_head by default, as llm-compressor).
    overrides: {pattern: scheme or None} for mixed precision; the first match wins, None = skip.
    act_scales: {layer name: static activation scale} for schemes with static activations.
    backend: "reference" (dequantize + F.linear), "triton" (the kernel registry's packed weights
    and kernels; schemes no kernel serves stay on reference, with a warning) or "auto" (triton
    on a CUDA device where a kernel serves the scheme). Quantize the model on the device it will
    run on.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; use one of {BACKENDS}")
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
        _set_module(model, name, QuantLinear.from_linear(layer, chosen, act_scale=scale,
                                                         backend=backend))
    return model


def bits_per_weight(model: nn.Module) -> float:
    """Stored bits per weight over the model's QuantLinear weights, scales included."""
    qlayers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return sum(m.weight_bits for m in qlayers) / sum(m.weight_numel for m in qlayers)


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
