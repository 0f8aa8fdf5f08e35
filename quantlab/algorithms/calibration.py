"""Calibration plumbing the algorithms, the jobs and the exporter share: the parts of a Llama-style
model, calibration tokens run through it one decoder layer at a time, layer inputs captured with
forward hooks (`collect_inputs`, `capture_linear_io`), static activation scales
(`static_act_scales`) and plain round to nearest with them (`rtn`).

Every algorithm here rewrites the same places: a decoder layer's `input_layernorm` feeds
`self_attn.{q,k,v}_proj`, `o_proj` writes the residual; `post_attention_layernorm` feeds
`mlp.{gate,up}_proj`, `down_proj` writes the residual; `model.model.norm` feeds `lm_head`.
Llama, Mistral, Qwen2 and Qwen3 share that layout in transformers.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from quantlab.formats import get_format
from quantlab.layers import matches_any
from quantlab.nn import quantize_model
from quantlab.schemes import Scheme

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
MIN_CALIB_TOKENS = 512


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """model.model.layers of a Llama/Mistral/Qwen-style causal LM, after checking the layout."""
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers: there is nothing for "
                         "GPTQ/AWQ/SmoothQuant/rotation to calibrate (GPT-2's Conv1D layers are "
                         "not nn.Linear: convert them first)")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    ok = (model_type in SUPPORTED_MODEL_TYPES and layers is not None
          and hasattr(inner, "embed_tokens") and hasattr(inner, "norm")
          and isinstance(getattr(model, "lm_head", None), nn.Linear))
    for layer in layers or ():
        ok = ok and all(isinstance(unwrap(getattr(layer.self_attn, n, None)), nn.Linear)
                        for n in ATTN)
        ok = ok and all(isinstance(unwrap(getattr(layer.mlp, n, None)), nn.Linear) for n in MLP)
        ok = ok and hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm")
    if not ok:
        raise ValueError(
            f"{type(model).__name__} (model_type={model_type!r}) is not a Llama-style causal LM "
            f"with float nn.Linear projections; the calibrated algorithms support model types "
            f"{SUPPORTED_MODEL_TYPES} (model.model.layers[i].self_attn.{{q,k,v,o}}_proj, "
            "mlp.{gate,up,down}_proj, RMSNorms, lm_head). Run them before quantize_model, or "
            "use plain round-to-nearest (quantlab.nn.quantize_model) for other architectures")
    return layers


def check_calibration(calib: Tensor, min_tokens: int = MIN_CALIB_TOKENS) -> Tensor:
    """calib: (B, T) int64 token ids. Raises ValueError unless it holds at least min_tokens."""
    if not isinstance(calib, Tensor) or calib.ndim != 2 or calib.dtype != torch.long:
        got = f"{type(calib).__name__} {getattr(calib, 'dtype', '')}"
        raise ValueError(f"calib must be a (batch, seq_len) int64 tensor of token ids, got {got}; "
                         "make one with quantlab.eval.token_windows(tok, text, 256, 4096)")
    if calib.numel() < min_tokens:
        raise ValueError(f"the calibration set has {calib.numel()} tokens; these algorithms need "
                         f"at least {min_tokens} to estimate activation statistics (a few "
                         "thousand is better): give a longer calibration text, e.g. "
                         "quantlab.models.calib_text()")
    return calib


def unwrap(module: nn.Module | None) -> nn.Module | None:
    """The linear inside a wrapper that transforms its input (rotation.HadamardInput), or the
    module itself."""
    inner = getattr(module, "linear", None)
    return inner if isinstance(inner, nn.Module) else module


def layer_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """The seven projections of one decoder layer by their name inside the layer (a wrapped one
    as "mlp.down_proj.linear"): nn.Linear, or QuantLinear once quantized."""
    out = {}
    for parent, names in ((layer.self_attn, ATTN), (layer.mlp, MLP)):
        prefix = "self_attn" if parent is layer.self_attn else "mlp"
        for n in names:
            m = getattr(parent, n)
            out[f"{prefix}.{n}" + (".linear" if unwrap(m) is not m else "")] = unwrap(m)
    return out


def check_token_ids(model: nn.Module, calib: Tensor) -> None:
    """Raise ValueError naming the vocabulary size unless every id of calib lies in it (else the
    embedding lookup fails with a bare IndexError, or a CUDA device-side assert)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    if vocab is None or not isinstance(calib, Tensor) or calib.numel() == 0:
        return
    lo, hi = int(calib.min()), int(calib.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"the calibration ids run from {lo} to {hi}, but the model's vocabulary "
                         f"has {vocab} tokens (ids 0..{vocab - 1}): tokenize the calibration "
                         "text with this model's own tokenizer (quantlab.eval.token_windows)")


class _StopForward(Exception):
    pass


@torch.no_grad()
def first_layer_inputs(model: nn.Module, calib: Tensor) -> tuple[Tensor, dict]:
    """Run the embeddings only: returns (hidden states (B, T, d) entering layer 0, the keyword
    arguments the model passes every decoder layer: rotary embeddings, mask, positions)."""
    layers = decoder_layers(model)
    check_token_ids(model, calib)
    seen = {}

    def grab(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=calib.to(model.device), use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return seen["hidden"], seen["kwargs"]


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
    """One decoder layer's output (B, T, d) (older transformers return a tuple)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def input_hooks(modules: dict[str, nn.Module], fn):
    """Within the block, fn(name, x) sees every input x (..., K) of each named module."""
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: fn(name, args[0]))
               for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_inputs(model: nn.Module, modules: dict[str, nn.Module], calib: Tensor,
                   max_rows: int | None = 4096) -> dict[str, Tensor]:
    """One float forward pass; each named module's inputs as (rows, K) float32, at most max_rows
    rows taken evenly over the calibration tokens (None: every row)."""
    check_token_ids(model, calib)
    seen: dict[str, Tensor] = {}
    with input_hooks(modules, lambda n, x: seen.__setitem__(n, x.reshape(-1, x.shape[-1]).float())):
        model(input_ids=calib.to(model.device), use_cache=False)
    if max_rows is None:
        return seen
    step = max(1, -(-calib.numel() // max_rows))
    return {n: x[::step] for n, x in seen.items()}


@torch.inference_mode()
def capture_linear_io(model: nn.Module, names: list[str], inputs: Tensor) -> dict[str, Tensor]:
    """Run the model on inputs (B, T) and return each named layer's input (B*T, K) float32."""
    return collect_inputs(model, {n: model.get_submodule(n) for n in names}, inputs, None)


@torch.no_grad()
def static_act_scales(model: nn.Module, scheme: Scheme, calib: Tensor,
                      ignore: tuple[str, ...] = ("lm_head",)) -> dict[str, Tensor]:
    """{layer name: amax of its inputs / element max}: the calibrated per-tensor activation
    scales a scheme with static activations (fp8_per_tensor) needs; {} for dynamic schemes."""
    act = scheme.activations
    if act is None or act.dynamic:
        return {}
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not matches_any(n, ignore)}
    check_token_ids(model, calib)
    amax: dict[str, Tensor] = {}
    with input_hooks(linears, lambda n, x: amax.__setitem__(
            n, torch.maximum(amax.get(n, torch.zeros(())), x.detach().abs().amax().float().cpu()))):
        model(input_ids=calib.to(model.device), use_cache=False)
    fmax = get_format(act.format).max
    return {n: (a / fmax).clamp(min=1e-12) for n, a in amax.items()}


def rtn(model: nn.Module, scheme: Scheme, calib: Tensor) -> nn.Module:
    """Round to nearest: every linear layer quantized on its own, no calibration for weights
    (calib (B, T) sets the static activation scales of schemes that have them)."""
    return quantize_model(model, scheme, act_scales=static_act_scales(model, scheme, calib))
