"""`quantlab export` and `quantlab audit`, registered by quantlab.cli:

    quantlab export --scheme w4a16 --to compressed-tensors --out out/stdlib-llama-w4a16
    quantlab export --scheme gguf_q4_0 --to gguf --out out/          # out/<name>-Q4_0.gguf
    quantlab audit out/stdlib-llama-w4a16 --reference embedded
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
CONTAINERS = ("compressed-tensors", "gguf")  # the checkpoint container `export --to` writes


def at_least(low: int):
    """An argparse type: an int >= low, else a usage error saying so (not a traceback later)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"{n} is too small: give a number >= {low}")
        return n
    parse.__name__ = f"int >= {low}"
    return parse


def shard_size(text: str) -> int:
    """An argparse type for --shard-size: a positive number of bytes, with an optional
    KB/MB/GB/KiB/MiB/GiB unit."""
    from quantlab.io.stream import _size

    try:
        n = _size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give e.g. 500MB or 2GB") \
            from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is {n} bytes: give a positive size (e.g. "
                                         "500MB)")
    return n


def device_name(text: str) -> str:
    """An argparse type for --device: cpu, cuda or cuda:N, and a GPU that is here."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N") \
            from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: quantlab runs layers on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU here (torch "
                                         f"{torch.__version__}); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has "
                                         f"{torch.cuda.device_count()} GPU(s)")
    return text


def scheme_list(text: str) -> str:
    """An argparse type for --schemes: a non-empty comma-separated list (empty is an error, not
    "all schemes"; leave the flag out for all)."""
    if not [s for s in text.split(",") if s.strip()]:
        raise argparse.ArgumentTypeError("is empty; name schemes (e.g. w4a16,nvfp4) or leave "
                                         "--schemes out to run every preset")
    return text


def read_text_file(path: str, flag: str) -> str:
    """The UTF-8 text of a --eval-file / --calib-file, or a ValueError saying what it is not."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{flag} {path} is not UTF-8 text (byte {err.start} is "
                         f"{data[err.start]:#04x}; a binary file?): give a plain-text "
                         "file") from None
    if "\x00" in text:
        raise ValueError(f"{flag} {path} holds NUL bytes, so it is binary, not text: give a "
                         "plain-text file")
    return text


def _load(model_arg: str | None):
    """(model, tokenizer, source directory or None, display name)."""
    from quantlab import models

    model, tok = models.load_causal_lm(model_arg)
    if model_arg is None:
        return model, tok, models.embedded_lm_dir(), models.EMBEDDED_LM
    src = Path(model_arg) if Path(model_arg).is_dir() else None
    return model, tok, src, Path(model_arg).name


def _calib_ids(tok, calib_file: str | None, n_tokens: int) -> torch.Tensor:
    from quantlab import models
    from quantlab.eval.lm import token_windows

    text = read_text_file(calib_file, "--calib-file") if calib_file else models.calib_text()
    return token_windows(tok, text, 256, n_tokens)


def _print_rows(rows: list[dict]) -> bool:
    bad = [r for r in rows if not r["equal"] and not r.get("ties_only")]
    exact = sum(r["equal"] for r in rows)
    ties = sum((not r["equal"]) and r.get("ties_only", False) for r in rows)
    print(f"Verified {len(rows)} layers with the peer's reader: {exact} bit-exact"
          + (f", {ties} differing only at {rows[0]['dtype']} rounding ties (NVFP4 global-scale "
             "convention)" if ties else "") + (f", {len(bad)} WRONG" if bad else ""))
    for r in bad:
        print(f"  {r['layer']}: {r['mismatches']} mismatches, max |diff| {r['max_abs_diff']:.3g}")
    return not bad


def cmd_export(args) -> int:
    from quantlab.algorithms.calibration import static_act_scales
    from quantlab.io import compressed_tensors as ct
    from quantlab.io import gguf as gg
    from quantlab.io import verify
    from quantlab.nn import quantize_model
    from quantlab.scales import NVFP4
    from quantlab.schemes import get_scheme

    scheme = get_scheme(args.scheme)
    needs_calib = (args.algorithm != "rtn" or scheme.activations is not None and
                   (not scheme.activations.dynamic or scheme.activations.scale_rule == NVFP4))
    if _sequential(args):
        return _export_sequential(args, scheme, needs_calib)
    # the in-memory pipeline writes one file and runs on the CPU: flags it would ignore are errors
    ignored = [f for f, v in (("--shard-size", args.shard_size is not None),
                              ("--device", args.device and torch.device(args.device).type != "cpu"))
               if v]
    if ignored:
        raise ValueError(f"{ignored[0]} applies to the layer-by-layer pipeline: add --pipeline "
                         f"sequential (--model is {args.model or 'the embedded model'}), or leave "
                         f"{ignored[0]} out")
    model, tok, src, label = _load(args.model)
    calib = _calib_ids(tok, args.calib_file, args.calib_tokens) if needs_calib else None
    base_params = {n: p.detach().to(DTYPES[args.dtype]).float() for n, p in
                   model.named_parameters()}
    with torch.no_grad():  # quantize what the checkpoint stores: weights rounded to --dtype
        for n, p in model.named_parameters():
            p.copy_(base_params[n])
    if args.algorithm != "rtn":
        from quantlab.algorithms import ALGORITHMS

        qmodel = ALGORITHMS[args.algorithm](model, scheme, calib)
    else:
        act_scales = static_act_scales(model, scheme, calib) if calib is not None else None
        qmodel = quantize_model(model, scheme, act_scales=act_scales)
    if args.to == "gguf":
        out = Path(args.out)
        if out.suffix != ".gguf":
            out = out / f"{label}-{scheme.weights.scale_rule.ggml_type or 'X'}.gguf"
        path = gg.export_gguf(qmodel, out, tok, name=label, overwrite=args.overwrite)
        size = path.stat().st_size
        print(f"Wrote {path} ({size:,} bytes, {size / 2**20:.2f} MiB): {scheme.name}, "
              f"{scheme.weights.describe()}")
        ok = _print_rows(verify.verify_gguf(path, qmodel)) if args.verify else True
        print(f"Serve it: llama-server -m {path}   (or: llama-cli -m {path} -p 'import os')")
        return 0 if ok else 1
    igs = ct.calibrate_input_global_scales(qmodel, calib) if calib is not None else None
    path = ct.export_compressed_tensors(qmodel, args.out, tokenizer=tok, source_dir=src,
                                        dtype=DTYPES[args.dtype], input_global_scales=igs,
                                        overwrite=args.overwrite)
    size = (path / "model.safetensors").stat().st_size
    print(f"Wrote {path}/ (model.safetensors {size:,} bytes, {size / 2**20:.2f} MiB): "
          f"{scheme.name} as {ct.compression_format(scheme)}")
    ok = _print_rows(verify.verify_compressed_tensors(path, qmodel)) if args.verify else True
    print(f"Serve it: {ct.vllm_serve_command(path, scheme)}")
    return 0 if ok else 1


def _sequential(args) -> bool:
    """--pipeline auto: layer by layer for a local model directory, in memory for the embedded
    model or a hub id (both containers stream: compressed-tensors shards, GGUF tensors)."""
    if args.pipeline == "in-memory":
        return False
    if args.pipeline == "sequential":
        return True
    return args.model is not None and Path(args.model).is_dir()


def _export_sequential(args, scheme, needs_calib: bool) -> int:
    """quantlab.sequential.export_sequential: one decoder layer at a time, shards as they fill."""
    import time

    from quantlab import models
    from quantlab.io import compressed_tensors as ct
    from quantlab.sequential import export_sequential

    src = Path(args.model) if args.model else models.embedded_lm_dir()
    if args.model is not None and not src.is_dir():
        raise ValueError(f"--pipeline sequential reads a local model directory (config.json and "
                         f"safetensors shards); {args.model} is none: download it first, or use "
                         "--pipeline in-memory")
    tok = calib = None
    if needs_calib or args.to == "gguf":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    if needs_calib:
        calib = _calib_ids(tok, args.calib_file, args.calib_tokens)
    label = models.EMBEDDED_LM if args.model is None else src.name
    out = Path(args.out)
    if args.to == "gguf" and out.suffix != ".gguf":
        out = out / f"{label}-{scheme.weights.scale_rule.ggml_type or 'X'}.gguf"
    start = time.perf_counter()
    path = export_sequential(src, scheme, out, algorithm=args.algorithm, calib=calib,
                             device=args.device, dtype=DTYPES[args.dtype],
                             max_shard_bytes=args.shard_size or "1GB",
                             overwrite=args.overwrite,
                             tokenizer=tok, to=args.to, name=label)
    if args.to == "gguf":
        size = path.stat().st_size
        print(f"Wrote {path} ({size:,} bytes, {size / 2**30:.2f} GiB) layer by layer in "
              f"{time.perf_counter() - start:.1f} s: {scheme.name} ({args.algorithm})")
        print(f"Check it: quantlab audit {path} --reference {src}")
        print(f"Serve it: llama-server -m {path}")
        return 0
    shards = sorted(path.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in shards)
    print(f"Wrote {path}/ ({len(shards)} shards, {size:,} bytes, {size / 2**30:.2f} GiB) layer by "
          f"layer in {time.perf_counter() - start:.1f} s: {scheme.name} ({args.algorithm}) as "
          f"{ct.compression_format(scheme)}")
    print(f"Check it: quantlab audit {path} --reference {src}")
    print(f"Serve it: {ct.vllm_serve_command(path, scheme)}")
    return 0


class _DeprecatedFormat(argparse.Action):
    """--format, the old name of --to: still works for one release, with a note on stderr."""

    def __call__(self, parser, namespace, values, option_string=None):
        print("quantlab export: --format is deprecated and will be removed in the next release; "
              f"use --to {values}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    from quantlab.io.compressed_tensors import SUPPORTED

    e = subparsers.add_parser("export", help="quantize a model and write a checkpoint vLLM "
                              "(compressed-tensors) or llama.cpp (GGUF) loads")
    e.add_argument("--model", help="Hugging Face id or local directory (default: embedded LM)")
    e.add_argument("--scheme", required=True,
                   help=f"compressed-tensors: {', '.join(SUPPORTED)}; gguf: gguf_q8_0, gguf_q4_0")
    e.add_argument("--to", choices=CONTAINERS, default="compressed-tensors",
                   help="checkpoint container: compressed-tensors (vLLM) or gguf (llama.cpp)")
    e.add_argument("--format", dest="to", choices=CONTAINERS, action=_DeprecatedFormat,
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    e.add_argument("--out", required=True, help="output directory (gguf: directory or .gguf)")
    e.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16",
                   help="dtype of the unquantized tensors (embeddings, norms, ignored layers)")
    e.add_argument("--calib-file", help="text for static activation scales (default: embedded "
                   "calibration split)")
    e.add_argument("--calib-tokens", type=at_least(1), default=2048)
    e.add_argument("--overwrite", action="store_true", help="replace --out if it is an earlier "
                   "quantlab export (it holds .quantlab-export) or empty; never other files")
    e.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip re-reading the export with compressed-tensors / gguf")
    e.add_argument("--algorithm", choices=("rtn", "gptq", "awq"), default="rtn",
                   help="how weights are rounded (gptq/awq calibrate on --calib-file)")
    e.add_argument("--pipeline", choices=("auto", "sequential", "in-memory"), default="auto",
                   help="sequential: one decoder layer at a time from the safetensors shards, "
                   "memory bounded by a layer, written as layers finish (compressed-tensors "
                   "shards or GGUF tensors; auto: for a local --model directory); in-memory: "
                   "the whole model in float32 (the reference)")
    e.add_argument("--device", type=device_name, help="where sequential layers run: cpu, cuda "
                   "or cuda:N (default: cuda when present)")
    e.add_argument("--shard-size", type=shard_size,
                   help="largest output shard of the sequential pipeline (e.g. 500MB; default "
                   "1GB)")
    e.set_defaults(func=cmd_export)
    return e


def cmd_audit(args) -> int:
    from quantlab.io.audit import audit, format_audit
    from quantlab.io.stream import LazyCheckpoint

    reference = None
    if args.reference:
        if args.reference == "embedded":
            from quantlab.models import embedded_lm_dir

            ref_path = embedded_lm_dir()
        else:
            ref_path = Path(args.reference)
        if ref_path.is_file() and ref_path.suffix != ".safetensors":
            raise ValueError(f"--reference {ref_path}: only .safetensors files and directories "
                             "are read (pickle-based .bin/.pt files can run code when loaded)")
        reference = LazyCheckpoint(ref_path)  # each reference tensor read when its layer is
    report = audit(args.path, reference)
    print(format_audit(report))
    return 1 if report.problems else 0


def add_audit_parser(subparsers) -> argparse.ArgumentParser:
    a = subparsers.add_parser("audit", help="read a compressed-tensors directory or .gguf file: "
                              "per-layer scheme, error, layers left in full precision, bad scales")
    a.add_argument("path", help="compressed-tensors model directory or .gguf file")
    a.add_argument("--reference", help="unquantized safetensors checkpoint (directory or file) to "
                   "measure the error against, or 'embedded'")
    a.set_defaults(func=cmd_audit)
    return a
