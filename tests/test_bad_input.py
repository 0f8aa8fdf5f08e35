"""Bad input never passes silently and nothing on disk is lost (issue 18).

One row per case: the call, and either the key words of the clear error it must raise or a
check of the correct result. Data-loss cases use real temporary folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantlab.io.safetensors_io import MARKER, OWNER, atomic_output

# --- data loss: export never deletes what it did not write --------------------------------


def _export(out, overwrite=False, source=None, is_dir=True, text="new"):
    with atomic_output(out, overwrite, is_dir, source=source) as tmp:
        (tmp / "model.safetensors" if is_dir else tmp).write_text(text)
    return Path(out)


def test_overwrite_keeps_user_folder(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="not a quantlab export"):
        _export(user, overwrite=True)
    assert (user / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_overwrite_replaces_previous_export_and_empty_folder(tmp_path):
    out = _export(tmp_path / "out", text="old")
    assert (out / MARKER).is_file() and not (out / OWNER).exists()
    _export(out, overwrite=True, text="new")
    assert (out / "model.safetensors").read_text() == "new"
    (tmp_path / "empty").mkdir()
    _export(tmp_path / "empty", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]


def test_source_folder_refused(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "model.safetensors").write_text("weights")
    (src / MARKER).write_text("")  # even a source that looks like an export
    for out in (src, tmp_path):
        with pytest.raises(ValueError, match="source model"):
            _export(out, overwrite=True, source=src)
    assert (src / "model.safetensors").read_text() == "weights"


def test_cwd_and_ancestors_refused(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "keep").write_text("x")
    monkeypatch.chdir(work)
    for out in (".", "..", str(tmp_path)):
        with pytest.raises(ValueError, match="working folder"):
            _export(out, overwrite=True)
    assert (work / "keep").exists()


def test_symlink_refused(tmp_path):
    real = _export(tmp_path / "real", text="old")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(ValueError, match="symlink.*real path"):
        _export(tmp_path / "link", overwrite=True)
    assert (real / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_file_export_replaces_only_gguf(tmp_path):
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes")
    with pytest.raises(FileExistsError, match="not a GGUF file"):
        _export(notes, overwrite=True, is_dir=False)
    assert notes.read_text() == "my notes"
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF old")
    _export(g, overwrite=True, is_dir=False, text="GGUF new")
    assert g.read_text() == "GGUF new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "notes.gguf"]


def _killed_export(out: Path) -> None:
    """Start an export in another process and kill it mid-write: its .partial stays behind."""
    code = ("import os, signal, sys\nfrom quantlab.io.safetensors_io import atomic_output\n"
            "with atomic_output(sys.argv[1]) as t:\n"
            "    (t / 'x').write_text('half')\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", code, str(out)], check=False)


def test_stale_partial_cleaned_but_not_others(tmp_path):
    out = tmp_path / "out"
    _killed_export(out)
    stale = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert len(stale) == 1 and (stale[0] / OWNER).is_file()
    lookalike = tmp_path / ".out.abcdefgh.partial"  # right name, no owner file: not ours
    lookalike.mkdir()
    live = tmp_path / ".out.livelive.partial"  # ours, but its process is running
    live.mkdir()
    (live / OWNER).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    _export(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", lookalike.name, live.name])


def test_crash_between_renames_is_undone(tmp_path):
    out = _export(tmp_path / "out", text="old")
    aside = tmp_path / ".out.old-999999999"  # what a crash after the first rename leaves
    (out / OWNER).write_text(json.dumps({"pid": 999999999, "host": os.uname().nodename}))
    os.replace(out, aside)
    with pytest.raises(FileExistsError, match="overwrite"):  # the old export is back
        _export(out)
    assert (out / "model.safetensors").read_text() == "old" and not (out / OWNER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_modes_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = _export(tmp_path / "out")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_disk_full_says_so(tmp_path):
    import errno

    with pytest.raises(OSError, match="disk full.*nothing was written.*free") as info:
        with atomic_output(tmp_path / "out") as tmp:
            (tmp / "a").write_bytes(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_symlink_out_of_model_folder_refused(tmp_path):
    import torch

    from quantlab.io.compressed_tensors import write_config_and_tokenizer

    src, out = tmp_path / "model", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (tmp_path / "secret").write_text("ssh key")
    (src / "tokenizer.json").symlink_to(tmp_path / "secret")
    with pytest.raises(ValueError, match="outside the model folder"):
        write_config_and_tokenizer(out, {}, torch.bfloat16, {}, src)
    assert not (out / "tokenizer.json").exists()
    snap = tmp_path / "hub" / "snapshots" / "abc"  # a hub cache's links into blobs/ are fine
    (tmp_path / "hub" / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (tmp_path / "hub" / "blobs" / "f00").write_text("{}")
    (snap / "tokenizer.json").symlink_to(tmp_path / "hub" / "blobs" / "f00")
    write_config_and_tokenizer(out, {}, torch.bfloat16, {}, snap)
    assert (out / "tokenizer.json").read_text() == "{}"


def test_export_refuses_source_folder(tmp_path):
    from quantlab.io.compressed_tensors import export_compressed_tensors
    from quantlab.nn import quantize_model

    (tmp_path / "model.safetensors").write_text("the original weights")
    (tmp_path / MARKER).write_text("")  # even a source folder that looks like an export
    q = quantize_model(_llama(), "w8a16")
    with pytest.raises(ValueError, match="source model"):
        export_compressed_tensors(q, tmp_path, source_dir=tmp_path, overwrite=True)
    assert (tmp_path / "model.safetensors").read_text() == "the original weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER, "model.safetensors"]


# --- silent wrong results -> clear errors ------------------------------------------------

def _outlier(value, dtype=None):
    import torch

    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0), dtype=dtype)
    x[1, 5] = value
    return x


@pytest.mark.parametrize("scheme,value", [
    ("w4a16", 1e6), ("w4a16", 1e38), ("w4a16_asym", 1e6), ("w4a16_asym", 1e38),
    ("gguf_q4_0", 1e6), ("gguf_q4_0", 1e38), ("gguf_q8_0", 1e38),
], ids=lambda v: str(v))
def test_scale_overflow_raises(scheme, value):
    from quantlab.quantize import quantize

    with pytest.raises(ValueError, match=r"overflow the fp16 scale format.*bf16/fp32 scales"):
        quantize(_outlier(value), scheme)


@pytest.mark.parametrize("scheme", ["fp8_dynamic", "mxfp8", "mxfp4", "nvfp4"])
def test_float64_beyond_float32_raises(scheme):
    import torch

    from quantlab.quantize import dequantize, quantize

    with pytest.raises(ValueError, match="beyond float32"):
        quantize(_outlier(1e300, torch.float64), scheme)
    q = quantize(_outlier(1e30, torch.float64), scheme)  # within float32: finite, as before
    assert bool(torch.isfinite(dequantize(q)).all())


@pytest.mark.parametrize("scale", [0.0, float("nan"), float("inf")], ids=["zero", "nan", "inf"])
def test_static_activation_scale_raises(scale):
    import torch

    from quantlab.quantize import quantize
    from quantlab.schemes import get_scheme

    act = get_scheme("fp8_per_tensor").activations
    with pytest.raises(ValueError, match="finite and positive.*recalibrate"):
        quantize(torch.randn(2, 64), act, scale=torch.tensor(scale))


# --- quantize_model: all or nothing, typos refused, ties undone ---------------------------

def _llama(tie=False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def test_quantize_model_nan_names_layer_and_changes_nothing():
    import torch

    from quantlab.nn import QuantLinear, quantize_model

    model = _llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj.*NaN.*unchanged"):
        quantize_model(model, "w8a16")
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_quantize_model_twice_refused():
    from quantlab.nn import quantize_model

    model = quantize_model(_llama(), "w8a16")
    with pytest.raises(ValueError, match="already quantized.*full-precision"):
        quantize_model(model, "w4a16")


@pytest.mark.parametrize("kw,words", [
    (dict(ignore=("lm_haed",)), r"ignore pattern 'lm_haed' matches no.*lm_head"),
    (dict(overrides={"mlp.down_prj": "w8a16"}), r"overrides pattern 'mlp.down_prj'.*down_proj"),
    (dict(overrides={"re:[": None}), "not a valid regular expression"),
], ids=["ignore-typo", "override-typo", "bad-regex"])
def test_quantize_model_patterns_that_match_nothing(kw, words):
    from quantlab.nn import QuantLinear, quantize_model

    model = _llama()
    with pytest.raises(ValueError, match=words):
        quantize_model(model, "w4a16", **kw)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_quantize_model_zero_act_scale_names_layer():
    import torch

    from quantlab.nn import quantize_model

    model = _llama()
    scales = {"model.layers.0.self_attn.q_proj": torch.tensor(0.0)}
    with pytest.raises(ValueError, match=r"q_proj: static activation scale.*positive"):
        quantize_model(model, "fp8_per_tensor", act_scales=scales)


def test_tied_lm_head_quantized_is_untied(tmp_path):
    from safetensors import safe_open

    from quantlab.io.compressed_tensors import export_compressed_tensors
    from quantlab.nn import QuantLinear, quantize_model

    model = _llama(tie=True)
    with pytest.warns(UserWarning, match="tie_word_embeddings is set to False"):
        quantize_model(model, "w8a16", ignore=())
    assert isinstance(model.lm_head, QuantLinear) and model.config.tie_word_embeddings is False
    out = export_compressed_tensors(model, tmp_path / "q")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight_scale" in keys
    kept = quantize_model(_llama(tie=True), "w8a16")  # the default ignore keeps the tie
    assert kept.config.tie_word_embeddings is True


# --- KV cache scales ---------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf"), -1.0],
                         ids=["zero", "nan", "inf", "negative"])
def test_kv_static_scale_raises(bad):
    from quantlab.kv import QuantizedKVCache

    with pytest.raises(ValueError, match="finite and positive.*recalibrate"):
        QuantizedKVCache("fp8_e4m3", num_layers=2, static_scales=[(1.0, 1.0), (bad, 1.0)])


def test_kv_one_nan_key_does_not_poison_automatic_scale():
    import torch

    from quantlab.kv import QuantizedKVCache

    cache = QuantizedKVCache("fp8_e4m3", num_layers=1)
    k = torch.randn(1, 2, 8, 64, generator=torch.Generator().manual_seed(0))
    v = k.clone()
    k[0, 0, 3, 7] = float("nan")
    out_k, _ = cache.update(k, v, 0)
    assert torch.isfinite(cache.layers[0].k_scale)
    nan = torch.isnan(out_k)
    assert int(nan.sum()) <= 64 and bool(nan[0, 0, 3, 7])  # the NaN stays where it was
    more, _ = cache.update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64), 0)
    assert int(torch.isnan(more).sum()) == int(nan.sum())  # later keys decode finite


# --- Triton quantize kernels (interpreted on a CPU) --------------------------------------

def _dev():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("fmt", ["e4m3", "int8"])
def test_per_token_kernel_nan_row_dequantizes_to_nan(fmt):
    import torch

    from quantlab.kernels.quantize import quantize_per_token
    from quantlab.quantize import dequantize

    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).to(_dev())
    x[1, 5] = float("nan")
    d = dequantize(quantize_per_token(x, fmt)).cpu()
    assert bool(torch.isnan(d[1]).all()) and bool(torch.isfinite(d[[0, 2]]).all())


@pytest.mark.parametrize("g", [0.0, float("nan")], ids=["zero", "nan"])
def test_nvfp4_blocks_global_scale_raises(g):
    import torch

    from quantlab.kernels.quantize import quantize_blocks

    with pytest.raises(ValueError, match="global_scale.*finite and positive"):
        quantize_blocks(torch.randn(2, 64).to(_dev()), "nvfp4", global_scale=g)


# --- audit without a reference -----------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0], ids=["nan", "inf", "neg"])
def test_audit_flags_bad_scales_without_reference(tmp_path, bad):
    from safetensors.torch import load_file, save_file

    from quantlab.io import audit, format_audit
    from quantlab.io.compressed_tensors import export_compressed_tensors
    from quantlab.nn import quantize_model

    out = export_compressed_tensors(quantize_model(_llama(), "w8a16"), tmp_path / "q")
    t = load_file(out / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight_scale"
    t[key] = t[key].clone()
    t[key].view(-1)[3] = bad
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    report = audit(out)
    assert any("up_proj" in p and ("NaN or inf" in p or "negative" in p) for p in report.problems)
    assert "0 problem(s)" not in format_audit(report)


def test_audit_reports_unsupported_gguf_type(tmp_path):
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as T

    from quantlab.io import audit

    path = tmp_path / "q5.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    rng = np.random.default_rng(0)
    w.add_tensor("blk.0.ffn_down.weight", gguf.quants.quantize(
        rng.standard_normal((32, 64)).astype(np.float32), T.Q5_0), raw_dtype=T.Q5_0)
    w.add_tensor("blk.0.ffn_up.weight", rng.standard_normal((64, 32)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    rows = {r.layer: r for r in audit(path).layers}
    down = next(r for n, r in rows.items() if "down" in n)
    assert down.status == "UNSUPPORTED" and "Q5_0" in down.problems[0]
    assert next(r for n, r in rows.items() if "up" in n).status == "full precision"


# --- CLI flags ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv,words", [
    ("compare --schemes ''", "--schemes: is empty"),
    ("weights --schemes ,", "--schemes: is empty"),
    ("compare --eval-tokens -5", "--eval-tokens.*-5 is too small"),
    ("compare --eval-tokens 0", "--eval-tokens.*0 is too small"),
    ("compare --calib-tokens 0", "--calib-tokens.*0 is too small"),
    ("compare --seq-len 0", "--seq-len.*>= 2"),
    ("compare --seq-len 1", "--seq-len.*>= 2"),
    ("weights --source gaussian --size -3", "--size.*too small"),
    ("weights --source gaussian --size 0", "--size.*too small"),
    ("weights --source gaussian --model some/dir", "--model applies to --source model"),
    ("export --scheme w4a16 --out x --calib-tokens 0", "--calib-tokens.*too small"),
    ("compare --algorithms ''", "--algorithms: is empty"),
    ("compare --algorithms rtn,gtpq", "--algorithms: unknown 'gtpq'"),
    ("export --scheme w4a16 --out x --shard-size 0", "--shard-size.*positive size"),
    ("export --scheme w4a16 --out x --shard-size lots", "--shard-size.*not a size"),
    ("export --scheme w4a16 --out x --pipeline sequential --device nosuch",
     "--device.*'nosuch' is not a device"),
    ("compare --device gpu0", "--device.*'gpu0' is not a device"),
], ids=lambda v: v if " " in v else "")
def test_cli_flags(argv, words, capsys):
    import re
    import shlex

    from quantlab.cli import main

    with pytest.raises(SystemExit) as info:
        main(shlex.split(argv))
    assert info.value.code == 2
    assert re.search(words, capsys.readouterr().err)


@pytest.mark.parametrize("flag", [["--shard-size", "5MB"]] + (
    [["--device", "cuda"]] if __import__("torch").cuda.is_available() else []))
def test_export_flags_the_in_memory_pipeline_would_ignore(flag, tmp_path, capsys):
    """The in-memory pipeline writes one file on the CPU: a shard size or a GPU is refused there
    (it was silently ignored), before any model is loaded."""
    from quantlab.cli import main

    out = tmp_path / "q"
    assert main(["export", "--scheme", "w4a16", "--out", str(out), *flag]) == 2
    assert f"{flag[0]} applies to the layer-by-layer pipeline" in capsys.readouterr().err
    assert not out.exists()


def test_cli_binary_eval_file(tmp_path, monkeypatch, capsys):
    from quantlab import models
    from quantlab.cli import main

    monkeypatch.setattr(models, "load_causal_lm", lambda name: (None, None))
    (tmp_path / "eval.bin").write_bytes(bytes(range(256)))
    assert main(["compare", "--eval-file", str(tmp_path / "eval.bin"), "--report", ""]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err


# --- unclear errors made clear: files ----------------------------------------------------

def _raw_safetensors(path, entry):
    import struct

    header = json.dumps({"w": entry}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    return path


@pytest.mark.parametrize("entry,words", [
    ({"dtype": "F32", "shape": [4], "data_offsets": [0]}, "malformed data_offsets"),
    ({"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}, "malformed shape"),
    ({"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}, "unknown dtype"),
], ids=["data_offsets-[0]", "shape-int", "dtype-list"])
def test_malformed_safetensors_header(tmp_path, entry, words):
    from quantlab.io import read_safetensors

    with pytest.raises(ValueError, match=f"{words}.*header is corrupt"):
        read_safetensors(_raw_safetensors(tmp_path / "m.safetensors", entry))


@pytest.fixture(scope="module")
def w8_export(tmp_path_factory):
    from quantlab.io.compressed_tensors import export_compressed_tensors
    from quantlab.nn import quantize_model

    return export_compressed_tensors(quantize_model(_llama(), "w8a16"),
                                     tmp_path_factory.mktemp("ct") / "q")


@pytest.mark.parametrize("edit,words", [
    (lambda c: [c], "holds a JSON list, not an object"),
    (lambda c: c["quantization_config"].update(config_groups=["group_0"]) or c,
     "config_groups must be an object"),
    (lambda c: c["quantization_config"]["config_groups"]["group_0"].update(weights=8) or c,
     "must be an object with 'targets' and 'weights'"),
    (lambda c: c["quantization_config"]["config_groups"]["group_0"].update(targets=["re:["])
     or c, "'re:\\[' is not a valid regular expression"),
    (lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].pop("num_bits")
     and c, "not a layout quantlab reads"),
], ids=["config-list", "groups-list", "group-weights-int", "target-re-[", "weights-no-bits"])
def test_malformed_config(w8_export, tmp_path, edit, words):
    import shutil

    from quantlab.io import audit

    d = tmp_path / "q"
    shutil.copytree(w8_export, d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(edit(config)))
    with pytest.raises(ValueError, match=words):
        audit(d)


def test_pickle_only_model_folder_refused(tmp_path):
    import torch

    from quantlab.models import load_causal_lm

    model = _llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="no .safetensors weights.*never loads pickle"):
        load_causal_lm(tmp_path)


@pytest.mark.parametrize("err", [
    "SafetensorError: No space left on device (os error 28)",
    "34816 requested and 9888 written",
], ids=["safetensors", "gguf-tofile"])
def test_disk_full_from_writers(tmp_path, err):
    class SafetensorError(Exception):
        pass

    exc = SafetensorError(err) if err.startswith("Safe") else OSError(err)
    with pytest.raises(OSError, match="disk full.*nothing was written"):
        with atomic_output(tmp_path / "out"):
            raise exc
    assert list(tmp_path.iterdir()) == []


def test_meta_tensor_refused():
    import torch

    from quantlab.quantize import quantize

    with pytest.raises(ValueError, match="meta device.*load the real weights"):
        quantize(torch.empty(8, 128, device="meta"), "w4a16")


def test_files_fsynced_before_rename_and_parent_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(
        f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b)))
                        or real_replace(a, b))
    _export(tmp_path / "out")
    kinds = [(k, Path(p).name) for k, p in events]
    first_replace = kinds.index(("replace", "out"))
    assert ("fsync", "model.safetensors") in kinds[:first_replace]
    assert ("fsync", tmp_path.name) in kinds[first_replace:]  # the parent, after the rename


# --- KV cache: non-finite values, shapes, refused batches leave the cache as it was -------

def _kv(T=128, seed=0, D=64):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, T, D, generator=g), torch.randn(1, 2, T, D, generator=g)


def test_kv_nan_stays_in_its_element_per_token_head():
    import torch

    from quantlab.kv import get_codec

    codec = get_codec("fp8_per_token_head")
    k, _ = _kv()
    k[0, 0, 3, 7], k[0, 1, 5, 2] = float("nan"), float("inf")
    d = codec.decode(codec.encode(k, "k"), "k")
    assert torch.isnan(d).sum() == 1 and bool(torch.isnan(d[0, 0, 3, 7]))
    amax = float(k[0, 1, 5].nan_to_num(0, 0, 0).abs().max())
    assert float(d[0, 1, 5, 2]) == pytest.approx(amax)  # inf saturates to the vector's amax
    finite = torch.isfinite(k)
    assert torch.allclose(d[finite], k[finite], rtol=0.07, atol=1e-6)  # neighbours untouched


@pytest.mark.parametrize("name", ["int8_per_token_head", "kivi_4", "turbo_4"])
def test_kv_nan_refused_and_cache_unchanged(name):
    import torch

    from quantlab.kv import QuantizedKVCache

    cache = QuantizedKVCache(name, num_layers=1)
    k, v = _kv(T=32)
    cache.update(k, v, 0)
    before = {n: t.clone() for n, t in cache.layers[0].tensors().items()}
    bad_k, bad_v = _kv(T=128, seed=1)
    bad_k[0, 1, 100, 9] = float("nan")
    with pytest.raises(ValueError, match=f"{name}: 1 of .* NaN or inf.*no code for"):
        cache.update(bad_k, bad_v, 0)
    layer = cache.layers[0]
    assert layer.n_tokens == 32 and layer.tensors().keys() == before.keys()
    assert all(torch.equal(layer.tensors()[n], t) for n, t in before.items())
    out, _ = cache.update(*_kv(T=1, seed=2), 0)  # and the cache still works
    assert out.shape[2] == 33 and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name,x,role,words", [
    ("turbo_4", (1, 2, 8, 48), "v", "power-of-two head_dim"),
    ("kivi_4", (1, 2, 32, 48), "v", "head_dim=48 is not a multiple"),
    ("kivi_4", (1, 2, 5, 64), "k", "blocks of 32 tokens, got 5"),
    ("int8_per_token_head", (2, 8, 64), "k", r"\(batch, kv_heads, tokens, head_dim\).*\(2, 8,"),
    ("fp8_per_token_head", (1, 2, 8, 64), "q", "role='q'"),
], ids=["turbo-hd48", "kivi-hd48", "kivi-5-keys", "3-D", "bad-role"])
def test_kv_codec_called_directly(name, x, role, words):
    import torch

    from quantlab.kv import get_codec

    with pytest.raises(ValueError, match=words):
        get_codec(name).encode(torch.randn(*x), role)


def test_kv_codec_refuses_int_and_fp16_overflow():
    import torch

    from quantlab.kv import get_codec

    with pytest.raises(ValueError, match="float tensor, got a torch.int64"):
        get_codec("fp8_per_token_head").encode(torch.ones(1, 2, 4, 64, dtype=torch.long), "k")
    k, _ = _kv(T=4)
    k[0, 0, 0, 0] = 1e6
    with pytest.raises(ValueError, match="beyond fp16's max 65504.*bf16"):
        get_codec("fp16").encode(k, "k")


@pytest.mark.parametrize("first,words", [
    ("empty", "amax 0.0/0.0 .*static_scales"), ("zeros", "amax 0.0/0.0 .*static_scales"),
], ids=str)
def test_kv_automatic_scale_needs_a_real_first_batch(first, words):
    import torch

    from quantlab.kv import QuantizedKVCache

    cache = QuantizedKVCache("fp8_e4m3", num_layers=1)
    k = torch.zeros(1, 2, 0 if first == "empty" else 4, 64)
    with pytest.raises(ValueError, match=words):
        cache.update(k, k.clone(), 0)
    assert not cache.layers[0].is_initialized and cache.layers[0].k_scale is None


@pytest.mark.parametrize("idx", [1, -1])
def test_kv_layer_index_out_of_range(idx):
    from quantlab.kv import QuantizedKVCache

    cache = QuantizedKVCache("int8_per_token_head", num_layers=1)
    with pytest.raises(ValueError, match=f"layer_idx={idx}, but this cache has 1 layers"):
        cache.update(*_kv(T=2), idx)
    assert not cache.layers[0].is_initialized


def test_kv_keys_values_shape_mismatch():
    from quantlab.kv import QuantizedKVCache

    cache = QuantizedKVCache("int8_per_token_head", num_layers=1)
    k, _ = _kv(T=4)
    _, v = _kv(T=5)
    with pytest.raises(ValueError, match=r"keys \(1, 2, 4, 64\) and values \(1, 2, 5, 64\)"):
        cache.update(k, v, 0)
    assert cache.layers[0].n_tokens == 0


# --- schemes, calibration ids, audit's magic sniffing ----------------------------------------

@pytest.mark.parametrize("kw,words", [
    (dict(granularity="block", block=(0, 128)), r"block=\(0, 128\) must be \(rows, cols\)"),
    (dict(granularity="block", block=128), r"block=128 must be \(rows, cols\)"),
    (dict(granularity="block", block=(1.5, 128)), r"two positive integers"),
    (dict(granularity="group", group_size=2.5), "group_size=2.5 must be a positive integer"),
    (dict(granularity="group", group_size="32"), "group_size='32' must be a positive integer"),
], ids=["block-0", "block-int", "block-float", "group-2.5", "group-str"])
def test_tensor_scheme_sizes(kw, words):
    from quantlab.schemes import TensorScheme

    with pytest.raises(ValueError, match=words):
        TensorScheme("int8", **kw)


@pytest.mark.parametrize("algorithm,lo,hi", [
    ("gptq", 0, 100), ("gptq", -5, 60), ("awq", 0, 100), ("smoothquant", 0, 100),
    ("static_act_scales", 0, 100),
], ids=["gptq-beyond-vocab", "gptq-negative", "awq", "smoothquant", "static-scales"])
def test_calibration_ids_outside_vocabulary(algorithm, lo, hi):
    import torch

    from quantlab.algorithms.awq import awq
    from quantlab.algorithms.calibration import static_act_scales
    from quantlab.algorithms.gptq import gptq
    from quantlab.algorithms.smoothquant import smooth_model
    from quantlab.schemes import get_scheme

    run = {"gptq": lambda m, ids: gptq(m, "w8a16", ids),
           "awq": lambda m, ids: awq(m, "w4a16", ids),
           "smoothquant": lambda m, ids: smooth_model(m, ids),
           "static_act_scales": lambda m, ids: static_act_scales(
               m, get_scheme("fp8_per_tensor"), ids)}[algorithm]
    ids = torch.randint(lo, hi, (2, 512), generator=torch.Generator().manual_seed(0))
    ids[0, 0], ids[0, 1] = lo, hi - 1
    with pytest.raises(ValueError, match=f"run from {lo} to {hi - 1}.*vocabulary has 64 tokens"):
        run(_llama(), ids)


def test_audit_sniffs_magic_without_reading_the_file(tmp_path, monkeypatch):
    from quantlab.io import audit

    big = tmp_path / "model.bin"
    big.write_bytes(b"PK\x03\x04" + b"\0" * 1024)

    def refuse(self):
        raise AssertionError("audit read the whole file to sniff 4 bytes")

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(FileNotFoundError, match="neither a compressed-tensors directory"):
        audit(big)


def test_missing_shard_named_not_dropped(tmp_path):
    from quantlab.io import read_safetensors_dir

    entry = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    _raw_safetensors(tmp_path / "model-00001-of-00002.safetensors", entry)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "w": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"lacks: \['model-00002-of-00002.safetensors'\]"):
        read_safetensors_dir(tmp_path)


def test_empty_model_name_refused():
    from quantlab.models import load_causal_lm

    with pytest.raises(ValueError, match="model name is empty"):
        load_causal_lm("")  # Path("") is the working folder: never load from there by accident


def test_compare_empty_model_name(capsys):
    """`--model ''` once read the working folder as a model (Path('') is '.')."""
    from quantlab.cli import main

    assert main(["compare", "--model", "", "--schemes", "w4a16", "--eval-tokens", "512"]) == 2
    assert "model name is empty" in capsys.readouterr().err
