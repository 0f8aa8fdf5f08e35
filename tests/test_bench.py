"""The benchmark's bookkeeping (the timing itself needs a GPU): runs merge into one file, a rerun
replaces the rows it repeats, runs from different machines refuse to merge; the committed H100
file holds every row issue 4 asks for."""

import json

import pytest

from quantlab.kernels.bench import MS, SHAPES, merge_runs, summarize
from quantlab.models import data_dir


def _run(device="NVIDIA H100", bw=3000.0, rows=()):
    return {"header": {"device": device, "torch": "2.11", "triton": "3.6", "bandwidth": bw},
            "rows": [dict(r) for r in rows]}


def test_merge_keeps_each_runs_rows_and_lets_reruns_replace():
    a = _run(rows=[{"kernel": "ours_w4a16", "M": 1, "N": 8, "K": 128, "model": "8b", "ms": 2.0},
                   {"kernel": "quant_mxfp4", "M": 64, "N": 1, "K": 128, "ms": 1.0}])
    b = _run(bw=3010.0, rows=[{"kernel": "quant_mxfp4", "M": 64, "N": 1, "K": 128, "ms": 0.5}])
    m = merge_runs([a, b])
    assert [h["bandwidth"] for h in m["header"]["runs"]] == [3000.0, 3010.0]
    assert len(m["rows"]) == 2
    q = [r for r in m["rows"] if r["kernel"] == "quant_mxfp4"]
    assert q == [{"kernel": "quant_mxfp4", "M": 64, "N": 1, "K": 128, "ms": 0.5, "run": 1}]


def test_merge_refuses_runs_of_different_devices():
    with pytest.raises(ValueError, match="differ"):
        merge_runs([_run(), _run(device="NVIDIA H200")])


def test_committed_h100_run_has_every_row():
    d = json.loads((data_dir() / "bench" / "kernels-nvidia-h100-80gb-hbm3.json").read_text())
    assert d["header"]["device"].startswith("NVIDIA H100")
    assert {"torch", "triton", "date", "bandwidth"} <= set(d["header"])
    have = {(r["kernel"], r["M"], r["N"], r["K"]) for r in d["rows"] if "ms" in r}
    peers = ["cublas_bf16", "ours_w4a16", "ours_w4a16_asym", "aten_int4pack", "ours_fp8_tensor",
             "scaled_mm_tensor", "ours_fp8_row", "scaled_mm_row", "ours_fp8_block",
             "scaled_mm_block", "ours_mxfp4", "ours_nvfp4", "gemlite_w4a16"]
    for model in SHAPES.values():
        for _, N, K in model:
            for M in MS:
                missing = [k for k in peers if (k, M, N, K) not in have]
                assert not missing, (M, N, K, missing)
    for r in d["rows"]:
        assert r["floor_ms"] > 0 and ("ms" not in r or r["ms"] > 0)


def test_summary_rows_each_use_their_own_shapes_times(capsys):
    """summarize's per-row helper reads the times of the row it prints, not the last shape's."""
    d = json.loads((data_dir() / "bench" / "kernels-nvidia-h100-80gb-hbm3.json").read_text())
    summarize(d["rows"])
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines()]
    ms = {(r["model"], r["layer"], r["M"], r["kernel"]): r["ms"] for r in d["rows"]
          if "ms" in r and "model" in r}
    table = [ln for ln in lines if len(ln) > 4 and ln[0] in SHAPES]
    assert len(table) == sum(len(v) for v in SHAPES.values()) * len(MS)
    for model, layer, M, _w, _floor, x_bf16, *_ in table:
        key = (model, layer, int(M))
        want = ms[(*key, "cublas_bf16")] / ms[(*key, "ours_w4a16")]
        assert x_bf16 == f"{want:.2f}", key
