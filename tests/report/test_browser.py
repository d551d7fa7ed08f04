"""The HTML report in a real headless browser (Debian chromium): the DOM has the summary and
per-bin tables and every plot decoded; a screenshot is not blank and has coloured plot lines."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.report.test_stages import recorded  # noqa: F401  (fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("KVT_REQUIRE_BROWSER") != "1",
    reason="chromium not installed (apt-get install chromium); set KVT_REQUIRE_BROWSER=1 to make this mandatory")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--force-device-scale-factor=1"]

CHECK_JS = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 100 && i.naturalHeight > 100).length;
  document.body.setAttribute('data-images-ok', ok + '/' + imgs.length);
  document.body.setAttribute('data-summary-rows', document.querySelectorAll('#summary tbody tr').length);
  // the headline heatmap (inline SVG): text boxes as laid out by the browser, pairwise overlaps
  const svg = document.getElementById('heatmap');
  if (!svg) return;
  const texts = [...svg.querySelectorAll('text')].filter(t => t.textContent.trim());
  const boxes = texts.map(t => t.getBoundingClientRect());
  let overlaps = 0; const pairs = [];
  for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
    const a = boxes[i], b = boxes[j];
    const ox = Math.min(a.right, b.right) - Math.max(a.left, b.left);
    const oy = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
    if (ox > 0.5 && oy > 0.5) { overlaps++; pairs.push(texts[i].textContent + ' | ' + texts[j].textContent); }
  }
  const labels = [...svg.querySelectorAll('g[id^="hm-rowlabel-"] text')].filter(t => t.textContent.trim());
  const minH = Math.min(...labels.map(t => t.getBoundingClientRect().height));
  const body = document.body;
  body.setAttribute('data-heat-texts', texts.length);
  body.setAttribute('data-heat-overlaps', overlaps);
  body.setAttribute('data-heat-pairs', pairs.slice(0, 5).join(' ;; '));
  // rows with a visible label (the knob, or the method name on the first row of its group)
  const labelled = new Set([...svg.querySelectorAll('g[id^="hm-rowlabel-"], g[id^="hm-method-"]')]
    .filter(g => g.textContent.trim()).map(g => g.id.replace(/^hm-(rowlabel|method)-/, '')));
  body.setAttribute('data-heat-rows', labelled.size);
  body.setAttribute('data-heat-tips', svg.querySelectorAll('g[id^="hm-cell-"] > title').length);
  body.setAttribute('data-heat-label-px', labels.length ? minH.toFixed(1) : '0');
  body.setAttribute('data-heat-width', svg.getBoundingClientRect().width.toFixed(0));
});
</script></body>"""


def test_report_renders_in_headless_chromium(recorded, tmp_path: Path):  # noqa: F811
    from kv_transition.cli import main

    assert CHROMIUM, "chromium is required (KVT_REQUIRE_BROWSER=1)"
    cfg, paths, cfg_file = recorded
    c = ["-c", str(cfg_file), "-o", "dataset.synthetic.depths=[0.1, 0.3, 0.5, 0.7, 0.9]"]
    assert main(["score", "-q", *c]) == 0 and main(["analyze", *c]) == 0 and main(["report", *c]) == 0
    page = paths.report_dir / "index.html"
    # a copy with a probe script that records what the browser decoded (the report itself has no JS)
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", CHECK_JS))
    profile = tmp_path / "profile"
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    n_img = page.read_text().count("<img ")
    assert n_img == 4 and f'data-images-ok="{n_img}/{n_img}"' in dom.stdout
    assert 'data-summary-rows="2"' in dom.stdout
    assert 'data-heat-rows="2"' in dom.stdout and 'data-heat-overlaps="0"' in dom.stdout
    assert 'id="bins"' in dom.stdout and "kvpress/snapkv r=0.5" in dom.stdout

    shot = tmp_path / "shot.png"
    r = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--window-size=1200,2400",
                        f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("RGB").resize((300, 600))
    px = list(img.get_flattened_data()) if hasattr(img, 'get_flattened_data') else list(img.getdata())
    non_white = sum(1 for p in px if sum(p) < 720) / len(px)
    coloured = sum(1 for (r_, g, b) in px if max(r_, g, b) - min(r_, g, b) > 80)
    assert non_white > 0.05, f"page looks blank ({non_white:.1%} non-white)"
    assert coloured > 50, "no coloured plot pixels in the screenshot"


def _attr(dom: str, name: str) -> str:
    import re

    m = re.search(rf'{name}="([^"]*)"', dom)
    assert m, f"{name} missing from the rendered DOM"
    return m.group(1)


def test_heatmap_legible_at_40_rows_in_chromium(tmp_path: Path):
    """A 40-cell study: in the browser's own layout, no two texts of the headline heatmap overlap, each of
    the 40 rows has its label, each cell × bin its tooltip, and labels render at a readable size."""
    from kv_transition.db import connect
    from kv_transition.report.build import write_report
    from kv_transition.report.data import load_report_data
    from tests.report.synth_study import make_study_db

    assert CHROMIUM, "chromium is required (KVT_REQUIRE_BROWSER=1)"
    db = tmp_path / "synth40" / "kv_transition.sqlite"
    db.parent.mkdir()
    make_study_db(db, per_task_bin=2, n_boot=100)
    conn = connect(db)
    data = load_report_data(conn)
    conn.close()
    files = write_report(data, tmp_path / "report")
    probe = tmp_path / "probe.html"
    probe.write_text(files.html.read_text().replace("</body>", CHECK_JS))
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1300,3000",
                          "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    out = dom.stdout
    n_img = files.html.read_text().count("<img ")
    assert f'data-images-ok="{n_img}/{n_img}"' in out and n_img == 5
    assert _attr(out, "data-heat-rows") == "40"
    assert _attr(out, "data-heat-tips") == str(40 * len(data.bins))
    assert int(_attr(out, "data-heat-texts")) > 40 * len(data.bins)
    assert _attr(out, "data-heat-overlaps") == "0", _attr(out, "data-heat-pairs")
    assert float(_attr(out, "data-heat-label-px")) >= 9.0          # row labels at least 9 px tall on screen
    assert int(_attr(out, "data-heat-width")) >= 900
