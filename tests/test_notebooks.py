"""The chapters' sources are lean and in step with the notebooks nbval runs, and the JupyterLab
panels build and redraw. Executing the chapters is nbval's job (`make test`: pytest --nbval-lax
tests/nbval, which also compares each chapter's `# NBVAL_CHECK_OUTPUT` cell with its stored
output); the book build and browser check are in test_book.py."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("jupytext", reason="pip install -e '.[notebooks]'")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


NBVAL = _script("nbval_notebooks")
CHAPTERS = NBVAL.chapters()


def test_chapters_exist():
    names = [p.name for p in CHAPTERS]
    assert {"01-numbers.md", "02-one-layer.md", "06-fp4.md"} <= set(names)
    toc = (ROOT / "book" / "_toc.yml").read_text()
    for p in CHAPTERS:  # every chapter is in the book
        assert f"notebooks/{p.stem}" in toc, f"{p.name} is missing from book/_toc.yml"


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_nbval_notebook_in_step(path):
    """tests/nbval holds each chapter's code as it is now, with a stored checked output."""
    problem = NBVAL.out_of_step(path)
    assert problem is None, (f"{problem}: run python scripts/nbval_notebooks.py update "
                             f"{path.stem[:2]}")


def test_nbval_sees_the_checked_cells():
    """nbval compares a cell only when a line of it is exactly the marker comment."""
    from nbval.plugin import find_comment_markers

    for path in CHAPTERS:
        cells = [c for c in NBVAL.convert(path).cells if NBVAL.checked(c)]
        assert len(cells) == 1, f"{path.name}: {len(cells)} NBVAL_CHECK_OUTPUT cells"
        assert dict(find_comment_markers(cells[0].source)).get("check") is True


def test_chapter_sources_are_lean():
    """Chapters are jupytext MyST with no outputs or editor metadata; code cells stay short."""
    import jupytext

    for path in CHAPTERS:
        nb = jupytext.read(path)
        assert set(nb.metadata) <= {"jupytext", "kernelspec"}, f"{path.name}: {set(nb.metadata)}"
        for cell in nb.cells:
            if cell.cell_type == "code":
                n = len(cell.source.splitlines())
                assert n <= 15, f"{path.name}: a {n}-line cell; move the work into quantlab"


def test_bit_explorer_panel_redraws():
    from quantlab.widgets import bit_explorer

    panel = bit_explorer()
    fmt, code, bits, _ = panel.children
    fmt.value = "e2m1"
    assert code.max == 15
    code.value = 0b0111
    assert "= 6" in bits.value  # 0 11 1: 2^(3-1) x 1.5
    fmt.value = "int8"
    code.value = 0x80
    assert "= -128" in bits.value


def test_quantize_panel_redraws_and_explains_bad_choices():
    from quantlab.widgets import quantize_panel, tensor_scheme

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    panel = quantize_panel(w)
    (el, grp, sf), _ = panel.children[0].children, panel.children[1]
    el.value, grp.value, sf.value = "e2m1", "group 32", "e8m0"
    assert tensor_scheme("e2m1", "group 32", "e8m0").scale_rule == "mx_floor"
    with pytest.raises(ValueError, match="minifloat"):
        tensor_scheme("int4", "group 32", "e8m0")
    assert "application/vnd.plotly.v1+json" in panel.children[1].outputs[0]["data"]
    el.value = "int4"  # e8m0 with int4: the panel shows the error instead of raising
    assert "minifloat" in panel.children[1].outputs[0]["text"]
