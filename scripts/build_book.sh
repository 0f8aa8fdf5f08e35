#!/usr/bin/env bash
# Build the book offline: book/_build/html/index.html. Every chapter is executed during the build.
#   scripts/build_book.sh            # uses the python on PATH (make book passes .venv's)
#   PYTHON=.venv/bin/python scripts/build_book.sh
# Stages book/ and notebooks/*.md into book/_build/src (Sphinx reads one source folder), copies
# plotly.min.js from the installed plotly package into _static (no CDN), then runs jupyter-book.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
ROOT=$(pwd)
SRC=book/_build/src
rm -rf "$SRC" book/_build/html
mkdir -p "$SRC/notebooks" "$SRC/_static"
cp book/_config.yml book/_toc.yml book/*.md "$SRC/"
cp notebooks/[0-9][0-9]-*.md "$SRC/notebooks/"
"$PYTHON" - "$SRC/_static" <<'PY'
import os, shutil, sys
import plotly
shutil.copy(os.path.join(os.path.dirname(plotly.__file__), "package_data", "plotly.min.js"),
            sys.argv[1])
PY
# The kernels import this checkout's quantlab even without `pip install -e .`.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Small tensors: one thread per kernel is as fast alone and much faster on a loaded machine.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
echo "book: build starts $(date +%T)"
"$PYTHON" -c "from jupyter_book.cli.main import main; main()" build "$SRC" --path-output book/_build/out --warningiserror --keep-going
rm -rf book/_build/html
mv book/_build/out/_build/html book/_build/html
echo "book: built $(date +%T): $ROOT/book/_build/html/index.html"
