"""Open every page of the built book in headless Chromium and check it: no script errors, no
request leaving the site, every plotly figure rendered, every slider step and dropdown button
applicable; save a screenshot of each page.

    python scripts/check_book.py             # book/_build/html, shots in book/_build/shots
    python scripts/check_book.py --html DIR --shots DIR

How: for each page a copy with a probe script is written beside it (so relative paths hold). The
probe records window errors and console.error calls from the first script on; after load it waits
for the figures, applies the first, middle and last step of each slider and each dropdown button
through Plotly's own API, and writes a JSON report into the DOM, which `chromium --dump-dom`
prints. A second run of the untouched page takes the screenshot.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--allow-file-access-from-files"]

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
  var nodes = document.querySelectorAll('.plotly-graph-div');
  report.figures = nodes.length;
  for (var t = 0; t < 50; t++) {  // figures draw asynchronously: wait until all have an svg
    if (document.querySelectorAll('.plotly-graph-div .main-svg').length >= nodes.length) break;
    await new Promise(function (r) { setTimeout(r, 100); });
  }
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


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def pages(html_dir: Path) -> list[Path]:
    """The book's pages: index/intro plus every chapter page."""
    found = sorted(html_dir.glob("notebooks/*.html"))
    intro = html_dir / "intro.html"
    return ([intro] if intro.exists() else []) + found


def _run(chromium: str, args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="quantlab-chromium-") as profile:
        return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)


def check_page(page: Path, chromium: str, shots: Path | None = None) -> dict:
    """Probe one page; returns the probe's report plus the screenshot path (if taken)."""
    html = page.read_text(encoding="utf-8")
    probe = page.with_name(page.stem + ".quantlab-check.html")
    html = re.sub(r"<head>", "<head>" + PROBE_HEAD, html, count=1)
    html = html.replace("</body>", PROBE_TAIL + "</body>", 1)
    probe.write_text(html, encoding="utf-8")
    try:
        res = _run(chromium, ["--virtual-time-budget=30000", "--dump-dom", probe.as_uri()])
    finally:
        probe.unlink()
    m = re.search(r'<pre id="quantlab-check"[^>]*>(.*?)</pre>', res.stdout, re.S)
    if not m:
        return {"page": page.name, "errors": [f"no probe report; chromium rc={res.returncode}: "
                                              f"{res.stderr[-2000:]}"],
                "figures": 0, "rendered": 0, "steps": 0, "step_failures": [], "external": []}
    report = json.loads(m.group(1).replace("&amp;", "&").replace("&lt;", "<")
                        .replace("&gt;", ">").replace("&quot;", '"'))
    report["page"] = page.name
    if shots is not None:
        shots.mkdir(parents=True, exist_ok=True)
        shot = shots / (page.stem + ".png")
        _run(chromium, ["--window-size=1400,9000", "--virtual-time-budget=5000",
                        f"--screenshot={shot}", page.as_uri()])
        report["screenshot"] = str(shot) if shot.exists() else None
    return report


def problems(report: dict) -> list[str]:
    """What is wrong with a page report (empty when it passes)."""
    out = [f"{report['page']}: {e}" for e in report["errors"]]
    out += [f"{report['page']}: request left the site: {u}" for u in report.get("external", [])]
    if report["rendered"] != report["figures"]:
        out.append(f"{report['page']}: {report['rendered']} of {report['figures']} figures drawn")
    out += [f"{report['page']}: {f}" for f in report["step_failures"]]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--html", type=Path, default=ROOT / "book" / "_build" / "html")
    ap.add_argument("--shots", type=Path, default=ROOT / "book" / "_build" / "shots")
    args = ap.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("no chromium on PATH: apt-get install -y chromium", file=sys.stderr)
        return 2
    bad = []
    for page in pages(args.html):
        r = check_page(page, chromium, args.shots)
        print(f"{r['page']:<28} figures {r['rendered']}/{r['figures']}  steps {r['steps']}  "
              f"errors {len(r['errors'])}  screenshot {r.get('screenshot')}")
        bad += problems(r)
    for p in bad:
        print("FAIL", p, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
