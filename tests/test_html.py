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


def test_report_html_needs_no_network_and_scripts_only_the_drilldown(chromium, page, tmp_path):
    text = page.read_text(encoding="utf-8")
    # The only scripts are Vega's embedded bundle and the drill-down's embedding call; no URL is fetched (the
    # Vega-Lite "$schema" is an identifier, never loaded). Everything else renders with JavaScript off: the
    # heatmaps' tooltips are SVG <title> elements.
    assert text.lower().count("<script") == 2 and 'id="drilldown-swap"' in text
    assert "src=\"http" not in text and "<link" not in text.lower()
    assert text.count("<title>") > 10
    assert page.stat().st_size < 5 * 2**20


class _Page:
    """One chromium tab over the DevTools protocol (websocket-client): console errors are kept as they come."""

    def __init__(self, chromium, tmp_path):
        import json
        import time
        import urllib.request

        import websocket

        profile = tmp_path / "cdp-profile"
        self.proc = subprocess.Popen([chromium, *FLAGS, "--remote-debugging-port=0", f"--user-data-dir={profile}",
                                      "--window-size=1400,1000", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip():
                break
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        for _ in range(100):
            try:
                targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json").read())
                break
            except OSError:
                time.sleep(0.1)
        url = next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"]
        self.ws, self.n, self.events, self.json = websocket.create_connection(url, timeout=60), 0, [], json

    def send(self, method, **params):
        self.n += 1
        self.ws.send(self.json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = self.json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                return msg.get("result", {})
            self.events.append(msg)

    def eval(self, expr):
        return self.send("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)["result"].get("value")

    def errors(self):
        return [e for e in self.events if e.get("method") == "Runtime.exceptionThrown"
                or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
                or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]

    def open(self, url, view):
        """Load ``url`` and wait until the drill-down ``view`` has rendered (``window.drilldownViews[view]``)."""
        import time

        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable")
        self.send("Page.navigate", url=url)
        for _ in range(200):
            if self.eval(f"!!(window.drilldownViews && window.drilldownViews.{view})"):
                return
            time.sleep(0.05)
        raise AssertionError(f"the drill-down {view!r} never rendered: {self.errors()[:3]}")

    def close(self):
        self.ws.close()
        self.proc.kill()
        self.proc.wait()


def test_hovering_a_head_shows_its_pattern(chromium, page, tmp_path):
    """The real page in chromium: no console error, and moving the mouse over a grid cell selects that head and
    draws its pattern on both example prompts (one rect per query-key pair of real tokens), with its tokens."""
    import json
    import time

    result = json.loads((page.parent / "results.json").read_text())
    pats = result["analysis"]["heads"]["patterns"]
    tab = _Page(chromium, tmp_path)
    try:
        tab.open(page.as_uri(), "swap")
        box = tab.eval("""(() => { const e = Array.from(document.querySelectorAll('#drilldown-swap path[aria-label]'))
            .find(e => /^head: 1; layer: 2;/.test(e.getAttribute('aria-label')));
            if (!e) return null; e.scrollIntoView(); const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; })()""")
        assert box is not None, "no grid cell for head 2.1"
        tab.send("Input.dispatchMouseEvent", type="mouseMoved", x=box[0], y=box[1])
        time.sleep(0.5)
        pick = json.loads(tab.eval("JSON.stringify(window.drilldownViews.swap.signal('pick'))"))
        assert pick["layer"] == [2] and pick["head"] == [1]
        labels = tab.eval("""Array.from(document.querySelectorAll('#drilldown-swap path[aria-label]'))
            .map(e => e.getAttribute('aria-label')).filter(t => t.includes('weight'))""")
        n = [len(t) for t in pats["tokens"]]
        assert len(labels) == sum(k * (k + 1) // 2 for k in n)
        want = next(r["w"] for r in pats["rows"] if (r["layer"], r["head"], r["pair"]) == (2, 1, 0))
        toks, q = pats["tokens"][0], n[0] - 1
        weight = want[q * (q + 1) // 2]  # the compact lower triangle: row q starts at q(q+1)/2; key 0
        cell = [t for t in labels if t.startswith(f"key (attended to): 0 {toks[0]}; query: {q} {toks[q]};")]
        assert any(f"weight: {weight:.3f}" in t for t in cell), (cell, weight)  # END's attention to the first token
        line = tab.eval("Array.from(document.querySelectorAll('#drilldown-swap text')).map(t => t.textContent)"
                        ".find(t => t.startsWith('head L'))")
        assert line.startswith("head L2H1: patching effect")
        assert len(want) == n[0] * (n[0] + 1) // 2
        assert not tab.errors(), tab.errors()[:3]
    finally:
        tab.close()


@pytest.fixture(scope="module")
def circuit_page(gpt2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("html") / "circuit"
    assert main(["circuit", "ioi", "--model", str(gpt2_dir), "--n-pairs", "3", "--method", "eap", "--edges", "10",
                 "40", "--resamples", "0", "--out", str(out), "--quiet"]) == 0
    return out / "report.html"


def test_hovering_a_circuit_node_shows_its_pattern(chromium, circuit_page, tmp_path):
    """The circuit report's drawing in chromium: no console error; moving the mouse over a head's node selects it,
    names it with its single patch effect, and draws its pattern on both example prompts from circuit.json."""
    import json
    import time

    saved = json.loads((circuit_page.parent / "results.json").read_text())
    pats = saved["baseline"]["patterns"]
    text = circuit_page.read_text(encoding="utf-8")
    assert text.lower().count("<script") == 2 and 'id="drilldown-circuit"' in text and "src=\"http" not in text
    assert circuit_page.stat().st_size < 5 * 2**20
    node = pats["rows"][-1]["node"]  # the last node with a pattern: not the one the page opens on
    tab = _Page(chromium, tmp_path)
    try:
        tab.open(circuit_page.as_uri(), "circuit")
        box = tab.eval(f"""(() => {{ const e = Array.from(document.querySelectorAll('#drilldown-circuit path[aria-label]'))
            .find(e => e.getAttribute('aria-label').includes('; node: {node}; single patch:'));
            if (!e) return null; e.scrollIntoView(); const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        assert box is not None, f"no node {node} in the drawing"
        tab.send("Input.dispatchMouseEvent", type="mouseMoved", x=box[0], y=box[1])
        time.sleep(0.5)
        assert json.loads(tab.eval("JSON.stringify(window.drilldownViews.circuit.signal('pick'))"))["node"] == [node]
        labels = tab.eval("""Array.from(document.querySelectorAll('#drilldown-circuit path[aria-label]'))
            .map(e => e.getAttribute('aria-label')).filter(t => t.includes('weight'))""")
        n = [len(t) for t in pats["tokens"]]
        assert len(labels) == sum(k * (k + 1) // 2 for k in n)
        want = next(r["w"] for r in pats["rows"] if (r["node"], r["pair"]) == (node, 1))
        toks, q = pats["tokens"][1], n[1] - 1
        assert any(f"weight: {want[q * (q + 1) // 2]:.3f}" in t for t in labels
                   if t.startswith(f"key (attended to): 0 {toks[0]}; query: {q} {toks[q]};"))
        line = tab.eval("Array.from(document.querySelectorAll('#drilldown-circuit text')).map(t => t.textContent)"
                        ".find(t => t.startsWith('node '))")
        assert line.startswith(f"node {node}: single patch effect")
        assert not tab.errors(), tab.errors()[:3]
    finally:
        tab.close()
