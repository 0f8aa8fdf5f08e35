"""SmoothQuant: Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models", arXiv:2211.10438 (ICML 2023).

A few input channels of a linear layer carry outliers 10-100x larger than the rest, so a
per-token activation scale wastes most of int8's grid on them. Since X W^T = (X / s)(W s)^T,
per-input-channel factors s move difficulty from activations to weights; the paper picks
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (eq. 4, alpha = 0.5 by default) and folds 1/s into
the op that produces X, so the float model computes the same function. As in the paper's Llama
code, X is smoothed where an RMSNorm produces it (q/k/v after input_layernorm, gate/up after
post_attention_layernorm); o_proj and down_proj inputs are left alone.

Departures: max|X_j| is taken over the calibration tokens of this call (the paper uses 512
Pile samples); channels whose activations or weights are all zero keep s = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quantlab.algorithms.calibration import (
    check_calibration,
    check_token_ids,
    decoder_layers,
    input_hooks,
    static_act_scales,
)
from quantlab.nn import quantize_model
from quantlab.schemes import Scheme, get_scheme


@torch.no_grad()
def migrate_scales(prev: nn.Module, linears: list[nn.Linear], s: Tensor) -> None:
    """Fold per-input-channel factors s (K,) exactly: prev's output channels / s (an RMSNorm's
    weight, or a Linear's rows and bias), each following linear's input columns * s. In float64,
    then back to the parameters' dtype."""
    s = s.double()
    prev.weight.copy_((prev.weight.double() / (s if prev.weight.ndim == 1 else s[:, None]))
                      .to(prev.weight.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias.copy_((prev.bias.double() / s).to(prev.bias.dtype))
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * s).to(lin.weight.dtype))


def smoothing_scales(act_amax: Tensor, weights: list[Tensor], alpha: float = 0.5) -> Tensor:
    """act_amax (K,): max |X_j| over calibration tokens; weights: (N_i, K) matrices reading X.
    Returns s (K,) = act_amax^alpha / max|W_j|^(1 - alpha) (SmoothQuant eq. 4)."""
    w_amax = torch.cat([w.detach().abs().float() for w in weights]).amax(0)
    s = act_amax.float().pow(alpha) / w_amax.pow(1 - alpha)
    return torch.where((act_amax > 0) & (w_amax > 0) & torch.isfinite(s), s, torch.ones_like(s))


@torch.no_grad()
def smooth_model(model: nn.Module, calib: Tensor, alpha: float = 0.5) -> nn.Module:
    """The float transform, in place: smooth the inputs of q/k/v and gate/up in every decoder
    layer. calib: (B, T) int64 token ids. The model's outputs are unchanged up to rounding."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: the migration strength lies in [0, 1] (0.5 is the "
                         "paper's default; 0.75-0.85 for models with strong outliers)")
    layers = decoder_layers(model)
    check_calibration(calib)
    check_token_ids(model, calib)
    readers = {}
    for i, layer in enumerate(layers):
        readers[f"{i}.attn"] = layer.self_attn.q_proj
        readers[f"{i}.mlp"] = layer.mlp.gate_proj
    amax: dict[str, Tensor] = {}

    def track(name, x):
        m = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float()
        amax[name] = torch.maximum(amax[name], m) if name in amax else m

    with input_hooks(readers, track):
        model(input_ids=calib.to(model.device), use_cache=False)
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        for key, norm, lins in ((f"{i}.attn", layer.input_layernorm,
                                 [attn.q_proj, attn.k_proj, attn.v_proj]),
                                (f"{i}.mlp", layer.post_attention_layernorm,
                                 [mlp.gate_proj, mlp.up_proj])):
            act = amax[key].to(lins[0].weight.device)
            s = smoothing_scales(act, [m.weight for m in lins], alpha)
            migrate_scales(norm, lins, s)
    return model


def smoothquant(model: nn.Module, scheme: Scheme | str, calib: Tensor, alpha: float = 0.5,
                ignore: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """SmoothQuant then round to nearest, in place: for W8A8 schemes (int8_w8a8, fp8_dynamic,
    fp8_per_tensor; static activation scales are calibrated after smoothing). Returns the model."""
    scheme = get_scheme(scheme)
    smooth_model(model, calib, alpha)
    return quantize_model(model, scheme, ignore=ignore,
                          act_scales=static_act_scales(model, scheme, calib, ignore))
