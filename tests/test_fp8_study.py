"""quantlab.studies.fp8: the FP8 GEMM path against the fake-quantized reference, the static-scale
and format measurements on inputs with known answers, and the figure builders."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantlab import get_scheme, viz
from quantlab.eval import lm_metrics, next_token_logprobs, sqnr_db
from quantlab.nn import QuantLinear
from quantlab.quantize import fake_quantize
from quantlab.studies import fp8 as fs


def randn(*shape, seed=0, std=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


# Awkward shapes: N = 160 leaves a partial 128-row weight block, rows of very different size.
M, N, K = 20, 160, 384


def operands(seed=0):
    x = randn(M, K, seed=seed) * torch.logspace(-3, 1, M)[:, None]  # tokens 10^4 apart
    w = randn(N, K, seed=seed + 1, std=0.05)
    return x, w


@pytest.mark.parametrize("name", ["fp8_per_tensor", "fp8_dynamic", "fp8_block"])
def test_fp8_linear_matches_fake_quant_reference(name):
    x, w = operands()
    scale = x.abs().amax() / 448 * 2  # a static scale with headroom
    out = fs.fp8_linear(x, w, name, scale)
    ref = fs.fake_quant_linear(x, w, name, scale)
    assert out.shape == (M, N) and out.dtype == torch.float32
    assert fs.relative_error(ref, out) < 1e-6
    assert 0.01 < fs.relative_error(x @ w.T, out) < 0.1  # E4M3 rounding, not exact


def test_fp8_linear_static_scale_is_used_and_saturates():
    x, w = operands(3)
    small = x.abs().amax() / 448 / 8  # everything above amax / 8 saturates
    y = fs.fp8_linear(x, w, "fp8_per_tensor", small)
    assert torch.allclose(y, fs.fake_quant_linear(x, w, "fp8_per_tensor", small), rtol=1e-6,
                          atol=1e-6)
    assert fs.relative_error(x @ w.T, y) > 0.3


def test_fp8_linear_matches_quantlinear():
    x, w = operands(5)
    lin = torch.nn.Linear(K, N, bias=False)
    lin.weight.data = w.clone()
    for name in ("fp8_dynamic", "fp8_block"):
        assert fs.relative_error(QuantLinear.from_linear(lin, name)(x), fs.fp8_linear(x, w, name)
                                 ) < 1e-6


def test_fp8_linear_rejects_bad_input():
    x, w = operands()
    with pytest.raises(ValueError, match="not an FP8 W8A8"):
        fs.fp8_linear(x, w, "w4a16")
    with pytest.raises(ValueError, match="not an FP8 W8A8"):
        fs.fp8_linear(x, w, "int8_w8a8")
    with pytest.raises(ValueError, match="group_size"):
        fs.fp8_linear(x[:, :320], w[:, :320], "fp8_block")  # K = 320 is no multiple of 128


def test_scaled_mm_calls():
    assert fs.scaled_mm_calls("fp8_block", 768) == 6
    assert fs.scaled_mm_calls("fp8_dynamic", 768) == fs.scaled_mm_calls("fp8_per_tensor", 768) == 1


def test_preset_rows_count_scales_and_bits():
    x, w = operands()
    rows = {r["preset"]: r for r in fs.preset_rows(w, x, ("fp8_per_tensor", "fp8_dynamic",
                                                          "fp8_block"), torch.tensor(0.1))}
    assert rows["fp8_per_tensor"]["weight scales"] == rows["fp8_per_tensor"]["activation scales"]
    assert rows["fp8_per_tensor"]["weight scales"] == 1
    dyn = rows["fp8_dynamic"]
    assert (dyn["weight scales"], dyn["activation scales"]) == (N, M)
    assert rows["fp8_block"]["weight scales"] == 2 * 3 and rows["fp8_block"][
        "activation scales"] == M * 3
    assert rows["fp8_dynamic"]["bits/weight"] == 8 + 32 / K


def test_static_sweep_equals_dynamic_at_amax_and_saturates_below():
    x = randn(64, 256, seed=2)
    s = x.abs().amax() / 448
    at1, half, big = fs.static_sweep(x, s, [1.0, 0.5, 2.0**20])
    assert at1 == pytest.approx(fs.dynamic_sqnr(x, "tensor"), abs=1e-9)
    assert half < at1 - 3  # the top octave of values clips at 448
    assert big < 10  # 2^20 too large: most values underflow
    assert fs.dynamic_sqnr(x, "token") >= at1 - 0.2
    assert fs.dynamic_sqnr(x, "token", "int8") > fs.dynamic_sqnr(x, "tensor", "int8")
    e5 = fs.static_sweep(x, x.abs().amax() / 57344, [1.0, 2.0**12], "e5m2")
    assert abs(e5[0] - e5[1]) < 0.5  # E5M2: 12 octaves of headroom are free


def test_flat_range_takes_the_contiguous_run_around_the_best():
    m = [0.25, 0.5, 1, 2, 4, 8, 16]
    assert fs.flat_range(m, [1, 5, 30, 30.5, 29.8, 20, 30.4]) == (1, 4)
    assert fs.flat_range(m, [30] * 7) == (0.25, 16)
    assert fs.flat_range(m, [1, 2, 3, 4, 5, 6, 7], tol_db=1.5) == (8, 16)


def test_code_regions_puts_values_in_the_right_window():
    x = torch.tensor([[1000.0, 1.0, 2.0**-8, 2.0**-12, 0.0]])  # E4M3 with scale 1
    reg = fs.code_regions(x, 1.0)
    assert reg == {"saturated": 25.0, "normal": 25.0, "subnormal": 25.0, "zero": 25.0}
    assert fs.code_regions(x, 1.0, "e5m2") == {"saturated": 0.0, "normal": 100.0,
                                                "subnormal": 0.0, "zero": 0.0}
    shifted = fs.code_regions(x, 2.0**-8)  # 1 / 2^-8 = 256 still fits, 1000 / 2^-8 does not
    assert (shifted["saturated"], shifted["normal"]) == (25.0, 75.0)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_code_regions_agree_with_the_format_rounding(fmt):
    from quantlab.formats import get_format

    f = get_format(fmt)
    mags = 2.0 ** (torch.rand(4000, generator=torch.Generator().manual_seed(1)) * 40 - 24)
    x = (mags * torch.where(torch.arange(4000) % 2 == 0, 1.0, -1.0))[None]
    q = f.round(x, overflow="saturate")
    reg = fs.code_regions(x, 1.0, fmt)
    assert reg["zero"] == pytest.approx(100 * float((q == 0).float().mean()))
    assert reg["saturated"] == pytest.approx(100 * float((x.abs() > f.max).float().mean()))
    assert reg["subnormal"] == pytest.approx(
        100 * float(((q != 0) & (q.abs() < f.min_normal)).float().mean()))


def test_calibration_rows():
    x = torch.ones(4, 8)
    x[1, 3] = 5.0  # one token past a calibrated amax of 4
    row = fs.calibration_rows({"a": x}, {"a": torch.tensor(4.0 / 448)})[0]
    assert row["calibrated amax"] == pytest.approx(4.0)
    assert row["held-out amax"] == 5.0 and row["held-out / calibrated"] == pytest.approx(1.25)
    assert row["tokens past it %"] == 25.0
    assert row["median token amax / calibrated"] == pytest.approx(0.25)


def test_max_energy_share():
    x = torch.tensor([[3.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]])
    total = 9 + 3 + 16
    assert fs.max_energy_share(x) == pytest.approx(9 / total)
    assert fs.max_energy_share(x, 4) == pytest.approx((9 + 4) / total)
    assert fs.max_energy_share(x, 1) == pytest.approx(1.0)


def test_range_row_e4m3_flushes_what_e5m2_keeps():
    t = torch.cat([torch.ones(10), torch.full((90,), 2.0**-25)])[None]
    r4, r5 = fs.range_row(t, "e4m3"), fs.range_row(t, "e5m2")
    assert r4["flushed to zero %"] == 90.0 and r5["flushed to zero %"] == 0.0
    assert r4["spread (octaves)"] == pytest.approx(25.0)
    g = randn(32, 64, seed=4)  # a narrow tensor: E4M3's extra mantissa bit wins ~6 dB
    assert 5 < fs.range_row(g, "e4m3")["sqnr_db"] - fs.range_row(g, "e5m2")["sqnr_db"] < 7


def test_format_rows():
    rows = {r["format"]: r for r in fs.format_rows()}
    assert rows["e4m3"]["max"] == 448 and rows["e5m2"]["min subnormal"] == 2.0**-16
    assert rows["e4m3"]["normal octaves"] == pytest.approx(math.log2(448 * 64))
    assert rows["e5m2"]["relative step"] == 0.25


def test_output_grads_and_lm_metrics_on_a_tiny_llama():
    model = tiny_llama()
    windows = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    g = fs.output_grads(model, windows, ["lm_head", "model.layers.0.mlp.down_proj"])
    assert g["lm_head"].shape == (32, 128) and g["model.layers.0.mlp.down_proj"].shape == (32, 128)
    rows = g["lm_head"].view(2, 16, 128)
    assert torch.all(rows[:, -1] == 0)  # the last position predicts nothing
    assert rows.sum(-1).abs().max() < 1e-6  # (softmax - onehot) / n sums to 0
    assert all(p.grad is None for p in model.parameters())  # left clean
    ref = next_token_logprobs(model, windows)
    base = lm_metrics(model, windows, ref)
    assert base["kl"] == pytest.approx(0, abs=1e-6) and base["top1_agreement"] == 1.0
    q = fs.quantized_copy(model, "fp8_dynamic")
    assert isinstance(q.model.layers[0].mlp.down_proj, QuantLinear)
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)  # original kept
    assert 0 < lm_metrics(q, windows, ref)["kl"] < 0.01


def test_quantized_copy_multiplies_static_scales():
    model = tiny_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and n != "lm_head"]
    scales = {n: torch.tensor(0.01) for n in names}
    q = fs.quantized_copy(model, "fp8_per_tensor", scales, multiplier=4.0)
    assert float(q.get_submodule(names[0]).input_scale) == pytest.approx(0.04)


def test_layer_sqnr_rows_and_summary():
    x = randn(64, 256, seed=1)
    weights = {"model.layers.0.mlp.up_proj": randn(128, 256, seed=2, std=0.05),
               "model.layers.0.mlp.down_proj": randn(128, 256, seed=3, std=0.05)}
    acts = {n: x for n in weights}  # shared input, as q/k/v share one
    schemes = {"static": get_scheme("fp8_per_tensor"), "block": get_scheme("fp8_block")}
    static = {n: x.abs().amax() / 448 for n in weights}
    rows = fs.layer_sqnr_rows(weights, acts, schemes, static)
    assert len(rows) == 4 and all(25 < r["output_sqnr_db"] < 40 for r in rows)
    r0 = rows[0]
    w = weights[r0["layer"]]
    assert r0["weight_sqnr_db"] == sqnr_db(w, fake_quantize(w, "fp8_per_tensor"))
    assert r0["output_sqnr_db"] == pytest.approx(sqnr_db(
        x @ w.T, fs.fake_quant_linear(x, w, "fp8_per_tensor", static[r0["layer"]])), abs=1e-3)
    summary = {r["scheme"]: r for r in fs.scheme_summary(rows)}
    assert summary["static"]["down_proj mean dB"] == rows[1]["output_sqnr_db"]
    assert summary["block"]["worst dB"] == min(r["output_sqnr_db"] for r in rows[2:])


def test_weight_grad_sqnr():
    g, h = randn(64, 32, seed=1), randn(64, 16, seed=2)
    assert fs.weight_grad_sqnr(g, h, "e4m3") > fs.weight_grad_sqnr(g, h, "e5m2") > 20


def test_layer_inputs():
    inputs = fs.layer_inputs(2)
    assert len(inputs) == 8 and inputs["layer 1 MLP in"] == "model.layers.1.mlp.gate_proj"


def _buttons(fig):
    return sum(len(m.buttons) for m in fig.layout.updatemenus or ()) + sum(
        len(s.steps) for s in fig.layout.sliders or ())


def test_figures_build_with_their_controls():
    x = randn(64, 256, seed=1)
    amax = {"a": x.abs().amax(-1), "b": 2 * x.abs().amax(-1)}
    fig = viz.fp8.token_amax_figure(amax, {"a": 3.0, "b": 4.0})
    assert len(fig.data) == 6 and _buttons(fig) == 2
    fig = viz.fp8.static_scale_slider(x, float(x.abs().amax() / 448), [-2, 0, 3])
    assert _buttons(fig) == 3 and fig.layout.sliders[0].active == 1
    assert [t.visible for t in fig.data] == [False, True, False]
    fig = viz.fp8.sweep_figure([0.5, 1, 2], {"a": [1, 2, 3]}, {"a dyn": 2.5})
    assert len(fig.data) == 2
    rows = [{"layer": f"model.layers.{i}.mlp.{p}", "scheme": s, "output_sqnr_db": 30.0 + i}
            for i in range(2) for p in ("up_proj", "down_proj") for s in ("A", "B")]
    fig = viz.fp8.layer_sqnr_figure(rows)
    assert _buttons(fig) == 2 and len(fig.data) == 4
    fig = viz.fp8.format_window_figure({"x": x, "y": x**3})
    assert _buttons(fig) == 2 and len(fig.data) == 2 + 4
    mrows = [{"config": c, "perplexity": 10 + d, "kl": d, "top1_agreement": 1 - d}
             for c, d in (("a", 0.01), ("b", 2.0))]
    fig = viz.fp8.model_metrics_figure(mrows, 10.0)
    assert _buttons(fig) == 3 and fig.layout.yaxis.type == "log"


def test_fp8_kernel_figure_styles_ours_and_peer():
    rows = [{"kernel": f"{k}_{g}", "M": m, "N": 256, "K": 512, "model": "x", "layer": "qkv",
             "ms": 0.01 * m, "floor_ms": 0.001, "compute_ms": 0.001}
            for k in ("ours_fp8", "scaled_mm") for g in ("tensor", "row", "block") for m in (1, 16)]
    bench = {"header": {"device": "GPU", "date": "today"}, "rows": rows}
    fig = viz.fp8.fp8_kernel_figure(bench)
    assert len(fig.data) == 6
    dashed = {t.name for t in fig.data if t.line.dash == "dash"}
    assert dashed == {"_scaled_mm, per tensor", "_scaled_mm, per row", "_scaled_mm, 128-block"}
    assert fig.data[0].line.color == fig.data[3].line.color  # same granularity, same color


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "e2m1"])
def test_fast_static_fake_quant_equals_the_reference(fmt):
    from quantlab import TensorScheme, dequantize, quantize

    x = randn(64, 96, seed=7) * torch.logspace(-6, 3, 96)  # saturation, subnormals, zeros
    x[0, :5] = 0.0
    for scale in (float(x.abs().max()) / 448 / 16, 0.37, 1e-3):
        ref = dequantize(quantize(x, TensorScheme(fmt, "tensor", dynamic=False),
                                  scale=torch.tensor(scale)))
        assert torch.equal(fs._fake_quant_static(x, scale, fmt), ref)
