"""Chapter 5 (FP8 end to end): the measurements behind notebooks/05-fp8.md (its figures are in
quantlab.viz.fp8).

Five questions, one block of functions each:
- what an FP8 W8A8 layer computes (`fp8_linear`: E4M3 codes through `torch._scaled_mm`, scales
  outside the sum over K, or per 128-deep slice of K for block scales);
- static (calibrated) against dynamic activation scales: saturation, headroom, subnormals
  (`calibration_rows`, `static_sweep`, `flat_range`);
- who shares a scale, layer by layer on a real model (`layer_sqnr_rows`, `max_energy_share`);
- E4M3 against E5M2 on activation- and gradient-like ranges (`output_grads`, `range_row`);
- the whole model: perplexity, KL and top-1 agreement (`quantized_copy`, scored with
  quantlab.eval's `next_token_logprobs` and `lm_metrics`).
Every tensor here is float32 on the CPU; SQNRs are in dB, KL in nats per token.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from quantlab.eval.metrics import sqnr_db
from quantlab.formats import get_format
from quantlab.granularity import Block
from quantlab.nn import quantize_model
from quantlab.quantize import dequantize, quantize
from quantlab.schemes import Scheme, TensorScheme, get_scheme

# The four distinct inputs of a Llama decoder layer: q/k/v share one, gate/up share one.
INPUTS = {"attention in": "self_attn.q_proj", "o_proj in": "self_attn.o_proj",
          "MLP in": "mlp.gate_proj", "down_proj in": "mlp.down_proj"}


# Per-tensor activations with a scale computed from each input: separates "static or dynamic"
# from "per tensor or per token" (no preset serves it; vLLM's dynamic FP8 is per token).
FP8_TENSOR_DYNAMIC = Scheme("fp8_tensor_dynamic", TensorScheme("e4m3", "tensor"),
                            TensorScheme("e4m3", "tensor"), "FP8 per tensor, dynamic activations")


def layer_inputs(n_layers: int) -> dict[str, str]:
    """label ("layer 0 MLP in") -> the linear layer whose input it is, for every decoder layer."""
    return {f"layer {i} {lab}": f"model.layers.{i}.{mod}"
            for i in range(n_layers) for lab, mod in INPUTS.items()}


# ---------------------------------------------------------------------------------------------
# What an FP8 layer computes.
# ---------------------------------------------------------------------------------------------


def _mm8(a8: Tensor, b8: Tensor, sa: Tensor, sb: Tensor) -> Tensor:
    """a8 (M, K), b8 (N, K) float8_e4m3fn; sa (M, 1) or (), sb (1, N) or () float32 -> (M, N)
    float32 = (a8 @ b8.T) * sa * sb, by torch._scaled_mm (cuBLASLt on a GPU, a CPU path here)."""
    try:
        return torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError):  # older torch: no CPU FP8 GEMM; same math
        return (a8.float() @ b8.float().t()) * sa * sb


def fp8_linear(x: Tensor, w: Tensor, scheme: str | Scheme, act_scale: Tensor | None = None
               ) -> Tensor:
    """x (M, K) float activations, w (N, K) float weights -> (M, N) float32, computed as an FP8
    GEMM does: both operands encoded to E4M3, multiplied as float8_e4m3fn tensors with fp32
    accumulation, scales applied to the result. Per tensor / token / channel, the scales do not
    change along K, so they multiply the finished sum; block scales (1x128 activation groups,
    128x128 weight blocks) do, so each 128-deep slice of K is a separate product, rescaled.
    act_scale: the static activation scale (a scalar) of schemes such as fp8_per_tensor."""
    s = get_scheme(scheme)
    if s.activations is None or s.weights.format != "e4m3" or s.activations.format != "e4m3":
        raise ValueError(f"{s.name} is not an FP8 W8A8 scheme; use fp8_per_tensor, fp8_dynamic "
                         "or fp8_block")
    qx = quantize(x, s.activations, scale=None if s.activations.dynamic else act_scale)
    qw = quantize(w, s.weights)
    x8, w8 = qx.codes.view(torch.float8_e4m3fn), qw.codes.view(torch.float8_e4m3fn)
    M, N = x.shape[0], w.shape[0]
    if isinstance(s.weights.granularity, Block):
        bn, bk = s.weights.block
        if s.activations.group_size != bk or x.shape[1] % bk:
            raise ValueError(f"block scales need activation groups of {bk} = the weight block's "
                             f"K side and K a multiple of it; got K={x.shape[1]}")
        sw = qw.scales.repeat_interleave(bn, 0)[:N]  # (N, K / bk): each row's block scales
        out = torch.zeros(M, N)
        for j in range(x.shape[1] // bk):
            k = slice(j * bk, (j + 1) * bk)
            out += _mm8(x8[:, k].contiguous(), w8[:, k].contiguous(),
                        qx.scales[:, j:j + 1].contiguous(), sw[:, j].reshape(1, N).contiguous())
        return out
    sa, sb = qx.scales.float(), qw.scales.float()
    if sa.numel() > 1 or sb.numel() > 1:  # rowwise scaling: both as (M, 1) and (1, N)
        sa = sa.reshape(-1, 1).expand(M, 1).contiguous()
        sb = sb.reshape(1, -1).expand(1, N).contiguous()
    return _mm8(x8, w8, sa, sb)


def fake_quant_linear(x: Tensor, w: Tensor, scheme: str | Scheme,
                      act_scale: Tensor | None = None) -> Tensor:
    """The reference for fp8_linear (and what quantlab.nn.QuantLinear computes): dequantize both
    operands, multiply in float32. x (M, K), w (N, K) -> (M, N) float32."""
    s = get_scheme(scheme)
    xq = dequantize(quantize(x, s.activations, None if s.activations.dynamic else act_scale))
    return xq.float() @ dequantize(quantize(w, s.weights)).float().T


def relative_error(ref: Tensor, approx: Tensor) -> float:
    """||approx - ref|| / ||ref|| (Frobenius), in float64."""
    return float((approx.double() - ref.double()).norm() / ref.double().norm())


def preset_rows(w: Tensor, x: Tensor, presets: tuple[str, ...], act_scale: Tensor) -> list[dict]:
    """w (N, K), x (T, K): per FP8 preset, what its weights and activations store, how many
    scales each carries for these tensors, and the weights' bits per element (scales included).
    act_scale: the static scale for presets with static activations."""
    rows = []
    for name in presets:
        s = get_scheme(name)
        qw = quantize(w, s.weights)
        qx = quantize(x, s.activations, scale=None if s.activations.dynamic else act_scale)
        rows.append({"preset": name, "weights": s.weights.describe(),
                     "activations": s.activations.describe(),
                     "weight scales": qw.scales.numel(), "activation scales": qx.scales.numel(),
                     "bits/weight": qw.bits_per_weight})
    return rows


def scaled_mm_calls(scheme: str | Scheme, K: int) -> int:
    """How many FP8 products (and fp32 rescales) fp8_linear runs for inner dimension K: one,
    or one per 128-deep slice of K when the scales change along K (blocks, groups)."""
    s = get_scheme(scheme)
    return K // s.weights.block[1] if isinstance(s.weights.granularity, Block) else 1


# ---------------------------------------------------------------------------------------------
# Static against dynamic activation scales.
# ---------------------------------------------------------------------------------------------


def calibration_rows(acts: dict[str, Tensor], scales: dict[str, Tensor],
                     fmt: str = "e4m3") -> list[dict]:
    """acts: label -> held-out inputs (T, K); scales: label -> calibrated static scale (a scalar,
    calibration amax / format max). Per label: calibrated amax, held-out amax and their ratio, the
    share of held-out tokens with an element past the calibrated amax (these saturate at the
    format max), and the median token amax / calibrated amax."""
    fmax = get_format(fmt).max
    rows = []
    for lab, x in acts.items():
        cal = float(scales[lab]) * fmax
        tok = x.abs().amax(-1)
        rows.append({"input": lab, "calibrated amax": cal, "held-out amax": float(tok.max()),
                     "held-out / calibrated": float(tok.max()) / cal,
                     "tokens past it %": 100 * float((tok > cal).float().mean()),
                     "median token amax / calibrated": float(tok.median()) / cal})
    return rows


def static_sweep(x: Tensor, scale: Tensor | float, multipliers: list[float],
                 fmt: str = "e4m3") -> list[float]:
    """x (T, K): SQNR (dB) of x quantized per tensor with the static scale `scale * m` for each
    multiplier m. m < 1 saturates more values at the format max; m > 1 leaves headroom and, far
    enough, pushes values into the subnormals and to zero."""
    return [_sqnr32(x, _fake_quant_static(x, float(scale) * m, fmt)) for m in multipliers]


def _fake_quant_static(x: Tensor, scale: float, fmt: str) -> Tensor:
    """dequantize(quantize(x, per-tensor fmt, scale=scale)), through torch's saturating FP8
    cast where the format has a torch dtype (several times faster; the tests check it equals the
    reference bit for bit)."""
    f = get_format(fmt)
    if f.torch_dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and scale > 0:
        return (x.float() / scale).clamp(-f.max, f.max).to(f.torch_dtype).float() * scale
    ts = TensorScheme(fmt, "tensor", dynamic=False)
    return dequantize(quantize(x, ts, scale=torch.tensor(scale)))


def dynamic_sqnr(x: Tensor, granularity: str = "token", fmt: str = "e4m3") -> float:
    """x (T, K): SQNR (dB) with dynamic absmax scales ("tensor", "token" or "group" of 128)."""
    kw = {"group_size": 128} if granularity == "group" else {}
    return _sqnr32(x, dequantize(quantize(x, TensorScheme(fmt, granularity, **kw))))


def flat_range(multipliers: list[float], sqnr: list[float], tol_db: float = 1.0
               ) -> tuple[float, float]:
    """The smallest and largest multiplier of the contiguous run around the best SQNR whose SQNR
    stays within tol_db of the best: how far a static scale may be off at little cost."""
    best = max(range(len(sqnr)), key=lambda i: sqnr[i])
    lo = hi = best
    while lo > 0 and sqnr[lo - 1] >= sqnr[best] - tol_db:
        lo -= 1
    while hi < len(sqnr) - 1 and sqnr[hi + 1] >= sqnr[best] - tol_db:
        hi += 1
    return multipliers[lo], multipliers[hi]


def code_regions(x: Tensor, scale: float, fmt: str = "e4m3") -> dict[str, float]:
    """Where the elements of x / scale land in the format, in % of x's nonzero elements:
    'saturated' (past the max, clipped to it), 'normal', 'subnormal' (rounded to a nonzero value
    below the smallest normal) and 'zero' (rounded to 0)."""
    f = get_format(fmt)
    a = (x.abs() / scale)[x != 0].float()
    q = f.round(a, overflow="saturate")  # the value each element is stored as
    share = lambda m: 100 * float(m.sum()) / max(a.numel(), 1)
    over = a > f.max
    return {"saturated": share(over), "normal": share((q >= f.min_normal) & ~over),
            "subnormal": share((q > 0) & (q < f.min_normal)), "zero": share(q == 0)}


# ---------------------------------------------------------------------------------------------
# Who shares a scale: layer by layer.
# ---------------------------------------------------------------------------------------------


def layer_sqnr_rows(weights: dict[str, Tensor], acts: dict[str, Tensor],
                    schemes: dict[str, Scheme], static_scales: dict[str, Tensor] | None = None
                    ) -> list[dict]:
    """weights: layer name -> (N, K); acts: layer name -> its inputs (T, K); schemes: label ->
    FP8 scheme; static_scales: layer name -> scale, for schemes with static activations. One row
    per (layer, scheme): weight, activation and layer output (x W^T) SQNR in dB. Layers that
    share an input (q/k/v, gate/up) share its quantized copy."""
    rows, cache = [], {}
    y_ref = {name: acts[name] @ w.T for name, w in weights.items()}
    for label, s in schemes.items():
        for name, w in weights.items():
            x = acts[name]
            key = (label, x.data_ptr())
            if key not in cache:
                scale = None if s.activations.dynamic else (static_scales or {})[name]
                xq = dequantize(quantize(x, s.activations, scale=scale))
                cache[key] = xq, _sqnr32(x, xq)
            (xq, act_db), wq = cache[key], dequantize(quantize(w, s.weights))
            rows.append({"layer": name, "scheme": label, "weight_sqnr_db": sqnr_db(w, wq),
                         "act_sqnr_db": act_db, "output_sqnr_db": _sqnr32(y_ref[name], xq @ wq.T)})
    return rows


def _sqnr32(ref: Tensor, approx: Tensor) -> float:
    """sqnr_db from float32 norms: 3x faster on large tensors, equal to about 1e-5 dB."""
    noise = float(torch.linalg.vector_norm(ref - approx))
    return math.inf if noise == 0 else 20 * math.log10(float(torch.linalg.vector_norm(ref)) / noise)


def scheme_summary(rows: list[dict]) -> list[dict]:
    """rows from layer_sqnr_rows -> one row per scheme: mean and worst output SQNR (dB) over all
    layers, and the mean over down_proj layers and over the others."""
    out = []
    for s in dict.fromkeys(r["scheme"] for r in rows):
        sel = [r["output_sqnr_db"] for r in rows if r["scheme"] == s]
        down = [r["output_sqnr_db"] for r in rows if r["scheme"] == s and "down_proj" in r["layer"]]
        rest = [r["output_sqnr_db"] for r in rows
                if r["scheme"] == s and "down_proj" not in r["layer"]]
        out.append({"scheme": s, "mean dB": sum(sel) / len(sel), "worst dB": min(sel),
                    "down_proj mean dB": sum(down) / len(down),
                    "other layers mean dB": sum(rest) / len(rest)})
    return out


def max_energy_share(x: Tensor, group: int | None = None) -> float:
    """x (T, K): the share of sum(x^2) held by each token's (group=None) or each group's largest
    |x|. That element maps to the format max, which is exact: the share of the energy a finer
    scale stores without error."""
    g = x.reshape(x.shape[0], -1, group or x.shape[1]).double()
    return float((g.abs().amax(-1) ** 2).sum() / (g**2).sum())


# ---------------------------------------------------------------------------------------------
# E4M3 against E5M2.
# ---------------------------------------------------------------------------------------------


def output_grads(model: nn.Module, windows: Tensor, names: list[str]) -> dict[str, Tensor]:
    """windows (B, T) int64 token ids: one forward and backward pass of the mean next-token loss;
    returns the gradient reaching each named linear layer's output, (B*T, N) float32: what the
    backward GEMMs of FP8 training would quantize."""
    grads: dict[str, Tensor] = {}
    hooks = [model.get_submodule(n).register_full_backward_hook(
        lambda m, gin, gout, n=n: grads.__setitem__(n, gout[0].detach().reshape(
            -1, gout[0].shape[-1]).float())) for n in names]
    try:
        model.zero_grad(set_to_none=True)
        model(input_ids=windows, labels=windows, use_cache=False).loss.backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    return grads


def range_row(t: Tensor, fmt: str) -> dict:
    """t: any float tensor, quantized to fmt with one absmax scale. SQNR (dB), the share of its
    nonzero elements that land in the subnormals or round to zero (%), and its spread: log2 of
    amax over the median nonzero magnitude (octaves)."""
    x = t.reshape(-1, t.shape[-1]).float()
    q = quantize(x, TensorScheme(fmt, "tensor"))
    reg = code_regions(x, float(q.scales), fmt)
    nz = x.abs()[x != 0]
    return {"format": fmt, "sqnr_db": sqnr_db(x, dequantize(q)),
            "subnormal %": reg["subnormal"], "flushed to zero %": reg["zero"],
            "spread (octaves)": math.log2(float(nz.max()) / float(nz.median()))}


def weight_grad_sqnr(grad_out: Tensor, inputs: Tensor, fmt: str) -> float:
    """grad_out (T, N), inputs (T, K): SQNR (dB) of the weight gradient grad_out^T inputs (N, K)
    when grad_out is quantized to fmt with one absmax scale (inputs kept exact)."""
    gq = dequantize(quantize(grad_out, TensorScheme(fmt, "tensor")))
    return sqnr_db(grad_out.T @ inputs, gq.T @ inputs)


def format_rows(formats: tuple[str, ...] = ("e4m3", "e5m2")) -> list[dict]:
    """The numbers that decide between FP8 formats: mantissa bits, largest value, smallest normal
    and subnormal, and the octaves of normal values (log2 max / min normal)."""
    rows = []
    for name in formats:
        f = get_format(name)
        rows.append({"format": name, "mantissa bits": f.mbits, "max": f.max,
                     "min normal": f.min_normal, "min subnormal": f.min_subnormal,
                     "normal octaves": math.log2(f.max / f.min_normal),
                     "relative step": 2.0 ** -f.mbits})
    return rows


# ---------------------------------------------------------------------------------------------
# The whole model.
# ---------------------------------------------------------------------------------------------


def quantized_copy(model: nn.Module, scheme: str | Scheme,
                   act_scales: dict[str, Tensor] | None = None, multiplier: float = 1.0
                   ) -> nn.Module:
    """A deep copy of model with every linear layer but lm_head quantized; static activation
    scales (if any) multiplied by `multiplier` (< 1: more saturation, > 1: headroom)."""
    scales = {k: v * multiplier for k, v in (act_scales or {}).items()}
    return quantize_model(copy.deepcopy(model), scheme, act_scales=scales or None)
