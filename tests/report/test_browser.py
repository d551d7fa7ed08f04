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
    assert 'data-images-ok="4/4"' in dom.stdout
    assert 'data-summary-rows="2"' in dom.stdout
    assert 'id="bins"' in dom.stdout and "kvpress/snapkv r=0.5" in dom.stdout

    shot = tmp_path / "shot.png"
    r = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--window-size=1200,2400",
                        f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("RGB").resize((300, 600))
    px = list(img.getdata())
    non_white = sum(1 for p in px if sum(p) < 720) / len(px)
    coloured = sum(1 for (r_, g, b) in px if max(r_, g, b) - min(r_, g, b) > 80)
    assert non_white > 0.05, f"page looks blank ({non_white:.1%} non-white)"
    assert coloured > 50, "no coloured plot pixels in the screenshot"
