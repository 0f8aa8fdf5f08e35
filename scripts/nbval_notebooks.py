"""The chapters as .ipynb for nbval: tests/nbval/NN-*.ipynb, generated from notebooks/NN-*.md.

nbval only collects .ipynb files and compares a re-run against the outputs stored in them, while
the chapters' source of truth is MyST markdown with no outputs. So each chapter is converted with
jupytext, executed once, and stored with the outputs of its `# NBVAL_CHECK_OUTPUT` cells only (a
printed summary of the numbers the chapter teaches; every other output is dropped, so no plotly
HTML is committed). `pytest --nbval-lax tests/nbval` then re-runs every cell, fails on any error
(the assert cells included) and compares the checked cells' text with what is stored here.

    python scripts/nbval_notebooks.py update            # re-execute and rewrite every chapter
    python scripts/nbval_notebooks.py update 04 05      # chapters whose name starts so
    python scripts/nbval_notebooks.py check             # sources in step with the markdown?

`check` (run by tests/test_notebooks.py) executes nothing: it fails when a chapter's code differs
from its stored notebook, and says to run `update`. Run `update` after changing a chapter and
commit the notebooks with it; review the diff of their outputs: a change there is a change in
what the book teaches.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
OUT = ROOT / "tests" / "nbval"
CHECK_MARK = "# NBVAL_CHECK_OUTPUT"


def chapters(prefixes: list[str] | None = None) -> list[Path]:
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]-*.md"))
    return [p for p in paths if not prefixes or any(p.name.startswith(x) for x in prefixes)]


def target(md: Path) -> Path:
    return OUT / (md.stem + ".ipynb")


def checked(cell) -> bool:
    return cell.cell_type == "code" and cell.source.lstrip().startswith(CHECK_MARK)


def convert(md: Path) -> nbformat.NotebookNode:
    """The chapter as a lean notebook: cells and kernelspec only, no ids or outputs."""
    nb = jupytext.read(md)
    nb.metadata = {"kernelspec": nb.metadata.get("kernelspec", {
        "display_name": "Python 3", "language": "python", "name": "python3"})}
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"  # stable ids: the diff shows only what changed
        cell.metadata = {k: v for k, v in cell.metadata.items() if k == "tags"}
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def update(md: Path, timeout: int = 600) -> float:
    """Execute one chapter (cwd tests/nbval, as nbval will) and store its checked outputs."""
    nb = convert(md)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(OUT)}}).execute()
    for cell in nb.cells:
        cell.metadata = {k: v for k, v in cell.metadata.items() if k == "tags"}  # no timings
        if cell.cell_type != "code":
            continue
        if checked(cell):  # nbval treats a cell with outputs but no count as never run
            for out in cell.outputs:
                if "metadata" in out:
                    out.metadata = {}
        else:
            cell.outputs, cell.execution_count = [], None
    nbformat.validate(nb)
    OUT.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target(md))
    return time.perf_counter() - t0


def out_of_step(md: Path) -> str | None:
    """Why the stored notebook no longer matches the chapter, or None."""
    path = target(md)
    if not path.exists():
        return f"{path.relative_to(ROOT)} is missing"
    stored = nbformat.read(path, as_version=4)
    fresh = convert(md)
    a = [(c.cell_type, c.source) for c in fresh.cells]
    b = [(c.cell_type, c.source) for c in stored.cells]
    if a != b:
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                 min(len(a), len(b)))
        return f"{path.relative_to(ROOT)} differs from {md.name} from cell {n} on"
    if not any(checked(c) and c.outputs for c in stored.cells):
        return f"{path.relative_to(ROOT)} has no stored {CHECK_MARK} output"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=["update", "check"])
    ap.add_argument("prefixes", nargs="*", help="only chapters whose name starts so")
    args = ap.parse_args(argv)
    if args.cmd == "check":
        problems = [p for p in map(out_of_step, chapters(args.prefixes)) if p]
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print("run: python scripts/nbval_notebooks.py update", file=sys.stderr)
        return 1 if problems else 0
    for md in chapters(args.prefixes):
        print(f"{md.stem:<24} {update(md):6.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
