#!/usr/bin/env bash
# Build the book offline: book/_build/html/index.html. Every chapter is executed during the build.
#   scripts/build_book.sh            # uses the python on PATH (make book passes .venv's)
#   PYTHON=.venv/bin/python scripts/build_book.sh
# Stages book/ and notebooks/*.md into book/_build/src (Sphinx reads one source folder), copies
# plotly.min.js and MathJax from installed packages into _static (no CDN), then runs jupyter-book.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
ROOT=$(pwd)
SRC=book/_build/src
rm -rf "$SRC" book/_build/html
mkdir -p "$SRC/notebooks" "$SRC/_static"
cp book/_config.yml book/_toc.yml book/*.md "$SRC/"
cp notebooks/[0-9][0-9]-*.md "$SRC/notebooks/"
"$PYTHON" - "$SRC" <<'PY'
import importlib.metadata, os, shutil, sys
import plotly
shutil.copy(os.path.join(os.path.dirname(plotly.__file__), "package_data", "plotly.min.js"),
            os.path.join(sys.argv[1], "_static"))
# MathJax 3.2.2 (the files of npm's mathjax@3.2.2 es5/) for book/_config.yml's mathjax_path, in
# html_extra_path (_extra), which Sphinx copies into the site as they are.
try:
    dist = importlib.metadata.distribution("sphinx-mathjax-offline")
except importlib.metadata.PackageNotFoundError:
    sys.exit("book: sphinx-mathjax-offline is missing (MathJax for the formulas): make install")
shutil.copytree(dist.locate_file("sphinx-mathjax-offline/static/mathjax"),
                os.path.join(sys.argv[1], "_extra", "_static", "mathjax"))
PY
# The kernels import this checkout's quantlab even without `pip install -e .`.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Small tensors: one thread per kernel is as fast alone and much faster on a loaded machine.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
echo "book: build starts $(date +%T)"
# The log keeps myst-nb's "Executed notebook in N seconds" per chapter (book/agenda.md's timings).
"$PYTHON" -c "from jupyter_book.cli.main import main; main()" build "$SRC" --path-output book/_build/out --warningiserror --keep-going 2>&1 | tee book/_build/build.log
rm -rf book/_build/html
mv book/_build/out/_build/html book/_build/html
echo "book: built $(date +%T): $ROOT/book/_build/html/index.html"
