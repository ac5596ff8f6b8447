"""The reports' drill-down: hover a head of the grid, or a node of a circuit, to see its attention pattern on two
example prompts.

    page = vega_bundle() + drilldown_html(result, "swap")   # one bundle per page; "" when there are no patterns
    page = vega_bundle() + circuit_drilldown_html(circuit_result, *circuit_layout(circuit_result))   # its nodes

A Vega-Lite chart (declarative JSON, rendered by Vega-Embed): the single-head patching grid (layer x head, colour =
delta LD) with a hover selection, the selected head's pattern on each example prompt (query x key, tokens as
labels, from ``analysis.heads.patterns``: ``AttentionPatterns.to_compact``), and a line with its patching effect
and direct logit attribution. Vega, Vega-Lite and Vega-Embed are embedded from ``vl-convert-python``'s bundle
(about 0.9 MB), so the page loads with no network. It reads only the results (``IOIResult``; a
``CircuitResult``'s ``baseline["patterns"]``, ``analysis.patterns.node_patterns``: ``a5.h3`` a head's pattern,
``a5`` the mean over a layer's heads where the graph does not separate them).
"""

from __future__ import annotations

import json

import numpy as np

from ..experiment.results import IOIResult

SCHEMA = "https://vega.github.io/schema/vega-lite/v5.json"  # an identifier only: nothing is fetched


def _pattern_view(pair: int, tokens: list[str]) -> dict:
    """One prompt's pattern of the selected head: the compact lower triangle unpacked by row number."""
    return {
        "title": {"text": f"example {pair}: {''.join(tokens)[:60]}", "fontSize": 11},
        "data": {"name": "patterns"}, "width": 300, "height": 300,
        "transform": [
            {"filter": {"param": "pick", "empty": False}}, {"filter": f"datum.pair == {pair}"},
            {"flatten": ["w"], "as": ["weight"]},
            {"window": [{"op": "row_number", "as": "i"}]},  # 1, 2, ...: entry i-1 of rows 0..q, keys 0..q each
            {"calculate": "floor((sqrt(8 * (datum.i - 1) + 1) - 1) / 2)", "as": "q"},
            {"calculate": "datum.i - 1 - datum.q * (datum.q + 1) / 2", "as": "k"},
            {"lookup": "pair", "from": {"data": {"name": "tokens"}, "key": "pair", "fields": ["tokens"]}},
            {"calculate": "datum.q + ' ' + datum.tokens[datum.q]", "as": "query"},
            {"calculate": "datum.k + ' ' + datum.tokens[datum.k]", "as": "key"},
        ],
        "mark": "rect",
        "encoding": {
            "x": {"field": "key", "type": "ordinal", "sort": {"field": "k"}, "title": "key (attended to)"},
            "y": {"field": "query", "type": "ordinal", "sort": {"field": "q"}, "title": "query"},
            "color": {"field": "weight", "type": "quantitative", "scale": {"domain": [0, 1], "scheme": "blues"},
                      "title": "attention"},
            "tooltip": [{"field": "query"}, {"field": "key"}, {"field": "weight", "format": ".3f"}],
        },
    }


def drilldown_spec(result: IOIResult, design: str) -> dict | None:
    """The Vega-Lite spec of the drill-down for ``design``'s single-head sweep; None without patterns or heads."""
    heads = (result.analysis or {}).get("heads", {})
    pats = heads.get("patterns")
    if not pats or not result.has("head", design):
        return None
    grid = result.head_grid(design)
    dla = np.asarray(heads.get("dla", []), dtype=float)
    cells = []
    for i, layer in enumerate(grid.layers):
        for h in range(grid.values.shape[1]):
            v = grid.values[i, h]
            d = dla[layer, h] if dla.ndim == 2 and layer < dla.shape[0] else float("nan")
            cells.append({"layer": int(layer), "head": h, "delta_ld": None if np.isnan(v) else round(float(v), 4),
                          "dla": None if np.isnan(d) else round(float(d), 4)})
    first = max(cells, key=lambda c: abs(c["delta_ld"] or 0.0))  # open on the strongest head
    grid_view = {
        "title": {"text": "single-head patching, all positions: hover a head", "fontSize": 11},
        "data": {"name": "grid"}, "width": max(120, 16 * grid.values.shape[1]), "height": max(120, 12 * len(cells) // grid.values.shape[1]),
        "params": [{"name": "pick", "value": [{"layer": first["layer"], "head": first["head"]}],
                    "select": {"type": "point", "on": "pointerover", "fields": ["layer", "head"], "clear": False}}],
        "mark": {"type": "rect"},
        "encoding": {
            "x": {"field": "head", "type": "ordinal"}, "y": {"field": "layer", "type": "ordinal", "sort": "descending"},
            "color": {"field": "delta_ld", "type": "quantitative", "title": "Δ logit diff",
                      "scale": {"scheme": "redblue", "domainMid": 0}},
            "stroke": {"condition": {"param": "pick", "empty": False, "value": "black"}, "value": None},
            "strokeWidth": {"condition": {"param": "pick", "empty": False, "value": 2}, "value": 0},
            "tooltip": [{"field": "layer"}, {"field": "head"}, {"field": "delta_ld", "format": ".3f", "title": "Δ LD"},
                        {"field": "dla", "format": ".3f", "title": "DLA"}],
        },
    }
    summary = {
        "data": {"name": "grid"}, "width": 300, "height": 16,
        "transform": [{"filter": {"param": "pick", "empty": False}},
                      {"calculate": "'head L' + datum.layer + 'H' + datum.head + ': patching effect (Δ LD) ' + "
                                    "format(datum.delta_ld, '.3f') + ', DLA ' + format(datum.dla, '.3f')", "as": "line"}],
        "mark": {"type": "text", "align": "left", "x": 0, "fontSize": 12, "fontWeight": "bold"},
        "encoding": {"text": {"field": "line"}},
    }
    tokens = [{"pair": b, "tokens": t} for b, t in enumerate(pats["tokens"])]
    return {
        "$schema": SCHEMA, "datasets": {"grid": cells, "patterns": pats["rows"], "tokens": tokens},
        "config": {"view": {"stroke": None}},
        "hconcat": [grid_view, {"vconcat": [summary] + [_pattern_view(b, t) for b, t in enumerate(pats["tokens"])]}],
        "resolve": {"scale": {"color": "independent"}},
    }


def vega_bundle() -> str:
    """Vega, Vega-Lite and Vega-Embed as one <script> (defines ``vegaEmbed``); once per page."""
    import vl_convert

    code = vl_convert.javascript_bundle().replace("</script", "<\\/script")  # never ends the tag early
    return "<script>" + code + "</script>"


def drilldown_html(result: IOIResult, design: str) -> str:
    """The drill-down's <div> and its embedding call (``vega_bundle`` must come first); "" when there is none."""
    return _embed(drilldown_spec(result, design), design)


def circuit_spec(result, edges: list, pos: dict[str, tuple[float, int]], widest: int) -> dict | None:
    """The circuit drawing (``circuit_report.circuit_layout``: edges, node positions, widest row) with a hover selection
    on its nodes, the node's single patch effect and classes, and its pattern on each example prompt."""
    pats = result.baseline.get("patterns")
    if not pats or not edges:
        return None
    effects, classes = result.baseline.get("head_effects") or {}, result.baseline.get("head_classes") or {}
    has = {r["node"] for r in pats["rows"]}
    nodes = [{"node": n, "x": x, "y": y, "has_pattern": n in has, "effect": effects.get(n),
              "classes": ", ".join(classes.get(n, []))} for n, (x, y) in pos.items()]
    top = max(abs(e[3]) for e in edges) or 1.0
    lines = [{"x": pos[a][0], "y": pos[a][1], "x2": pos[b][0], "y2": pos[b][1], "score": sc,
              "width": 0.4 + 3.5 * abs(sc) / top} for a, b, _, sc in edges]
    first = next(n["node"] for n in nodes if n["has_pattern"])
    xy = {"x": {"field": "x", "type": "quantitative", "axis": None},
          "y": {"field": "y", "type": "quantitative", "title": "layer (input -1, logits on top)"}}
    graph = {
        "title": {"text": f"the circuit's {len(edges)} strongest edges: hover a node", "fontSize": 11},
        "width": min(1000, max(400, 45 * widest)), "height": 360,
        "layer": [
            {"data": {"name": "edges"}, "mark": {"type": "rule", "opacity": 0.6},
             "encoding": {**xy, "x2": {"field": "x2"}, "y2": {"field": "y2"},
                          "color": {"condition": {"test": "datum.score > 0", "value": "#1f77b4"}, "value": "#d62728"},
                          "strokeWidth": {"field": "width", "type": "quantitative", "scale": None}}},
            {"data": {"name": "nodes"}, "mark": {"type": "circle", "size": 260, "opacity": 1},
             "params": [{"name": "pick", "value": [{"node": first}],
                         "select": {"type": "point", "on": "pointerover", "fields": ["node"], "clear": False}}],
             "encoding": {**xy, "color": {"condition": {"test": "datum.has_pattern", "value": "#9ecae1"},
                                          "value": "#dddddd"},
                          "stroke": {"condition": {"param": "pick", "empty": False, "value": "black"}, "value": None},
                          "tooltip": [{"field": "node"}, {"field": "effect", "format": ".3f", "title": "single patch"},
                                      {"field": "classes"}]}},
            {"data": {"name": "nodes"}, "mark": {"type": "text", "fontSize": 8, "dy": -12},
             "encoding": {**xy, "text": {"field": "node"}}},
        ],
    }
    summary = {
        "data": {"name": "nodes"}, "width": 600, "height": 16,
        "transform": [{"filter": {"param": "pick", "empty": False}},
                      {"calculate": "'node ' + datum.node + ': single patch effect ' + (datum.effect === null ? 'n/a' : "
                                    "format(datum.effect, '.3f')) + (datum.classes ? '; ' + datum.classes : '') + "
                                    "(datum.has_pattern ? '' : '; no attention pattern stored for this node')",
                       "as": "line"}],
        "mark": {"type": "text", "align": "left", "x": 0, "fontSize": 12, "fontWeight": "bold"},
        "encoding": {"text": {"field": "line"}},
    }
    tokens = [{"pair": b, "tokens": t} for b, t in enumerate(pats["tokens"])]
    return {
        "$schema": SCHEMA, "datasets": {"nodes": nodes, "edges": lines, "patterns": pats["rows"], "tokens": tokens},
        "config": {"view": {"stroke": None}},
        "vconcat": [graph, summary, {"hconcat": [_pattern_view(b, t) for b, t in enumerate(pats["tokens"])]}],
        "resolve": {"scale": {"color": "independent"}},
    }


def circuit_drilldown_html(result, edges: list, pos: dict, widest: int) -> str:
    """The circuit drill-down's <div> and embedding call (``vega_bundle`` first); "" without stored patterns."""
    return _embed(circuit_spec(result, edges, pos, widest), "circuit")


def _embed(spec: dict | None, name: str) -> str:
    if spec is None:
        return ""
    data = json.dumps(spec, separators=(",", ":")).replace("</", "<\\/")
    div = f"drilldown-{name}"
    return (f'<div id="{div}" class="drilldown"></div>\n'
            f'<script>vegaEmbed("#{div}", {data}, {{"actions": false, "renderer": "svg"}})'
            f'.then(function (r) {{ window.drilldownViews = window.drilldownViews || {{}}; '
            f'window.drilldownViews["{name}"] = r.view; }});</script>')
