"""The compare job on a small random Llama with a byte tokenizer, and its report."""

import math

import pytest
import torch

from quantlab.algorithms.calibration import static_act_scales
from quantlab.compare import compare
from quantlab.eval import token_windows
from quantlab.schemes import get_scheme
from quantlab.viz import html_report, layer_sqnr_heatmap, perplexity_vs_bits
from tests.test_nn import tiny_llama


class ByteTokenizer:
    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [b % 128 for b in text.encode()]}


TEXT = "def f(x):\n    return x * 2\n" * 200


def test_compare_rows_order_by_bits_and_write_a_report(tmp_path):
    model = tiny_llama()
    base, rows = compare(model, ByteTokenizer(), TEXT, TEXT, ["w8a16", "w4a16", "fp8_per_tensor"],
                         seq_len=64, eval_tokens=512, calib_tokens=128, kl_tokens=128, log=None)
    by = {r.scheme: r for r in rows}
    assert math.isfinite(base["perplexity"]) and base["eval_tokens"] == 512
    assert by["w8a16"].kl < by["w4a16"].kl  # 8 bits disturb the model less than 4
    assert abs(by["w8a16"].delta_ppl) < abs(by["w4a16"].delta_ppl) + 1e-6
    assert by["w4a16"].bits_per_weight == pytest.approx(4.125)
    assert by["w4a16"].size_mib < by["w8a16"].size_mib < base["size_mib"]
    assert len(by["w4a16"].layers) == 14  # 2 layers x 7 linears, lm_head ignored
    out = tmp_path / "r.html"
    html_report(str(out), "t", "table", [perplexity_vs_bits(base, rows), layer_sqnr_heatmap(rows)])
    page = out.read_text()
    assert page.count("Plotly.newPlot") == 2 and "w4a16" in page


def test_static_scales_come_from_calibration():
    model = tiny_llama()
    calib = torch.randint(0, 128, (2, 32))
    scales = static_act_scales(model, get_scheme("fp8_per_tensor"), calib)
    assert len(scales) == 14 and all(float(s) > 0 for s in scales.values())
    assert static_act_scales(model, get_scheme("fp8_dynamic"), calib) == {}


def test_compare_errors():
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(ByteTokenizer(), "short", 64, 512)
    with pytest.raises(ValueError, match="unknown algorithm"):
        compare(tiny_llama(), ByteTokenizer(), TEXT, TEXT, ["w4a16"], ["magic"])


def test_compare_runs_calibrated_algorithms():
    base, rows = compare(tiny_llama(), ByteTokenizer(), TEXT, TEXT, ["w4a16"],
                         ["rtn", "gptq", "awq"], seq_len=64, eval_tokens=256, calib_tokens=512,
                         kl_tokens=128, log=None)
    by = {r.algorithm: r for r in rows}
    assert set(by) == {"rtn", "gptq", "awq"}
    assert by["gptq"].layers and not by["awq"].layers  # AWQ rescales float weights: no layer view
    assert by["awq"].worst_layer.startswith("n/a")
    assert all(math.isfinite(r.perplexity) and r.kl > 0 for r in rows)
    heat = layer_sqnr_heatmap(rows)
    assert len(heat.data[0].x) == 2  # rtn and gptq columns only
