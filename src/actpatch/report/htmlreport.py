"""A self-contained ``report.html``: one file to open, share or attach; all but the drill-down reads with JavaScript off.

    page = render_html(result, {"layers.png": png_bytes, ...})   # a str; the CLI writes report.html

What is in it: the headline figure (hidden states vs heads per layer) first, the status and model, the sanity checks as a pass/fail table, the baseline, the head
classes, and per design the findings, the per-layer table, the account of the gap and one heatmap of
the single-head sweep as inline SVG (hovering
a cell shows its layer, head and value through the cell's SVG <title>, so the interactivity needs
no script), the drill-down (``drilldown``: hover a head for its attention pattern; Vega-Lite, embedded), every PNG
plot embedded as base64, and the exact command and config. It reads only the
``IOIResult`` (and the plots' bytes). Tables come from pandas (``DataFrame.to_html``, escaped).
"""

from __future__ import annotations

import base64
import html
import json
import re

import numpy as np
import pandas as pd

from ..engine.sanity import CHECK_DESCRIPTIONS
from ..experiment.results import IOIResult
from .drilldown import drilldown_html, vega_bundle
from .markdown import GAP_HEADERS, findings, gap_rows, gap_text

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; }
td.pass { background: #d9f2d9; color: #135f13; font-weight: bold; text-align: center; }
td.fail { background: #f8d0d0; color: #8a1010; font-weight: bold; text-align: center; }
.status-pass { color: #135f13; } .status-fail { color: #8a1010; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
svg.heatmap rect:hover { stroke: #000; stroke-width: 2; }
"""


def _color(value: float, lim: float) -> str:
    """Diverging blue (positive) / red (negative) fill, white at 0."""
    if not np.isfinite(value):
        return "#dddddd"
    t = max(-1.0, min(1.0, value / lim)) if lim else 0.0
    r, g, b = (255, int(255 * (1 - abs(t))), int(255 * (1 - abs(t)))) if t < 0 else (int(255 * (1 - t)), int(255 * (1 - t * 0.6)), 255)
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap_svg(result: IOIResult, design: str, cell: int = 22) -> str:
    """The single-head sweep as an SVG grid; each cell's <title> is its tooltip (layer, head, Δ LD)."""
    grid = result.head_grid(design)
    values = grid.values
    lim = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    left, top = 40, 20
    grid_w, grid_h = cell * values.shape[1], cell * values.shape[0]
    width, height = left + grid_w + 80, top + max(grid_h, 110) + 10  # room for the colour bar
    parts = [f'<svg class="heatmap" id="heatmap-{html.escape(design)}" xmlns="http://www.w3.org/2000/svg" '
             f'width="{width}" height="{height}" role="img" aria-label="single-head patching, donor {html.escape(design)}">']
    parts.append(f'<text x="{left - 6}" y="{top - 6}" font-size="9" text-anchor="end">L \\ H</text>')  # rows: layer, columns: head
    for h in range(values.shape[1]):
        parts.append(f'<text x="{left + h * cell + cell / 2}" y="{top - 6}" font-size="9" text-anchor="middle">{h}</text>')
    for i, layer in enumerate(grid.layers):
        parts.append(f'<text x="{left - 6}" y="{top + i * cell + cell * 0.7}" font-size="9" text-anchor="end">{layer}</text>')
        for h in range(values.shape[1]):
            v = float(values[i, h])
            label = f"layer {layer}, head {h}: \u0394 logit diff {v:+.3f}" if np.isfinite(v) else f"layer {layer}, head {h}: not patched"
            parts.append(f'<rect x="{left + h * cell}" y="{top + i * cell}" width="{cell}" height="{cell}" '
                         f'fill="{_color(v, lim)}"><title>{html.escape(label)}</title></rect>')
    parts += _colour_bar(left + grid_w + 14, top, lim)
    parts.append("</svg>")
    return "".join(parts)


def _colour_bar(x: float, y: float, lim: float, steps: int = 21, h: float = 100.0) -> list[str]:
    """A stepped vertical colour scale from +lim (top) to -lim (bottom), labelled at the ends and 0."""
    step = h / steps
    out = [f'<rect x="{x}" y="{y + k * step:.1f}" width="12" height="{step + 0.5:.1f}" '
           f'fill="{_color(lim * (1 - 2 * k / (steps - 1)), lim)}"/>' for k in range(steps)]
    for frac, text in ((0.0, f"+{lim:.2f}"), (0.5, "0"), (1.0, f"\u2212{lim:.2f}")):
        out.append(f'<text x="{x + 16}" y="{y + frac * h + 3:.1f}" font-size="9">{text}</text>')
    out.append(f'<text x="{x}" y="{y + h + 12:.1f}" font-size="9">\u0394 LD</text>')
    return out


LAYER_COLUMNS = [("hidden", "all"), ("hidden", "END"), ("all_heads", "all"), ("all_heads", "END")]


def _inline(text: str) -> str:
    """Escaped text with the Markdown report's inline marks: **bold** and `code`."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def _table(rows: list[dict], table_id: str) -> str:
    return pd.DataFrame(rows).to_html(index=False, table_id=table_id, escape=True, float_format=lambda x: f"{x:.3f}")


def _sanity_table(result: IOIResult) -> str:
    rows = []
    for name, check in result.sanity.items():
        cls, word = ("pass", "pass") if check["passed"] else ("fail", "FAIL")
        rows.append(f'<tr><td style="text-align:left">{html.escape(name)}</td><td class="{cls}">{word}</td>'
                    f'<td style="text-align:left">{html.escape(CHECK_DESCRIPTIONS.get(name, ""))}</td>'
                    f'<td style="text-align:left">{html.escape(str(check["detail"]))}</td></tr>')
    return ('<table id="sanity"><thead><tr><th>check</th><th>result</th><th>what it asserts</th><th>detail</th></tr>'
            '</thead><tbody>' + "".join(rows) + "</tbody></table>")


CAPTIONS = {
    "layers": "Mean logit difference after patching each layer: hidden states vs all heads of the layer",
    "heads": "Single-head patching (all positions), Δ logit diff per layer and head, donor",
    "heads_attribution": "Attribution patching estimate per head (gradient, all positions), donor",
    "attribution_vs_exact": "Attribution estimate against exact patching, one point per head, donor",
    "positions": "Patching at one named position: hidden states and all heads, donor",
    "heads_by_position": "Single heads patched at one named position, donor",
}


def _caption(name: str) -> str:
    stem = name.removesuffix(".png")
    for kind in sorted(CAPTIONS, key=len, reverse=True):  # heads_attribution before heads
        if stem == kind:
            return CAPTIONS[kind] + "."
        if stem.startswith(kind + "_"):
            return f"{CAPTIONS[kind]} {stem[len(kind) + 1:]}."
    return stem


def _figure(name: str, data: bytes) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return (f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{html.escape(_caption(name))} <code>{html.escape(name)}</code></figcaption></figure>")


def render_html(result: IOIResult, plots: dict[str, bytes] | None = None) -> str:
    """The whole page as one string (no external files, no script)."""
    m, cfg = result.model, result.config
    ok = result.passed
    status = "PASSED" if ok else "FAILED: do not trust these numbers"
    baseline = [{"design": d, "prompts": who, **{k: v for k, v in base[who].items()}}
                for d, base in result.baseline["designs"].items() for who in ("recipient", "donor")]
    body = [
        f"<h1>IOI activation patching — {html.escape(str(m.get('model_id')))}</h1>",
        *([_figure("layers.png", plots["layers.png"])] if plots and "layers.png" in plots else []),  # the headline first
        f'<p>{result.n_layers} layers × {result.n_heads} heads, {html.escape(str(m.get("dtype")))} on '
        f'{html.escape(str(m.get("device")))}; {int(result.baseline["n_pairs"])} pairs per design. Sanity checks: '
        f'<strong class="status-{"pass" if ok else "fail"}" id="status">{status}</strong></p>',
        "<h2>Sanity checks</h2>", _sanity_table(result),
        "<h2>Baseline</h2>", _table(baseline, "baseline"),
    ]
    heads = (result.analysis or {}).get("heads", {})
    classes = heads.get("classes", [])
    if classes:
        body.append("<h2>Heads classified by role</h2>")
        body.append(_table([{"head": f"L{c['layer']}H{c['head']}", "classes": ", ".join(c["classes"]), **c["evidence"]}
                            for c in classes if set(c["classes"]) - {"previous token", "duplicate token"}], "head-classes"))
    if heads.get("class_rules"):
        near = heads.get("near_misses", {})
        body.append("<h3>Thresholds, and the heads that nearly qualified</h3>")
        body.append(_table([{"class": cls, "criteria": rule, "nearly qualified": "; ".join(
            f"L{r['layer']}H{r['head']} missed {r['missed']}" for r in near.get(cls, [])[:3]) or "–"}
            for cls, rule in heads["class_rules"].items()], "class-rules"))
    df = result.to_dataframe()
    bundled = False
    for design in result.designs:
        body.append(f"<h2>Donor design <code>{html.escape(design)}</code></h2>")
        body.append(f'<ul class="findings" id="findings-{html.escape(design)}">'
                    + "".join(f"<li>{_inline(x)}</li>" for x in findings(result, design)) + "</ul>")
        layer = df[(df.design == design) & df.experiment.isin(["hidden", "all_heads"]) & df.position.isin(["all", "END"])]
        if len(layer):
            wide = layer.pivot_table(index="layer", columns=["experiment", "position"], values="logit_diff")
            order = [c for c in LAYER_COLUMNS if c in wide.columns]  # the Markdown report's order
            wide = wide[order]
            wide.columns = [f"{'hidden state' if e == 'hidden' else 'all heads'}, "
                            f"{'END only' if p == 'END' else 'all positions'}" for e, p in order]
            body.append("<p>Mean logit difference after patching each layer:</p>")
            body.append(wide.reset_index().to_html(index=False, table_id=f"layers-{html.escape(design)}",
                                                   float_format=lambda x: f"{x:.2f}"))
        if result.has("head", design):
            grid = result.head_grid(design).values
            lim = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
            body.append(f"<p>Single-head patching, all positions: rows are layers, columns heads. Hover a cell for "
                        f"layer, head and Δ LD; blue raises LD, red lowers it, full colour at ±{lim:.2f}.</p>")
            body.append(heatmap_svg(result, design))
            drill = drilldown_html(result, design)
            if drill:
                if not bundled:
                    body.append(vega_bundle())
                    bundled = True
                body.append(f"<p>Drill down (needs JavaScript, embedded: no network): hover a head to see its attention "
                            f"pattern on two example prompts, its patching effect and its DLA.</p>{drill}")
        info = (result.analysis or {}).get("designs", {}).get(design)
        if info:
            para, lines = gap_text(result, design, info)
            body.append(f"<h3>Why heads move LD less than hidden states</h3><p>{_inline(para)}</p>")
            body.append(pd.DataFrame(gap_rows(info), columns=GAP_HEADERS).to_html(
                index=False, table_id=f"gap-{html.escape(design)}", escape=True))
            body.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in lines) + "</ul>")
    if plots:
        body.append("<h2>Plots</h2>")
        body += [_figure(name, data) for name, data in plots.items() if name != "layers.png"]
    body += [
        "<h2>Reproduce</h2>",
        f'<p>Command:</p><pre id="command">{html.escape(str(cfg.get("command") or "actpatch.run_ioi(...)"))}</pre>',
        '<p>Config, model and environment:</p><pre id="config">'
        + html.escape(json.dumps({"config": cfg, "model": m, "environment": result.environment}, indent=2, default=str))
        + "</pre>",
    ]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>actpatch report — "
            f"{html.escape(str(m.get('model_id')))}</title><style>{STYLE}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
