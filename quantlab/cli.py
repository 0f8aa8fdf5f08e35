"""The `quantlab` command.

    quantlab compare                       # every preset on the embedded causal LM: perplexity, KL
    quantlab compare --model ID_OR_PATH --schemes w4a16,nvfp4 --algorithms rtn,gptq
    quantlab weights --source gaussian     # weight-tensor error only, on a 4096 x 4096 N(0, 1)
    quantlab formats                       # the element and scale formats, and the presets
    quantlab export --scheme w4a16 --to compressed-tensors --out DIR       # a vLLM checkpoint
    quantlab audit DIR --reference embedded                                # check a checkpoint
    quantlab throughput --model 8b --schemes bf16,w4a16   # tokens/s through the kernels
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from quantlab.formats import FORMATS
from quantlab.report import compare_weights, format_table, linear_weights
from quantlab.schemes import PRESETS, Scheme, get_scheme


def _scheme_names(arg: str | None) -> list[str]:
    return [s.strip() for s in arg.split(",") if s.strip()] if arg is not None else list(PRESETS)


def _schemes(arg: str | None) -> list[Scheme]:
    """--schemes resolved here, once (an unknown name fails before any work); the jobs below
    are handed the Scheme objects."""
    return [get_scheme(s) for s in _scheme_names(arg)]


def algorithm_list(text: str) -> str:
    """An argparse type for --algorithms: a non-empty comma-separated list of known names, checked
    before the model loads (not minutes later)."""
    from quantlab.compare import ALGORITHMS

    names = [a.strip() for a in text.split(",") if a.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"is empty; name algorithms (e.g. rtn,gptq) from "
                                         f"{', '.join(ALGORITHMS)}, or leave it out for rtn")
    if unknown := [a for a in names if a not in ALGORITHMS]:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown))}; pick from "
                                         f"{', '.join(ALGORITHMS)}")
    return text


def cmd_compare(args) -> int:
    from quantlab import compare as cmp
    from quantlab import models, viz

    schemes = _schemes(args.schemes)
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = cmp.choose_pipeline(args.pipeline, args.model, device)
    src = args.model or str(models.embedded_lm_dir())
    if pipeline == "sequential":  # one decoder layer in memory at a time (quantlab.compare)
        from pathlib import Path

        from transformers import AutoTokenizer

        if not Path(src).is_dir():
            raise ValueError(f"--pipeline sequential reads a local model directory (config.json "
                             f"and safetensors shards); {src} is none: download it first, or "
                             "use --pipeline in-memory")
        model, tok = None, AutoTokenizer.from_pretrained(src, local_files_only=True)
    else:
        model, tok = models.load_causal_lm(args.model)
    label = args.model or f"embedded {models.EMBEDDED_LM}"
    from quantlab.io.cli import read_text_file

    eval_text = (read_text_file(args.eval_file, "--eval-file") if args.eval_file
                 else models.eval_text())
    print(f"Model: {label}. Evaluating {len(schemes)} schemes x {len(algorithms)} algorithms "
          f"on {args.eval_tokens} held-out tokens ({pipeline}) ...")
    sizes = dict(seq_len=args.seq_len, eval_tokens=args.eval_tokens,
                 calib_tokens=args.calib_tokens)
    if model is None:
        base, rows = cmp.compare_sequential(src, tok, eval_text, models.calib_text(), schemes,
                                            algorithms, device=device, **sizes)
    else:
        base, rows = cmp.compare(model, tok, eval_text, models.calib_text(), schemes,
                                 algorithms, **sizes)
    table = [{"scheme": "unquantized", "algorithm": "-", "bits_per_weight": 16.0,
              "size_mib": base["size_mib"], "perplexity": base["perplexity"], "delta_ppl": 0.0,
              "kl": 0.0, "worst": "-"}]
    for r in rows:
        d = dataclasses.asdict(r)
        d["worst"] = (f"{r.worst_layer} ({r.worst_output_sqnr_db:.1f} dB)" if r.layers
                      else r.worst_layer)
        table.append(d)
    text = format_table(table, [
        ("scheme", "scheme", ""), ("algorithm", "algorithm", ""),
        ("bits_per_weight", "bits/weight", ".3f"), ("size_mib", "size MiB", ".2f"),
        ("perplexity", "perplexity", ".3f"), ("delta_ppl", "delta", "+.3f"),
        ("kl", "KL nats", ".5f"), ("worst", "worst layer (output SQNR)", "")])
    print(text)
    print(f"Perplexity over {base['eval_tokens']} tokens in windows of {base['seq_len']}; "
          "sizes count non-linear weights (embeddings, norms, ignored lm_head) at 16 bits.")
    if args.report:
        viz.html_report(args.report, f"quantlab compare: {label}", text,
                        [viz.perplexity_vs_bits(base, rows), viz.layer_sqnr_heatmap(rows)])
        print(f"Report: {args.report}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": label, "baseline": base,
                       "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    return 0


def _weights(args) -> tuple[str, dict]:
    if args.source == "gaussian":
        g = torch.Generator().manual_seed(args.seed)
        n = args.size
        return f"N(0, 1) tensor {n}x{n}, seed {args.seed}", {
            "gaussian": torch.randn(n, n, generator=g)}
    if args.model:
        return args.model, linear_weights(args.model)
    from quantlab.models import embedded_lm_dir

    path = embedded_lm_dir()
    return f"embedded model {path.name}", linear_weights(path)


def cmd_weights(args) -> int:
    _schemes(args.schemes)  # rows are labelled with the names as given
    schemes = _scheme_names(args.schemes)
    source, weights = _weights(args)
    n = sum(w.numel() for w in weights.values())
    print(f"Weights: {source}: {len(weights)} tensors, {n:,} elements")
    rows = [dataclasses.asdict(r) for r in compare_weights(weights, schemes)]
    for r in rows:
        r["mib"] = r["nbytes"] / 2**20
        r["worst"] = f"{r['worst_layer']} ({r['worst_sqnr_db']:.1f})"
    print(format_table(rows, [
        ("scheme", "scheme", ""), ("bits_per_weight", "bits/weight", ".4f"),
        ("mib", "MiB", ".3f"), ("sqnr_db", "SQNR dB", ".2f"), ("cosine", "cosine", ".6f"),
        ("max_abs_error", "max |err|", ".4g"), ("worst", "worst tensor (SQNR dB)", "")]))
    print(f"bf16 for reference: 16 bits/weight, {n * 2 / 2**20:.3f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"source": source, "rows": rows}, f, indent=1)
    return 0


def format_sqnr(fmt, x: torch.Tensor) -> float | None:
    """SQNR (dB) of x quantized to `fmt` with one fp32 absmax scale per row (asymmetric for
    unsigned integers); None for a scale-only format."""
    from quantlab.eval import sqnr_db
    from quantlab.quantize import fake_quantize
    from quantlab.schemes import TensorScheme

    if fmt.kind == "exponent":
        return None
    unsigned = fmt.kind == "int" and not fmt.signed
    return sqnr_db(x, fake_quantize(x, TensorScheme(fmt.name, "channel", symmetric=not unsigned)))


def cmd_formats(args) -> int:
    x = None
    if args.sqnr_size:
        x = torch.randn(args.sqnr_size, args.sqnr_size, generator=torch.Generator().manual_seed(0))
    rows = []
    for f in FORMATS.values():
        d = f.describe()
        db = format_sqnr(f, x) if x is not None else None
        rows.append({"name": d["name"], "bits": d["bits"], "max": d["max"],
                     "min": f.min_subnormal, "values": d["values"], "inf": d["has_inf"],
                     "nan": d["has_nan"], "sqnr": "-" if db is None else f"{db:.2f}"})
    cols = [("name", "format", ""), ("bits", "bits", "d"), ("max", "max", ".6g"),
            ("min", "smallest > 0", ".6g"), ("values", "values", "d"), ("inf", "inf", ""),
            ("nan", "NaN", "")]
    if x is not None:
        cols.append(("sqnr", f"SQNR dB, N(0,1) {args.sqnr_size}^2 per-row scale", ">"))
    print(format_table(rows, cols))
    print()
    print(format_table([{"name": s.name, "w": s.weights.describe(),
                         "a": s.activations.describe() if s.activations else "16-bit"}
                        for s in PRESETS.values()],
                       [("name", "scheme", ""), ("w", "weights", ""), ("a", "activations", "")]))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="quantlab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    from quantlab.io.cli import at_least, device_name, scheme_list

    c = sub.add_parser("compare", help="quantize a causal LM with each scheme: perplexity, KL")
    c.add_argument("--model", help="Hugging Face id or local directory (default: embedded LM)")
    c.add_argument("--schemes", type=scheme_list,
                   help=f"comma-separated subset of: {', '.join(PRESETS)}")
    c.add_argument("--algorithms", default="rtn", type=algorithm_list,
                   help="comma-separated subset of rtn, gptq, awq, smoothquant, quarot")
    c.add_argument("--eval-tokens", type=at_least(1), default=8192)
    c.add_argument("--seq-len", type=at_least(2), default=256,
                   help="tokens per perplexity window (>= 2: one predicted token)")
    c.add_argument("--calib-tokens", type=at_least(1), default=2048,
                   help="calibration tokens for static scales and the calibrated algorithms")
    c.add_argument("--eval-file", help="text to measure perplexity on (default: embedded eval)")
    c.add_argument("--pipeline", choices=("auto", "sequential", "in-memory"), default="auto",
                   help="sequential: one decoder layer in memory at a time, read from a local "
                   "model directory's safetensors (rtn, gptq); in-memory: the whole model in "
                   "float32; auto: sequential when that would not fit in half the free memory")
    c.add_argument("--device", type=device_name, help="where sequential layers run: cpu, cuda "
                   "or cuda:N (default: cuda when present)")
    c.add_argument("--report", default="quantlab-report.html", help="HTML report path ('' = none)")
    c.add_argument("--json", help="also write the rows to this JSON file")
    c.set_defaults(func=cmd_compare)
    w = sub.add_parser("weights", help="quantize weight tensors with each scheme: tensor error")
    w.add_argument("--source", choices=("model", "gaussian"), default="model")
    w.add_argument("--model", help="a safetensors file or directory (default: the embedded LM)")
    w.add_argument("--schemes", type=scheme_list,
                   help=f"comma-separated subset of: {', '.join(PRESETS)}")
    w.add_argument("--size", type=at_least(1), default=4096, help="gaussian: rows = cols")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--json", help="also write the rows to this JSON file")
    w.set_defaults(func=cmd_weights)
    from quantlab.io.cli import add_audit_parser, add_export_parser

    add_export_parser(sub)
    add_audit_parser(sub)
    from quantlab.throughput import add_parser as add_throughput_parser

    add_throughput_parser(sub)
    f = sub.add_parser("formats", help="list element formats and scheme presets")
    f.add_argument("--sqnr-size", type=at_least(0), default=0,
                   help="also measure each format's SQNR on an N x N N(0, 1) tensor")
    f.set_defaults(func=cmd_formats)
    args = p.parse_args(argv)
    if args.command == "weights" and args.source == "gaussian" and args.model:
        w.error("--model applies to --source model; drop --model, or drop --source gaussian "
                "to measure the model's weights")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError, ModuleNotFoundError) as err:
        print(f"quantlab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
