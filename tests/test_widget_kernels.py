"""Chapter 8's roofline panel and the bench-file helpers behind chapters 7 and 8."""

import json

import pytest

from quantlab.viz.kernels import ROOFLINE_SCHEMES, bench_files, read_bench, roofline_point


def _bench(tmp_path, name, device, date, rows=(), top_level=False):
    head = {"device": device, "date": date, "bandwidth": 3000.0, "bf16_tflops": 700.0,
            "fp8_tflops": 1400.0}
    data = {**head, "rows": list(rows)} if top_level else {"header": head, "rows": list(rows)}
    (tmp_path / name).write_text(json.dumps(data))


def test_read_bench_picks_newest_or_named_gpu_and_says_which(tmp_path):
    _bench(tmp_path, "kernels-a100.json", "NVIDIA A100", "2026-01-02")
    _bench(tmp_path, "kernels-h100.json", "NVIDIA H100 80GB HBM3", "2026-03-01")
    _bench(tmp_path, "e2e-h200.json", "NVIDIA H200", "2026-02-01", top_level=True)
    (tmp_path / "kv-accuracy-x.json").write_text(json.dumps({"setup": {}, "codecs": []}))
    assert [b.path.name for b in bench_files("kernels", tmp_path)] == [
        "kernels-h100.json", "kernels-a100.json"]
    assert bench_files("kv", tmp_path) == []  # a CPU study has no device: skipped
    assert read_bench("kernels", None, bench_dir=tmp_path).device == "NVIDIA H100 80GB HBM3"
    assert read_bench("kernels", "a100", bench_dir=tmp_path).describe() == (
        "kernels-a100.json: NVIDIA A100, 2026-01-02")
    assert read_bench("e2e", bench_dir=tmp_path).date == "2026-02-01"  # header at top level
    with pytest.raises(ValueError, match="kernels-h100.json: NVIDIA H100"):
        read_bench("kernels", "B200", bench_dir=tmp_path)
    loose = read_bench("kernels", "B200", strict=False, bench_dir=tmp_path)
    assert loose.path.name == "kernels-h100.json" and "B200" in loose.describe()
    with pytest.raises(ValueError, match="pick one of"):
        bench_files("kernel", tmp_path)
    with pytest.raises(ValueError, match="run the benchmark on a GPU"):
        read_bench("kv", bench_dir=tmp_path)


def test_roofline_point_floors_ridge_and_measured_row():
    bench = {"header": {"device": "GPU", "date": "d", "bandwidth": 1000.0, "bf16_tflops": 100.0,
                        "fp8_tflops": 200.0},
             "rows": [{"kernel": "cublas_bf16", "M": 1, "N": 4096, "K": 4096, "ms": 0.05}]}
    p = roofline_point(bench, "bf16", 1, 4096, 4096)
    nbytes = 2 * 4096 * 4096 + 2 * 4096 + 2 * 4096
    assert p["memory_ms"] == pytest.approx(nbytes / 1e12 * 1e3)
    assert p["intensity"] == pytest.approx(2 * 4096 * 4096 / nbytes)
    assert p["bound"] == "memory" and p["measured"]["ms"] == 0.05
    ridge = p["ridge_M"]  # the floors cross there, and the bound flips
    at = roofline_point(bench, "bf16", round(ridge), 4096, 4096)
    assert at["memory_ms"] == pytest.approx(at["compute_ms"], rel=0.01)
    assert roofline_point(bench, "bf16", 4 * round(ridge), 4096, 4096)["bound"] == "compute"
    w4 = "w4a16 (int4, fp16 scale per 128)"
    assert roofline_point(bench, w4, 1, 4096, 4096)["ridge_M"] < ridge / 3  # 4x fewer bytes
    assert roofline_point(bench, w4, 1, 4096, 4096)["measured"] is None
    with pytest.raises(ValueError, match="pick one of"):
        roofline_point(bench, "int3", 1, 64, 64)
    assert set(ROOFLINE_SCHEMES) >= {"bf16", w4}


def test_roofline_panel_redraws():
    from quantlab.widgets import roofline_panel

    bench = read_bench("kernels").data
    panel = roofline_panel(bench)
    (shape, scheme), (n, k, m) = panel.children[0].children, panel.children[1].children
    text, out = panel.children[2], panel.children[3]
    shape.value = "8b gate_up"
    assert (n.value, k.value) == (28672, 4096)
    scheme.value, m.value = "bf16", 1
    before, fig_before = text.value, out.outputs[0]["data"]["application/vnd.plotly.v1+json"]
    assert "memory-bound" in before and "measured (cublas_bf16)" in before
    m.value = 4096
    assert "compute-bound" in text.value and text.value != before
    assert out.outputs[0]["data"]["application/vnd.plotly.v1+json"] != fig_before
    n.value = 1000  # a shape the file does not have
    assert "not measured" in text.value


def test_kernel_summary_ratios():
    from quantlab.viz.kernels import kernel_summary

    def row(kernel, M, ms, **kw):
        return {"kernel": kernel, "M": M, "ms": ms, "model": "8b", "layer": "o", **kw}

    rows = [row("ours_w4a16", 1, 1.0, floor_frac=0.5), row("cublas_bf16", 1, 2.0),
            row("aten_int4pack", 1, 0.8), row("ours_w4a16", 4096, 3.0, floor_frac=0.9),
            row("cublas_bf16", 4096, 2.4), row("aten_int4pack", 4096, 60.0),
            row("ours_fp8_row", 256, 1.0), row("scaled_mm_row", 256, 0.9)]
    s = kernel_summary({"rows": rows})
    assert s["vs_cublas_m1"] == (2.0, 2.0) and s["vs_int4pack_m4"] == pytest.approx((0.8, 0.8))
    assert s["vs_cublas_m4096"] == pytest.approx((0.8, 0.8))
    assert s["vs_int4pack_m4096"] == (20.0, 20.0)
    assert s["w4_floor_frac"] == 0.5  # M <= 16 only
    assert s["fp8"]["row"] == [pytest.approx(0.9)] and s["fp8"]["block"] == []
    assert s["gemlite"] is None
    assert s["vs_cublas_mid"] is None  # no M in 64..1024


def _w4a16_bench(with_marlin):
    """8b gate_up at M = 1 and 256: ours, cuBLAS, tinygemm, gemlite and (optionally) Marlin."""
    ms = {"ours_w4a16": (0.046, 0.206), "cublas_bf16": (0.069, 0.100),
          "aten_int4pack": (0.038, 2.08), "gemlite_w4a16": (0.043, 0.314),
          "marlin_w4a16": (0.036, 0.182)}
    rows = [{"kernel": k, "M": M, "N": 28672, "K": 4096, "model": "8b", "layer": "gate_up",
             "ms": t, "floor_ms": 0.0143, "compute_ms": 2e-4 * M,
             "floor_frac": round(max(0.0143, 2e-4 * M) / t, 4), "rel_err": 0.003}
            for k, ts in ms.items() if with_marlin or k != "marlin_w4a16"
            for M, t in zip((1, 256), ts, strict=True)]
    return {"header": {"device": "GPU", "date": "d", "bandwidth": 4000.0, "bf16_tflops": 700.0,
                       "fp8_tflops": 1300.0}, "rows": rows}


@pytest.mark.parametrize("with_marlin", [True, False])
def test_w4a16_figure_and_panel_show_marlin_only_when_measured(with_marlin):
    from quantlab.viz.kernels import (
        W4A16_KERNELS,
        kernel_shapes_figure,
        kernel_summary,
        layer_roofline_figure,
    )
    from quantlab.widgets import roofline_panel
    from quantlab.widgets.kernels import roofline_text

    marlin = W4A16_KERNELS["marlin_w4a16"]
    assert marlin == "Marlin (vLLM gptq_marlin, built from source)"
    bench, w4 = _w4a16_bench(with_marlin), "w4a16 (int4, fp16 scale per 128)"
    names = [t.name for t in kernel_shapes_figure(bench, W4A16_KERNELS, floor_of="ours_w4a16",
                                                  what="W4A16 time").data]
    peers = ["ours (W4A16)", "cuBLAS bf16", "tinygemm (aten._weight_int4pack_mm)", "gemlite"]
    assert names == peers + [marlin] * with_marlin + ["floor"]
    roof = [t.name for t in layer_roofline_figure(bench, w4, 28672, 4096, 1).data]
    assert ("measured: " + marlin in roof) is with_marlin
    assert "measured: gemlite" in roof and "measured: cuBLAS bf16" in roof
    text = roofline_text(bench, w4, 1, 28672, 4096)
    assert "measured (ours_w4a16)" in text and "gemlite: 0.0430 ms, 1.07x our speed" in text
    assert ("Marlin" in text) is with_marlin
    fig = roofline_panel(bench).children[3].outputs[0]["data"]["application/vnd.plotly.v1+json"]
    assert ("Marlin" in str(fig)) is with_marlin
    assert "Marlin" not in roofline_text(bench, "bf16", 1, 28672, 4096)  # not bf16's peer
    s = kernel_summary(bench)["marlin"]
    if not with_marlin:
        assert s is None
        return
    assert s["vs_cublas"] == pytest.approx({1: 0.069 / 0.036, 256: 0.100 / 0.182})
    assert s["ours_vs_cublas"] == pytest.approx({1: 0.069 / 0.046, 256: 0.100 / 0.206})
    assert s["floor_frac"] == pytest.approx(0.0143 / 0.036, abs=1e-4)
    assert s["ours_floor_frac"] == pytest.approx(0.0143 / 0.046, abs=1e-4)
