"""Safety: only safetensors and GGUF are read, never pickles; malformed, truncated or
mismatched files fail with a message saying what is wrong; failed exports leave nothing."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantlab.io import compressed_tensors as ct
from quantlab.io import read_gguf, read_safetensors, read_safetensors_dir
from tests.test_io_fixtures import calib_ids, quantized, tiny  # noqa: F401


@pytest.fixture(scope="module")
def w4_dir(tiny, calib_ids, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("safety") / "w4"
    ct.export_compressed_tensors(quantized(tiny, calib_ids, "w4a16_asym"), d, tokenizer=tiny[1])
    return d


def test_truncated_safetensors(w4_dir, tmp_path):
    data = (w4_dir / "model.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors(tmp_path / "t.safetensors")
    (tmp_path / "t.safetensors").write_bytes(data[:5])
    with pytest.raises(ValueError, match="too short"):
        read_safetensors(tmp_path / "t.safetensors")


def test_malformed_header(tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(struct.pack("<Q", 10) + b"{not json}" + b"\0" * 8)
    with pytest.raises(ValueError, match="not valid JSON"):
        read_safetensors(f)
    f.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ValueError, match="does not fit"):
        read_safetensors(f)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}}).encode()
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(ValueError, match="needs 64 bytes"):
        read_safetensors(f)


def test_pickles_are_refused(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle"):
        read_safetensors_dir(tmp_path)
    with pytest.raises(ValueError, match="pickle"):
        read_safetensors_dir(tmp_path / "pytorch_model.bin")


def _edit(src, dst, tensors=None, config=None):
    shutil.copytree(src, dst)
    if tensors:
        t = load_file(dst / "model.safetensors")
        tensors(t)
        save_file(t, str(dst / "model.safetensors"))
    if config:
        c = json.loads((dst / "config.json").read_text())
        config(c["quantization_config"])
        (dst / "config.json").write_text(json.dumps(c))
    return dst


def test_wrong_shapes_and_mismatched_config(w4_dir, tmp_path):
    p = "model.layers.0.mlp.up_proj."
    bad = _edit(w4_dir, tmp_path / "a", tensors=lambda t: t.__setitem__(
        p + "weight_scale", t[p + "weight_scale"][:, :1].contiguous()))
    with pytest.raises(ValueError, match=r"up_proj.weight_scale has shape \(512, 1\)"):
        ct.read_compressed_tensors(bad)
    bad = _edit(w4_dir, tmp_path / "b", config=lambda q: q["config_groups"]["group_0"][
        "weights"].__setitem__("group_size", 64))
    with pytest.raises(ValueError, match="weight_scale has shape"):
        ct.read_compressed_tensors(bad)
    bad = _edit(w4_dir, tmp_path / "c", tensors=lambda t: t.pop(p + "weight_zero_point"))
    with pytest.raises(ValueError, match="weight_zero_point is missing"):
        ct.read_compressed_tensors(bad)
    bad = _edit(w4_dir, tmp_path / "d", config=lambda q: q.__setitem__("quant_method", "gptq"))
    with pytest.raises(ValueError, match="not 'compressed-tensors'"):
        ct.read_compressed_tensors(bad)
    bad = _edit(w4_dir, tmp_path / "e", config=lambda q: q["config_groups"]["group_0"].__setitem__(
        "targets", ["re:.*attn.*"]))
    with pytest.raises(ValueError, match="no config group targets it"):
        ct.read_compressed_tensors(bad)


def test_bad_gguf_files(tiny, calib_ids, tmp_path):  # noqa: F811
    from quantlab.io import export_gguf

    (tmp_path / "x.gguf").write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        read_gguf(tmp_path / "x.gguf")
    path = export_gguf(quantized(tiny, calib_ids, "gguf_q8_0"), tmp_path / "m.gguf", tiny[1])
    data = path.read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[: len(data) - 4096])
    with pytest.raises(ValueError, match="truncated"):
        read_gguf(tmp_path / "t.gguf")


def test_failed_export_leaves_nothing(tiny, calib_ids, tmp_path, monkeypatch):  # noqa: F811
    import safetensors.torch

    m = quantized(tiny, calib_ids, "w4a16")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ct.export_compressed_tensors(m, tmp_path / "out", tokenizer=tiny[1])
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tiny, calib_ids, tmp_path):  # noqa: F811
    m = quantized(tiny, calib_ids, "w4a16")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        ct.export_compressed_tensors(m, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").exists()
    with pytest.raises(FileExistsError, match="not a quantlab export"):  # user files survive
        ct.export_compressed_tensors(m, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
    ct.export_compressed_tensors(m, tmp_path / "new")
    (tmp_path / "new" / "stale.txt").write_text("y")  # a previous export: replaced whole
    ct.export_compressed_tensors(m, tmp_path / "new", overwrite=True)
    assert not (tmp_path / "new" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]
