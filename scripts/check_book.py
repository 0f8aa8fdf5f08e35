"""Open every page of the built book in headless Chromium and check it: no script errors, no
request leaving the site, every plotly figure rendered, every slider step and dropdown button
applicable, every formula typeset by MathJax (at least one on each page whose source has one),
check cells and exercise solutions collapsed; save full-page screenshots.

    python scripts/check_book.py             # book/_build/html, shots in book/_build/shots
    python scripts/check_book.py --html DIR --src DIR --shots DIR

How: for each page a copy with a probe script is written beside it (so relative paths hold). The
probe records window errors and console.error calls from the first script on; after load it waits
for the figures and for MathJax's first typesetting pass, applies the first, middle and last step
of each slider and each dropdown button through Plotly's own API, and writes a JSON report
(including the page's height) into the DOM, which `chromium --dump-dom` prints. Then the untouched
page is screenshot whole: one image when it is at most TILE_PX tall, else equal tiles of at most
TILE_PX (05-fp8.1.png, 05-fp8.2.png, ...), each from a copy shifted up to its tile.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--allow-file-access-from-files"]
WIDTH_PX = 1400  # the book theme's wide layout: both sidebars shown
# Chromium 156 here took a 40,000 px tall screenshot in one piece and hung on 70,000 px; tiles of
# 16,384 px (a common GPU texture limit) stay far from that and open in any image viewer.
TILE_PX = 16384

PROBE_HEAD = """<script>
window.__qlErrors = [];
window.addEventListener('error', function (e) {
  var where = e.filename || (e.target && (e.target.src || e.target.href)) || '';
  window.__qlErrors.push('error: ' + (e.message || 'failed to load') + ' ' + where);
}, true);
window.addEventListener('unhandledrejection', function (e) {
  window.__qlErrors.push('unhandled rejection: ' + e.reason);
});
(function () { var orig = console.error; console.error = function () {
  window.__qlErrors.push('console.error: ' + Array.prototype.join.call(arguments, ' '));
  return orig.apply(console, arguments); }; })();
</script>"""

PROBE_TAIL = """<script>
window.addEventListener('load', async function () {
  var report = {errors: [], figures: 0, rendered: 0, steps: 0, step_failures: []};
  // MathJax (deferred) typesets after load; its startup promise settles after the first pass.
  for (var w = 0; w < 50 && window.MathJax && !(MathJax.startup && MathJax.startup.promise); w++)
    await new Promise(function (r) { setTimeout(r, 100); });
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    try { await MathJax.startup.promise; }
    catch (err) { window.__qlErrors.push('MathJax: ' + err); }
  }
  var shown = function (el) {  // laid out with a size, and neither hidden nor transparent
    var r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && (!el.checkVisibility ||
      el.checkVisibility({opacityProperty: true, visibilityProperty: true}));
  };
  var maths = Array.prototype.slice.call(document.querySelectorAll('.math'));
  report.mathjax = (window.MathJax && MathJax.version) || null;
  report.formulas = maths.length;
  report.typeset = document.querySelectorAll('mjx-container').length;
  report.untypeset = maths.filter(function (m) { return !m.querySelector('mjx-container'); })
    .map(function (m) { return m.textContent.slice(0, 80); });
  report.math_errors = Array.prototype.map.call(document.querySelectorAll('mjx-merror'),
    function (e) { return e.getAttribute('data-mjx-error') || e.textContent; });
  // Check cells (tag hide-cell) and exercise solutions (dropdown admonitions) start collapsed.
  var hidden = document.querySelectorAll('.cell.tag_hide-cell');
  report.hidden_cells = hidden.length;
  report.hidden_cells_open = Array.prototype.filter.call(hidden, function (c) {
    var code = c.querySelector('.cell_input');
    return !c.querySelector('details.hide') || (code && shown(code)); }).length;
  var drops = document.querySelectorAll('.admonition.dropdown');
  report.dropdowns = drops.length;
  report.dropdowns_open = Array.prototype.filter.call(drops, function (d) {
    return Array.prototype.some.call(d.children, function (k) {
      return !k.classList.contains('admonition-title') && shown(k); }); }).length;
  var nodes = document.querySelectorAll('.plotly-graph-div');
  report.figures = nodes.length;
  for (var t = 0; t < 50; t++) {  // figures draw asynchronously: wait until all have an svg
    if (document.querySelectorAll('.plotly-graph-div .main-svg').length >= nodes.length) break;
    await new Promise(function (r) { setTimeout(r, 100); });
  }
  // Drawn, before any slider or button: the screenshot is of the page as it loads.
  report.height = Math.ceil(document.documentElement.scrollHeight);
  nodes.forEach(function (gd) { if (gd.querySelector('.main-svg') && gd._fullData &&
                                     gd._fullData.length) report.rendered++; });
  var resources = performance.getEntriesByType('resource').map(function (e) { return e.name; });
  report.external = resources.filter(function (u) { return !u.startsWith('file:'); });
  for (var i = 0; i < nodes.length; i++) {
    var gd = nodes[i], lay = gd.layout || {};
    var actions = [];
    (lay.sliders || []).forEach(function (s) {
      var n = s.steps.length;
      [0, Math.floor(n / 2), n - 1].forEach(function (k) { actions.push(s.steps[k]); });
    });
    (lay.updatemenus || []).forEach(function (m) {
      m.buttons.forEach(function (b) { actions.push(b); });
    });
    for (var a = 0; a < actions.length; a++) {
      var act = actions[a];
      try {
        await Plotly[act.method].apply(null, [gd].concat(act.args || []));
        report.steps++;
        if (!gd.querySelector('.main-svg')) throw new Error('figure gone');
      } catch (err) {
        report.step_failures.push('figure ' + i + ' ' + act.method + ' ' + (act.label || '') +
                                  ': ' + err);
      }
    }
  }
  report.errors = window.__qlErrors;
  var pre = document.createElement('pre');
  pre.id = 'quantlab-check';
  pre.textContent = JSON.stringify(report);
  document.body.appendChild(pre);
});
</script>"""

# A tile's copy of a page shifts it up to the tile's top (headless --screenshot ignores scrolling:
# a scrolled page shoots blank). A transform moves what is painted without changing the layout.
SHIFT_UP = "<style>html { transform: translateY(-TOPpx); }</style>"


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def pages(html_dir: Path) -> list[Path]:
    """The book's pages: the intro, every chapter page, then the other pages (glossary, agenda)."""
    intro = html_dir / "intro.html"
    chapters = sorted(html_dir.glob("notebooks/*.html"))
    skip = {"index.html", "intro.html", "genindex.html", "search.html"}
    others = sorted(p for p in html_dir.glob("*.html")
                    if p.name not in skip and ".quantlab-" not in p.name)
    return ([intro] if intro.exists() else []) + chapters + others


# Code, whose `$` is no formula: fenced blocks that are code (no info string, a language, or a
# code directive), and inline code spans. Other directives ({admonition}, {glossary}) hold text.
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_CODE_DIRECTIVES = ("{code-cell}", "{code-block}", "{code}", "{sourcecode}")


def source_formulas(md: str) -> int:
    """How many formulas a MyST page's source holds: $$...$$ and $...$ outside code (counted as
    myst's dollarmath parses them: a pair of unescaped $ within a paragraph), plus {math}
    directives and roles."""
    text, stack = [], []  # stack: (fence, is code) of the open fences
    for line in re.sub(r"\A---\n.*?\n---\n", "", md, flags=re.S).splitlines():
        fence = _FENCE.match(line)
        if fence and stack and not fence.group(2).strip() and \
                fence.group(1)[0] == stack[-1][0][0] and len(fence.group(1)) >= len(stack[-1][0]):
            stack.pop()  # a closing fence
            text.append("")
            continue
        if stack and stack[-1][1]:
            continue
        if fence:
            info = fence.group(2).split()
            math_block = bool(info) and info[0] == "{math}"
            is_code = not info or not info[0].startswith("{") or info[0] in _CODE_DIRECTIVES
            stack.append((fence.group(1), is_code or math_block))
            text.append("$$x$$" if math_block else "")
            continue
        text.append(line)
    body = "\n".join(text)
    n = len(re.findall(r"\{math\}`[^`]+`", body))
    body = re.sub(r"(`+)(?!`).+?(?<!`)\1(?!`)", "", body, flags=re.S).replace("\\$", "")
    n += len(re.findall(r"\$\$.+?\$\$", body, flags=re.S))
    body = re.sub(r"\$\$.+?\$\$", "", body, flags=re.S)
    for para in re.split(r"\n\s*\n", body):
        n += len(re.findall(r"\$[^$]+?\$", para.replace("\n", " ")))
    return n


def _run(chromium: str, args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    """Run Chromium with a fresh profile. One that stalls past `timeout` s is killed with every
    process it started (its own session) and started once more; a second stall raises
    subprocess.TimeoutExpired."""
    for attempt in (1, 2):
        with tempfile.TemporaryDirectory(prefix="quantlab-chromium-") as profile:
            cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)
            try:
                out, err = proc.communicate(timeout=timeout)
                return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                try:
                    proc.communicate(timeout=30)
                except subprocess.TimeoutExpired:  # a child outside the session holds a pipe
                    pass
                if attempt == 2:
                    raise


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    return struct.unpack(">II", head[16:24])


def screenshot(page: Path, chromium: str, shots: Path, height: int) -> list[Path]:
    """Screenshot the whole page, `height` CSS px tall at WIDTH_PX wide: one image, or tiles of
    at most TILE_PX and of equal height, each from a copy of the page shifted up to its top."""
    page, shots = page.resolve(), shots.resolve()
    shots.mkdir(parents=True, exist_ok=True)
    for old in shots.glob(page.stem + ".*png"):  # the tiles of an earlier, longer page
        if re.fullmatch(re.escape(page.stem) + r"(\.\d+)?\.png", old.name):
            old.unlink()
    height = max(1, height)
    n = math.ceil(height / TILE_PX)
    # Tiles of equal height (to a pixel), never a sliver: 16-30 px tall windows took Chromium 156
    # about 20 s in most runs here (500 px: 4-5 s), and a 19 px one was still running after 300 s
    # on CI.
    tops = [height * i // n for i in range(n + 1)]
    out = []
    for i in range(n):
        y, h = tops[i], tops[i + 1] - tops[i]
        shot = shots / (f"{page.stem}.png" if n == 1 else f"{page.stem}.{i + 1}.png")
        target = page
        if n > 1:
            target = page.with_name(f"{page.stem}.quantlab-tile{i + 1}.html")
            html = page.read_text(encoding="utf-8")
            target.write_text(html.replace("</head>", SHIFT_UP.replace("TOP", str(y)) +
                                           "</head>", 1), encoding="utf-8")
        try:
            _run(chromium, [f"--window-size={WIDTH_PX},{h}", "--virtual-time-budget=8000",
                            f"--screenshot={shot}", target.as_uri()], timeout=180)
        finally:
            if target != page:
                target.unlink()
        out.append(shot)
    return out


def check_page(page: Path, chromium: str, shots: Path | None = None,
               source: Path | None = None) -> dict:
    """Probe one page; returns the probe's report plus `source_formulas` (from `source`, the
    page's MyST source, when given) and the screenshot paths (when `shots` is given)."""
    page = page.resolve()  # chromium needs a file:// URI
    html = page.read_text(encoding="utf-8")
    probe = page.with_name(page.stem + ".quantlab-check.html")
    html = re.sub(r"<head>", "<head>" + PROBE_HEAD, html, count=1)
    html = html.replace("</body>", PROBE_TAIL + "</body>", 1)
    probe.write_text(html, encoding="utf-8")
    try:
        res = _run(chromium, [f"--window-size={WIDTH_PX},900", "--virtual-time-budget=30000",
                              "--dump-dom", probe.as_uri()])
    finally:
        probe.unlink()
    m = re.search(r'<pre id="quantlab-check"[^>]*>(.*?)</pre>', res.stdout, re.S)
    if not m:
        report = {"errors": [f"no probe report; chromium rc={res.returncode}: "
                             f"{res.stderr[-2000:]}"],
                  "figures": 0, "rendered": 0, "steps": 0, "step_failures": [], "external": []}
    else:
        report = json.loads(m.group(1).replace("&amp;", "&").replace("&lt;", "<")
                            .replace("&gt;", ">").replace("&quot;", '"'))
    report["page"] = page.name
    if source is not None and source.exists():
        report["source_formulas"] = source_formulas(source.read_text(encoding="utf-8"))
    if shots is not None and report.get("height"):
        report["screenshots"] = [str(p) for p in screenshot(page, chromium, shots,
                                                            report["height"])]
    return report


def problems(report: dict) -> list[str]:
    """What is wrong with a page report (empty when it passes)."""
    page = report["page"]
    out = [f"{page}: {e}" for e in report["errors"]]
    out += [f"{page}: request left the site: {u}" for u in report.get("external", [])]
    if report["rendered"] != report["figures"]:
        out.append(f"{page}: {report['rendered']} of {report['figures']} figures drawn")
    out += [f"{page}: {f}" for f in report["step_failures"]]
    if report.get("source_formulas") and not report.get("typeset"):
        out.append(f"{page}: its source has {report['source_formulas']} formulas, MathJax "
                   f"typeset none (MathJax {report.get('mathjax') or 'not loaded'})")
    out += [f"{page}: formula not typeset: {t}" for t in report.get("untypeset", [])]
    out += [f"{page}: TeX error: {e}" for e in report.get("math_errors", [])]
    if report.get("hidden_cells_open"):
        out.append(f"{page}: {report['hidden_cells_open']} of {report['hidden_cells']} hide-cell "
                   "cells are shown open (they should start collapsed)")
    if report.get("dropdowns_open"):
        out.append(f"{page}: {report['dropdowns_open']} of {report['dropdowns']} dropdown "
                   "admonitions are shown open (they should start collapsed)")
    for shot in report.get("screenshots", []):
        path = Path(shot)
        if not path.exists():
            out.append(f"{page}: no screenshot {path.name}")
        elif png_size(path)[0] != WIDTH_PX:
            out.append(f"{page}: screenshot {path.name} is {png_size(path)} px, not "
                       f"{WIDTH_PX} wide")
    if "screenshots" in report:
        tall = sum(png_size(Path(p))[1] for p in report["screenshots"] if Path(p).exists())
        if tall != report["height"]:
            out.append(f"{page}: screenshots cover {tall} of the page's {report['height']} px")
    return out


def source_of(page: Path, html_dir: Path, src_dir: Path) -> Path:
    """The MyST source a page was built from (src_dir is the build's staged book/_build/src)."""
    return (src_dir / page.relative_to(html_dir)).with_suffix(".md")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--html", type=Path, default=ROOT / "book" / "_build" / "html")
    ap.add_argument("--src", type=Path, default=ROOT / "book" / "_build" / "src",
                    help="the sources the book was built from (to know which pages have math)")
    ap.add_argument("--shots", type=Path, default=ROOT / "book" / "_build" / "shots")
    args = ap.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("no chromium on PATH: apt-get install -y chromium", file=sys.stderr)
        return 2
    if not (args.html / "intro.html").exists():
        print(f"no book in {args.html}: make book first", file=sys.stderr)
        return 2
    bad = []
    for page in pages(args.html):
        r = check_page(page, chromium, args.shots, source_of(page, args.html, args.src))
        print(f"{r['page']:<28} figures {r['rendered']}/{r['figures']}  steps {r['steps']}  "
              f"formulas {r.get('typeset', 0)}/{r.get('formulas', 0)}  "
              f"collapsed {r.get('hidden_cells', 0)}+{r.get('dropdowns', 0)}  "
              f"errors {len(r['errors'])}  {r.get('height', 0)} px  "
              f"shots {' '.join(Path(p).name for p in r.get('screenshots', []))}")
        bad += problems(r)
    for p in bad:
        print("FAIL", p, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
