"""Faithfulness curves: how much of the model's behaviour circuits of growing size keep, measured by edge patching.

    evaluate = Evaluator(lm, graph, batch, donor, score, rows)   # the mean metric with every edge outside a circuit
    rows, kept = measure_curve(cfg, graph, scores, evaluate, full, empty, sizes, bar)   # MIB grid + sizes + bisection
    node_curve(graph, head_effects, evaluate, full, empty, bar)  # circuits of the top-k heads (single-head patching)

faithfulness(C) = (m(C) - m(empty)) / (m(model) - m(empty)), with m the mean metric over pairs, C kept at the
recipient's values and every other edge patched to the donor; the empty circuit patches every edge. Each curve is
measured at MIB's edge fractions (``analysis.mib_scores``), which its CPR and CMD are computed from.
"""

from __future__ import annotations

import numpy as np
import torch

from ..analysis.circuit_pruning import circuit_nodes, greedy_edges, node_circuit, top_edges
from ..analysis.mib_scores import MIB_FRACTIONS, mib_sizes
from ..engine.edge_patching import edge_patched_logits
from ..engine.circuit_graph import Graph
from ..model.models import LoadedModel


class Evaluator:
    """The mean metric of the recipient run with every edge outside a circuit patched to the donor."""

    def __init__(self, lm: LoadedModel, graph: Graph, batch, donor: torch.Tensor, score, rows: int) -> None:
        self.lm, self.graph, self.batch, self.donor, self.score, self.rows = lm, graph, batch, donor, score, rows
        self.calls = 0

    def per_pair(self, keep: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) metric with ``weights`` (default: 1 outside ``keep``) of each edge patched."""
        w = (self.graph.allowed & ~keep).float() if weights is None else weights
        out = []
        for lo in range(0, len(self.batch), self.rows):
            part = slice(lo, lo + self.rows)
            logits = edge_patched_logits(self.lm, self.graph, self.batch.select(part), self.donor[:, part], w)
            out.append(self.score(logits, part).float().cpu())
        self.calls += 1
        return torch.cat(out)

    def __call__(self, keep: torch.Tensor) -> float:
        return float(self.per_pair(keep).mean())


def select_circuit(cfg, graph: Graph, scores: torch.Tensor, n: int) -> torch.Tensor:
    if n < 1:
        return torch.zeros_like(graph.allowed)  # MIB's 0.1% of a tiny graph: the empty circuit
    return (greedy_edges if cfg.select == "greedy" else top_edges)(graph, scores, min(n, graph.n_edges))


def point(graph: Graph, keep: torch.Tensor, m: torch.Tensor, full: torch.Tensor, empty: torch.Tensor, **info) -> dict:
    per_pair = (m - empty) / (full - empty)
    f = float((m.mean() - empty.mean()) / (full.mean() - empty.mean()))
    q = np.nanquantile(per_pair.numpy(), [0.25, 0.5, 0.75]) if len(per_pair) else [np.nan] * 3
    return {**info, "edges": int(keep.sum()), "nodes": len(circuit_nodes(graph, keep)), "metric": float(m.mean()),
            "faithfulness": f, "pair_q25": float(q[0]), "pair_median": float(q[1]), "pair_q75": float(q[2])}


def measure_curve(cfg, graph, scores, evaluate, full, empty, sizes, bar, method=None, refine=True, cap=None):
    """The faithfulness of ``method``'s circuit at every MIB fraction of the edges (``grid`` rows) up to ``cap``
    edges, at ``sizes``, and, with ``refine``, at a few sizes bisected towards the smallest that reaches the
    target."""
    rows, kept = [], {}
    method = method or cfg.method
    n_all = graph.n_edges
    points = [(n, f, True) for n, f in zip(mib_sizes(n_all), MIB_FRACTIONS) if cap is None or n <= cap]
    points += [(n, n / n_all, False) for n in sizes if n not in {p[0] for p in points}]

    def measure(n: int, fraction: float, grid: bool) -> dict:
        keep = kept[n] = select_circuit(cfg, graph, scores, n)
        row = point(graph, keep, evaluate.per_pair(keep), full, empty, method=method, select=cfg.select, size=n,
                     fraction=fraction, grid=grid)
        rows.append(row)
        bar.update(1)
        return row

    for n, fraction, grid in points:
        measure(n, fraction, grid)
    small = max(1, n_all // 3)  # a circuit of half or all the edges is no answer: no bisection towards it
    above = sorted(r["size"] for r in rows if r["faithfulness"] >= cfg.target and r["size"] <= small)
    if above and refine:  # bisect between the smallest size that reaches the target and the largest below it
        hi = above[0]
        lo = max([r["size"] for r in rows if r["size"] < hi], default=0)
        for _ in range(5):
            if hi - lo <= max(1, lo // 20):
                break
            mid = (lo + hi) // 2
            bar.total += 1  # the bisection's points are counted as they come
            row = measure(mid, mid / n_all, False)
            lo, hi = (lo, mid) if row["faithfulness"] >= cfg.target else (mid, hi)
    return sorted(rows, key=lambda r: r["size"]), kept


def node_curve(graph, effects: dict[str, float], evaluate, full, empty, bar) -> list[dict]:
    ranked = sorted(effects, key=lambda n: -abs(effects[n]))
    counts = sorted({int(round(x)) for x in np.geomspace(1, len(ranked), min(10, len(ranked)))})
    rows = []
    for k in counts:
        keep = node_circuit(graph, ranked[:k])
        rows.append(point(graph, keep, evaluate.per_pair(keep), full, empty, method="nodes", select="single-head",
                           size=k, fraction=k / len(ranked), grid=False))
        bar.update(1)
    return rows
