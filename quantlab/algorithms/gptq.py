"""GPTQ: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", arXiv:2210.17323 (ICLR 2023).

Each linear layer's weight W (N, K) is quantized one input column at a time; the rounding error
of column j is spread over the columns not yet quantized so as to minimize ||X W^T - X Q^T||^2
over calibration inputs X (n, K). The Hessian of that loss is H = 2 X^T X. Following the paper:
dampening (H += percdamp * mean(diag H) * I), the Cholesky form of H^-1 (Algorithm 1) and lazy
batch updates (blocks of 128 columns), and layers quantized in order, each one's inputs computed
by the layers before it already quantized (`gptq`). The reference code's act-order option
(process columns by descending diag(H)) is here too.

Where this departs from the reference code (IST-DASLab/gptq, AutoGPTQ):
- Scales are those of quantlab.quantize for any TensorScheme (int sym/asym, fp8, MX, NVFP4,
  NF4; per tensor, channel, group or block), not only the integer min/max quantizer.
- A scale group's scales are computed from the group's *current* (error-updated) weights when
  its first column is reached, including pending lazy-batch updates, which the reference skips
  for groups that start inside a block. With act_order, groups stay the original contiguous
  columns (no g_idx needed, so every exporter and kernel can take the result): a group's scales
  are fixed when the first of its columns comes up in the permuted order. The reference instead
  either regroups in permuted order (needs g_idx) or fixes all scales up front (static_groups).
- NVFP4's per-tensor global scale comes from the original weight, as llm-compressor does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quantlab.algorithms.calibration import (
    check_calibration,
    decoder_layers,
    first_layer_inputs,
    input_hooks,
    layer_linears,
    run_layer,
    static_act_scales,
)
from quantlab.granularity import Block
from quantlab.layers import matches_any
from quantlab.nn import QuantLinear, quantize_model
from quantlab.quantize import QuantizedTensor, dequantize, quantize
from quantlab.scales import GGUF, NVFP4, nvfp4_block_scales, nvfp4_global_scale
from quantlab.schemes import Scheme, TensorScheme, get_scheme


def _check(W: Tensor, H: Tensor, ts: TensorScheme) -> None:
    N, K = W.shape
    if tuple(H.shape) != (K, K):
        raise ValueError(f"H has shape {tuple(H.shape)}; the weight ({N}, {K}) needs a ({K}, {K}) "
                         "Hessian: 2 X^T X of the layer's inputs X (n, K)")
    if isinstance(ts.scale_rule, GGUF):
        raise ValueError(f"GPTQ here supports the absmax, MX and NVFP4 scale rules, not "
                         f"{ts.scale_rule}; quantize GGUF schemes with round to nearest")
    if ts.group_size and K % ts.group_size:
        raise ValueError(f"group_size={ts.group_size} does not divide K={K}; pick a group size "
                         "that divides the layer's in_features, or a per-channel scheme")


def _fit_group(Wg: Tensor, ts: TensorScheme, glob: Tensor | None):
    """Scales for one group of columns Wg (N, g): (stored scales, stored zero points or None,
    per-row scale (N,), per-row zero point (N,) or None), as quantlab.quantize picks them."""
    N = Wg.shape[0]
    if glob is not None:  # NVFP4: E4M3 block scales relative to the tensor's fixed global scale
        s = nvfp4_block_scales(Wg, glob)
        return s, None, s.reshape(N), None
    qt = quantize(Wg, ts)
    s, zp = qt.scales, qt.zero_points
    if isinstance(ts.granularity, Block):
        rows = s[:, 0].repeat_interleave(ts.block[0])[:N]
        return s, zp, rows, None
    rows = s.reshape(-1).expand(N) if s.numel() == 1 else s.reshape(N)
    return s, zp, rows, (None if zp is None else zp.reshape(N).float())


def _quantize_column(w: Tensor, s: Tensor, zp: Tensor | None, fmt, glob: Tensor | None):
    """w (N,) -> (codes (N,), dequantized (N,) float32), ops in quantlab.quantize's order so
    that dequantize() of the assembled tensor returns exactly these values."""
    denom = s * glob if glob is not None else s
    v = torch.where(denom == 0, torch.zeros_like(w), w / torch.where(denom == 0, 1.0, denom))
    if zp is not None:
        codes = fmt.encode(torch.round(v) + zp)
        return codes, (fmt.decode(codes) - zp) * s
    codes = fmt.encode(v, overflow="saturate") if fmt.kind == "float" else fmt.encode(v)
    q = fmt.decode(codes) * s
    return codes, (q * glob if glob is not None else q)


@torch.no_grad()
def gptq_quantize(weight: Tensor, H: Tensor, scheme: Scheme | TensorScheme | str,
                  percdamp: float = 0.1, blocksize: int = 128, act_order: bool = False
                  ) -> QuantizedTensor:
    """weight (N, K) float, H (K, K) = 2 X^T X of the layer's calibration inputs X (n, K)
    -> QuantizedTensor whose dequantize() is the weight GPTQ chose (codes (N, K), scales and
    zero points in quantlab.quantize's layout for the scheme's weight TensorScheme).
    percdamp defaults to 0.1, as gptq() does (see there why not the paper's 0.01)."""
    ts = scheme if isinstance(scheme, TensorScheme) else get_scheme(scheme).weights
    _check(weight, H, ts)
    fmt = ts.element
    N, K = weight.shape
    W = weight.detach().float().clone()
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0  # inputs that are always zero: any weight works, zero is cheapest
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    glob = None
    if ts.scale_rule == NVFP4:
        glob = nvfp4_global_scale(W.abs().amax())

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    inv = torch.argsort(perm)
    W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(K)
    try:  # Hinv: the upper Cholesky factor of H^-1 (the paper's Algorithm 1)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as err:
        raise ValueError(f"H + {percdamp} * mean(diag H) I is not positive definite: raise "
                         "percdamp (e.g. 0.1) or give more calibration tokens") from err

    g = ts.granularity.width(K)
    group_of = perm // g  # original scale group of each column, in processing order
    shape = tuple(quantize(torch.ones(N, K), ts).scales.shape)
    scales = torch.zeros(shape)
    zeros = torch.zeros(shape, dtype=torch.int32) if not ts.symmetric else None
    rows: dict[int, tuple[Tensor, Tensor | None]] = {}
    codes, Q = [], torch.zeros(N, K)
    for i1 in range(0, K, blocksize):  # lazy batches: W[:, i1:] is updated once per block
        i2 = min(i1 + blocksize, K)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros(N, i2 - i1)
        for i in range(i2 - i1):
            j = i1 + i
            G = int(group_of[j])
            if G not in rows:  # the group's first column: fit scales to its current weights
                pos = inv[G * g: (G + 1) * g]  # its columns' positions, all >= j
                Wg = W[:, pos] - Err1[:, :i] @ Hinv[i1:j, pos]  # block start + pending updates
                s, zp, s_rows, zp_rows = _fit_group(Wg, ts, glob)
                _store(scales, s, G)
                if zeros is not None:
                    _store(zeros, zp, G)
                rows[G] = (s_rows, zp_rows)
            w = W1[:, i]
            c, Q[:, j] = _quantize_column(w, *rows[G], fmt, glob)
            codes.append(c)
            err = (w - Q[:, j]) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    codes = torch.stack(codes, 1)[:, inv]
    qt = QuantizedTensor(codes, scales, ts, weight.shape, weight.dtype, zeros, glob)
    if not torch.equal(dequantize(qt, torch.float32), Q[:, inv]):
        raise RuntimeError("GPTQ's assembled QuantizedTensor does not dequantize to the weights it "
                           f"chose for scheme {ts.describe()}: please report this as a bug")
    return qt


def _store(full: Tensor, part: Tensor, G: int) -> None:
    """Write one group's scales (N, 1) / (nb, 1), or the only group's, into the full layout."""
    if full.ndim == 2 and full.shape[1] > 1:
        full[:, G] = part[:, 0]
    else:
        full.copy_(part.reshape(full.shape))


# Projections that read the same input share one Hessian: GPTQ treats rows independently, so
# stacking their weights and quantizing once is the same as one call per layer, and faster.
SHARED_INPUT = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _split_rows(qt: QuantizedTensor, sizes: list[int]) -> list[QuantizedTensor]:
    """A QuantizedTensor of stacked weights (per-row scales) back into one per layer."""
    out, start = [], 0
    for n in sizes:
        rows = slice(start, start + n)
        zp = None if qt.zero_points is None else qt.zero_points[rows]
        out.append(QuantizedTensor(qt.codes[rows], qt.scales[rows], qt.scheme,
                                   torch.Size((n, qt.shape[1])), qt.dtype, zp))
        start += n
    return out


@torch.no_grad()
def gptq_layer(layer: nn.Module, prefix: str, hidden: Tensor, kwargs: dict, scheme: Scheme,
                ignore, percdamp: float, blocksize: int, act_order: bool) -> None:
    """GPTQ for one decoder layer, in place: its Hessians from `hidden` (its inputs, (B, T, H),
    on the layer's device; kwargs: what the layer is called with), then each linear replaced by
    a QuantLinear. gptq() runs it layer after layer; quantlab.sequential one loaded layer at a
    time. prefix: the layer's name in the model ("model.layers.3."), for `ignore`."""

    ts, act = scheme.weights, scheme.activations
    fmax = act.element.max if act is not None else 1.0
    stackable = ts.granularity.per_row and not ts.scale_rule.global_scale_bits
    paths = {p.removesuffix(".linear"): p for p in layer_linears(layer)}
    groups = [[paths[n] for n in names if not matches_any(prefix + n, ignore)]
              for names in SHARED_INPUT]
    groups = [g for g in groups if g]
    first = {g[0]: layer.get_submodule(g[0]) for g in groups}
    dev = hidden.device
    with torch.device(dev):  # gptq_quantize's own tensors (torch.zeros, torch.eye) on dev too
        stats = {p: [torch.zeros(m.in_features, m.in_features), 0, torch.zeros(())]
                 for p, m in first.items()}

        def accumulate(path, x):
            x = x.reshape(-1, x.shape[-1]).float()
            st = stats[path]
            st[0] += x.T @ x
            st[1] += x.shape[0]
            st[2] = torch.maximum(st[2], x.abs().amax())

        with input_hooks(first, accumulate):
            run_layer(layer, hidden, kwargs)
        for group in groups:
            xtx, n, amax = stats[group[0]]
            H = 2 * xtx / n
            lins = [layer.get_submodule(p) for p in group]
            if stackable and len(lins) > 1:
                W = torch.cat([m.weight for m in lins])
                qts = _split_rows(gptq_quantize(W, H, ts, percdamp, blocksize, act_order),
                                  [m.out_features for m in lins])
            else:
                qts = [gptq_quantize(m.weight, H, ts, percdamp, blocksize, act_order)
                       for m in lins]
            act_scale = (amax / fmax).clamp(min=1e-12) if act is not None and not act.dynamic \
                else None
            for path, lin, qt in zip(group, lins, qts, strict=True):
                parent, _, child = path.rpartition(".")
                setattr(layer.get_submodule(parent), child,
                        QuantLinear.from_linear(lin, scheme, qweight=qt, act_scale=act_scale))


@torch.no_grad()
def gptq(model: nn.Module, scheme: Scheme | str, calib: Tensor, percdamp: float = 0.1,
         blocksize: int = 128, act_order: bool = False, ignore: tuple[str, ...] = ("lm_head",)
         ) -> nn.Module:
    """GPTQ over a Llama-style model, in place: decoder layer by decoder layer, each layer's
    Hessians from its inputs with the layers before it already quantized (and their activations
    fake-quantized, for W8A8/W4A4 schemes). calib: (B, T) int64 token ids, a few thousand tokens.
    percdamp 0.1, not the reference's 0.01: with a few thousand calibration tokens (not 128 x 2048)
    the stronger dampening generalizes better to held-out text. Linear layers outside the
    decoder layers (lm_head is ignored by default) get round to nearest. Returns the model."""
    scheme = get_scheme(scheme)
    layers = decoder_layers(model)
    check_calibration(calib)
    hidden, kwargs = first_layer_inputs(model, calib)
    for index, layer in enumerate(layers):
        gptq_layer(layer, f"model.layers.{index}.", hidden, kwargs, scheme, ignore, percdamp,
                   blocksize, act_order)
        hidden = run_layer(layer, hidden, kwargs)  # the next layer sees this quantized one
    if any(isinstance(m, nn.Linear) and not matches_any(n, ignore)
           for n, m in model.named_modules()):
        quantize_model(model, scheme, ignore=ignore,
                       act_scales=static_act_scales(model, scheme, calib, ignore))
    return model
