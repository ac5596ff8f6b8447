"""Figures and report pages of a ``CircuitResult`` (they only read the result).

    fig = plot_faithfulness(result)    # faithfulness against circuit size: edge circuits vs node-level circuits
    fig = plot_circuit(result)         # the chosen circuit: nodes by layer, edge width by |score|, colour by sign
    fig = plot_curves([eap, eap_ig])   # several runs' curves, one panel per model and task
    save_circuit_plots(result, "runs/circuit")      # faithfulness.png, circuit.png
    render_circuit_md(result, plots); render_circuit_html(result, images)
"""

from __future__ import annotations

import re
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import pandas as pd  # noqa: E402

from ..experiment.circuit_result import CircuitResult  # noqa: E402
from .drilldown import circuit_drilldown_html, vega_bundle  # noqa: E402
from .pairsreport import figure_html, html_page, markdown_page  # noqa: E402

DRAWN_EDGES = 150  # a drawing of more edges is unreadable: the strongest ones are drawn, the title says so


def plot_faithfulness(result: CircuitResult) -> plt.Figure:
    """Faithfulness against the number of edges (log scale), one line per kind of circuit, the target dashed."""
    df = result.faithfulness_frame()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (method, select), part in df.groupby(["method", "select"], sort=False):
        part = part.sort_values("edges")
        label = "node-level (top heads by single-head patching)" if method == "nodes" else f"{method} edges, {select}"
        ax.plot(part.edges, part.faithfulness, marker="o", label=label)
    target = result.circuit.get("target", 0.8)
    ax.axhline(target, color="gray", ls="--", lw=1, label=f"target {target:g}")
    best = result.circuit
    ax.plot([best["n_edges"]], [best["faithfulness"]], marker="*", ms=14, color="black", ls="none", label="chosen circuit")
    ax.set_xscale("log")
    ax.set_xlabel("edges in the circuit (log scale)")
    ax.set_ylabel("faithfulness")
    ax.set_title(f"{result.config.get('task')}: {result.config.get('metric')}, {result.baseline['n_pairs']} pairs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_curves(results: Sequence[CircuitResult]) -> plt.Figure:
    """Several runs' faithfulness curves, one panel per model and task: each run's edge circuits, and the node-level
    circuits once (they do not depend on the edge method)."""
    panels: dict[tuple[str, str], list[CircuitResult]] = {}
    for r in results:
        panels.setdefault((str(r.model.get("spec") or r.model.get("model_id")), str(r.config.get("task"))), []).append(r)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, ((model, task), runs) in zip(axes[0], panels.items()):
        for i, r in enumerate(runs):
            for (method, select), part in r.faithfulness_frame().groupby(["method", "select"], sort=False):
                if method == "nodes" and i:
                    continue
                part = part.sort_values("edges")
                label = "node-level (top single heads)" if method == "nodes" else f"{method} ({select})"
                ax.plot(part.edges, part.faithfulness, marker="o", ms=3, label=label)
        ax.axhline(runs[0].circuit.get("target", 0.8), color="gray", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel(f"edges kept (of {runs[0].graph.get('n_edges')}, log scale)")
        ax.set_ylabel("faithfulness")
        ax.set_title(f"{task} on {model}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _layer_of(node: str, n_layers: int) -> int:
    if node == "input":
        return -1
    if node == "logits":
        return n_layers
    return int(re.match(r"[am](\d+)", node).group(1))


def circuit_layout(result: CircuitResult) -> tuple[list, dict[str, tuple[float, int]], int]:
    """The drawn edges (the strongest ``DRAWN_EDGES``), each node's (x, layer) with input at -1 and the logits on
    top, and the widest row's node count; shared by the PNG and the HTML drill-down."""
    edges = sorted(result.circuit["edges"], key=lambda e: -abs(e[3]))[:DRAWN_EDGES]
    n_layers = result.graph.get("n_layers", 1)
    nodes = dict.fromkeys(n for e in edges for n in e[:2])
    rows: dict[int, list[str]] = {}
    for node in sorted(nodes, key=lambda n: (_layer_of(n, n_layers), n.startswith("m"), n)):
        rows.setdefault(_layer_of(node, n_layers), []).append(node)
    pos = {n: (i - (len(ns) - 1) / 2, layer) for layer, ns in rows.items() for i, n in enumerate(ns)}
    return edges, pos, max((len(ns) for ns in rows.values()), default=1)


def plot_circuit(result: CircuitResult) -> plt.Figure:
    """The chosen circuit's strongest edges: a layered drawing (input at the bottom, logits on top)."""
    edges, pos, widest = circuit_layout(result)
    n_layers = result.graph.get("n_layers", 1)
    g = nx.DiGraph()
    for sender, receiver, inp, score in edges:
        g.add_edge(sender, receiver, score=score, input=inp)
    width = max(6.0, 0.9 * widest)
    fig, ax = plt.subplots(figsize=(min(width, 24), max(5.0, 0.45 * (n_layers + 2))))
    top = max((abs(e[3]) for e in edges), default=1.0) or 1.0
    colors = ["tab:blue" if g.edges[e]["score"] > 0 else "tab:red" for e in g.edges]
    widths = [0.4 + 3.5 * abs(g.edges[e]["score"]) / top for e in g.edges]
    node_colors = ["#bbbbbb" if n in ("input", "logits") else "#f6c28b" if n.startswith("m") else "#9ecae1" for n in g.nodes]
    nx.draw_networkx(g, pos, ax=ax, node_color=node_colors, edge_color=colors, width=widths, node_size=380,
                     font_size=6, arrowsize=6, connectionstyle="arc3,rad=0.08")
    shown = f"{len(edges)} strongest of {result.circuit['n_edges']} edges" if len(edges) < result.circuit["n_edges"] \
        else f"{len(edges)} edges"
    ax.set_title(f"circuit ({shown}); blue: score > 0, red: < 0; width: |score|", fontsize=9)
    ax.set_ylabel("layer")
    ax.tick_params(left=True, labelleft=True)
    ax.set_axis_on()
    fig.tight_layout()
    return fig


def save_circuit_plots(result: CircuitResult, out) -> list[str]:
    """Write faithfulness.png and circuit.png into ``out``; their names."""
    names = []
    for name, make in (("faithfulness.png", plot_faithfulness), ("circuit.png", plot_circuit)):
        fig = make(result)
        fig.savefig(f"{out}/{name}", dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def findings(result: CircuitResult) -> list[str]:
    """Plain sentences: the chosen circuit, how it compares with node-level circuits, attribution, stability."""
    c, out = result.circuit, []
    if c.get("reached_target"):
        out.append(f"The smallest {c['method']} circuit with faithfulness >= {c['target']:g} has {c['n_edges']} edges "
                   f"and {len(c['nodes'])} nodes (faithfulness {c['faithfulness']:.3f}).")
    else:
        out.append(f"No evaluated {c['method']} circuit reached faithfulness {c['target']:g}: no small faithful circuit "
                   f"here. The largest reached {c['faithfulness']:.3f} with {c['n_edges']} edges.")
    nodes = result.faithfulness_frame().query("method == 'nodes'")
    hit = nodes[nodes.faithfulness >= c["target"]]
    if len(hit):
        row = hit.sort_values("edges").iloc[0]
        out.append(f"Node-level circuits (top heads by single-head patching) first reach it with {int(row['size'])} "
                   f"heads, {int(row['edges'])} edges.")
    out += _benchmark_findings(result)
    effects = result.baseline.get("head_effects") or {}
    if effects:
        top = sorted(effects, key=lambda n: -abs(effects[n]))[:10]
        senders = {e[0] for e in c["edges"]}
        missing = [n for n in top if n not in senders]
        out.append(f"Of the {len(top)} attention senders that move the metric most when patched alone (all positions), "
                   f"{len(top) - len(missing)} send edges in the circuit" + (f"; not: {', '.join(missing)}." if missing else "."))
    out += _class_findings(result)
    att = result.attribution_check
    out.append(f"Edge scores are attribution estimates; on {att['n_edges']} edges re-measured by exact patching, "
               f"Spearman {att['spearman']:.2f}, signs agree on {100 * att['sign_agreement']:.0f}%.")
    s = result.stability
    if s.get("resample_jaccard_mean") is not None:
        out.append(f"Stability: edge Jaccard with circuits from resampled pairs {s['resample_jaccard_mean']:.2f}.")
    if s.get("random_split_jaccard") is not None:
        n = [x["n_pairs"] for x in s["subsets"] if x["subset"].startswith("random half")]
        line = (f"Circuits from two random halves of the pairs ({n[0]} and {n[1]}) share "
                f"{s['random_split_jaccard']:.2f} of their edges (Jaccard)")
        if s.get("template_split_jaccard") is not None:
            line += f"; two halves with no template in common share {s['template_split_jaccard']:.2f}"
        out.append(line + ".")
    return out


def _benchmark_findings(result: CircuitResult) -> list[str]:
    """CPR and CMD of each curve (MIB's definitions, ``analysis.mib_scores``)."""
    scores = result.benchmark_scores()
    scores = scores[scores.cpr.notna()]
    if scores.empty:
        return []
    parts = [f"{'node-level (fraction of heads)' if r.method == 'nodes' else r.method} CPR {r.cpr:.3f}, CMD {r.cmd:.3f}"
             for r in scores.itertuples()]
    return ["Benchmark scores as MIB defines them (faithfulness at 0.1% to 100% of the edges, trapezoids over the "
            "fraction; CPR: area under the curve, higher is better; CMD: area between it and 1, lower is better): "
            + "; ".join(parts) + "."]


CLASS_ORDER = ("name mover", "negative name mover", "backup name mover", "S-inhibition", "S suppressor", "induction",
               "duplicate token", "previous token")


def _class_findings(result: CircuitResult) -> list[str]:
    """How the circuit's heads line up with the IOI head classes (IOI pairs only)."""
    classes = result.baseline.get("head_classes")
    if classes is None:
        return []
    inside = set(result.circuit.get("heads", []))
    if not classes:
        return [f"No head meets the IOI class thresholds (analysis.heads) on these pairs; the circuit has {len(inside)} "
                "heads and none can be named by class."]
    parts = []
    for cls in CLASS_ORDER:
        members = [h for h, cl in classes.items() if cls in cl]
        if members:
            hit = [h for h in members if h in inside]
            parts.append(f"{cls} {len(hit)} of {len(members)}" + (f" ({', '.join(hit[:6])})" if hit else ""))
    unnamed = sorted(inside - set(classes))
    coarse = "" if result.graph.get("head_senders", True) else (
        " Heads count here when their layer's attention writes in the circuit and they read in it: this model's "
        "attention writes through a norm, so one head's write is not separable from its layer's.")
    return [f"IOI head classes (attention, DLA and copy-score thresholds, analysis.heads) in the circuit's "
            f"{len(inside)} heads: " + "; ".join(parts) + f". {len(unnamed)} of the circuit's heads have no class."
            + coarse]


def head_table(result: CircuitResult, top: int = 10) -> pd.DataFrame:
    """The circuit's heads, the classified heads and the top single-head patches, side by side."""
    effects = result.baseline.get("head_effects") or {}
    classes = result.baseline.get("head_classes") or {}
    inside = set(result.circuit.get("heads", []))
    rank = {n: i + 1 for i, n in enumerate(sorted(effects, key=lambda n: -abs(effects[n])))}
    top_heads = {n for n in rank if rank[n] <= top and ".h" in n}
    rows = []
    for name in sorted(inside | set(classes) | top_heads, key=_head_key):
        sender = name if name in effects else name.split(".")[0]  # a layer's attention where heads are not separable
        rows.append({"head": name, "in circuit": name in inside, "single patch of": sender,
                     "effect": effects.get(sender), "rank": rank.get(sender), "IOI classes": ", ".join(classes.get(name, []))})
    return pd.DataFrame(rows, columns=["head", "in circuit", "single patch of", "effect", "rank", "IOI classes"])


def _head_key(name: str) -> tuple[int, int]:
    layer, head = re.match(r"a(\d+)\.h(\d+)", name).groups()
    return int(layer), int(head)


def _tables(result: CircuitResult) -> dict[str, pd.DataFrame]:
    checks = pd.DataFrame([{"check": k, "passed": v["passed"], "detail": v["detail"]} for k, v in result.sanity.items()])
    edges = pd.DataFrame(result.circuit["edges"][:25], columns=["sender", "receiver", "input", "score (estimate)"])
    tables = {"sanity checks": checks}
    side = result.side_by_side()
    if len(side.columns) > 1:  # --compare: every method at equal edge counts
        tables["methods side by side: faithfulness at equal edge counts, then the areas under and over each curve"] = (
            side.reset_index(names="edges kept"))
    tables.update({"benchmark scores of each curve (areas as the benchmark defines them)": result.benchmark_scores(),
                   "faithfulness": result.faithfulness_frame(),
                   "strongest edges of the circuit": edges,
                   "heads of the circuit, their single-head patches and classes": head_table(result)})
    subsets = result.stability.get("subsets") or []
    if subsets:  # each subset's circuit, of the chosen size, against the chosen circuit; the halves' own Jaccard
        between = {"random": result.stability.get("random_split_jaccard"),
                   "template": result.stability.get("template_split_jaccard")}
        tables["stability: circuits with as many edges as the chosen one, from subsets of the pairs"] = pd.DataFrame(
            [{"subset": x["subset"], "pairs": x["n_pairs"], "Jaccard with the chosen circuit": x["jaccard"],
              "Jaccard with the other half": between.get(x["subset"].split(" half")[0]) if " half" in x["subset"] else ""}
             for x in subsets])
    return tables


def render_circuit_md(result: CircuitResult, plots: list[str]) -> str:
    """report.md of a circuit run."""
    status = "all sanity checks passed" if result.passed else "SANITY CHECKS FAILED: do not trust these numbers"
    intro = (f"Metric `{result.config.get('metric')}`, {result.baseline['n_pairs']} pairs, {result.graph.get('n_edges')} "
             f"edges in the model's graph; {status}.")
    return markdown_page(_title(result), intro, plots, findings(result), _tables(result),
                         str(result.config.get("command") or "actpatch.run_circuit(...)"))


def render_circuit_html(result: CircuitResult, images: dict[str, bytes]) -> str:
    """report.html of a circuit run, self-contained."""
    head = [f'<p>Sanity checks: <strong id="status">{"passed" if result.passed else "FAILED"}</strong></p>']
    head += [figure_html(name, data) for name, data in images.items()]
    drill = circuit_drilldown_html(result, *circuit_layout(result))
    if drill:  # hover a node of the drawing: its attention pattern on two example prompts
        head += ["<h2>Drill down: hover a node</h2>", vega_bundle(), drill]
    return html_page(_title(result), head, findings(result), _tables(result), [],
                     {"config": result.config, "model": result.model, "environment": result.environment},
                     str(result.config.get("command")))


def _title(result: CircuitResult) -> str:
    return f"actpatch circuit: {result.config.get('task')} on {result.model.get('model_id')}"
