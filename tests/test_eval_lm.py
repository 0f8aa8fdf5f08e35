"""quantlab.eval.lm, the one language-model evaluation: its reductions equal, bit for bit, the
formulas the jobs and chapter studies used to write out themselves (kept here as references), and
its whole-set, per-window and per-token numbers agree with each other; plus the layer-name rule
(quantlab.layers) and activation capture (quantlab.algorithms.calibration)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from quantlab.algorithms.calibration import capture_linear_io, collect_inputs
from quantlab.eval import (
    lm_metrics,
    mean_nll,
    metrics_from_logprobs,
    next_token_kl,
    next_token_logprobs,
    score_text,
    token_windows,
    window_nll,
    window_scores,
)
from quantlab.layers import matches, matches_any
from quantlab.nn import quantize_model
from tests.test_nn import tiny_llama


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama()
    windows = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    return model, quantize_model(copy.deepcopy(model), "w8a16"), windows


def _reference_mean_nll(model, windows, batch_size=8):
    """compare.mean_nll as it was written before quantlab.eval held it."""
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        logits = model(input_ids=batch, use_cache=False).logits.float()
        total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                       batch[:, 1:].reshape(-1), reduction="sum"))
        count += batch[:, 1:].numel()
    return total / count


@torch.inference_mode()
def test_reductions_equal_the_formulas_they_replace_bit_for_bit(tiny):
    model, qmodel, windows = tiny
    assert mean_nll(qmodel, windows, 2) == _reference_mean_nll(qmodel, windows, 2)
    ref, lp = next_token_logprobs(model, windows, 2), next_token_logprobs(qmodel, windows, 2)
    # calibrated.reference_nll / window_scores, fp8_study.metrics_from_logprobs
    old_nll = -lp[:, :-1].gather(-1, windows[:, 1:, None])[..., 0].double().mean(-1)
    assert torch.equal(window_nll(lp, windows), old_nll)
    old_kl = (ref.exp() * (ref - lp)).sum(-1).double().mean(-1)
    s = window_scores(ref, qmodel, windows, batch_size=2)
    assert torch.equal(s["kl"], old_kl) and torch.equal(s["nll"], old_nll)
    m = metrics_from_logprobs(lp, windows, ref)
    assert m["perplexity"] == math.exp(float(-lp[:, :-1].gather(-1, windows[:, 1:, None]).mean()))
    assert m["kl"] == float((ref.exp() * (ref - lp)).sum(-1).mean())
    assert lm_metrics(qmodel, windows, ref, 2) == m


def test_whole_set_and_per_window_numbers_agree(tiny):
    model, qmodel, windows = tiny
    ref = next_token_logprobs(model, windows, batch_size=2)
    assert ref.shape == (3, 16, 128)
    s = window_scores(ref, qmodel, windows, batch_size=2)
    assert s["kl"].shape == (3,) and (s["kl"] > 0).all()
    assert float(s["kl"].mean()) == pytest.approx(next_token_kl(model, qmodel, windows), rel=1e-5)
    assert float(s["nll"].mean()) == pytest.approx(mean_nll(qmodel, windows), rel=1e-5)
    assert float(window_nll(ref, windows).mean()) == pytest.approx(mean_nll(model, windows),
                                                                   rel=1e-5)
    assert float(window_scores(ref, model, windows)["kl"].abs().max()) < 1e-6


def test_metrics_from_logprobs():
    windows = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(0))
    uniform = torch.full((2, 8, 16), -math.log(16))
    m = metrics_from_logprobs(uniform, windows, uniform)
    assert m["perplexity"] == pytest.approx(16) and m["kl"] == pytest.approx(0, abs=1e-6)
    assert m["top1_agreement"] == 1.0
    sharp = torch.log_softmax(torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
                              * 5, -1)
    m2 = metrics_from_logprobs(uniform, windows, sharp)
    assert m2["kl"] > 0.5 and m2["top1_agreement"] < 0.5


class _Chars:
    """One token per character, ids = code points mod 128."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [ord(c) % 128 for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_score_text_is_mean_nll_over_token_windows_plus_the_tail(tiny):
    model = tiny[0]
    text = "".join(chr(97 + i % 26) for i in range(64))
    windows = token_windows(_Chars(), text, 16, 64)
    assert windows.shape == (4, 16)
    score = score_text(model, _Chars(), text, seq_len=16)
    assert score.nll == mean_nll(model, windows) and score.n_predicted == 60
    assert score_text(model, _Chars(), text + "xyz", seq_len=16).n_predicted == 62


def test_capture_linear_io_sees_what_a_forward_hook_sees(tiny):
    model, _, windows = tiny
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    seen = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: seen.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]).float()))
        for n in names]
    with torch.inference_mode():
        model(input_ids=windows, use_cache=False)
    for h in hooks:
        h.remove()
    got = capture_linear_io(model, names, windows)
    assert all(torch.equal(got[n], seen[n]) and len(got[n]) == 48 for n in names)
    sub = collect_inputs(model, {n: model.get_submodule(n) for n in names}, windows, max_rows=24)
    assert torch.equal(sub[names[0]], seen[names[0]][::2])


def test_one_layer_name_rule():
    name = "model.layers.0.mlp.down_proj"
    assert matches(name, name) and matches(name, "*.down_proj") and matches(name, "down_proj")
    assert matches(name, "mlp.down_proj") and not matches(name, "proj")
    assert matches(name, r"re:.*layers\.0\.") and not matches(name, "re:layers")
    # compressed-tensors' own rule: exact names and regexes only
    assert matches(name, name, loose=False) and not matches(name, "down_proj", loose=False)
    assert matches(name, "re:.*down_proj$", loose=False)
    assert matches_any("lm_head", ("x", "lm_head")) and not matches_any("lm_head", ())
