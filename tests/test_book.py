"""The book builds offline (executing every chapter) and every page works in a real browser:
no script errors, no request leaving the site, every plotly figure drawn, every slider step and
dropdown button applicable, every formula typeset by the site's own MathJax, check cells and
solutions collapsed. Full-page screenshots land in book/_build/shots/ (look at them).

The fast tests here check what the build relies on without building: the glossary's terms and
every {term} reference to them, the toc, the MathJax files, the checker's own logic."""

import importlib.metadata
import importlib.util
import math
import os
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "book" / "_build" / "html"
pytest.importorskip("jupyter_book", reason="pip install -e '.[book]'")

# Agreed for every chapter (issue 17): the glossary holds exactly these, and chapters link no other.
TERMS = {"SQNR", "KL divergence", "perplexity", "byte floor", "group", "block", "scale rule",
         "per-channel", "per-token", "microscaling", "calibration", "outlier", "roofline", "W4A16"}
TERM_REF = re.compile(r"\{term\}`([^`]*)`")


def _checker():
    spec = importlib.util.spec_from_file_location("check_book", ROOT / "scripts" / "check_book.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def glossary_terms(md: str) -> dict[str, str]:
    """term -> definition, from the {glossary} directive of a MyST page."""
    body = re.search(r"```\{glossary\}\n(.*?)\n```", md, re.S)
    assert body, "no ```{glossary} directive"
    terms, term = {}, None
    for line in body.group(1).splitlines():
        if line and not line[0].isspace():
            term = line.strip()
            terms[term] = ""
        elif line.strip():
            terms[term] += " " + line.strip()
    return terms


def test_glossary_holds_exactly_the_agreed_terms():
    terms = glossary_terms((ROOT / "book" / "glossary.md").read_text())
    assert set(terms) == TERMS, sorted(set(terms) ^ TERMS)
    for term, text in terms.items():  # 1-3 sentences each
        sentences = re.findall(r"[.!?](?:\s|$)", re.sub(r"\b(e\.g|i\.e)\.", "", text))
        assert 1 <= len(sentences) <= 3, f"{term}: {len(sentences)} sentences: {text}"


def test_every_term_reference_names_a_glossary_term():
    """A {term} whose target is not in the glossary fails the strict build; say so in seconds."""
    unknown = []
    for path in [*sorted((ROOT / "notebooks").glob("[0-9][0-9]-*.md")),
                 *sorted((ROOT / "book").glob("*.md"))]:
        for ref in TERM_REF.findall(path.read_text()):
            target = re.search(r"<([^>]*)>\s*$", ref)
            name = (target.group(1) if target else ref).strip()
            if name not in TERMS:  # Sphinx also accepts another case: the book does not use it
                unknown.append(f"{path.name}: {{term}}`{ref}`")
    assert not unknown, "not in book/glossary.md: " + "; ".join(unknown)


def test_toc_puts_glossary_and_agenda_after_the_chapters_and_intro_links_them():
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    chapters = [f"notebooks/{p.stem}" for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]-*.md"))]
    assert files[:len(chapters)] == chapters
    assert files[len(chapters):] == ["agenda", "glossary"]
    intro = (ROOT / "book" / "intro.md").read_text()
    for page in ("agenda", "glossary"):
        assert (ROOT / "book" / f"{page}.md").exists()
        assert f"]({page}.md)" in intro, f"book/intro.md does not link {page}.md"


def test_mathjax_is_installed_where_the_build_copies_it_from():
    config = yaml.safe_load((ROOT / "book" / "_config.yml").read_text())["sphinx"]["config"]
    assert config["mathjax_path"] == "mathjax/tex-mml-chtml.js"
    assert config["html_extra_path"] == ["_extra"]
    build = (ROOT / "scripts" / "build_book.sh").read_text()
    assert '"_extra", "_static", "mathjax"' in build
    mathjax = Path(importlib.metadata.distribution("sphinx-mathjax-offline")
                   .locate_file("sphinx-mathjax-offline/static/mathjax"))
    assert '"3.2.2"' in (mathjax / "tex-mml-chtml.js").read_text()
    assert len(list((mathjax / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))) >= 20


def test_source_formulas_counts_math_outside_code():
    count = _checker().source_formulas
    assert count("no math, a price of \\$5 and `$x$` in code\n") == 0
    assert count("Inline $x^2$ and $y$.\n\n$$\na = b\n$$\n") == 3
    assert count("```python\ncost = '$1 $2'\n```\n\n```{code-cell} ipython3\nf'$x$'\n```\n") == 0
    nested = "````{admonition} Exercise 1\nPredict $s$ first.\n```python\n$no$\n```\n````\n"
    assert count(nested) == 1
    assert count("```{math}\nE = mc^2\n```\nand {math}`x + 1`\n") == 2
    assert count("---\ntitle: $not$\n---\ntext\n") == 0
    # myst's dollarmath pairs any two $ in a paragraph, so this is one formula, as on the page
    assert count("costs $5 and $10\n") == 1
    assert count("$a\n\nb$\n") == 0  # a paragraph break ends inline math


def test_problems_names_untypeset_math_open_cells_and_short_screenshots(tmp_path):
    check = _checker()
    base = {"page": "05-fp8.html", "errors": [], "external": [], "figures": 3, "rendered": 3,
            "step_failures": [], "steps": 6}
    assert check.problems(base) == []
    assert check.problems(base | {"source_formulas": 2, "typeset": 0, "mathjax": None}) == [
        "05-fp8.html: its source has 2 formulas, MathJax typeset none (MathJax not loaded)"]
    assert check.problems(base | {"source_formulas": 2, "typeset": 2}) == []
    bad = check.problems(base | {"untypeset": ["\\(x\\)"], "math_errors": ["Missing }"],
                                 "hidden_cells": 2, "hidden_cells_open": 1, "dropdowns": 3,
                                 "dropdowns_open": 3})
    assert len(bad) == 4 and "\\(x\\)" in bad[0] and "Missing }" in bad[1]
    assert "1 of 2 hide-cell" in bad[2] and "3 of 3 dropdown" in bad[3]
    shot = tmp_path / "05-fp8.png"
    shot.write_bytes(_png(np.zeros((5, check.WIDTH_PX, 3), np.uint8)))
    assert check.problems(base | {"screenshots": [str(shot)], "height": 5}) == []
    assert check.problems(base | {"screenshots": [str(shot)], "height": 9}) == [
        "05-fp8.html: screenshots cover 5 of the page's 9 px"]


def test_a_stalled_chromium_is_started_once_more_then_given_up(tmp_path, monkeypatch):
    """_run kills a Chromium that outlives its timeout, and what it started, and starts it once
    more: a stand-in that stalls on its first start succeeds on the second (within the time of
    two timeouts, not of its stall); one that always stalls raises."""
    check = _checker()
    starts = tmp_path / "starts"
    fake = tmp_path / "chromium"
    fake.write_text(f"#!/bin/sh\necho x >> {starts}\n"
                    f"[ $(wc -l < {starts}) -ge $STALL_UNTIL ] || sleep 30\necho done\n")
    fake.chmod(0o755)
    monkeypatch.setenv("STALL_UNTIL", "2")
    t0 = time.perf_counter()
    assert check._run(str(fake), [], timeout=2).stdout == "done\n"
    assert len(starts.read_text().splitlines()) == 2 and time.perf_counter() - t0 < 20
    starts.unlink()
    monkeypatch.setenv("STALL_UNTIL", "3")
    with pytest.raises(subprocess.TimeoutExpired):
        check._run(str(fake), [], timeout=2)
    assert len(starts.read_text().splitlines()) == 2 and time.perf_counter() - t0 < 40


def _png(rgb: np.ndarray) -> bytes:
    """A minimal 8-bit RGB PNG of rgb (H, W, 3) uint8 (filter None on every row)."""
    def chunk(kind, data):
        return (len(data).to_bytes(4, "big") + kind + data +
                zlib.crc32(kind + data).to_bytes(4, "big"))
    h, w, _ = rgb.shape
    raw = b"".join(b"\0" + rgb[y].tobytes() for y in range(h))
    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) +
            chunk(b"IEND", b""))


def _first_row(path: Path) -> np.ndarray:
    """The top row of pixels (W, channels) of an 8-bit RGB or RGBA PNG. The first row's filter
    can only refer to its left neighbour (the row above counts as zeros): None, Sub, Up or Paeth
    (which reduce to None or Sub there), or Average."""
    data = path.read_bytes()
    pos, idat = 8, b""
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            width, depth, color = int.from_bytes(body[:4], "big"), body[8], body[9]
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    assert depth == 8 and color in (2, 6), (depth, color)
    ch = 3 if color == 2 else 4
    row = zlib.decompressobj().decompress(idat, 1 + width * ch)
    kind, px = row[0], np.frombuffer(row[1:], np.uint8).reshape(width, ch).astype(np.int64)
    if kind in (1, 4):  # Sub (and Paeth with a zero row above): add the left neighbour
        px = np.cumsum(px, axis=0) % 256
    elif kind == 3:  # Average: add half the left neighbour, one pixel at a time
        for x in range(1, width):
            px[x] = (px[x] + px[x - 1] // 2) % 256
    return px[:, :3]


@pytest.mark.slow
def test_screenshots_tile_a_tall_page_without_gaps(tmp_path):
    """A page taller than a tile is shot as tiles of equal height (no sliver: Chromium 156 hung
    on a 19 px window on CI) that start where the previous one ended: on a page of 100 px bands,
    each of its own colour, each tile's top row has the colour of the band at the tile's top."""
    check = _checker()
    chromium = check.find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    tile, height = 400, 1350
    colours = [(20 * i, 250 - 15 * i, (70 * i) % 256) for i in range(math.ceil(height / 100))]
    bands = "".join(f'<div style="height:100px;background:rgb{c}"></div>' for c in colours)
    page = tmp_path / "tall.html"
    page.write_text(f"<html><head></head><body style='margin:0'>{bands}</body></html>")
    check.TILE_PX = tile
    shots = tmp_path / "shots"
    shots.mkdir()
    (shots / "tall.9.png").write_bytes(b"stale")  # a tile of an earlier, longer page goes
    paths = [Path(p) for p in check.screenshot(page, chromium, shots, height)]
    assert [p.name for p in paths] == ["tall.1.png", "tall.2.png", "tall.3.png", "tall.4.png"]
    assert sorted(p.name for p in shots.iterdir()) == [p.name for p in paths]
    assert [check.png_size(p) for p in paths] == [(check.WIDTH_PX, h) for h in (337, 338, 337, 338)]
    tops = [tuple(int(v) for v in _first_row(p)[check.WIDTH_PX // 2]) for p in paths]
    assert tops == [colours[y // 100] for y in (0, 337, 675, 1012)]
    assert not list(tmp_path.glob("*.quantlab-*.html")), "tile copies left beside the page"


@pytest.mark.slow
def test_book_builds_offline_and_renders_in_chromium():
    check = _checker()
    chromium = check.find_chromium()
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium (apt-get install -y chromium) for this test")
        pytest.skip("chromium is not installed (apt-get install -y chromium); book not checked")
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run(["bash", str(ROOT / "scripts" / "build_book.sh")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    build_s = time.perf_counter() - t0
    pages = check.pages(HTML)
    chapters = [p for p in pages if p.parent.name == "notebooks"]
    assert len(chapters) >= 3, [p.name for p in pages]
    assert {"agenda.html", "glossary.html"} <= {p.name for p in pages}
    for page in pages:  # no script or stylesheet from another host (CDNs fail offline)
        html = page.read_text(encoding="utf-8")
        remote = re.findall(r"<(?:script|link)[^>]+(?:src|href)=[\"'](?:https?:)?//[^\"']+", html)
        assert not remote, f"{page.name} loads {remote}"
    src = ROOT / "book" / "_build" / "src"
    problems, drawn, reports, t1 = [], 0, {}, time.perf_counter()
    for page in pages:
        report = check.check_page(page, chromium, ROOT / "book" / "_build" / "shots",
                                  check.source_of(page, HTML, src))
        reports[page.name] = report
        problems += check.problems(report)
        drawn += report["rendered"]
        assert report.get("screenshots"), f"{page.name}: no screenshot"
        if page in chapters:
            assert report["figures"] >= 3, f"{page.name}: {report['figures']} figures"
            assert report["steps"] >= 3, f"{page.name}: no slider or dropdown was exercised"
    assert not problems, "\n".join(problems)
    # The glossary's formulas are typeset by the site's MathJax (problems() failed any left raw).
    glossary = reports["glossary.html"]
    assert glossary["mathjax"] == "3.2.2" and glossary["typeset"] >= 14, glossary
    print(f"book built in {build_s:.0f} s; {drawn} figures drawn in {len(pages)} pages, "
          f"checked in {time.perf_counter() - t1:.0f} s")
