"""Model-level error: next-token KL against the unquantized model, and per-layer error."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quantlab.eval.metrics import sqnr_db


@torch.inference_mode()
def next_token_logprobs(model: nn.Module, windows: Tensor, batch_size: int = 8) -> Tensor:
    """windows (B, T) int64 token ids -> next-token log-probabilities (B, T, vocab) float32."""
    return torch.cat([torch.log_softmax(model(input_ids=b, use_cache=False).logits.float(), -1)
                      for b in windows.split(batch_size)])


@torch.inference_mode()
def next_token_kl(ref_model: nn.Module, model: nn.Module, windows: Tensor,
                  batch_size: int = 8) -> float:
    """Mean KL(P_ref || P_model) of next-token distributions, in nats per token.

    windows: (B, T) int64 token ids; every position of every window is scored.
    """
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        lp_ref = torch.log_softmax(ref_model(input_ids=batch, use_cache=False).logits.float(), -1)
        lp = torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), -1)
        total += float((lp_ref.exp() * (lp_ref - lp)).sum())
        count += batch.numel()
    return total / count


@torch.inference_mode()
def capture_linear_io(model: nn.Module, names: list[str], inputs: Tensor) -> dict[str, Tensor]:
    """Run the model on inputs (B, T) and return each named layer's input (B*T, K) float32."""
    seen: dict[str, Tensor] = {}
    hooks = []
    for name in names:
        mod = model.get_submodule(name)
        hooks.append(mod.register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(
                name, args[0].detach().reshape(-1, args[0].shape[-1]).float())))
    try:
        model(input_ids=inputs, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.inference_mode()
def layer_errors(ref_model: nn.Module, model: nn.Module, inputs: Tensor) -> list[dict]:
    """Per quantized layer: weight SQNR (dB) and the relative error of the layer's output on the
    reference model's own inputs to that layer, ||W x - Q(W) Q(x)|| / ||W x||.

    inputs: (B, T) token ids (calibration text). Layers are those of `model` that are QuantLinear.
    """
    from quantlab.nn import QuantLinear

    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    acts = capture_linear_io(ref_model, names, inputs)
    rows = []
    for name in names:
        q = model.get_submodule(name)
        w = ref_model.get_submodule(name).weight.detach().float()
        x = acts[name]
        y_ref = x @ w.T
        y = q.quantize_input(x) @ q.weight.float().T
        rel = float((y - y_ref).norm() / y_ref.norm().clamp(min=1e-30))
        rows.append({"layer": name, "weight_sqnr_db": sqnr_db(w, q.weight),
                     "output_rel_error": rel, "output_sqnr_db": sqnr_db(y_ref, y)})
    return rows
