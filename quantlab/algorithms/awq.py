"""AWQ: Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", arXiv:2306.00978 (MLSys 2024).

Weights that meet large activations matter most. Scaling input channel j of W up by s_j (and
the input down by s_j, folded into the op before) shrinks that weight's relative rounding error.
The paper searches s = mean|X|^alpha over a grid of alpha in [0, 1) (section 3.3), normalized
so that sqrt(max(s) min(s)) = 1 as the reference code does, keeping the alpha whose
fake-quantized layers reproduce the float outputs best on calibration inputs. The scales fold
into the RMSNorm before q/k/v and gate/up, into v_proj before o_proj (only when v_proj's output
is o_proj's input: not with grouped-query attention, as in the reference), and into up_proj
before down_proj, so the float model is unchanged. Then every layer is rounded to nearest.

Departures from the reference code (mit-han-lab/llm-awq): the error is measured on the outputs
of the linear layers themselves (sum over q/k/v, or gate/up), not of the whole attention or MLP
block; inputs come from one float forward pass (folding is exact, so later groups see the same
inputs as in the reference's sequence). The reference's weight-clipping search (auto_clip) is
here as `search_clip`: it shrinks each scale group's range where that lowers the group's output
error, for every layer but q/k (as the reference), on at most 1024 tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quantlab.algorithms.calibration import (
    check_calibration,
    collect_inputs,
    decoder_layers,
    static_act_scales,
)
from quantlab.algorithms.smoothquant import migrate_scales
from quantlab.nn import quantize_model
from quantlab.quantize import fake_quantize
from quantlab.schemes import Scheme, TensorScheme, get_scheme


@torch.no_grad()
def search_scales(x: Tensor, weights: list[Tensor], ts: TensorScheme, n_grid: int = 20
                  ) -> tuple[Tensor, float, list[float]]:
    """x (n, K) calibration inputs; weights (N_i, K) reading them; ts: the weight TensorScheme.
    Returns (s (K,), the best alpha, mean squared output error per alpha on the grid)."""
    x = x.float()
    x_mean = x.abs().mean(0)
    refs = [x @ w.float().T for w in weights]
    errors, best = [], (float("inf"), torch.ones_like(x_mean), 0.0)
    for k in range(n_grid):
        alpha = k / n_grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = sum(float(((x @ (fake_quantize(w.float() * s, ts) / s).T - y) ** 2).sum())
                  for w, y in zip(weights, refs, strict=True)) / sum(y.numel() for y in refs)
        errors.append(err)
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2], errors


@torch.no_grad()
def search_clip(x: Tensor, w: Tensor, ts: TensorScheme, n_grid: int = 20, max_shrink: float = 0.5
                ) -> Tensor:
    """x (n, K) inputs, w (N, K) weight (already AWQ-scaled) -> w clamped per (row, scale group)
    to +-r * amax, r in (1 - max_shrink, 1] chosen to minimize that group's output error
    sum_t (x_t,g . (w_g - Q(clip(w_g))))^2 (AWQ's auto_clip)."""
    N, K = w.shape
    g = ts.granularity.group_size or K
    xg = x.float().reshape(len(x), K // g, g).transpose(0, 1)  # (G, n, g)
    wg = w.float().reshape(N, K // g, g)  # (N, G, g)
    amax = wg.abs().amax(-1, keepdim=True)
    best_err = torch.full((N, K // g), float("inf"))
    best = amax.clone()
    for k in range(int(max_shrink * n_grid)):
        m = amax * (1 - k / n_grid)
        q = fake_quantize(torch.clamp(wg, -m, m).reshape(N, K), ts).reshape(N, K // g, g)
        err = (torch.bmm(xg, (wg - q).permute(1, 2, 0)) ** 2).sum(1).T  # (N, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better.unsqueeze(-1), m, best)
    return torch.clamp(wg, -best, best).reshape(N, K).to(w.dtype)


@torch.no_grad()
def awq_layer(layer: nn.Module, xs: dict[str, Tensor], ts: TensorScheme, n_grid: int = 20,
              clip: bool = True) -> dict[str, float]:
    """AWQ for one Llama-style decoder layer, in place: search and fold the scales of each
    group of linears that share an input, then (clip) clip their weights. xs: {"qkv", "o",
    "gate_up", "down": that group's inputs (rows, K)} from the float model. awq_scale_model runs
    it layer after layer; quantlab.sequential one loaded layer at a time. Returns {group: alpha}."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = [("qkv", layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
              ("gate_up", layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]),
              ("down", mlp.up_proj, [mlp.down_proj])]
    if attn.v_proj.out_features == attn.o_proj.in_features:  # no GQA: v -> o is foldable
        groups.insert(1, ("o", attn.v_proj, [attn.o_proj]))
    alphas = {}
    for key, prev, lins in groups:
        s, alpha, _ = search_scales(xs[key], [m.weight for m in lins], ts, n_grid)
        migrate_scales(prev, lins, s.to(lins[0].weight.device))
        alphas[key] = alpha
        if not clip:
            continue
        x = xs[key] / s  # what the scaled layers now read
        x = x[:: max(1, len(x) // 1024)]
        for lin in lins:
            if lin not in (attn.q_proj, attn.k_proj):
                lin.weight.copy_(search_clip(x, lin.weight, ts))
    return alphas


@torch.no_grad()
def awq_scale_model(model: nn.Module, scheme: Scheme | str, calib: Tensor, n_grid: int = 20,
                    max_rows: int = 4096, clip: bool = True) -> dict[str, float]:
    """In place: search and fold AWQ scales for every decoder layer (a float transform: outputs
    unchanged), then, if clip, clip weights (not function-preserving: it prepares rounding).
    calib: (B, T) int64 token ids; at most max_rows tokens per layer enter the scale search.
    Returns {group name: chosen alpha} (alpha 0 = no scaling)."""
    ts = get_scheme(scheme).weights
    layers = decoder_layers(model)
    check_calibration(calib)
    probes = {}
    for i, layer in enumerate(layers):
        probes.update({f"{i}.qkv": layer.self_attn.q_proj, f"{i}.o": layer.self_attn.o_proj,
                       f"{i}.gate_up": layer.mlp.gate_proj, f"{i}.down": layer.mlp.down_proj})
    xs = collect_inputs(model, probes, calib, max_rows)
    alphas = {}
    for i, layer in enumerate(layers):
        xi = {k: xs[f"{i}.{k}"] for k in ("qkv", "o", "gate_up", "down")}
        for key, alpha in awq_layer(layer, xi, ts, n_grid, clip).items():
            alphas[f"model.layers.{i}.{key}"] = alpha
    return alphas


def awq(model: nn.Module, scheme: Scheme | str, calib: Tensor, n_grid: int = 20,
        clip: bool = True, ignore: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """AWQ scale search and folding (and clipping), then round to nearest, in place. For
    weight-only schemes (w4a16, w4a16_asym, nvfp4_a16; any scheme runs). Returns the model."""
    scheme = get_scheme(scheme)
    awq_scale_model(model, scheme, calib, n_grid, clip=clip)
    return quantize_model(model, scheme, ignore=ignore,
                          act_scales=static_act_scales(model, scheme, calib, ignore))
