"""Language-model evaluation, the one place for it: token windows, next-token NLL and perplexity,
KL divergence from a reference model, log-probabilities against a reference, per-layer error.

Text is read as non-overlapping windows (B, T) of token ids: position t predicts token t + 1, no
context carries over between windows, log-softmax in float32. Every job (compare, deploy,
models.score_text) and every study (chapters 3-5, the KV-cache evaluation) scores through here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantlab.eval.metrics import sqnr_db

# --- windows and logits --------------------------------------------------------------------------


def token_windows(tokenizer, text: str, seq_len: int, n_tokens: int) -> Tensor:
    """The first n_tokens tokens of text as (n_tokens // seq_len, seq_len) int64 windows."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:n_tokens]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {seq_len}; "
                         "give a longer text or a smaller seq_len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def logits(model: nn.Module, batch: Tensor) -> Tensor:
    """batch (B, T) int64 -> next-token logits (B, T, vocab) float32, one pass, no KV cache."""
    return model(input_ids=batch, use_cache=False).logits.float()


@torch.inference_mode()
def next_token_logprobs(model: nn.Module, windows: Tensor, batch_size: int = 8) -> Tensor:
    """windows (B, T) int64 token ids -> next-token log-probabilities (B, T, vocab) float32."""
    return torch.cat([torch.log_softmax(logits(model, b), -1) for b in windows.split(batch_size)])


# --- negative log-likelihood and perplexity ------------------------------------------------------

Forward = Callable[[nn.Module, Tensor], Tensor]


@torch.inference_mode()
def nll_total(model: nn.Module, batches: Iterable[Tensor], forward: Forward = logits
              ) -> tuple[float, int]:
    """Summed next-token NLL (nats) of tokens 1..T-1 and how many were predicted, over batches of
    windows (B, T) (their T may differ). forward(model, batch) -> (B, T, vocab) float32 logits:
    one plain pass by default; studies.kv passes one that reads through a quantized cache."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        lg = forward(model, batch)
        total += float(F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]),
                                       batch[:, 1:].reshape(-1), reduction="sum"))
        count += batch[:, 1:].numel()
    return total, count


def mean_nll(model: nn.Module, windows: Tensor, batch_size: int = 8,
             forward: Forward = logits) -> float:
    """Mean next-token NLL (nats) over every window (B, T); exp of it is the perplexity."""
    total, count = nll_total(model, windows.split(batch_size), forward)
    return total / count


@dataclass(frozen=True)
class LMScore:
    """How well a causal LM predicts a text.

    nll: mean negative log-likelihood per predicted token, in nats. n_predicted: tokens scored.
    n_tokens, n_bytes: tokens and UTF-8 bytes of the text that was read.
    """

    nll: float
    n_predicted: int
    n_tokens: int
    n_bytes: int

    @property
    def perplexity(self) -> float:
        """exp(nll): tokenizer-dependent, so compare only models sharing a tokenizer."""
        return math.exp(self.nll)

    @property
    def bits_per_byte(self) -> float:
        """nll in bits times the tokenizer's tokens per byte of the text read: comparable across
        tokenizers (the unpredicted first token of each window counts at the average rate)."""
        return self.nll / math.log(2) * self.n_tokens / self.n_bytes


def score_text(model, tokenizer, text: str, seq_len: int = 256, max_tokens: int | None = None,
               batch_size: int = 8) -> LMScore:
    """Score ``text`` in non-overlapping windows of ``seq_len`` tokens (each window predicts its
    tokens 1..seq_len-1 from the ones before, with no context carried over), reading at most
    ``max_tokens`` tokens; a ragged tail of 2 or more tokens is scored as a window of its own."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: a window needs at least 2 tokens to predict one")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is not None and max_tokens < len(ids):
        ids = ids[:max_tokens]
        n_bytes = len(tokenizer.decode(ids).encode("utf-8"))  # the bytes those tokens spell
    else:
        n_bytes = len(text.encode("utf-8"))
    if len(ids) < 2:
        raise ValueError(f"text has {len(ids)} token(s); perplexity needs at least 2")
    tokens = torch.tensor(ids, dtype=torch.long)
    n_full = len(ids) // seq_len
    batches = list(tokens[: n_full * seq_len].view(n_full, seq_len).split(batch_size))
    if len(ids) - n_full * seq_len >= 2:
        batches.append(tokens[n_full * seq_len :].unsqueeze(0))
    total, predicted = nll_total(model, batches)
    return LMScore(nll=total / predicted, n_predicted=predicted, n_tokens=len(ids), n_bytes=n_bytes)


def perplexity(model, tokenizer, text: str, seq_len: int = 256,
               max_tokens: int | None = None) -> float:
    """exp(mean NLL per predicted token) over non-overlapping seq_len windows; see score_text."""
    return score_text(model, tokenizer, text, seq_len=seq_len, max_tokens=max_tokens).perplexity


# --- against a reference: log-probs in, per-token / per-window / whole-set numbers out -----------


def _kl_terms(ref_lp: Tensor, lp: Tensor) -> Tensor:
    """ref_lp, lp (..., vocab) log-probs -> p_ref (log p_ref - log p) (..., vocab) float32."""
    return ref_lp.exp() * (ref_lp - lp)


def token_kl(ref_lp: Tensor, lp: Tensor) -> Tensor:
    """ref_lp, lp (B, T, vocab) -> KL(P_ref || P) at every position (B, T) float32, nats."""
    return _kl_terms(ref_lp, lp).sum(-1)


def token_nll(lp: Tensor, windows: Tensor) -> Tensor:
    """lp (B, T, vocab) log-probs of windows (B, T) -> NLL of tokens 1..T-1 (B, T-1), nats."""
    return -lp[:, :-1].gather(-1, windows[:, 1:, None])[..., 0]


def window_nll(lp: Tensor, windows: Tensor) -> Tensor:
    """lp (B, T, vocab) log-probs of windows (B, T) -> mean NLL per window (B,) float64, nats."""
    return token_nll(lp, windows).double().mean(-1)


@torch.inference_mode()
def next_token_kl(ref_model: nn.Module, model: nn.Module, windows: Tensor,
                  batch_size: int = 8) -> float:
    """Mean KL(P_ref || P_model) of next-token distributions, in nats per token.

    windows: (B, T) int64 token ids; every position of every window is scored.
    """
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        lp_ref = torch.log_softmax(logits(ref_model, batch), -1)
        lp = torch.log_softmax(logits(model, batch), -1)
        total += float(_kl_terms(lp_ref, lp).sum())  # one float32 sum per batch (B, T, vocab)
        count += batch.numel()
    return total / count


@torch.inference_mode()
def window_scores(ref_lp: Tensor, model: nn.Module, windows: Tensor, batch_size: int = 8
                  ) -> dict[str, Tensor]:
    """ref_lp (B, T, vocab): the reference's next_token_logprobs on windows (B, T). Per window
    (B,) float64: kl = mean over its T positions of KL(P_ref || P_model) (next_token_kl's terms),
    nll = mean NLL of tokens 1..T-1 (mean_nll's terms), both in nats."""
    kl, nll = [], []
    for i, b in enumerate(windows.split(batch_size)):
        lp = torch.log_softmax(logits(model, b), -1)
        ref = ref_lp[i * batch_size: i * batch_size + len(b)]
        kl.append(token_kl(ref, lp).double().mean(-1))
        nll.append(window_nll(lp, b))
    return {"kl": torch.cat(kl), "nll": torch.cat(nll)}


def metrics_from_logprobs(lp: Tensor, windows: Tensor, ref_lp: Tensor) -> dict:
    """lp, ref_lp (B, T, vocab) log-probs of windows (B, T): perplexity of the next tokens
    (positions 0..T-2 predict 1..T-1), mean KL(P_ref || P) in nats per position (every position)
    and the share of positions whose top-1 token matches the reference's (float32 means)."""
    nll = token_nll(lp, windows).mean()
    kl = token_kl(ref_lp, lp).mean()
    top1 = (lp.argmax(-1) == ref_lp.argmax(-1)).float().mean()
    return {"perplexity": math.exp(float(nll)), "kl": float(kl), "top1_agreement": float(top1)}


def lm_metrics(model: nn.Module, windows: Tensor, ref_lp: Tensor, batch_size: int = 8) -> dict:
    """metrics_from_logprobs of model's own log-probs on windows (B, T) against ref_lp."""
    return metrics_from_logprobs(next_token_logprobs(model, windows, batch_size), windows, ref_lp)


# --- per layer -----------------------------------------------------------------------------------


@torch.inference_mode()
def layer_errors(ref_model: nn.Module, model: nn.Module, inputs: Tensor) -> list[dict]:
    """Per quantized layer: weight SQNR (dB) and the relative error of the layer's output on the
    reference model's own inputs to that layer, ||W x - Q(W) Q(x)|| / ||W x||.

    inputs: (B, T) token ids (calibration text). Layers are those of `model` that are QuantLinear.
    """
    from quantlab.algorithms.calibration import capture_linear_io
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
