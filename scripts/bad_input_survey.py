"""Bad-input survey (issue 18): 149 bad inputs and faults, each run for real and classified.

    .venv/bin/python scripts/bad_input_survey.py              # all; writes notes/bad-input.md
    .venv/bin/python scripts/bad_input_survey.py --only kv --no-write

Categories: tensors, models, files, export, kv, cli, determinism. Each case runs in a process of
its own (a fork of one that has imported quantlab; CLI cases as `python -m quantlab.cli ...`), in
a fresh folder holding the files the case sets up, and gets one verdict:

- clear: it raises (or the CLI exits non-zero) with a message that names the bad thing (each case
  says which words), or it does the right thing (each case that may return says what right is);
- unclear: it raises, but with a bare ZeroDivisionError / IndexError / KeyError / AttributeError /
  TypeError / re.error, an internal traceback, or a message that does not name the bad thing;
- silent: it returns a wrong result (non-finite where the input was finite, a lost value, all
  zeros, an ignored flag, a run that differs from itself);
- crash: the process dies (a signal, or it hangs past the time limit);
- loss: a file that existed before the case is gone or changed.

The tests in tests/test_bad_input.py pin the behaviour this survey counts; this script measures.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ("tensors", "models", "files", "export", "kv", "cli", "determinism")
VERDICTS = ("clear", "unclear", "silent", "crash", "loss")
BARE = ("ZeroDivisionError", "IndexError", "KeyError", "AttributeError", "error",  # re.error
        "UnboundLocalError", "NameError", "AssertionError", "RecursionError", "StopIteration",
        "NotImplementedError", "UnpicklingError")


@dataclass
class Case:
    """run(folder) returns a result or raises; words: regex a clear message must match;
    check(result) -> None if the result is right, else what is wrong (None: any return is wrong);
    setup(folder) writes the files that must survive; argv: a CLI case instead of run."""

    category: str
    name: str
    words: str
    run: Callable | None = None
    check: Callable | None = None
    setup: Callable | None = None
    argv: list[str] | None = None
    timeout: int = 300


CASES: list[Case] = []


def case(category, name, words, run=None, check=None, setup=None, argv=None, timeout=300):
    CASES.append(Case(category, name, words, run, check, setup, argv, timeout))


# ---------------------------------------------------------------- helpers run in the child

def _torch():
    import torch

    return torch


def llama(tie=False, vocab=64):
    torch = _torch()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def randn(*shape, seed=0, dtype=None):
    torch = _torch()
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def tensor_check(x):
    """The result of quantizing x is right when it dequantizes to x's shape, finite wherever x is,
    keeps x's largest value within 50%, and is not all zero for a non-zero x."""
    torch = _torch()

    def check(q):
        from quantlab.quantize import dequantize

        d = dequantize(q).double()
        xf = x.double()
        if d.shape != xf.shape:
            return f"shape {tuple(xf.shape)} came back as {tuple(d.shape)}"
        fin = torch.isfinite(xf)
        if bool((fin & ~torch.isfinite(d)).any()):
            n = int((fin & ~torch.isfinite(d)).sum())
            return f"{n} finite inputs dequantize to NaN/inf"
        if xf.numel() and bool(fin.any()):
            i = int(xf.nan_to_num(0, 0, 0).abs().flatten().argmax())
            big, got = float(xf.flatten()[i]), float(d.flatten()[i])
            if big != 0 and abs(got - big) > 0.5 * abs(big):
                return f"the largest input {big:g} dequantizes to {got:g}"
            if big != 0 and not bool(d.nan_to_num(0, 0, 0).any()):
                return "a non-zero input dequantizes to all zeros"
        return None
    return check


def snapshot(folder: Path) -> dict[str, str]:
    """path -> sha256 (or 'dir' / 'link:target') of everything under folder."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def lost(before: dict, after: dict, keep_out: tuple = ()) -> list[str]:
    return [p for p, h in before.items() if after.get(p) != h
            and not any(p == k or p.startswith(k + "/") for k in keep_out)]


def export_ct(model, out, **kw):
    from quantlab.io.compressed_tensors import export_compressed_tensors

    return export_compressed_tensors(model, out, **kw)


def quantized(scheme="w8a16", **kw):
    from quantlab.nn import quantize_model

    return quantize_model(llama(**kw), scheme)


def user_folder(d: Path, name="mine"):
    (d / name).mkdir()
    (d / name / "thesis.tex").write_text("years of work")


def prior_export(d: Path, name="out"):
    export_ct(quantized(), d / name)


def raw_safetensors(path: Path, header: dict, data: bytes = b"\0" * 16, length=None):
    import struct

    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)
    return path


# ---------------------------------------------------------------- tensors

FAMILIES = ("w4a16", "fp8_dynamic", "mxfp4", "nvfp4")


def _variants():
    torch = _torch()

    def outlier(v, dtype=None):
        x = randn(4, 256, dtype=dtype)
        x[1, 5] = v
        return x

    return {
        "1e6": (lambda: outlier(1e6), "overflow|scale"),
        "1e38": (lambda: outlier(1e38), "overflow|scale"),
        "inf": (lambda: outlier(float("inf")), "inf|finite"),
        "NaN": (lambda: outlier(float("nan")), "NaN|finite"),
        "zeros": (lambda: torch.zeros(4, 256), "zero"),
        "fp64 1e300": (lambda: outlier(1e300, torch.float64), "float32|float64"),
        "empty": (lambda: torch.zeros(0, 256), "empty|no elements|0 elements"),
        "0-d": (lambda: torch.tensor(1.5), "0-d|scalar|dimension|shape"),
        "1-D": (lambda: randn(256), "1-D|2-D|dimension|shape"),
        "int64": (lambda: torch.arange(1024).reshape(4, 256) - 512, "int64|dtype|float"),
        "meta": (lambda: torch.empty(4, 256, device="meta"), "meta"),
    }


def _tensor_cases():
    for fam in FAMILIES:
        for v, (make, words) in _variants().items():
            def run(d, make=make, fam=fam):
                from quantlab.quantize import quantize

                x = make()
                return x, quantize(x, fam)
            case("tensors", f"quantize({fam}) {v}", words, run,
                 check=lambda r: tensor_check(r[0])(r[1]))


def _more_tensor_cases():
    def outlier_run(scheme, v):
        def run(d):
            from quantlab.quantize import quantize

            x = randn(4, 256)
            x[1, 5] = v
            return x, quantize(x, scheme)
        return run

    for scheme, v in (("w4a16_asym", 1e6), ("gguf_q4_0", 1e6), ("gguf_q8_0", 1e38)):
        case("tensors", f"quantize({scheme}) {v:g}", "overflow",
             outlier_run(scheme, v), check=lambda r: tensor_check(r[0])(r[1]))

    def scheme_run(**kw):
        def run(d):
            from quantlab.quantize import quantize
            from quantlab.schemes import TensorScheme

            x = randn(64, 256)
            return x, quantize(x, TensorScheme("e4m3" if "block" in kw else "int4", **kw))
        return run

    case("tensors", "TensorScheme(block=(0, 128))", r"block=\(0, 128\)",
         scheme_run(granularity="block", block=(0, 128)), check=lambda r: "accepted")
    case("tensors", "TensorScheme(group_size=2.5)", r"group_size=2\.5.*integer",
         scheme_run(granularity="group", group_size=2.5), check=lambda r: "accepted")

    def static_act(scale):
        def run(d):
            torch = _torch()
            from quantlab.quantize import quantize
            from quantlab.schemes import get_scheme

            return quantize(randn(2, 64), get_scheme("fp8_per_tensor").activations,
                            scale=torch.tensor(scale))
        return run

    case("tensors", "static activation scale 0", "scale.*positive", static_act(0.0))

    def blocks(g):
        def run(d):
            from quantlab.kernels.quantize import quantize_blocks

            return quantize_blocks(randn(2, 64), "nvfp4", global_scale=g)
        return run

    case("tensors", "quantize_blocks(nvfp4, global_scale=0)", "global_scale", blocks(0.0))

    def per_token_nan(d):
        from quantlab.kernels.quantize import quantize_per_token
        from quantlab.quantize import dequantize

        x = randn(3, 64)
        x[1, 5] = float("nan")
        return dequantize(quantize_per_token(x, "e4m3"))

    case("tensors", "Triton per-token quantize, a NaN row", "NaN", per_token_nan,
         check=lambda r: None if bool(_torch().isnan(r[1]).all()) and bool(
             _torch().isfinite(r[[0, 2]]).all()) else "the NaN row decodes to finite values")


# ---------------------------------------------------------------- models

def _model_cases():
    def qm(model_fn, scheme="w8a16", **kw):
        def run(d):
            from quantlab.nn import quantize_model

            return quantize_model(model_fn(), scheme, **kw)
        return run

    def nan_model():
        m = llama()
        m.model.layers[1].mlp.down_proj.weight.data[0, 0] = float("nan")
        return m

    case("models", "quantize_model, NaN in one weight", r"layers\.1\.mlp\.down_proj.*NaN",
         qm(nan_model))
    case("models", "quantize_model on a quantized model", "already quantized",
         qm(lambda: quantized()))
    case("models", "quantize_model ignore pattern typo", "lm_haed.*matches no",
         qm(llama, ignore=("lm_haed",)))
    case("models", "quantize_model overrides pattern typo", "down_prj",
         qm(llama, overrides={"mlp.down_prj": "w4a16"}))
    case("models", "quantize_model overrides 're:['", "regular expression",
         qm(llama, overrides={"re:[": None}))

    def zero_act(d):
        torch = _torch()
        from quantlab.nn import quantize_model

        return quantize_model(llama(), "fp8_per_tensor", act_scales={
            "model.layers.0.self_attn.q_proj": torch.tensor(0.0)})

    case("models", "quantize_model static activation scale 0", "q_proj.*scale", zero_act)

    def no_act_scales(d):
        from quantlab.nn import QuantLinear, quantize_model

        m = quantize_model(llama(), "fp8_per_tensor")
        return [n for n, q in m.named_modules() if isinstance(q, QuantLinear)]

    case("models", "quantize_model static scheme without act_scales", "static|act_scales|calib",
         no_act_scales)

    def no_linear(d):
        torch = _torch()
        from quantlab.nn import quantize_model

        return quantize_model(torch.nn.Sequential(torch.nn.Embedding(10, 8)), "w8a16")

    case("models", "quantize_model, a model with no nn.Linear", "no .*Linear|nothing", no_linear)
    case("models", "quantize_model w4a16 on K=64 (< group 128)", "64 is not a multiple.*128",
         qm(llama, "w4a16"))

    def tied(d):
        import warnings

        from quantlab.nn import quantize_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return quantize_model(llama(tie=True), "w8a16", ignore=())

    case("models", "quantize_model, tied lm_head quantized", "tie", tied,
         check=lambda m: None if m.config.tie_word_embeddings is False
         else "tie_word_embeddings stays true beside a quantized lm_head")

    def meta_model(d):
        torch = _torch()
        from transformers import LlamaConfig, LlamaForCausalLM

        from quantlab.nn import quantize_model

        with torch.device("meta"):
            m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=1, num_attention_heads=2))
        return quantize_model(m, "w8a16")

    case("models", "quantize_model on meta tensors", "meta", meta_model)

    def gptq_ids(ids_fn):
        def run(d):
            from quantlab.algorithms.gptq import gptq

            return gptq(llama(), "w8a16", ids_fn())
        return run

    torch_ids = lambda lo, hi, n=512: (  # noqa: E731
        lambda: _torch().randint(lo, hi, (2, n), generator=_torch().Generator().manual_seed(0)))
    case("models", "GPTQ calibration ids beyond the vocabulary", "vocabulary has 64",
         gptq_ids(torch_ids(0, 100)))
    case("models", "GPTQ negative calibration ids", "vocabulary has 64",
         gptq_ids(torch_ids(-5, 60)))

    def gptq_gpt2(d):
        from transformers import GPT2Config, GPT2LMHeadModel

        from quantlab.algorithms.gptq import gptq

        m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
        return gptq(m, "w8a16", torch_ids(0, 60)())

    case("models", "GPTQ on GPT-2 (Conv1D, not Llama)", "Conv1D|not a Llama", gptq_gpt2)

    def load(path_fn):
        def run(d):
            from quantlab.models import load_causal_lm

            return load_causal_lm(path_fn(d))
        return run


    def pickle_only(d):
        m = llama()
        m.config.save_pretrained(d / "m")
        _torch().save(m.state_dict(), d / "m" / "pytorch_model.bin")
        return d / "m"

    case("models", "load_causal_lm, a pickle-only folder", "never loads pickle", load(pickle_only))

    def config_list(d):
        (d / "m").mkdir()
        (d / "m" / "config.json").write_text("[]")
        return d / "m"

    case("models", "load_causal_lm, config.json is a list", r"config\.json|list|dict",
         load(config_list))


# ---------------------------------------------------------------- files

def _file_cases():
    def read_st(make):
        def run(d):
            from quantlab.io import read_safetensors

            return read_safetensors(make(d))
        return run

    good = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    case("files", "safetensors data_offsets [0]", "data_offsets", read_st(
        lambda d: raw_safetensors(d / "m.safetensors", {"w": {**good, "data_offsets": [0]}})))
    case("files", "safetensors shape as an int", "shape", read_st(
        lambda d: raw_safetensors(d / "m.safetensors", {"w": {**good, "shape": 4}})))
    case("files", "safetensors dtype as a list", "dtype", read_st(
        lambda d: raw_safetensors(d / "m.safetensors", {"w": {**good, "dtype": ["F32"]}})))
    case("files", "safetensors truncated data", "truncated|corrupt|offsets|bytes", read_st(
        lambda d: raw_safetensors(d / "m.safetensors", {"w": good}, data=b"\0" * 7)))

    def random_bytes(d):
        (d / "m.safetensors").write_bytes(os.urandom(64))
        return d / "m.safetensors"

    case("files", "safetensors wrong magic (random bytes)", "header|corrupt|safetensors",
         read_st(random_bytes))


    def a_dir(d):
        (d / "m.safetensors").mkdir()
        return d / "m.safetensors"

    case("files", "safetensors path is a directory", "directory", read_st(a_dir))

    def missing_shard(d):
        from quantlab.io import read_safetensors_dir

        (d / "m").mkdir()
        raw_safetensors(d / "m" / "model-00001-of-00002.safetensors", {"a": good})
        (d / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
        return read_safetensors_dir(d / "m")

    case("files", "safetensors index names a missing shard", "model-00002-of-00002|missing|shard",
         missing_shard, check=lambda t: None if "b" in t else "tensor 'b' silently dropped")

    def empty_dir(d):
        from quantlab.io import read_safetensors_dir

        (d / "m").mkdir()
        return read_safetensors_dir(d / "m")

    case("files", "read a folder with no safetensors", "no .*safetensors|safetensors", empty_dir,
         check=lambda t: None if t else "returned {} for a folder without weights")

    def ct_edit(edit):
        def run(d):
            from quantlab.io import audit

            export_ct(quantized(), d / "q")
            edit(d / "q")
            return audit(d / "q")
        return run

    def cfg(fn):
        def edit(q):
            c = json.loads((q / "config.json").read_text())
            (q / "config.json").write_text(json.dumps(fn(c)))
        return edit

    groups = lambda c: c["quantization_config"]["config_groups"]  # noqa: E731
    case("files", "config.json is a list", "JSON list", ct_edit(cfg(lambda c: [c])))
    case("files", "config_groups is a list", "config_groups must be an object",
         ct_edit(cfg(lambda c: c["quantization_config"].update(config_groups=["g"]) or c)))
    case("files", "config group weights is an int", "'targets' and 'weights'",
         ct_edit(cfg(lambda c: groups(c)["group_0"].update(weights=8) or c)))
    case("files", "config target 're:['", "regular expression",
         ct_edit(cfg(lambda c: groups(c)["group_0"].update(targets=["re:["]) or c)))
    case("files", "config weights without num_bits", "layout quantlab reads|num_bits",
         ct_edit(cfg(lambda c: groups(c)["group_0"]["weights"].pop("num_bits") and c)))
    case("files", "checkpoint without model.safetensors", "safetensors",
         ct_edit(lambda q: (q / "model.safetensors").unlink()),
         check=lambda r: "audited a folder with no weights")

    def nan_scale(q):
        from safetensors.torch import load_file, save_file

        t = load_file(q / "model.safetensors")
        k = "model.layers.0.mlp.up_proj.weight_scale"
        t[k] = t[k].clone()
        t[k].view(-1)[3] = float("nan")
        save_file(t, str(q / "model.safetensors"), metadata={"format": "pt"})

    case("files", "audit without --reference, a NaN weight_scale", "NaN", ct_edit(nan_scale),
         check=lambda r: None if any("up_proj" in p for p in r.problems)
         else "the NaN scale passes the audit")

    def gguf_file(d, qtype="Q8_0", truncate=None):
        import gguf
        import numpy as np

        path = d / "m.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_block_count(1)
        t = getattr(gguf.GGMLQuantizationType, qtype)
        w.add_tensor("blk.0.ffn_down.weight", gguf.quants.quantize(
            np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32), t),
            raw_dtype=t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        if truncate:
            path.write_bytes(path.read_bytes()[:truncate])
        return path

    def audit_of(make):
        def run(d):
            from quantlab.io import audit

            return audit(make(d))
        return run

    case("files", "GGUF Q5_0 layer", "Q5_0", audit_of(lambda d: gguf_file(d, "Q5_0")),
         check=lambda r: None if all(x.status == "UNSUPPORTED" for x in r.layers)
         else "a Q5_0 layer reported as " + ",".join(x.status for x in r.layers))
    case("files", "GGUF truncated", "truncated|corrupt|GGUF|bytes|offset",
         audit_of(lambda d: gguf_file(d, truncate=200)))

    def bad_magic(d):
        (d / "m.gguf").write_bytes(b"GGUX" + os.urandom(60))
        return d / "m.gguf"

    case("files", "GGUF wrong magic", "magic|not a GGUF|GGUF", audit_of(bad_magic))


    def sniff(d):
        from quantlab.io import audit

        (d / "model.bin").write_bytes(b"PK\x03\x04" + b"\0" * 64)
        real = Path.read_bytes
        Path.read_bytes = lambda self: (_ for _ in ()).throw(
            AssertionError("audit read the whole file to sniff its magic"))
        try:
            return audit(d / "model.bin")
        finally:
            Path.read_bytes = real

    case("files", "audit sniffs a file's magic (reads 4 bytes)", "neither", sniff)


# ---------------------------------------------------------------- export

def _export_cases():
    def atomic(out_fn, overwrite=True, is_dir=True, source_fn=None, body=None):
        def run(d):
            from quantlab.io.safetensors_io import atomic_output

            out = out_fn(d)
            with atomic_output(out, overwrite, is_dir, source=source_fn(d) if source_fn else None
                               ) as tmp:
                if body:
                    body(tmp)
                (tmp / "model.safetensors" if is_dir else tmp).write_text("new")
            return out
        return run

    case("export", "--overwrite onto a user folder", "not a quantlab export",
         atomic(lambda d: d / "mine"), setup=user_folder)

    def source(d):
        (d / "model").mkdir()
        (d / "model" / "model.safetensors").write_text("weights")

    case("export", "--overwrite onto the source model", "source model",
         atomic(lambda d: d / "model", source_fn=lambda d: d / "model"), setup=source)
    def nested_source(d):
        (d / "models" / "llama").mkdir(parents=True)
        (d / "models" / "llama" / "model.safetensors").write_text("weights")

    case("export", "--out onto the source model's parent", "source model",
         atomic(lambda d: d / "models", source_fn=lambda d: d / "models" / "llama"),
         setup=nested_source)
    case("export", "--out . --overwrite", "working folder", atomic(lambda d: Path(".")),
         setup=lambda d: (d / "keep.txt").write_text("x"))

    def link(d):
        prior_export(d, "real")
        (d / "link").symlink_to(d / "real")

    case("export", "--out a symlink to an export", "symlink", atomic(lambda d: d / "link"),
         setup=link)
    case("export", "--out exists, no --overwrite", "exists.*overwrite",
         atomic(lambda d: d / "out", overwrite=False), setup=prior_export)

    case("export", "GGUF --overwrite onto a non-GGUF file", "not a GGUF file",
         atomic(lambda d: d / "notes.gguf", is_dir=False),
         setup=lambda d: (d / "notes.gguf").write_text("my notes"))

    def replaces_export(d):
        run = atomic(lambda d: d / "out")
        run(d)
        return (d / "out" / "model.safetensors").read_text()

    case("export", "--overwrite replaces an earlier export", "-", replaces_export,
         check=lambda r: None if r == "new" else f"the old export is still there: {r!r}",
         setup=prior_export)

    def killed(d):
        code = ("import os, signal, sys\nfrom quantlab.io.safetensors_io import atomic_output\n"
                "with atomic_output(sys.argv[1]) as t:\n"
                "    (t / 'x').write_text('half')\n    os.kill(os.getpid(), signal.SIGKILL)\n")
        subprocess.run([sys.executable, "-c", code, str(d / "out")], check=False)
        atomic(lambda d: d / "out", overwrite=False)(d)
        return sorted(p.name for p in d.iterdir())

    case("export", "a killed export's .partial left behind", "-", killed,
         check=lambda names: None if names == ["out"] else f"left behind: {names}")

    def modes(d):
        old = os.umask(0o022)
        try:
            out = atomic(lambda d: d / "out", overwrite=False)(d)
        finally:
            os.umask(old)
        return out.stat().st_mode & 0o777, (out / "model.safetensors").stat().st_mode & 0o777

    case("export", "export modes under umask 022", "-", modes,
         check=lambda m: None if m == (0o755, 0o644) else f"modes {oct(m[0])}/{oct(m[1])}")

    def fsync(d):
        events = []
        real_fsync, real_replace = os.fsync, os.replace
        os.fsync = lambda fd: events.append("fsync") or real_fsync(fd)
        os.replace = lambda a, b: events.append("replace") or real_replace(a, b)
        try:
            atomic(lambda d: d / "out", overwrite=False)(d)
        finally:
            os.fsync, os.replace = real_fsync, real_replace
        return events

    case("export", "files fsynced before the rename", "-", fsync,
         check=lambda e: None if "fsync" in e and e.index("fsync") < e.index("replace")
         else f"events {e}")

    def full(exc):
        def body(tmp):
            raise exc()
        return atomic(lambda d: d / "out", overwrite=False, body=body)

    case("export", "disk full (ENOSPC) mid-export", "disk full",
         full(lambda: OSError(errno.ENOSPC, "No space left on device")))

    class SafetensorError(Exception):
        pass

    case("export", "disk full from safetensors (SafetensorError)", "disk full",
         full(lambda: SafetensorError("No space left on device (os error 28)")))
    case("export", "disk full from GGUF (short write)", "disk full",
         full(lambda: OSError("34816 requested and 9888 written")))

    def tokenizer_link(d):
        torch = _torch()
        from quantlab.io.compressed_tensors import write_config_and_tokenizer

        (d / "model").mkdir()
        (d / "out").mkdir()
        (d / "model" / "tokenizer.json").symlink_to(d / "secret")
        write_config_and_tokenizer(d / "out", {}, torch.bfloat16, {}, d / "model")
        return (d / "out" / "tokenizer.json").exists()

    case("export", "tokenizer symlink out of the model folder", "outside the model folder",
         tokenizer_link, setup=lambda d: (d / "secret").write_text("ssh key"))

    def tied_export(d):
        import warnings

        from quantlab.nn import quantize_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = export_ct(quantize_model(llama(tie=True), "w8a16", ignore=()), d / "q")
        return json.loads((out / "config.json").read_text())["tie_word_embeddings"]

    case("export", "tied embeddings beside a quantized lm_head", "tie", tied_export,
         check=lambda t: None if t is False else "exports tie_word_embeddings=true")


    def unquantized(d):
        return export_ct(llama(), d / "q")

    case("export", "export an unquantized model", "no QuantLinear|not quantized|quantize_model",
         unquantized, check=lambda out: "wrote a checkpoint with no quantized layer")

    def gguf_of(scheme, name="m.gguf"):
        def run(d):
            from quantlab.io.gguf import export_gguf
            from quantlab.models import load_causal_lm
            from quantlab.nn import quantize_model

            model, tok = load_causal_lm()
            return export_gguf(quantize_model(model, scheme), d / name, tok)
        return run

    case("export", "GGUF export of a w8a16 model", "gguf_q8_0|gguf_q4_0|GGUF", gguf_of("w8a16"))


# ---------------------------------------------------------------- KV cache

def _kv_cases():
    def kv(T=8, D=64, seed=0):
        return randn(1, 2, T, D, seed=seed), randn(1, 2, T, D, seed=seed + 1)

    def cache_run(codec, fn, **kw):
        def run(d):
            from quantlab.kv import QuantizedKVCache

            c = QuantizedKVCache(codec, num_layers=1, **kw)
            return fn(c)
        return run

    for bad in (0.0, float("nan")):
        case("kv", f"static_scales {bad}", "finite and positive",
             cache_run("fp8_e4m3", lambda c: c, static_scales=[(bad, 1.0)]))
    case("kv", "static_scales of the wrong length", "2 entries for 1 layers",
         cache_run("fp8_e4m3", lambda c: c, static_scales=[(1.0, 1.0)] * 2))

    def nan_then(codec, T=128):
        def fn(c):
            k, v = kv(T)
            k[0, 0, 3, 7] = float("nan")
            out1, _ = c.update(k, v, 0)
            out2, _ = c.update(*kv(1, seed=5), 0)
            return int(_torch().isnan(out1).sum()), int(_torch().isnan(out2).sum())
        return cache_run(codec, fn)

    nan_ok = lambda r: None if r == (1, 1) else f"one NaN key became {r[0]} NaNs, then {r[1]}"  # noqa: E731
    case("kv", "one NaN key, fp8_e4m3 automatic scale", "NaN", nan_then("fp8_e4m3"), check=nan_ok)
    case("kv", "one NaN key, fp8_per_token_head", "NaN", nan_then("fp8_per_token_head"),
         check=nan_ok)
    for codec in ("int8_per_token_head", "kivi_4", "turbo_4"):
        case("kv", f"one NaN key, {codec}", "NaN or inf", nan_then(codec), check=nan_ok)

    def refused_keeps_state(d):
        from quantlab.kv import QuantizedKVCache

        c = QuantizedKVCache("kivi_4", num_layers=1)
        c.update(*kv(32), 0)
        k, v = kv(128, seed=3)
        k[0, 1, 9, 9] = float("nan")
        try:
            c.update(k, v, 0)
        except ValueError:
            pass
        return c.layers[0].n_tokens

    case("kv", "a refused batch leaves the cache as it was", "-", refused_keeps_state,
         check=lambda n: None if n == 32 else f"the cache advanced to {n} tokens")

    def direct(codec, shape, role="k"):
        def run(d):
            from quantlab.kv import get_codec

            return get_codec(codec).encode(randn(*shape), role)
        return run

    case("kv", "turbo_4 codec called with head_dim 48", "power-of-two head_dim",
         direct("turbo_4", (1, 2, 8, 48), "v"))
    case("kv", "kivi_4 codec called with head_dim 48", "head_dim=48",
         direct("kivi_4", (1, 2, 32, 48), "v"))
    case("kv", "codec called with a 3-D tensor", "head_dim", direct("int8_per_token_head",
                                                                    (2, 8, 64)))
    case("kv", "codec called on empty input", "-", direct("turbo_4", (1, 2, 0, 64)),
         check=lambda p: None if p["codes"].shape[2] == 0 else "tokens from nothing")

    def first(kind):
        def fn(c):
            z = _torch().zeros(1, 2, 0 if kind == "empty" else 4, 64)
            return c.update(z, z.clone(), 0)
        return cache_run("fp8_e4m3", fn)

    case("kv", "automatic fp8 scale from an empty first batch", "static_scales", first("empty"))
    case("kv", "automatic fp8 scale from an all-zero first batch", "static_scales", first("zero"))
    case("kv", "layer_idx beyond the cache", "layer_idx=3",
         cache_run("int8_per_token_head", lambda c: c.update(*kv(), 3)))
    case("kv", "negative layer_idx", "layer_idx=-1",
         cache_run("int8_per_token_head", lambda c: c.update(*kv(), -1)))
    case("kv", "keys and values of different lengths", "keys .* and values",
         cache_run("int8_per_token_head", lambda c: c.update(kv(4)[0], kv(5)[1], 0)))
    case("kv", "int64 keys", "float tensor", cache_run(
        "fp8_per_token_head", lambda c: c.update(*(t.long() for t in kv()), 0)))

    def fp16_overflow(d):
        from quantlab.kv import get_codec

        k = randn(1, 2, 4, 64)
        k[0, 0, 0, 0] = 1e6
        return get_codec("fp16").decode(get_codec("fp16").encode(k, "k"), "k")

    case("kv", "fp16 cache, a key of 1e6", "65504", fp16_overflow,
         check=lambda d: None if bool(_torch().isfinite(d).all()) else "stored as inf")


# ---------------------------------------------------------------- CLI flags

def _cli_cases():
    small = ["--schemes", "w8a16", "--report", ""]
    ok_if_refused = lambda out: "ran to the end"  # noqa: E731
    for flag, value, words in (
            ("--eval-tokens", "0", "--eval-tokens.*too small"),
            ("--eval-tokens", "-5", "--eval-tokens.*too small"),
            ("--eval-tokens", "abc", "--eval-tokens.*not a whole number"),
            ("--seq-len", "0", "--seq-len.*>= 2"),
            ("--seq-len", "1", "--seq-len.*>= 2"),
            ("--calib-tokens", "0", "--calib-tokens.*too small"),
            ("--schemes", "", "--schemes: is empty"),
            ("--schemes", "w4a17", "unknown scheme 'w4a17'"),
            ("--algorithms", "", "--algorithms: is empty"),
            ("--algorithms", "gtpq", "--algorithms: unknown 'gtpq'")):
        argv = ["compare", *small, "--eval-tokens", "64", "--seq-len", "32", flag, value]
        case("cli", f"compare {flag} {value!r}", words, argv=argv, check=ok_if_refused)
    for flag, value, words in (("--size", "-3", "--size.*too small"),
                               ("--schemes", ",", "--schemes: is empty")):
        argv = ["weights", "--source", "gaussian", "--size", "64", flag, value]
        case("cli", f"weights {flag} {value!r}", words, argv=argv, check=ok_if_refused)
    case("cli", "weights --source gaussian --model X", "--model applies to --source model",
         argv=["weights", "--source", "gaussian", "--size", "64", "--model", "X"],
         check=ok_if_refused)
    exp = ["export", "--scheme", "w8a16", "--out", "q"]
    case("cli", "export --calib-tokens 0", "--calib-tokens.*too small",
         argv=[*exp, "--calib-tokens", "0"], check=ok_if_refused)
    case("cli", "export --shard-size 0", "--shard-size", argv=[*exp, "--shard-size", "0"],
         check=ok_if_refused)

    case("cli", "compare --model ''", "model name is empty",
         argv=["compare", *small, "--model", ""], check=ok_if_refused)
    case("cli", "export --out '' --overwrite", "working folder",
         argv=[*exp[:-1], "", "--overwrite"], setup=lambda d: (d / "keep.txt").write_text("x"),
         check=ok_if_refused)
    case("cli", "export --device nosuch", "--device.*nosuch",
         argv=[*exp, "--pipeline", "sequential", "--device", "nosuch"], check=ok_if_refused)

    def binary(d):
        (d / "eval.bin").write_bytes(bytes(range(256)))

    case("cli", "compare --eval-file binary", "not UTF-8 text",
         argv=["compare", *small, "--eval-file", "eval.bin"], setup=binary, check=ok_if_refused)


# ---------------------------------------------------------------- determinism

def _determinism_cases():
    def same(fn):
        def run(d):
            torch = _torch()

            a, b = fn(0), fn(1)
            return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        return run

    same_check = lambda r: None if r else "two runs differ"  # noqa: E731

    def quantize_twice(scheme):
        def fn(i):
            from quantlab.quantize import quantize

            q = quantize(randn(64, 256), scheme)
            return [q.codes, q.scales]
        return fn

    for scheme in ("nvfp4",):
        case("determinism", f"quantize({scheme}) twice", "-", same(quantize_twice(scheme)),
             check=same_check)

    def threads(i):
        torch = _torch()
        from quantlab.quantize import quantize

        torch.set_num_threads(1 + i)
        q = quantize(randn(512, 1024), "mxfp4")
        return [q.codes, q.scales]

    case("determinism", "quantize(mxfp4) on 1 and 2 threads", "-", same(threads), check=same_check)

    def export_twice(d):
        a, b = export_ct(quantized(), d / "a"), export_ct(quantized(), d / "b")
        return all((a / f).read_bytes() == (b / f).read_bytes()
                   for f in ("model.safetensors", "config.json"))

    case("determinism", "export twice, byte for byte", "-", export_twice, check=same_check)

    def gptq_twice(i):
        from quantlab.algorithms.gptq import gptq

        ids = _torch().randint(0, 64, (2, 256), generator=_torch().Generator().manual_seed(0))
        m = gptq(llama(), "w8a16", ids)
        return list(m.state_dict().values())

    case("determinism", "GPTQ twice", "-", same(gptq_twice), check=same_check)


    def cache_roundtrip(d):
        torch = _torch()
        from quantlab.kv import QuantizedKVCache

        a = QuantizedKVCache("kivi_2", num_layers=1)
        k, v = randn(1, 2, 160, 64), randn(1, 2, 160, 64, seed=1)
        out, _ = a.update(k, v, 0)
        b = QuantizedKVCache("kivi_2", num_layers=1)
        b.load_state_dict(a.state_dict(), a.save_metadata())
        nxt = randn(1, 2, 1, 64, seed=2)
        return torch.equal(a.update(nxt, nxt, 0)[0], b.update(nxt, nxt, 0)[0])

    case("determinism", "KV cache saved and loaded decodes the same", "-", cache_roundtrip,
         check=same_check)



for _make in (_tensor_cases, _more_tensor_cases, _model_cases, _file_cases, _export_cases,
              _kv_cases, _cli_cases, _determinism_cases):
    _make()


# ---------------------------------------------------------------- running and classifying

def classify_error(c: Case, etype: str, msg: str) -> str:
    if etype in BARE:
        return "unclear"
    return "clear" if re.search(c.words, msg, re.I | re.S) else "unclear"


def run_in_child(c: Case) -> dict:
    """Fork; the child runs the case in a fresh folder and writes one JSON line to a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        out = {}
        try:
            folder = Path(tempfile.mkdtemp(prefix="bad-input-")) / "w"
            folder.mkdir()
            os.chdir(folder)
            if c.setup:
                c.setup(folder)
            before = snapshot(folder.parent)
            try:
                result = c.run(folder)
                wrong = c.check(result) if c.check else "returned instead of raising"
                out = {"verdict": "clear" if wrong is None else "silent",
                       "detail": "right result" if wrong is None else wrong}
            except BaseException as err:  # noqa: BLE001 - every failure is a verdict
                msg = str(err)
                out = {"verdict": classify_error(c, type(err).__name__, msg),
                       "detail": f"{type(err).__name__}: {msg}"}
            gone = lost(before, snapshot(folder.parent),
                        keep_out=("w/out",) if c.name.startswith("--overwrite replaces") else ())
            if gone:
                out = {"verdict": "loss", "detail": f"changed or deleted: {gone[:3]}"}
        except BaseException:  # noqa: BLE001
            out = {"verdict": "unclear", "detail": "harness: " + traceback.format_exc()[-300:]}
        os.write(w, json.dumps(out).encode())
        os.close(w)
        os._exit(0)
    os.close(w)
    deadline = time.monotonic() + c.timeout
    chunks = []
    os.set_blocking(r, False)
    while True:
        try:
            chunk = os.read(r, 1 << 16)
            if chunk:
                chunks.append(chunk)
        except BlockingIOError:
            pass
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"verdict": "crash", "detail": f"hung past {c.timeout} s"}
        time.sleep(0.02)
    try:
        while chunk := os.read(r, 1 << 16):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    os.close(r)
    if os.WIFSIGNALED(status):
        return {"verdict": "crash", "detail": f"killed by signal {os.WTERMSIG(status)}"}
    if not chunks:
        return {"verdict": "crash", "detail": f"exited {os.WEXITSTATUS(status)} with no verdict"}
    return json.loads(b"".join(chunks))


def run_cli(c: Case) -> dict:
    with tempfile.TemporaryDirectory(prefix="bad-input-cli-") as tmp:
        folder = Path(tmp) / "w"
        folder.mkdir()
        if c.setup:
            c.setup(folder)
        before = snapshot(Path(tmp))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT)}
        try:
            p = subprocess.run([sys.executable, "-m", "quantlab.cli", *c.argv], cwd=folder,
                               env=env, capture_output=True, text=True, timeout=c.timeout)
        except subprocess.TimeoutExpired:
            return {"verdict": "crash", "detail": f"hung past {c.timeout} s"}
        gone = lost(before, snapshot(Path(tmp)))
        if gone:
            return {"verdict": "loss", "detail": f"changed or deleted: {gone[:3]}"}
        err = p.stderr.strip().splitlines()
        last = err[-1] if err else ""
        if p.returncode < 0:
            return {"verdict": "crash", "detail": f"killed by signal {-p.returncode}"}
        if p.returncode == 0:
            wrong = c.check(p.stdout) if c.check else "exit 0"
            return {"verdict": "clear" if wrong is None else "silent",
                    "detail": "right result" if wrong is None else f"exit 0: {wrong}"}
        if "Traceback (most recent call last)" in p.stderr:
            return {"verdict": "unclear", "detail": f"traceback: {last}"}
        verdict = "clear" if re.search(c.words, p.stderr, re.I) else "unclear"
        return {"verdict": verdict, "detail": f"exit {p.returncode}: {last}"}


def survey(only: set[str], jobs: int) -> list[dict]:
    import torch

    torch.set_num_threads(1)  # no OpenMP pool before fork; each child may set its own
    if not torch.cuda.is_available():  # the Triton kernels' cases run interpreted on a CPU
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import gguf  # noqa: F401  (import once, before the forks: each case starts in ms)
    import safetensors.torch  # noqa: F401
    from transformers import (  # noqa: F401
        AutoModelForCausalLM,
        AutoTokenizer,
        GPT2LMHeadModel,
        LlamaForCausalLM,
    )

    import quantlab.algorithms.awq  # noqa: F401
    import quantlab.algorithms.gptq  # noqa: F401
    import quantlab.io  # noqa: F401
    import quantlab.io.compressed_tensors  # noqa: F401
    import quantlab.kv  # noqa: F401
    import quantlab.nn  # noqa: F401
    import quantlab.quantize  # noqa: F401

    chosen = [c for c in CASES if c.category in only]
    rows: dict[int, dict] = {}

    def timed(fn, c):
        t0 = time.monotonic()
        return {**fn(c), "seconds": round(time.monotonic() - t0, 1)}

    def record(i, c, res):
        rows[i] = {"category": c.category, "name": c.name, **res}
        print(f"{c.category:12s} {res['verdict']:8s} {res['seconds']:5.1f} s  {c.name}",
              flush=True)

    cli = [(i, c) for i, c in enumerate(chosen) if c.argv is not None]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(timed, run_cli, c): (i, c) for i, c in cli}
        for i, c in enumerate(chosen):
            if c.argv is None:
                record(i, c, timed(run_in_child, c))
        for f, (i, c) in futures.items():
            record(i, c, f.result())
    return [rows[i] for i in sorted(rows)]


def counts(rows: list[dict]) -> dict[str, Counter]:
    by = {cat: Counter() for cat in CATEGORIES if any(r["category"] == cat for r in rows)}
    for r in rows:
        by[r["category"]][r["verdict"]] += 1
    return by


def table(rows: list[dict]) -> str:
    by = counts(rows)
    lines = ["| category | cases | " + " | ".join(VERDICTS) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in VERDICTS) + " |"]
    total = Counter()
    for cat, cnt in by.items():
        total.update(cnt)
        lines.append(f"| {cat} | {sum(cnt.values())} | "
                     + " | ".join(str(cnt[v]) for v in VERDICTS) + " |")
    lines.append(f"| **all** | **{sum(total.values())}** | "
                 + " | ".join(f"**{total[v]}**" for v in VERDICTS) + " |")
    return "\n".join(lines)


def short(text: str, n: int = 160) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= n else text[: n - 3] + "..."


BEGIN, END = "<!-- survey:begin (scripts/bad_input_survey.py) -->", "<!-- survey:end -->"


def write_note(rows: list[dict], path: Path, seconds: float) -> None:
    """Write the counts and the rows between BEGIN and END of notes/bad-input.md; the prose
    around them is kept (a new note gets a short heading)."""
    import torch

    bad = [r for r in rows if r["verdict"] != "clear"]
    block = [BEGIN, "", table(rows), "",
             f"{len(rows)} cases, {seconds / 60:.0f} min on a 2-core CPU, torch "
             f"{torch.__version__} (`.venv/bin/python scripts/bad_input_survey.py`).", "",
             "Cases that are not clear:", ""]
    if bad:
        block += ["| category | case | verdict | what happened |", "| --- | --- | --- | --- |"]
        block += [f"| {r['category']} | {short(r['name'], 60)} | {r['verdict']} | "
                  f"{short(r['detail'])} |" for r in bad]
    else:
        block.append("none: every case raises a clear error or does the right thing.")
    block += ["", "<details><summary>Every case</summary>", "",
              "| category | case | verdict |", "| --- | --- | --- |"]
    block += [f"| {r['category']} | {short(r['name'], 70)} | {r['verdict']} |" for r in rows]
    block += ["", "</details>", "", END]
    text = path.read_text() if path.exists() else "# Bad input: the survey (issue 18)\n\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + "\n".join(block) + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(block) + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(CATEGORIES),
                   help=f"comma-separated categories (default all: {','.join(CATEGORIES)})")
    p.add_argument("--jobs", type=int, default=2, help="CLI subprocesses at a time")
    p.add_argument("--no-write", action="store_true", help="do not write notes/bad-input.md")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    args = p.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if unknown := only - set(CATEGORIES):
        p.error(f"--only: unknown categories {sorted(unknown)}; pick from {CATEGORIES}")
    if args.list:
        for c in CASES:
            print(f"{c.category:12s} {c.name}")
        print(f"{len(CASES)} cases")
        return 0
    start = time.monotonic()
    rows = survey(only, args.jobs)
    seconds = time.monotonic() - start
    print()
    print(table(rows))
    for r in rows:
        if r["verdict"] != "clear":
            print(f"  {r['verdict']:8s} {r['category']}: {r['name']}: {short(r['detail'], 200)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if not args.no_write and only == set(CATEGORIES):
        write_note(rows, ROOT / "notes" / "bad-input.md", seconds)
        print("wrote notes/bad-input.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
