"""quantlab.studies.calibrated (chapter 4's measurements): the Hessian form of the output error
equals the error measured on the inputs, the GPTQ replay reproduces GPTQ's own column loop, the AWQ
curve is the one search_scales minimizes, and the model scores match quantlab.eval's."""

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantlab import fake_quantize, viz
from quantlab.algorithms import gptq_quantize, search_scales
from quantlab.algorithms.calibration import capture_linear_io
from quantlab.eval import next_token_logprobs, sqnr_db, window_nll, window_scores
from quantlab.nn import quantize_model
from quantlab.schemes import TensorScheme
from quantlab.studies import calibrated as C

INT4_CHANNEL = TensorScheme("int4", "channel")
INT4_G16 = TensorScheme("int4", "group", group_size=16)


def layer(N=24, K=48, n=400, seed=0, outliers=(3, 17)):
    """A weight (N, K) and correlated inputs (n, K) with a few large channels."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.05
    x = torch.randn(n, K, generator=g) @ (torch.eye(K) + 0.3 * torch.randn(K, K, generator=g))
    x[:, list(outliers)] *= 6
    return W, x


def test_hessian_form_equals_the_error_on_the_inputs():
    W, x = layer()
    Wq = fake_quantize(W, INT4_CHANNEL)
    H = C.hessian(x.reshape(4, 100, -1))  # (B, T, K) inputs are flattened
    assert torch.allclose(H, 2 * x.T @ x / len(x), rtol=1e-5, atol=1e-5)
    direct = float(((x @ (W - Wq).T) ** 2).sum() / ((x @ W.T) ** 2).sum())
    assert C.output_error(W, Wq, H) == pytest.approx(direct, rel=1e-4)
    assert C.output_sqnr_db(W, Wq, H) == pytest.approx(sqnr_db(x @ W.T, x @ Wq.T), abs=1e-3)
    assert C.output_error(W, W, H) == 0


def test_error_shares_follow_the_activations():
    W, x = layer()
    H = C.hessian(x)
    s = C.error_shares(W, fake_quantize(W, INT4_CHANNEL), H)
    assert s["weight_share"].sum() == pytest.approx(1)
    assert s["output_share"].sum() == pytest.approx(1)
    assert torch.allclose(s["act_rms"], x.pow(2).mean(0).sqrt().double(), rtol=1e-4)
    weight_top, output_top = C.top_share(s, frac=2 / 48)  # the two outlier channels
    assert weight_top < 0.15 and output_top > 0.5
    assert set(s["act_rms"].argsort(descending=True)[:2].tolist()) == {3, 17}
    # with uncorrelated inputs the cross terms vanish: the diagonal is the whole error
    diag = C.error_shares(W, fake_quantize(W, INT4_CHANNEL), torch.diag(torch.diag(H)))
    assert float(diag["diagonal_fraction"]) == pytest.approx(1, abs=1e-9)


def naive_gptq(W, H, percdamp):
    """GPTQ's column loop as in the paper, one column at a time, per-channel INT4 scales from
    the original rows (what gptq_quantize fits for a per-channel scheme): returns Q and the
    weight after every column."""
    K = W.shape[1]
    W, H = W.double(), H.double()
    H = H + percdamp * torch.diag(H).mean() * torch.eye(K, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    s = (W.abs().amax(1) / 7).float().double()
    V, states = W.clone(), [W.clone()]
    for j in range(K):
        q = torch.clamp(torch.round(V[:, j] / s), -8, 7) * s
        err = (V[:, j] - q) / U[j, j]
        V[:, j:] -= err[:, None] * U[j, j:][None, :]
        V[:, j] = q
        states.append(V.clone())
    return V, states


def test_gptq_trace_replays_gptqs_column_loop():
    W, x = layer()
    H = C.hessian(x)
    Q, states = naive_gptq(W, H, percdamp=0.1)
    lib = gptq_quantize(W, H, INT4_CHANNEL, percdamp=0.1).dequantize()
    assert (lib != Q.float()).float().mean() < 0.01  # the library agrees up to rounding ties
    trace = C.gptq_error_trace(W, Q.float(), H, percdamp=0.1, step=1)
    want = [C.output_error(W, V.float(), H) for V in states]
    assert torch.allclose(trace, torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-9)
    assert trace[0] == 0 and trace[-1] == pytest.approx(C.output_error(W, Q.float(), H))
    rtn = C.rtn_error_trace(W, fake_quantize(W, INT4_CHANNEL), H, step=1)
    assert trace[-1] < 0.8 * rtn[-1]  # compensation beats independent rounding


def test_gptq_trace_only_grows_on_the_loss_it_minimizes():
    W, x = layer(seed=1)
    H = C.hessian(x)  # percdamp 0: the measured loss is the one GPTQ's steps add to
    Q = gptq_quantize(W, H, INT4_G16, percdamp=0.0).dequantize()
    trace = C.gptq_error_trace(W, Q, H, percdamp=0.0, step=1)
    assert (trace.diff() >= -1e-9).all()


def test_error_traces_and_rtn_trace():
    W, x = layer(K=64)
    H = C.hessian(x)
    R = fake_quantize(W, INT4_G16)
    Q = gptq_quantize(W, H, INT4_G16, percdamp=0.1).dequantize()
    Qa = gptq_quantize(W, H, INT4_G16, percdamp=0.1, act_order=True).dequantize()
    t = C.error_traces(W, H, R, Q, Qa)
    assert t["columns"] == C.trace_columns(64, 2) == list(range(0, 65, 2))
    assert all(len(t[k]) == 33 for k in ("RTN", "GPTQ", "GPTQ act_order"))
    for key, Wq in (("RTN", R), ("GPTQ", Q), ("GPTQ act_order", Qa)):
        assert t[key][0] == 0 and t[key][-1] == pytest.approx(C.output_error(W, Wq, H), rel=1e-6)
    # with a diagonal H, RTN's trace adds up each column's own error
    Hd = torch.diag(torch.diag(H))
    per_col = ((W - R) ** 2 * torch.diag(Hd)).sum(0).double() / C._energy(W, Hd)
    assert torch.allclose(C.rtn_error_trace(W, R, Hd, step=1)[1:], per_col.cumsum(0), rtol=1e-4)


def test_sqnr_and_gain_rows():
    W, x = layer()
    H = C.hessian(x)
    R = fake_quantize(W, INT4_CHANNEL)
    Q = gptq_quantize(W, H, INT4_CHANNEL, percdamp=0.1).dequantize()
    rows = C.sqnr_rows(W, {"RTN": R, "GPTQ": Q}, {"cal": H})
    assert [r["version"] for r in rows] == ["RTN", "GPTQ"]
    assert rows[0]["weight SQNR dB"] == pytest.approx(sqnr_db(W, R))
    gains = C.gain_rows({"a": W}, {"a": R}, {"a": Q}, {"cal": {"a": H}, "same": {"a": H}})
    assert gains[0]["cal"] == pytest.approx(rows[1]["output SQNR dB, cal"]
                                            - rows[0]["output SQNR dB, cal"], abs=1e-3)
    assert gains[0]["cal"] > 1
    assert C.gain_rows({"a": W}, {"a": R}, {"a": R}, {"cal": {"a": H}})[0]["cal"] == 0


def test_damping_sweep_turns_gptq_into_rtn():
    W, x = layer(n=800)
    rows = C.damping_sweep(W, x, C.hessian(x), INT4_CHANNEL, tokens=(200, 800),
                           percdamps=(0.01, 1e4))
    assert [(r["tokens"], r["percdamp"]) for r in rows] == [(200, 0.01), (200, 1e4),
                                                            (800, 0.01), (800, 1e4)]
    strong = [r for r in rows if r["percdamp"] == 1e4]
    assert all(abs(r["calibration gain dB"]) < 0.05 for r in strong)  # GPTQ -> RTN
    assert rows[0]["calibration gain dB"] > rows[0]["held-out gain dB"]  # fits its own tokens
    assert rows[2]["held-out gain dB"] == pytest.approx(rows[2]["calibration gain dB"])


def test_awq_curve_is_the_one_search_scales_minimizes():
    W, x = layer()
    W2 = W.flip(0) * 1.5
    s, alpha, errors = search_scales(x, [W, W2], INT4_G16, n_grid=10)
    H = C.hessian(x)
    curve = C.awq_alpha_curve([W, W2], x.abs().mean(0), {"cal": H}, INT4_G16, n_grid=10)
    assert torch.equal(curve["alpha"], torch.arange(10, dtype=torch.float64) / 10)
    total = C._energy(torch.cat([W, W2]), H) / 2 / (2 * W.shape[0])  # -> search_scales's MSE
    assert torch.allclose(curve["cal"] * total, torch.tensor(errors, dtype=torch.float64),
                          rtol=1e-3)
    assert float(curve["alpha"][curve["cal"].argmin()]) == alpha > 0
    assert torch.allclose(C.awq_scales(x.abs().mean(0), alpha), s)
    assert curve["cal"][0] == pytest.approx(C.output_error(torch.cat([W, W2]), fake_quantize(
        torch.cat([W, W2]), INT4_G16), H))  # alpha = 0 is RTN


def test_keeping_salient_channels():
    W, x = layer()
    H = C.hessian(x)
    assert C.keep_channels_error(W, H, INT4_CHANNEL, torch.arange(W.shape[1])) == 0
    rows = C.salient_rows({"l": (W, x.abs().mean(0), H)}, INT4_CHANNEL, frac=2 / 48)
    r = rows[0]
    assert r["channels kept"] == 2 and r["by activation / RTN"] < r["random / RTN"] <= 1
    assert rows == C.salient_rows({"l": (W, x.abs().mean(0), H)}, INT4_CHANNEL, frac=2 / 48)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    windows = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(1))
    return model, windows


def test_summary_rows_pair_windows(tiny):
    model, windows = tiny
    qmodel = quantize_model(copy.deepcopy(model), "w8a16")
    ref = next_token_logprobs(model, windows, batch_size=2)
    s = window_scores(ref, qmodel, windows, batch_size=2)
    base = window_nll(ref, windows)
    same = window_scores(ref, model, windows)
    rows = C.summary_rows({("s", "RTN"): same, ("s", "Q"): s}, base)
    assert rows[0]["KL - RTN"] == 0 and rows[0]["perplexity increase"] == pytest.approx(0, abs=1e-4)
    assert rows[1]["perplexity"] == pytest.approx(math.exp(float(s["nll"].mean())))
    assert rows[1]["KL - RTN SE"] == pytest.approx(float((s["kl"] - same["kl"]).std()) / 3 ** 0.5)


def test_alpha_curves_walk_every_group(tiny):
    model, windows = tiny
    names = C.input_names(2)
    assert len(names) == 8 and names[3] == "model.layers.0.mlp.down_proj"
    X = capture_linear_io(model, names, windows)
    H = {n: C.hessian(X[n]) for n in names}
    xm = {n: X[n].abs().mean(0) for n in names}
    curves = C.alpha_curves(model, xm, {"cal": H}, {"ch": INT4_CHANNEL}, n_grid=4)
    assert list(curves) == ["layers.0 qkv", "layers.0 gate_up", "layers.0 down",
                            "layers.1 qkv", "layers.1 gate_up", "layers.1 down"]
    assert curves["layers.1 down"]["ch"]["cal"].shape == (4,)


def test_figures_have_one_dropdown_button_per_layer():
    W, x = layer()
    H = C.hessian(x)
    R = fake_quantize(W, INT4_G16)
    Q = gptq_quantize(W, H, INT4_G16, percdamp=0.1).dequantize()
    shares = {f"l{i}": C.error_shares(W, R, H) for i in range(3)}
    V = viz.calibrated
    figs = {
        3: V.blind_spot_figure(shares),
        2: V.trace_figure({f"l{i}": C.error_traces(W, H, R, Q) for i in range(2)}),
        1: V.damping_figure({"l": C.damping_sweep(W, x, H, INT4_G16, (200, 400), (0.1,))}),
        4: V.alpha_figure({f"g{i}": {"w": C.awq_alpha_curve([W], x.abs().mean(0),
                                                            {"calibration": H, "held out": H},
                                                            INT4_G16, 5)} for i in range(4)}),
    }
    for n, fig in figs.items():
        buttons = fig.layout.updatemenus[0].buttons
        assert len(buttons) == n
        shown = [sum(b.args[0]["visible"]) for b in buttons]
        assert len(set(shown)) == 1 and shown[0] == len(fig.data) // n  # same traces per button
        assert sum(bool(t.visible) for t in fig.data) == shown[0]  # first button's shown
    rows = [{"scheme": s, "algorithm": a, "KL": 0.01, "perplexity increase": 0.1}
            for s in ("a", "b") for a in ("RTN", "GPTQ")]
    fig = V.model_figure(rows)
    assert len(fig.layout.updatemenus[0].buttons) == 2 and len(fig.data) == 4
    assert len(V.gain_figure(C.gain_rows({"a": W}, {"a": R}, {"a": Q}, {"x": {"a": H}})).data) == 1
