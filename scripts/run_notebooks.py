"""Execute the chapters (notebooks/*.md, jupytext MyST) top to bottom and report each one's time.

    python scripts/run_notebooks.py                 # every chapter
    python scripts/run_notebooks.py 01 06           # chapters whose file name starts so
    python scripts/run_notebooks.py --out build/nb  # also write the executed .ipynb files

A chapter fails when any cell raises (its assert cells included). Exit status 1 on failure.
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
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def chapters(prefixes: list[str] | None = None) -> list[Path]:
    """The chapter sources, sorted: notebooks/NN-*.md."""
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]-*.md"))
    if prefixes:
        paths = [p for p in paths if any(p.name.startswith(x) for x in prefixes)]
    return paths


def execute(path: Path, timeout: int = 300) -> tuple[nbformat.NotebookNode, float]:
    """Run one chapter in a fresh kernel (cwd notebooks/, the repository importable).
    Returns (executed notebook, seconds). Raises CellExecutionError on the first failing cell."""
    nb = jupytext.read(path)
    # The kernel must import this checkout's quantlab even without `pip install -e .`.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    # These chapters work on small tensors: one thread per kernel is as fast alone and far
    # faster when tests run in parallel on a loaded 2-core machine.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    t0 = time.perf_counter()
    client.execute()
    return nb, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prefixes", nargs="*", help="run only chapters whose name starts so")
    ap.add_argument("--out", type=Path, help="write executed notebooks here as .ipynb")
    args = ap.parse_args(argv)
    failed = 0
    for path in chapters(args.prefixes):
        try:
            nb, seconds = execute(path)
        except CellExecutionError as err:
            failed += 1
            print(f"FAIL {path.name}\n{err}", file=sys.stderr)
            continue
        print(f"ok   {path.name:<32} {seconds:6.1f} s")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, args.out / (path.stem + ".ipynb"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
