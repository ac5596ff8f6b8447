"""EAP, EAP-IG (inputs), EAP-IG (activations) and exact edge patching, side by side on the same pairs.

    curves = compare_methods(cfg, lm, graph, batch, don, score, evaluate, full, empty, {"eap": scores}, disable)
    side_by_side(result.faithfulness_frame(), n_edges)   # faithfulness per method at equal edge counts, CPR, CMD

Every method's circuits are chosen the same way (top-n edges by |score|, then pruned) and measured by the same
exact edge patching, at MIB's edge fractions. "exact" scores each edge by its own exact patch (one edge-patched
forward of every pair per edge): on a model with tens of thousands of edges that is only affordable for candidates,
so it scores the union of the other methods' ``exact_candidates`` top edges and is drawn only at sizes up to
that many edges. An edge with a large exact effect that no estimate ranks among its top is missed by it.
"""

from __future__ import annotations

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..analysis.mib_scores import MIB_FRACTIONS, cpr_cmd
from ..engine.eap_scores import edge_scores
from ..engine.circuit_graph import Graph
from .faithfulness_curve import measure_curve

METHODS = ("eap", "eap-ig-inputs", "eap-ig-activations")  # MIB's names; "eap-ig" is EAP-IG on the inputs
ALIASES = {"eap-ig": "eap-ig-inputs"}


def steps_of(cfg, method: str) -> tuple[int | None, str]:
    """(IG steps, what is interpolated) of ``method``: (None, "inputs") for EAP."""
    return (None, "inputs") if method == "eap" else (cfg.ig_steps, method.removeprefix("eap-ig-"))


def exact_scores(graph: Graph, evaluate, base: float, candidates: torch.Tensor, bar=None) -> torch.Tensor:
    """(R, S): the exact change of the mean metric when each candidate edge alone is patched to the donor (0
    elsewhere). ``candidates``: (R, S) bool."""
    out = torch.zeros(graph.allowed.shape)
    for r, s in (candidates & graph.allowed).nonzero().tolist():
        w = torch.zeros(graph.allowed.shape)
        w[r, s] = 1.0
        out[r, s] = float(evaluate.per_pair(None, weights=w).mean()) - base
        if bar is not None:
            bar.update(1)
    return out


def _top(graph: Graph, scores: torch.Tensor, n: int) -> torch.Tensor:
    flat = scores.abs().masked_fill(~graph.allowed, -1).flatten()
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[flat.topk(min(n, graph.n_edges)).indices] = True
    return keep.view(graph.allowed.shape)


def compare_methods(cfg, lm, graph: Graph, batch, don, score, evaluate, full, empty, scored: dict,
                    disable) -> list[dict]:
    """Faithfulness rows (``measure_curve``) of every method not in ``scored`` (which it fills in), then of exact
    edge patching on the candidates; each curve at MIB's fractions, without bisection."""
    work: dict = {}  # the scoring's scratch memory, reused by every method
    for method in METHODS:
        if method not in scored:
            steps, what = steps_of(cfg, method)
            scored[method] = edge_scores(lm, graph, batch, score, don, steps=steps, interpolate=what, workspace=work,
                                         accumulate=cfg.ig_buffer)
    del work
    candidates = torch.zeros_like(graph.allowed)
    for sc in scored.values():
        candidates |= _top(graph, sc, cfg.exact_candidates)
    with tqdm(total=int(candidates.sum()), desc="exact edge scores", disable=disable, dynamic_ncols=True) as bar:
        scored["exact"] = exact_scores(graph, evaluate, float(full.mean()), candidates, bar)
    rows = []
    with tqdm(total=0, desc="faithfulness (compare)", disable=disable, dynamic_ncols=True) as bar:
        for method, sc in scored.items():
            if method == cfg.method:
                continue  # the run's own curve is measured with the run
            cap = cfg.exact_candidates if method == "exact" else graph.n_edges
            bar.total += len(MIB_FRACTIONS)
            curve, _ = measure_curve(cfg, graph, sc, evaluate, full, empty, [], bar, method=method, refine=False,
                                     cap=cap)
            rows += curve
    return rows


def grid_scores(curve: pd.DataFrame) -> tuple[float, float]:
    """(CPR, CMD) of one curve's rows on the MIB grid; (nan, nan) unless it has every grid point."""
    grid = curve[curve.grid == True]  # noqa: E712 (bools, or objects when read back from CSV)
    if len(grid) != len(MIB_FRACTIONS):
        return float("nan"), float("nan")
    return cpr_cmd(grid.fraction, grid.faithfulness)


def side_by_side(frame: pd.DataFrame, n_edges: int) -> pd.DataFrame:
    """One row per MIB fraction (edges), one column per method's faithfulness there, then CPR and CMD rows (NaN for
    a curve that does not cover the whole grid, e.g. exact patching of candidates)."""
    grid = frame[frame.get("grid", False) == True]  # noqa: E712 (a column of bools, NaN on other rows)
    if grid.empty:
        return pd.DataFrame()
    table = grid.pivot_table(index="fraction", columns="method", values="faithfulness", aggfunc="first")
    order = [m for m in ("eap", "eap-ig-inputs", "eap-ig-activations", "exact") if m in table.columns]
    table = table[order + [m for m in table.columns if m not in order]]
    table.index = [f"{100 * f:g}% ({int(f * n_edges)} edges)" for f in table.index]
    scores = {method: grid_scores(grid[grid.method == method]) for method in table.columns}
    table.loc["CPR (higher is better)"] = [scores[m][0] for m in table.columns]
    table.loc["CMD (lower is better)"] = [scores[m][1] for m in table.columns]
    return table
