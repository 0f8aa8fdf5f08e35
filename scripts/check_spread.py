"""How far each chapter's asserted numbers move across CPUs and thread counts.

Torch picks its CPU kernels by the instruction set (`ATEN_CPU_CAPABILITY` = default, avx2,
avx512; another CPU rounds differently) and splits reductions by thread count, so a number a
chapter asserts is only as exact as its spread over those. This script runs the chapters with
every `assert` rewritten to record, instead of raise: whether it held and the value of each
non-constant operand of each comparison in it (for `all(... for ...)` and `any(...)`, the
smallest and largest value over the loop).

    python scripts/check_spread.py record --out build/spread/avx2-t1.json  # this process's setting
    python scripts/check_spread.py sweep --out-dir build/spread            # every setting here
    python scripts/check_spread.py table build/spread/*.json               # spread against bounds

`sweep` runs `record` in a subprocess per (capability, threads) pair; a capability the CPU lacks
is skipped (torch would silently run a lower one). `table` prints, per asserted operand, its
min and max over the runs, the nearest constant bound in its comparison and the margin left in
units of the measured spread, and which chapters' `# NBVAL_CHECK_OUTPUT` cells printed
different text in different runs (nbval would fail there); it exits 1 on either, or when any
assert failed in any run.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CAPABILITIES = ("default", "avx2", "avx512")


# ---------------------------------------------------------------------------------------------
# Rewriting asserts into recording calls


def _is_const(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return _is_const(node.operand)
    if isinstance(node, ast.BinOp):
        return _is_const(node.left) and _is_const(node.right)
    return False


def _comparisons(test: ast.expr, src: str) -> list[dict]:
    """The Compare nodes of an assert's test, each with its operands and the loop it sits in."""
    out = []

    def visit(node, loop):
        if isinstance(node, ast.BoolOp):
            for v in node.values:
                visit(v, loop)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            visit(node.operand, loop)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("all", "any") and len(node.args) == 1
              and isinstance(node.args[0], ast.GeneratorExp) and loop is None):
            visit(node.args[0].elt, node.args[0])
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            out.append({"node": node, "loop": loop, "operands": operands,
                        "ops": [type(o).__name__ for o in node.ops]})

    visit(test, None)
    return out


def _operand_lambda(operand: ast.expr, loop: ast.GeneratorExp | None) -> ast.expr:
    """`lambda: operand`, or over a loop `lambda: [operand for ... in ...]`."""
    body: ast.expr = operand
    if loop is not None:
        body = ast.ListComp(elt=operand, generators=loop.generators)
    return ast.Lambda(args=ast.arguments(posonlyargs=[], args=[], vararg=None, kwonlyargs=[],
                                         kw_defaults=[], kwarg=None, defaults=[]), body=body)


class _Rewrite(ast.NodeTransformer):
    def __init__(self, cell: int, src: str, records: list):
        self.cell, self.src, self.records = cell, src, records

    def visit_Assert(self, node: ast.Assert):
        key = len(self.records)
        comps = _comparisons(node.test, self.src)
        meta = {"cell": self.cell, "line": node.lineno,
                "source": ast.get_source_segment(self.src, node) or ast.unparse(node),
                "comparisons": []}
        lambdas = []
        for c in comps:
            ops = []
            for i, operand in enumerate(c["operands"]):
                const = _is_const(operand)
                ops.append({"expr": ast.unparse(operand), "const": const,
                            "value": eval(ast.unparse(operand), {}) if const else None})
                if not const:
                    lambdas.append(ast.Tuple(elts=[ast.Constant(len(meta["comparisons"])),
                                                   ast.Constant(i),
                                                   _operand_lambda(operand, c["loop"])],
                                             ctx=ast.Load()))
            meta["comparisons"].append({"ops": c["ops"], "operands": ops,
                                        "loop": c["loop"] is not None})
        self.records.append(meta)
        call = ast.Call(func=ast.Name("__record_assert__", ast.Load()),
                        args=[ast.Constant(key), _operand_lambda(node.test, None),
                              ast.List(elts=lambdas, ctx=ast.Load())], keywords=[])
        return ast.copy_location(ast.Expr(call), node)


def _plain(v):
    """A JSON-able summary of one evaluated operand."""
    try:
        import torch

        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
    except ImportError:
        pass
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return v if not (isinstance(v, float) and not math.isfinite(v)) else repr(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return repr(v)[:200]


def record_chapter(path: Path) -> dict:
    """Execute one chapter in this process with its asserts recording; returns what they saw."""
    import jupytext

    nb = jupytext.read(path)
    records: list[dict] = []
    seen: dict[int, dict] = {}
    printed: dict[int, str] = {}

    def record(key, test, operands):
        entry = seen.setdefault(key, {"held": True, "values": {}})
        try:
            held = bool(test())
        except Exception as err:  # an assert that raises is a failed check
            held = False
            entry["error"] = f"{type(err).__name__}: {err}"
        entry["held"] = entry["held"] and held
        for ci, oi, fn in operands:
            try:
                v = fn()
            except Exception as err:
                v = f"error: {type(err).__name__}"
            vals = v if isinstance(v, list) else [v]
            vals = [_plain(x) for x in vals]
            slot = entry["values"].setdefault(f"{ci}:{oi}", [])
            slot.extend(vals)

    namespace = {"__name__": "__main__", "__record_assert__": record}
    cwd = os.getcwd()
    os.chdir(path.parent)
    t0 = time.perf_counter()
    try:
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            src = cell.source
            if any(line.lstrip().startswith(("%", "!")) for line in src.splitlines()):
                raise SystemExit(f"{path.name} cell {i}: IPython syntax is not supported here")
            tree = ast.parse(src)
            tree = ast.fix_missing_locations(_Rewrite(i, src, records).visit(tree))
            code = compile(tree, f"{path.name}[{i}]", "exec")
            if src.lstrip().startswith("# NBVAL_CHECK_OUTPUT"):  # what nbval will compare
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    exec(code, namespace)
                printed[i] = buf.getvalue()
            else:
                exec(code, namespace)
    finally:
        os.chdir(cwd)
    for key, meta in enumerate(records):
        meta.update(seen.get(key, {"held": None, "values": {}}))
    return {"chapter": path.stem, "seconds": time.perf_counter() - t0, "asserts": records,
            "checked_output": printed}


def chapters(prefixes: list[str]) -> list[Path]:
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]-*.md"))
    return [p for p in paths if not prefixes or any(p.name.startswith(x) for x in prefixes)]


def setting() -> dict:
    import torch

    return {"capability": torch.backends.cpu.get_cpu_capability(),
            "requested": os.environ.get("ATEN_CPU_CAPABILITY", ""),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": sys.version.split()[0]}


def cmd_record(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"setting": setting(), "chapters": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rc = 0
    for path in chapters(args.prefixes):
        try:
            res = record_chapter(path)
        except Exception as err:  # a chapter that does not run: say so, record the others
            print(f"{path.stem:<24} FAILED to run: {type(err).__name__}: {err}", flush=True)
            rc = 1
            continue
        failed = sum(a["held"] is False for a in res["asserts"])
        print(f"{path.stem:<24} {res['seconds']:6.1f} s  {len(res['asserts'])} asserts"
              f"  {failed} failed", flush=True)
        out["chapters"].append(res)
        args.out.write_text(json.dumps(out, indent=1))  # after every chapter
    return rc


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def cmd_sweep(args) -> int:
    flags = cpu_flags()
    have = {"default": True, "avx2": "avx2" in flags, "avx512": "avx512f" in flags}
    rc = 0
    for cap in args.capabilities:
        if not have.get(cap):
            print(f"skip {cap}: this CPU lacks it")
            continue
        for threads in args.threads:
            out = args.out_dir / f"{cap}-t{threads}.json"
            env = dict(os.environ, ATEN_CPU_CAPABILITY=cap, OMP_NUM_THREADS=str(threads))
            print(f"== {cap}, {threads} thread(s) -> {out}", flush=True)
            cmd = [sys.executable, __file__, "record", "--out", str(out),
                   "--threads", str(threads), *args.prefixes]
            rc |= subprocess.call(cmd, env=env)
    return rc


# ---------------------------------------------------------------------------------------------
# The table


def _numbers(vals) -> list[float]:
    return [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]


def cmd_table(args) -> int:
    runs = [json.loads(Path(p).read_text()) for p in args.files]
    labels = [f"{r['setting']['requested'] or r['setting']['capability']}"
              f"/{r['setting']['threads']}t/{r['setting']['torch']}" for r in runs]
    print("runs:", ", ".join(labels))
    failed = 0
    rows = []
    by_chapter: dict[str, list] = {}
    for r in runs:
        for ch in r["chapters"]:
            by_chapter.setdefault(ch["chapter"], []).append(ch)
    for chapter, chs in sorted(by_chapter.items()):
        for k, meta in enumerate(chs[0]["asserts"]):
            held = [c["asserts"][k].get("held") for c in chs if k < len(c["asserts"])]
            if not all(held):
                failed += 1
                print(f"FAILED in {held.count(False)}/{len(held)} runs: {chapter} "
                      f"cell {meta['cell']}: {meta['source'][:140]}")
            for ci, comp in enumerate(meta["comparisons"]):
                consts = [o["value"] for o in comp["operands"] if o["const"]]
                for oi, op in enumerate(comp["operands"]):
                    if op["const"]:
                        continue
                    per_run = [_numbers(c["asserts"][k]["values"].get(f"{ci}:{oi}", []))
                               for c in chs if k < len(c["asserts"])]
                    per_run = [v for v in per_run if v]
                    if not per_run:
                        continue
                    vals = [x for v in per_run for x in v]
                    lo, hi = min(vals), max(vals)
                    bounds = [b for b in consts if isinstance(b, (int, float))]
                    margin = min((abs(v - b) for b in bounds for v in vals), default=math.inf)
                    # Across runs, element by element (a loop or a list gives several values).
                    n = len(per_run[0])
                    if all(len(v) == n for v in per_run):
                        spread = max(max(v[j] for v in per_run) - min(v[j] for v in per_run)
                                     for j in range(n))
                    else:
                        spread = math.nan
                    rows.append((chapter, meta["cell"], op["expr"][:60], lo, hi, spread,
                                 bounds, margin))
    differ = 0
    for chapter, chs in sorted(by_chapter.items()):
        texts = {json.dumps(c.get("checked_output", {}), sort_keys=True) for c in chs}
        if len(texts) > 1:
            differ += 1
            print(f"NBVAL_CHECK_OUTPUT differs across runs: {chapter}")
            for t in sorted(texts):
                print("   ", t[:400])
    if args.markdown:
        # Only numbers that moved by more than 1e-4 of their size: the rest moved in the last
        # digits, which no bound comes near.
        print("\n| chapter | asserted number | min | max | spread | bound(s) | margin / spread |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for chapter, _cell, expr, lo, hi, spread, bounds, margin in rows:
            if bounds and spread > 1e-4 * max(abs(lo), abs(hi)):
                ratio = margin / spread
                print(f"| {chapter[:2]} | `{expr}` | {lo:.5g} | {hi:.5g} | {spread:.2g} | "
                      f"{', '.join(f'{b:g}' for b in bounds)} | {ratio:.2g} |")
    print(f"\n{'chapter':<18}{'cell':>5}  {'operand':<60} {'min':>11} {'max':>11} "
          f"{'spread':>9} {'margin':>9} bounds")
    tight = 0
    for chapter, cell, expr, lo, hi, spread, bounds, margin in rows:
        flag = ""
        if bounds and spread > 0 and margin < 3 * spread:
            flag, tight = "  <-- margin < 3x spread", tight + 1
        if args.all or flag or spread > 0:
            print(f"{chapter:<18}{cell:>5}  {expr:<60} {lo:11.5g} {hi:11.5g} {spread:9.2g} "
                  f"{margin:9.2g} {bounds}{flag}")
    print(f"\n{len(rows)} operands, {tight} with a margin under 3x their spread, "
          f"{failed} asserts failed somewhere, {differ} chapters whose checked output differs")
    return 1 if failed or differ else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="run chapters in this process, recording every assert")
    r.add_argument("prefixes", nargs="*")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--threads", type=int, default=0)
    s = sub.add_parser("sweep", help="record under each CPU capability and thread count")
    s.add_argument("prefixes", nargs="*")
    s.add_argument("--out-dir", type=Path, default=ROOT / "build" / "spread")
    s.add_argument("--capabilities", nargs="+", default=list(CAPABILITIES))
    s.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    t = sub.add_parser("table", help="spread of each asserted operand against its bounds")
    t.add_argument("files", nargs="+")
    t.add_argument("--all", action="store_true", help="also rows that did not move")
    t.add_argument("--markdown", action="store_true",
                   help="also a markdown table of the bounded numbers that moved")
    args = ap.parse_args(argv)
    return {"record": cmd_record, "sweep": cmd_sweep, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
