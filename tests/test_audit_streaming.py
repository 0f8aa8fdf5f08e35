"""The streaming audit (one module's tensors in memory at a time) against the whole-checkpoint
readers it replaced: the same rows, statuses, schemes, problems, and errors within float64-sum
rounding; and it never reads a whole checkpoint."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from quantlab.eval import sqnr_db
from quantlab.io import (
    audit,
    export_compressed_tensors,
    export_gguf,
    read_compressed_tensors,
    safetensors_io,
)
from quantlab.io.gguf import read_gguf
from quantlab.io.stream import LazyCheckpoint
from quantlab.nn import quantize_model
from quantlab.quantize import dequantize
from tests.test_io_fixtures import tiny  # noqa: F401


@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory):  # noqa: F811
    model, tok, _ = tiny
    root = tmp_path_factory.mktemp("audit-stream")
    w4 = quantize_model(copy.deepcopy(model), "w4a16")
    ct = export_compressed_tensors(w4, root / "ct", tokenizer=tok)
    q4 = quantize_model(copy.deepcopy(model), "gguf_q4_0")
    gg = export_gguf(q4, root / "m.gguf", tokenizer=tok)
    return ct, gg


def _whole(values: dict, reference: dict) -> dict:
    """{layer: (sqnr dB, max |err|)} from whole tensors, as the audit computed before."""
    out = {}
    for name, v in values.items():
        approx = dequantize(v, torch.float32) if not isinstance(v, torch.Tensor) else v.float()
        ref = reference[f"{name}.weight"].float()
        out[name] = (sqnr_db(ref, approx), float((ref - approx).abs().max()))
    return out


def _check_rows(report, expected: dict) -> None:
    assert [r.layer for r in report.layers] == sorted(expected)
    for r in report.layers:
        db, err = expected[r.layer]
        # float64 sums over row chunks against one float32 sum: within float32 rounding
        assert r.sqnr_db == pytest.approx(db, abs=1e-3), r.layer
        assert r.max_abs_error == pytest.approx(err, rel=1e-6), r.layer


def test_compressed_tensors_audit_matches_whole_reader(exports, tiny, monkeypatch):  # noqa: F811
    """Same rows as whole tensors give; no whole-checkpoint read; every read is one module's."""
    ct, _ = exports
    ref_dir = tiny[2]
    reference = dict(safetensors_io.read_safetensors_dir(ref_dir))
    ck = read_compressed_tensors(ct)
    expected = _whole({**ck.layers, **ck.full_precision}, reference)

    def refuse(*_):
        raise AssertionError("the audit read a whole checkpoint")

    calls = []
    real = LazyCheckpoint.load

    def spy(self, names, device="cpu"):
        names = list(names)
        calls.append(names)
        return real(self, names, device)

    monkeypatch.setattr(safetensors_io, "read_safetensors_dir", refuse)
    monkeypatch.setattr(LazyCheckpoint, "load", spy)
    rep = audit(ct, LazyCheckpoint(ref_dir))
    _check_rows(rep, expected)
    assert rep.problems == []
    status = {r.layer: r.status for r in rep.layers}
    assert status["lm_head"] == "ignored"
    assert sum(s == "quantized" for s in status.values()) == 7
    assert all(r.scheme.startswith("w4a16") for r in rep.layers if r.status == "quantized")
    assert len(calls) > 2 * 8 and all(len({n.rpartition(".")[0] for n in c}) == 1 for c in calls)


def test_gguf_audit_matches_whole_reader(exports, tiny):  # noqa: F811
    _, gg = exports
    reference = safetensors_io.read_safetensors_dir(tiny[2])
    ck = read_gguf(gg)
    expected = _whole({**ck.layers, **{n: w for n, w in ck.other.items() if "embed" not in n}},
                      reference)
    rep = audit(gg, LazyCheckpoint(tiny[2]))
    _check_rows(rep, expected)
    assert rep.problems == []
    assert {r.scheme.split(":")[0] for r in rep.layers} == {"Q4_0", "F16"}


def test_stats_chunked_equals_whole():
    from quantlab.io.audit import _stats

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(300, 70, generator=g).to(torch.bfloat16)
    approx = ref.float() + 0.01 * torch.randn(300, 70, generator=g)
    st = _stats("x", approx, ref, rows=7 * 70)  # 43 chunks of 7 rows
    assert st.sqnr_db == pytest.approx(sqnr_db(ref.float(), approx), abs=1e-4)
    assert st.max_abs_error == pytest.approx(float((ref.float() - approx).abs().max()))
    assert st.amax == pytest.approx(float(approx.abs().max()))
    rms = approx.pow(2).mean().sqrt() / ref.float().pow(2).mean().sqrt()
    assert st.rms_ratio == pytest.approx(float(rms), rel=1e-5)
    assert math.isinf(_stats("x", ref, ref).sqnr_db)
    with pytest.raises(ValueError, match="same model"):
        _stats("x", approx, ref[:10])


def test_truncated_gguf_tensor_is_reported(exports, tmp_path):
    """A file cut inside its tensor data: a clear error, not a short read decoded as garbage."""
    _, gg = exports
    data = gg.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: len(data) - 4096])
    with pytest.raises(ValueError, match="truncated"):
        audit(bad)
