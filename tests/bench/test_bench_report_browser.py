"""report.html in a real browser: headless Chromium loads the page, every table and every figure is there.

Needs Debian's ``chromium`` (``.ci/run`` installs it); skipped with the reason when it is absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM = next(
    (
        p
        for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
        if p and os.path.exists(p)
    ),
    None,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it before the tests)",
    ),
]

# Read-only probe appended to a copy of the page: once everything loaded, it writes what the browser
# rendered into attributes that --dump-dom serialises (decoded image sizes, table row counts).
_PROBE = """<script>
window.addEventListener("load", () => {
  document.querySelectorAll("img.report-figure").forEach(img => {
    img.setAttribute("data-natural-width", img.complete ? img.naturalWidth : -1);
    img.setAttribute("data-natural-height", img.complete ? img.naturalHeight : -1);
  });
  document.querySelectorAll("table.report-table").forEach(t => {
    t.setAttribute("data-body-rows", t.tBodies[0] ? t.tBodies[0].rows.length : 0);
    t.setAttribute("data-rendered-height", t.getBoundingClientRect().height);
  });
  document.body.setAttribute("data-probe", "done");
});
</script>"""


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp / 'profile'}",
        "--virtual-time-budget=15000",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables: list[dict] = []
        self.images: list[dict] = []
        self.body: dict = {}
        self._cells: list[str] | None = None
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and "report-table" in (a.get("class") or ""):
            self.tables.append({**a, "cells": []})
        elif tag == "img" and "report-figure" in (a.get("class") or ""):
            self.images.append(a)
        elif tag == "body":
            self.body = a
        elif tag == "td" and self.tables:
            self._in_td = True
            self.tables[-1]["cells"].append("")

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_td = False

    def handle_data(self, data):
        if self._in_td and self.tables:
            self.tables[-1]["cells"][-1] += data


def _parse(html: str) -> _Collect:
    p = _Collect()
    p.feed(html)
    return p


def test_report_html_renders_every_table_and_figure_in_chromium(real_report, tmp_path):
    page = real_report / "report.html"
    source = _parse(page.read_text())
    csvs = sorted(p.stem for p in real_report.glob("*.csv"))
    pngs = sorted(p.name for p in real_report.glob("*.png"))
    assert sorted(t["data-key"] for t in source.tables) == csvs
    assert sorted(i["data-file"] for i in source.images) == pngs

    # 1. the page as shipped, parsed by the browser
    got = _chromium(["--dump-dom", page.resolve().as_uri()], tmp_path)
    assert got.returncode == 0, got.stderr[-2000:]
    dom = _parse(got.stdout)
    assert sorted(t["data-key"] for t in dom.tables) == csvs
    assert sorted(i["data-file"] for i in dom.images) == pngs
    for t in dom.tables:
        assert t["cells"] and any(c.strip() for c in t["cells"]), t["data-key"]

    # 2. what the browser rendered: decoded images with a size, tables with rows and a height
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    got = _chromium(["--dump-dom", probe.as_uri()], tmp_path)
    assert got.returncode == 0, got.stderr[-2000:]
    dom = _parse(got.stdout)
    assert dom.body.get("data-probe") == "done", "the page's load event did not fire"
    for img in dom.images:
        assert int(img["data-natural-width"]) > 100 and int(img["data-natural-height"]) > 100, img["data-file"]
    for t in dom.tables:
        assert int(t["data-body-rows"]) >= 1 and float(t["data-rendered-height"]) > 20, t["data-key"]

    # 3. a screenshot: the page is painted (not blank)
    shot = tmp_path / "report.png"
    got = _chromium(
        [f"--screenshot={shot}", "--window-size=1400,3000", "--hide-scrollbars", page.resolve().as_uri()], tmp_path
    )
    assert got.returncode == 0 and shot.is_file(), got.stderr[-2000:]
    from PIL import Image

    im = Image.open(shot).convert("L")
    assert im.size == (1400, 3000)
    lo, hi = im.getextrema()
    assert hi - lo > 100  # text and figures, not an empty page
    hist = im.histogram()
    assert sum(hist[:200]) > 0.01 * im.size[0] * im.size[1]  # a real amount of ink
    keep = os.environ.get("MTLENS_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
