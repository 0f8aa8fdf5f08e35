"""Audit: the scheme read from the tensors, error against the reference, layers left in full
precision (ignored vs silently unquantized), and planted wrong scales."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantlab.io import audit, export_compressed_tensors, export_gguf, format_audit
from quantlab.io.cli import add_audit_parser, add_export_parser
from tests.test_io_fixtures import calib_ids, quantized, tiny  # noqa: F401


@pytest.fixture(scope="module")
def reference(tiny):  # noqa: F811
    return {f"{k}": v for k, v in tiny[0].state_dict().items() if v.ndim == 2}


@pytest.fixture(scope="module")
def nvfp4_dir(tiny, calib_ids, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("audit") / "nvfp4"
    export_compressed_tensors(quantized(tiny, calib_ids, "nvfp4_a16"), d, tokenizer=tiny[1])
    return d


def _copy_with(src, dst, edit):
    shutil.copytree(src, dst)
    t = load_file(dst / "model.safetensors")
    edit(t)
    save_file(t, str(dst / "model.safetensors"))
    return dst


def test_clean_checkpoint_has_no_problems(nvfp4_dir, reference):
    rep = audit(nvfp4_dir, reference)
    assert rep.problems == []
    q = [r for r in rep.layers if r.status == "quantized"]
    assert len(q) == 7 and all(r.scheme.startswith("nvfp4") for r in q)
    assert all(19 < r.sqnr_db < 22 and r.bits_per_weight == pytest.approx(4.5, abs=0.01)
               for r in q)  # NVFP4 on Gaussian-like weights: about 20 dB
    assert [r.status for r in rep.layers if r.layer == "lm_head"] == ["ignored"]
    assert "0 problem(s)." in format_audit(rep)


def test_planted_inverted_nvfp4_global_scale_is_caught(nvfp4_dir, reference, tmp_path):
    key = "model.layers.0.mlp.up_proj.weight_global_scale"
    bad = _copy_with(nvfp4_dir, tmp_path / "bad", lambda t: t.__setitem__(key, 1.0 / t[key]))
    for ref in (None, reference):
        rep = audit(bad, ref)
        assert len(rep.problems) == (1 if ref is None else 2), rep.problems
        assert all(p.startswith("model.layers.0.mlp.up_proj:") for p in rep.problems)
        assert "looks inverted" in rep.problems[0]


def test_planted_wrong_scale_is_caught_with_reference(nvfp4_dir, reference, tmp_path):
    key = "model.layers.0.self_attn.o_proj.weight_global_scale"
    bad = _copy_with(nvfp4_dir, tmp_path / "bad", lambda t: t.__setitem__(key, t[key] / 4))
    assert audit(bad, None).problems == []  # plausible magnitudes: only the reference tells
    (p,) = audit(bad, reference).problems
    assert "o_proj" in p and "4x the reference" in p


def test_silently_unquantized_layer_is_flagged(nvfp4_dir, tiny, tmp_path):  # noqa: F811
    name = "model.layers.0.mlp.gate_proj"

    def unquantize(t):
        for k in [k for k in t if k.startswith(name + ".")]:
            del t[k]
        t[name + ".weight"] = tiny[0].get_submodule(name).weight.detach().to(torch.bfloat16)

    rep = audit(_copy_with(nvfp4_dir, tmp_path / "bad", unquantize))
    (row,) = [r for r in rep.layers if r.layer == name]
    assert row.status == "UNQUANTIZED" and "silently unquantized" in row.problems[0]
    # the same layer listed in ignore is a deliberate choice, not a problem
    cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
    cfg["quantization_config"]["ignore"].append(name)
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    rep = audit(tmp_path / "bad")
    assert rep.problems == [] and [r.status for r in rep.layers if r.layer == name] == ["ignored"]


def test_gguf_audit(tiny, calib_ids, reference, tmp_path):  # noqa: F811
    path = export_gguf(quantized(tiny, calib_ids, "gguf_q4_0"), tmp_path / "m.gguf", tiny[1])
    rep = audit(path, reference)
    assert rep.problems == []
    q = {r.layer: r for r in rep.layers if r.status == "quantized"}
    assert len(q) == 7 and all(r.scheme.startswith("Q4_0") for r in q.values())
    # q/k rows come back in HF order: the error against the HF reference is small
    assert q["model.layers.0.self_attn.q_proj"].sqnr_db > 15
    assert [r.scheme for r in rep.layers if r.layer == "lm_head"] == ["F16"]


def test_cli_export_and_audit(tiny, tmp_path, capsys):  # noqa: F811
    import argparse

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    add_export_parser(sub)
    add_audit_parser(sub)
    # in memory, the export re-reads itself with gguf (--verify); layer by layer (the default
    # for a local directory) holds no whole model to compare with and points at audit instead
    args = p.parse_args(["export", "--model", str(tiny[2]), "--scheme", "gguf_q8_0",
                         "--to", "gguf", "--out", str(tmp_path), "--pipeline", "in-memory"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "7 bit-exact" in out and "llama-server -m" in out
    next(tmp_path.glob("*.gguf")).unlink()
    args = p.parse_args(["export", "--model", str(tiny[2]), "--scheme", "gguf_q8_0",
                         "--to", "gguf", "--out", str(tmp_path)])
    assert args.func(args) == 0
    assert "quantlab audit" in capsys.readouterr().out
    path = next(tmp_path.glob("*.gguf"))
    args = p.parse_args(["audit", str(path), "--reference", str(tiny[2])])
    assert args.func(args) == 0
    assert "0 problem(s)." in capsys.readouterr().out


def test_cli_export_format_is_a_deprecated_alias_of_to(capsys):
    """--format (the old name) still picks the container for one release, with a note on stderr;
    --to prints none, and --help lists only --to."""
    import argparse

    p = argparse.ArgumentParser()
    add_export_parser(p.add_subparsers(dest="command"))
    base = ["export", "--scheme", "gguf_q8_0", "--out", "x"]
    assert p.parse_args(base).to == "compressed-tensors"
    assert p.parse_args(base + ["--to", "gguf"]).to == "gguf"
    assert capsys.readouterr().err == ""
    assert p.parse_args(base + ["--format", "gguf"]).to == "gguf"
    err = capsys.readouterr().err
    assert "--format is deprecated" in err and "use --to gguf" in err
    with pytest.raises(SystemExit):
        p.parse_args(["export", "--help"])
    help_text = capsys.readouterr().out
    assert "--to" in help_text and "--format" not in help_text
