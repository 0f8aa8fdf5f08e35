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


def _check_patterns(kind: str, patterns, names: list[str]) -> None:
    """Raise when a pattern is a broken regex or picks no layer (a typo would silently
    quantize the layer it meant to skip), listing the closest layer names."""
    import difflib
    import re

    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{kind} pattern {p!r} is not a string; give layer names or globs")
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as err:
                raise ValueError(f"{kind} pattern {p!r} is not a valid regular expression "
                                 f"({err}); escape special characters, e.g. 're:.*\\[0\\]'"
                                 ) from err
        if not any(matches(n, p) for n in names):
            tails = sorted({n.rsplit(".", 1)[-1] for n in names} | set(names))
            close = difflib.get_close_matches(p.removeprefix("re:"), tails, n=4, cutoff=0.5)
            raise ValueError(f"{kind} pattern {p!r} matches no linear layer of the model; "
                             f"did you mean {close or tails[:6]}? (names, globs like "
                             "'*.down_proj', dotted suffixes like 'lm_head', or 're:<regex>')")


def _untie_if_quantized(model: nn.Module, qlayers: dict[str, nn.Module]) -> None:
    """A quantized lm_head cannot share the embeddings' full-precision weight: say untied in
    config, so an export does not promise transformers a tie it cannot load."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    name = next((n for n, m in model.named_modules() if m is head), None)
    if name in qlayers:
        warnings.warn(f"{name} is quantized, so it no longer shares the input embeddings' "
                      "weight: config.tie_word_embeddings is set to False (pass "
                      f"ignore=('{name}',) to keep them tied and lm_head in full precision)",
                      stacklevel=3)
        config.tie_word_embeddings = False


def quantize_model(model: nn.Module, scheme: Scheme | str,
                   ignore: tuple[str, ...] = ("lm_head",),
                   overrides: dict[str, Scheme | str | None] | None = None,
                   act_scales: dict[str, Tensor] | None = None,
                   backend: str = "reference") -> nn.Module:
    """Replace nn.Linear layers by QuantLinear, in place; returns the model.

    ignore: names or glob patterns left in full precision (lm_head by default, as llm-compressor).
    overrides: {pattern: scheme or None} for mixed precision; the first match wins, None = skip.
    A pattern that matches no linear layer raises (a typo would quantize what it meant to skip).
    act_scales: {layer name: static activation scale} for schemes with static activations.
    backend: "reference" (dequantize + F.linear), "triton" (the kernel registry's packed weights
    and kernels; schemes no kernel serves stay on reference, with a warning) or "auto" (triton
    on a CUDA device where a kernel serves the scheme). Quantize the model on the device it will
    run on.

    All or nothing: every layer is quantized into a new module first (an error names the layer
    and leaves the model untouched), then all are swapped in. A quantized lm_head tied to the
    embeddings is untied (config.tie_word_embeddings = False, with a warning). A model with
    QuantLinear layers and nothing left to quantize raises (it is already quantized).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; use one of {BACKENDS}")
    scheme = get_scheme(scheme)  # names resolved here, once: Scheme objects go down
    if isinstance(ignore, str):
        ignore = (ignore,)
    overrides = {p: None if s is None else get_scheme(s) for p, s in (overrides or {}).items()}
    layers = linear_layers(model)
    done = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not layers and not done:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to quantize (GPT-2's "
                         "Conv1D layers are not nn.Linear: convert them first)")
    names = list(layers) + done
    if tuple(ignore) != ("lm_head",):  # the default may name nothing (a model without a head)
        _check_patterns("ignore", ignore, names)
    _check_patterns("overrides", overrides, names)
    todo: dict[str, Scheme] = {}
    for name in layers:
        chosen = scheme
        for pattern, s in overrides.items():
            if matches(name, pattern):
                chosen = s
                break
        else:
            if any(matches(name, p) for p in ignore):
                chosen = None
        if chosen is not None:
            todo[name] = chosen
    if done and not todo:
        raise ValueError(f"the model is already quantized ({len(done)} QuantLinear layers, e.g. "
                         f"{done[0]}) and no nn.Linear is left to quantize; quantize a fresh "
                         "copy of the full-precision model (copy.deepcopy it before quantizing)")
    new: dict[str, QuantLinear] = {}
    for name, chosen in todo.items():
        layer = layers[name]
        K = layer.in_features
        g = chosen.weights.group_size
        if g and K % g:
            raise ValueError(f"{name}: in_features={K} is not a multiple of {chosen.name}'s group "
                             f"size {g}; add it to ignore=, or override it with a per-channel "
                             "scheme (e.g. w8a16)")
        scale = (act_scales or {}).get(name)
        if scale is not None:
            st = torch.as_tensor(scale, dtype=torch.float32)
            if not bool(torch.isfinite(st).all()) or not bool((st > 0).all()):
                raise ValueError(f"{name}: static activation scale {st.tolist()} is not finite "
                                 "and positive; recalibrate it (amax of the layer's inputs / "
                                 "format max, clamped away from 0) - the model is unchanged")
        try:
            new[name] = QuantLinear.from_linear(layer, chosen, act_scale=scale, backend=backend)
        except (ValueError, TypeError) as err:
            raise type(err)(f"{name}: {err} (the model is unchanged)") from err
    for name, module in new.items():
        _set_module(model, name, module)
    _untie_if_quantized(model, new)
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
