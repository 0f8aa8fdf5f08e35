"""The `quantlab` command: compare schemes, list formats.

    quantlab compare                       # every preset on the embedded model's weights
    quantlab compare --source gaussian     # ... on a 4096 x 4096 N(0, 1) tensor
    quantlab formats                       # the element and scale formats
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from quantlab.formats import FORMATS
from quantlab.report import compare_weights, format_table, linear_weights
from quantlab.schemes import PRESETS, get_scheme


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


def cmd_compare(args) -> int:
    schemes = args.schemes.split(",") if args.schemes else list(PRESETS)
    for s in schemes:
        get_scheme(s)  # fail before any work on an unknown name
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
        ("max_abs_error", "max |err|", ".4g"), ("worst", "worst layer (SQNR dB)", "")]))
    print(f"bf16 for reference: 16 bits/weight, {n * 2 / 2**20:.3f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"source": source, "rows": rows}, f, indent=1)
    return 0


def cmd_formats(args) -> int:
    rows = []
    for f in FORMATS.values():
        d = f.describe()
        rows.append({"name": d["name"], "bits": d["bits"], "max": d["max"],
                     "min": f.min_subnormal,
                     "values": d["values"], "inf": d["has_inf"], "nan": d["has_nan"]})
    print(format_table(rows, [("name", "format", ""), ("bits", "bits", "d"),
                              ("max", "max", ".6g"), ("min", "smallest > 0", ".6g"),
                              ("values", "values", "d"), ("inf", "inf", ""), ("nan", "NaN", "")]))
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
    c = sub.add_parser("compare", help="quantize weights with each scheme and print the error")
    c.add_argument("--source", choices=("model", "gaussian"), default="model")
    c.add_argument("--model", help="a safetensors file or directory (default: the embedded LM)")
    c.add_argument("--schemes", help=f"comma-separated subset of: {', '.join(PRESETS)}")
    c.add_argument("--size", type=int, default=4096, help="gaussian: rows = cols")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", help="also write the rows to this JSON file")
    c.set_defaults(func=cmd_compare)
    f = sub.add_parser("formats", help="list element formats and scheme presets")
    f.set_defaults(func=cmd_formats)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"quantlab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
