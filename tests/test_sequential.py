"""The layer-sequential exporter against the in-memory reference: every tensor byte for byte and
config.json equal, on the embedded model and a tiny sharded checkpoint; and its bad-input paths."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from torch import nn

from quantlab import models
from quantlab.algorithms import awq, gptq
from quantlab.algorithms.calibration import static_act_scales
from quantlab.io import compressed_tensors as ct
from quantlab.io.safetensors_io import read_safetensors_dir
from quantlab.nn import quantize_model
from quantlab.schemes import get_scheme
from quantlab.sequential import export_sequential, layer_list
from tests.test_io_fixtures import make_sharded_llama


def _reference(model_dir, scheme, out, algorithm="rtn", calib=None):
    """What `quantlab export --pipeline in-memory` writes (io/cli.cmd_export's steps)."""
    scheme = get_scheme(scheme)
    model, tok = models.load_causal_lm(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    if algorithm == "gptq":
        q = gptq(model, scheme, calib)
    elif algorithm == "awq":
        q = awq(model, scheme, calib)
    else:
        scales = static_act_scales(model, scheme, calib) if calib is not None else None
        q = quantize_model(model, scheme, act_scales=scales)
    igs = (ct.calibrate_input_global_scales(q, calib)
           if scheme.activations is not None and scheme.activations.scale_rule.name == "nvfp4"
           else None)
    src = model_dir or models.embedded_lm_dir()
    return ct.export_compressed_tensors(q, out, tokenizer=tok, source_dir=src,
                                        input_global_scales=igs)


def _assert_same(ref, seq):
    a, b = read_safetensors_dir(ref), read_safetensors_dir(seq)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8)
                           ) if a[k].numel() else True, k
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (ref, seq))
    assert ca == cb
    assert (seq / "model.safetensors.index.json").is_file()
    assert not (seq / "model.safetensors").exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer Llama saved as 3+ bf16 shards with an index (tests/test_io_fixtures.py)."""
    return make_sharded_llama(tmp_path_factory.mktemp("tiny") / "llama")


def _calib(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (4, 128), generator=torch.Generator().manual_seed(1))


def test_embedded_rtn_w4a16_identical(tmp_path):
    src = models.embedded_lm_dir()
    ref = _reference(None, "w4a16", tmp_path / "ref")
    seq = export_sequential(src, "w4a16", tmp_path / "seq", device="cpu",
                            max_shard_bytes="2MB", progress=False)
    assert len(list(seq.glob("*.safetensors"))) >= 3
    _assert_same(ref, seq)


@pytest.mark.slow
def test_embedded_static_fp8_identical(tmp_path):
    """fp8_per_tensor: static input scales from the float model's stream, layer by layer."""
    from quantlab.eval.lm import token_windows

    _, tok = models.load_causal_lm(None)
    calib = token_windows(tok, models.calib_text(), 256, 1024)
    ref = _reference(None, "fp8_per_tensor", tmp_path / "ref", calib=calib)
    seq = export_sequential(models.embedded_lm_dir(), "fp8_per_tensor", tmp_path / "seq",
                            calib=calib, device="cpu", progress=False)
    _assert_same(ref, seq)


@pytest.mark.parametrize("scheme,algorithm", [
    ("w4a16", "rtn"), ("w4a16", "gptq"), pytest.param("w4a16_asym", "awq", marks=pytest.mark.slow),
    ("nvfp4", "rtn"), pytest.param("fp8_per_tensor", "gptq", marks=pytest.mark.slow)])
def test_tiny_sharded_identical(tiny, tmp_path, scheme, algorithm):
    """GPTQ: both paths take each layer's Hessian from the quantized previous layers' outputs;
    AWQ: both from the float model's; NVFP4 input global scales: from the quantized model."""
    calib = _calib(512)
    ref = _reference(str(tiny), scheme, tmp_path / "ref", algorithm, calib)
    seq = export_sequential(tiny, scheme, tmp_path / "seq", algorithm=algorithm, calib=calib,
                            device="cpu", max_shard_bytes="100KB", progress=False)
    _assert_same(ref, seq)


def test_not_a_module_list():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(4, 4))

    with pytest.raises(ValueError, match="not a non-empty nn.ModuleList.*--pipeline in-memory"):
        layer_list(Odd())


def test_missing_shard(tiny, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    sorted(broken.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(FileNotFoundError, match="missing.*fetch those files again"):
        export_sequential(broken, "w4a16", tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


def test_disk_full_leaves_nothing(tiny, tmp_path, monkeypatch):
    import safetensors.torch

    calls = []

    def full(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match="disk full.*free at least"):
        export_sequential(tiny, "w4a16", tmp_path / "out", device="cpu",
                          max_shard_bytes="100KB", progress=False)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # no out, no .partial folder


def test_cli_sequential_export_audits(tiny, tmp_path, capsys):
    from quantlab.cli import main

    out = tmp_path / "out"
    assert main(["export", "--model", str(tiny), "--scheme", "fp8_dynamic", "--out", str(out),
                 "--device", "cpu", "--shard-size", "100KB"]) == 0
    assert "layer by layer" in capsys.readouterr().out
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 2
    assert main(["audit", str(out), "--reference", str(tiny)]) == 0
