"""report.html in a real headless browser (Debian's chromium; `make test` / `.ci/run` install it if absent)."""

from __future__ import annotations

import shutil
import subprocess

import matplotlib.image
import pytest

from actpatch.cli import main

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("the HTML report test needs Debian's chromium: apt-get install chromium (make test and .ci/run "
                    "install it when they can)")
    return exe


@pytest.fixture(scope="module")
def page(gpt2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("html") / "run"
    assert main(["ioi", "--model", str(gpt2_dir), "--n-pairs", "3", "--donor", "swap", "--out", str(out), "--quiet"]) == 0
    return out / "report.html"


def _browser(chromium, tmp_path, *args):
    cmd = [chromium, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_report_html_renders_in_chromium(chromium, page, tmp_path):
    shot = tmp_path / "shot.png"
    run = _browser(chromium, tmp_path, "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri())
    assert shot.is_file(), run.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)[..., :3]  # (H, W, 3) floats in [0, 1]
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels.std() > 0.05 and (pixels < 0.5).mean() > 0.005, "the screenshot is blank"
    dom = _browser(chromium, tmp_path, "--dump-dom", page.as_uri()).stdout
    assert '<table id="sanity">' in dom and dom.count('class="pass"') == 12 and 'class="fail"' not in dom
    for name in ("patch_writes_exactly", "donor_differs_from_recipient", "dla_matches_attention_output",
                 "gap_matches_forward", "path_patch_identity", "fast_path_matches_reference"):
        assert f'<td style="text-align:left">{name}</td>' in dom  # every check is named, with what it asserts
    assert "independent one-forward-per-patch reference" in dom
    assert 'id="status"' in dom and "PASSED" in dom
    assert '<svg class="heatmap" id="heatmap-swap"' in dom and "<title>layer 2, head 3: Δ logit diff" in dom
    assert dom.count('src="data:image/png;base64,') >= 2  # plots are embedded, not linked
    assert 0 < dom.index('alt="layers.png"') < dom.index("<table")  # the headline figure opens the page
    assert 'id="command"' in dom and "actpatch ioi --model" in dom and 'id="config"' in dom
    # the Markdown report's findings and account of the gap are in the page too
    assert '<ul class="findings" id="findings-swap">' in dom and '<table border="1" class="dataframe" id="gap-swap">' in dom
    assert "hidden state, END only" in dom and "<figcaption>Mean logit difference after patching each layer" in dom


def test_report_html_needs_no_javascript(chromium, page, tmp_path):
    text = page.read_text(encoding="utf-8")
    assert "<script" not in text.lower() and "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    # The page has no script at all, so it renders the same with JavaScript off. (Chromium's headless
    # --screenshot and --dump-dom themselves stop working under --blink-settings=scriptEnabled=false,
    # so the browser cannot be asked directly.) The hover tooltips are SVG <title> elements, not script.
    assert text.count("<title>") > 10
