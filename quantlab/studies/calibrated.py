"""Chapter 4's measurements: why GPTQ and AWQ beat round to nearest (RTN), layer by layer and on
the whole model (the figures that show it are in quantlab.viz.calibrated).

Everything here measures a linear layer y = x W^T (W: (N, K), inputs x: (n, K)) by its *output*
error on real inputs, through the Hessian of that error, H = 2 X^T X / n (K, K):

    ||X (W - Wq)^T||^2 / ||X W^T||^2 = tr(E H E^T) / tr(W H W^T),   E = W - Wq,

so a (K, K) matrix stands for thousands of tokens and one layer's error costs one N x K x K
product. The algorithms themselves are quantlab.algorithms.gptq / awq; this module only
measures what they do (gptq_error_trace replays GPTQ's updates with its choices known).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from quantlab.algorithms import gptq_quantize
from quantlab.eval.metrics import sqnr_db
from quantlab.quantize import fake_quantize
from quantlab.schemes import TensorScheme

# The four distinct inputs of a Llama decoder layer: q/k/v share one, gate/up share one.
LAYER_INPUTS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
# AWQ's scale groups here: the linears that read one input (o_proj is left out under
# grouped-query attention, as in quantlab.algorithms.awq).
AWQ_GROUPS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


def input_names(n_layers: int) -> list[str]:
    """Qualified names of the linears whose inputs stand for all of them: (4 n_layers,)."""
    return [f"model.layers.{i}.{p}" for i in range(n_layers) for p in LAYER_INPUTS]


def hessian(x: Tensor) -> Tensor:
    """x (n, K) layer inputs -> H = 2 X^T X / n (K, K) float32, as quantlab's GPTQ builds it."""
    x = x.reshape(-1, x.shape[-1]).float()
    return 2 * x.T @ x / len(x)


def _energy(E: Tensor, H: Tensor) -> float:
    """tr(E H E^T) for E (N, K), H (K, K): float32 products summed in float64."""
    return float(((E.float() @ H.float()) * E.float()).sum(dtype=torch.float64))


def output_error(W: Tensor, Wq: Tensor, H: Tensor) -> float:
    """W, Wq (N, K), H (K, K) -> relative output error energy tr(E H E^T) / tr(W H W^T), E = W - Wq
    (unitless; 10 log10 of its inverse is the output SQNR in dB)."""
    return _energy(W.float() - Wq.float(), H) / _energy(W, H)


def output_sqnr_db(W: Tensor, Wq: Tensor, H: Tensor) -> float:
    """Output SQNR in dB of Wq standing in for W on the inputs H was built from."""
    return -10 * math.log10(output_error(W, Wq, H))


# --- 1. What RTN does not see --------------------------------------------------------------------

def error_shares(W: Tensor, Wq: Tensor, H: Tensor) -> dict[str, Tensor]:
    """Per input channel k (all (K,) float64): act_rms = sqrt(mean x_k^2) = sqrt(H_kk / 2);
    weight_share = ||E[:, k]||^2 / ||E||^2; output_share = ||E[:, k]||^2 H_kk / sum_k of the same
    (the channel's own contribution to the output error, cross terms left out);
    diagonal_fraction: scalar tensor, sum_k ||E[:, k]||^2 H_kk / tr(E H E^T)."""
    E, d = (W - Wq).double(), torch.diag(H).double()
    col = (E ** 2).sum(0)
    total = float(((E @ H.double()) * E).sum())
    return {"act_rms": (d / 2).sqrt(), "weight_share": col / col.sum(),
            "output_share": col * d / (col * d).sum(),
            "diagonal_fraction": (col * d).sum() / total}


def top_share(shares: dict[str, Tensor], frac: float = 0.05) -> tuple[float, float]:
    """(weight error share, output error share) held by the frac of input channels with the
    largest activations."""
    k = max(1, round(frac * len(shares["act_rms"])))
    top = shares["act_rms"].argsort(descending=True)[:k]
    return float(shares["weight_share"][top].sum()), float(shares["output_share"][top].sum())


# --- 2. GPTQ ------------------------------------------------------------------------------------

def gptq_error_trace(W: Tensor, Q: Tensor, H: Tensor, percdamp: float = 0.1,
                     order: Tensor | None = None, step: int = 8) -> Tensor:
    """Replay GPTQ on W (N, K) with its choices Q (N, K) known: Q came from gptq_quantize(W, H,
    ..., percdamp) with this column order (None: 0..K-1; act_order: descending diag H). Column
    j takes its value from Q; its error, divided by U_jj, moves onto the columns not yet quantized
    along row j of U, the upper Cholesky factor of the damped H^-1 (the paper's Algorithm 1).
    Returns (J,) float64 for j = trace_columns(K, step): the relative output error, on H's own
    (undamped) inputs, of the half-quantized weight after j columns. Assumes no input is always
    zero (gptq_quantize zeroes such columns; real layers have none)."""
    K = W.shape[1]
    order = torch.arange(K) if order is None else order
    W, Q, H = W[:, order].double(), Q[:, order].double(), H[order][:, order].double()
    Hd = H + percdamp * torch.diag(H).mean() * torch.eye(K, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    V, total, errs = W.clone(), _energy(W, H), []
    for j in range(K + 1):
        if j % step == 0 or j == K:
            errs.append(_energy(W - V, H) / total)
        if j < K:
            err = (V[:, j] - Q[:, j]) / U[j, j]
            V[:, j + 1:] -= err[:, None] * U[j, j + 1:][None, :]
            V[:, j] = Q[:, j]
    return torch.tensor(errs, dtype=torch.float64)


def trace_columns(K: int, step: int = 8) -> list[int]:
    """The column counts 0, step, 2 step, ..., K at which the traces measure (J,)."""
    return list(range(0, K, step)) + [K]


def rtn_error_trace(W: Tensor, R: Tensor, H: Tensor, order: Tensor | None = None,
                    step: int = 8) -> Tensor:
    """W, R (N, K): the float and the round-to-nearest weight. The relative output error (J,)
    float64 of W with its first j columns (in `order`) rounded and the others untouched, for
    j = trace_columns(K, step)."""
    order = torch.arange(W.shape[1]) if order is None else order
    W, E, H = W[:, order], (W - R)[:, order], H[order][:, order]
    total = _energy(W, H)
    return torch.tensor([_energy(E[:, :j], H[:j, :j]) / total
                         for j in trace_columns(W.shape[1], step)], dtype=torch.float64)


def error_traces(W: Tensor, H: Tensor, rtn: Tensor, gptq: Tensor,
                 gptq_act_order: Tensor | None = None, percdamp: float = 0.1,
                 step: int | None = None) -> dict[str, list[int] | Tensor]:
    """W (N, K) and its RTN, GPTQ (and GPTQ act_order) versions (N, K), all GPTQ runs from H
    with this percdamp -> {"columns": trace_columns(K, step), "RTN": (J,), "GPTQ": (J,),
    "GPTQ act_order": (J,)}: relative output errors on H's inputs, columns in processing order.
    step None: K // 32 (33 points, each an N x K x K product)."""
    step = step or max(1, W.shape[1] // 32)
    out = {"columns": trace_columns(W.shape[1], step), "RTN": rtn_error_trace(W, rtn, H, step=step),
           "GPTQ": gptq_error_trace(W, gptq, H, percdamp, step=step)}
    if gptq_act_order is not None:
        order = torch.argsort(torch.diag(H), descending=True)  # as gptq_quantize's act_order
        out["GPTQ act_order"] = gptq_error_trace(W, gptq_act_order, H, percdamp, order, step)
    return out


def sqnr_rows(W: Tensor, versions: dict[str, Tensor], Hs: dict[str, Tensor]) -> list[dict]:
    """W (N, K); versions: label -> quantized weight (N, K); Hs: label -> (K, K) Hessian. One
    row per version: its weight SQNR and its output SQNR on each H's inputs, in dB."""
    return [{"version": lab, "weight SQNR dB": sqnr_db(W, Wq),
             **{f"output SQNR dB, {h}": output_sqnr_db(W, Wq, H) for h, H in Hs.items()}}
            for lab, Wq in versions.items()]


def gain_rows(W: dict[str, Tensor], rtn: dict[str, Tensor], gptq: dict[str, Tensor],
              Hs: dict[str, dict[str, Tensor]]) -> list[dict]:
    """W, rtn, gptq: layer name -> (N, K) float, RTN and GPTQ weights; Hs: label -> layer name ->
    (K, K). One row per layer: GPTQ's output SQNR minus RTN's (dB) on each label's inputs."""
    # the gain is 10 log10(RTN's error energy / GPTQ's): the output energy cancels
    gain = lambda n, H: 10 * math.log10(_energy(W[n] - rtn[n], H) / _energy(W[n] - gptq[n], H))
    return [{"layer": n.removeprefix("model."), **{lab: gain(n, H[n]) for lab, H in Hs.items()}}
            for n in W]


def damping_sweep(W: Tensor, x_calib: Tensor, H_eval: Tensor, ts: TensorScheme,
                  tokens: tuple[int, ...], percdamps: tuple[float, ...]) -> list[dict]:
    """GPTQ on the first n rows of x_calib (n_max, K) for each n in tokens and each percdamp.
    Rows: tokens, percdamp, and the gain in output SQNR over RTN (dB) on those calibration rows
    and on the held-out inputs behind H_eval (K, K)."""
    R = fake_quantize(W, ts)
    rows = []
    for n in tokens:
        H = hessian(x_calib[:n])
        for pd in percdamps:
            Q = gptq_quantize(W, H, ts, percdamp=pd).dequantize()
            rows.append({"tokens": n, "percdamp": pd,
                         "calibration gain dB": output_sqnr_db(W, Q, H) - output_sqnr_db(W, R, H),
                         "held-out gain dB": output_sqnr_db(W, Q, H_eval)
                         - output_sqnr_db(W, R, H_eval)})
    return rows


# --- 3. AWQ -------------------------------------------------------------------------------------

def awq_scales(x_mean: Tensor, alpha: float) -> Tensor:
    """x_mean (K,) mean |x| per input channel -> AWQ's scales s = x_mean^alpha (K,), normalized
    so that sqrt(max s * min s) = 1, as quantlab.algorithms.awq.search_scales computes them."""
    s = x_mean.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def awq_alpha_curve(weights: list[Tensor], x_mean: Tensor, Hs: dict[str, Tensor],
                    ts: TensorScheme, n_grid: int = 10) -> dict[str, Tensor]:
    """weights: the (N_i, K) linears reading one input; x_mean (K,) from the calibration inputs;
    Hs: label -> (K, K) Hessian to measure on. For alpha = 0, 1/n_grid, ..., 1 - 1/n_grid: quantize
    W s (s = awq_scales) and divide by s again. Returns alpha (A,) and, per label, the relative
    output error (A,) of the group's stacked weights (alpha = 0 is plain RTN)."""
    W = torch.cat([w.float() for w in weights])
    alphas = torch.arange(n_grid, dtype=torch.float64) / n_grid  # search_scales's grid
    out: dict[str, list] = {lab: [] for lab in Hs}
    total = {lab: _energy(W, H) for lab, H in Hs.items()}
    for a in alphas.tolist():
        s = awq_scales(x_mean.float(), a)
        E = W - fake_quantize(W * s, ts) / s
        for lab, H in Hs.items():
            out[lab].append(_energy(E, H) / total[lab])
    return {"alpha": alphas, **{lab: torch.tensor(v, dtype=torch.float64)
                                for lab, v in out.items()}}


def alpha_curves(model: nn.Module, x_mean: dict[str, Tensor], Hs: dict[str, dict[str, Tensor]],
                 schemes: dict[str, TensorScheme], n_grid: int = 10) -> dict[str, dict]:
    """awq_alpha_curve for every AWQ group of every decoder layer. x_mean: input name (as
    input_names gives) -> (K,) mean |x| on the calibration inputs; Hs: label -> input name ->
    (K, K). Returns "layers.i group" -> scheme label -> curve."""
    out = {}
    for i in range(len(model.model.layers)):
        for g, projs in AWQ_GROUPS.items():
            name = f"model.layers.{i}.{projs[0]}"
            ws = [model.get_submodule(f"model.layers.{i}.{p}").weight.detach() for p in projs]
            out[f"layers.{i} {g}"] = {
                lab: awq_alpha_curve(ws, x_mean[name], {h: H[name] for h, H in Hs.items()}, ts,
                                     n_grid) for lab, ts in schemes.items()}
    return out


def keep_channels_error(W: Tensor, H: Tensor, ts: TensorScheme, keep: Tensor) -> float:
    """Relative output error when W (N, K) is rounded to nearest except input channels `keep`
    (indices), which stay in full precision (AWQ's motivating experiment)."""
    Wq = fake_quantize(W, ts)
    Wq[:, keep] = W[:, keep].to(Wq.dtype)
    return output_error(W, Wq, H)


def salient_rows(layers: dict[str, tuple[Tensor, Tensor, Tensor]], ts: TensorScheme,
                 frac: float = 0.01, seed: int = 0) -> list[dict]:
    """layers: label -> (W (N, K), x_mean (K,), H (K, K)). Per layer, the output error as a
    fraction of RTN's when the frac of input channels with the largest mean |x|, the largest
    weight column norm, or random ones stay in full precision."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lab, (W, x_mean, H) in layers.items():
        k = max(1, round(frac * W.shape[1]))
        picks = {"by activation": x_mean.argsort(descending=True)[:k],
                 "by weight norm": W.norm(dim=0).argsort(descending=True)[:k],
                 "random": torch.randperm(W.shape[1], generator=g)[:k]}
        rtn = output_error(W, fake_quantize(W, ts), H)
        rows.append({"layer": lab, "channels kept": k,
                     **{f"{p} / RTN": keep_channels_error(W, H, ts, idx) / rtn
                        for p, idx in picks.items()}})
    return rows


# --- 4. The whole model -------------------------------------------------------------------------

def summary_rows(scores: dict[tuple[str, str], dict[str, Tensor]], base_nll: Tensor,
                 baseline: str = "RTN") -> list[dict]:
    """scores: (scheme, algorithm) -> quantlab.eval.window_scores (per-window KL and NLL, (B,));
    base_nll (B,): the float model's quantlab.eval.window_nll. One row each: KL (nats/token),
    perplexity and its increase, and the paired difference from the same scheme's `baseline`
    algorithm in KL and in NLL with its standard error over the B windows."""
    rows = []
    ppl0 = math.exp(float(base_nll.mean()))
    for (scheme, algo), s in scores.items():
        ref = scores[scheme, baseline]
        dkl, dnll = s["kl"] - ref["kl"], s["nll"] - ref["nll"]
        se = lambda d: float(d.std() / math.sqrt(len(d))) if len(d) > 1 else math.nan
        ppl = math.exp(float(s["nll"].mean()))
        rows.append({"scheme": scheme, "algorithm": algo, "KL": float(s["kl"].mean()),
                     "perplexity": ppl, "perplexity increase": ppl - ppl0,
                     f"KL - {baseline}": float(dkl.mean()), f"KL - {baseline} SE": se(dkl),
                     f"NLL - {baseline}": float(dnll.mean()), f"NLL - {baseline} SE": se(dnll)})
    return rows
