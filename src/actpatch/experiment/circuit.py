"""Find a task's circuit and measure it: edge scores (EAP, EAP-IG), selection, faithfulness curves, checks.

    result = run_circuit(CircuitConfig(task="ioi", method="eap-ig", ig_steps=5))
    result = run_circuit(task="pairs", pairs_file="facts.jsonl", metric="logprob", select="greedy")

faithfulness(C) = (m(C) - m(empty)) / (m(model) - m(empty)), with m the mean metric over pairs, C kept at the
recipient's values and every other edge patched to the donor; the empty circuit patches every edge. The curve
covers about ten circuit sizes, next to node-level circuits made of the heads that matter most when patched one
at a time (all positions). The checks of ``experiment.circuitchecks`` run every time.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..analysis.circuits import (circuit_heads, circuit_nodes, exact_prune, greedy_edges, node_circuit, top_edges,
                                 top_edges_with)
from ..analysis.patterns import node_patterns
from ..engine.capture import last_logits
from ..engine.eap import edge_scores, group_rows
from ..engine.edges import edge_patched_logits, sender_outputs
from ..engine.graph import Graph, build_graph
from ..engine.hooks import count_hooks
from ..engine.metrics import TASK_METRICS, task_scores
from ..engine.sanity import check_no_hooks_left
from ..engine.pairs import PromptPair
from ..errors import ConfigError, UnsupportedArchitectureError
from ..model.models import DEFAULT_MODEL, LoadedModel
from .circuitchecks import attribution_check, head_classes, head_effects, run_circuit_checks, stability
from .circuitresult import CircuitResult
from .config import environment
from .contrast import PairsConfig, _pairs_for
from .selftest import load_checked

log = logging.getLogger(__name__)
METHODS = ("eap", "eap-ig")
SELECTIONS = ("top", "greedy", "exact")


@dataclass(frozen=True)
class CircuitConfig:
    """Everything that determines an ``actpatch circuit`` run; saved with its results.

    Example::

        run_circuit(CircuitConfig(task="greater-than", method="eap", edges=(50, 200, 1000)))
    """

    model: str = DEFAULT_MODEL
    task: str = "ioi"
    pairs_file: str | None = None
    n_pairs: int = 16
    design: str | None = None
    seed: int = 0
    metric: str | None = None          # None: the task's
    method: str = "eap-ig"
    ig_steps: int = 5
    select: str = "top"                # top: top-n then pruned; greedy: grown from the logits; exact: ACDC-style
    edges: tuple[int, ...] | None = None   # circuit sizes of the curve; None: about ten, log-spaced
    target: float = 0.8                # the faithfulness the smallest circuit must reach
    exact_threshold: float = 0.01      # exact pruning: drop an edge moving the metric by < this x (model - empty)
    resamples: int = 3                 # stability: circuits from resampled pairs (0: skip)
    device: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    max_rows: int | None = None
    progress: bool | None = None
    command: str | None = None

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method (--method) must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.select not in SELECTIONS:
            raise ConfigError(f"select (--select) must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if not isinstance(self.ig_steps, int) or self.ig_steps < 1:
            raise ConfigError(f"ig_steps (--ig-steps) must be an int >= 1, got {self.ig_steps!r}")
        if self.metric is not None and self.metric not in TASK_METRICS:
            raise ConfigError(f"metric (--metric) must be one of {', '.join(TASK_METRICS)}, got {self.metric!r}")
        if self.edges is not None and (not self.edges or any(not isinstance(n, int) or n < 1 for n in self.edges)):
            raise ConfigError(f"edges (--edges) must be positive ints, got {self.edges!r}")
        if not 0 < self.target <= 1:
            raise ConfigError(f"target (--target) must be in (0, 1], got {self.target!r}")


def default_sizes(n_edges: int, n: int = 10) -> list[int]:
    """About ``n`` circuit sizes, log-spaced from 10 edges (or fewer on a tiny model) to a third of all edges."""
    hi = max(2, n_edges // 3)
    return sorted({int(round(x)) for x in np.geomspace(min(10, hi), hi, n)})


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


def _select(cfg: CircuitConfig, graph: Graph, scores: torch.Tensor, n: int) -> torch.Tensor:
    return (greedy_edges if cfg.select == "greedy" else top_edges)(graph, scores, min(n, graph.n_edges))


def _same_size(cfg: CircuitConfig, graph: Graph, scores: torch.Tensor, chosen: dict) -> torch.Tensor:
    """A circuit from other scores with as many edges as the chosen one (top: after pruning), for stability."""
    n = int(chosen["keep"].sum())
    if cfg.select == "top" and n:
        return top_edges_with(graph, scores, n)
    return _select(cfg, graph, scores, int(chosen["point"]["size"]))


def _point(graph: Graph, keep: torch.Tensor, m: torch.Tensor, full: torch.Tensor, empty: torch.Tensor, **info) -> dict:
    per_pair = (m - empty) / (full - empty)
    f = float((m.mean() - empty.mean()) / (full.mean() - empty.mean()))
    q = np.nanquantile(per_pair.numpy(), [0.25, 0.5, 0.75]) if len(per_pair) else [np.nan] * 3
    return {**info, "edges": int(keep.sum()), "nodes": len(circuit_nodes(graph, keep)), "metric": float(m.mean()),
            "faithfulness": f, "pair_q25": float(q[0]), "pair_median": float(q[1]), "pair_q75": float(q[2])}


def _curve(cfg, graph, scores, evaluate, full, empty, sizes, bar) -> tuple[list[dict], dict[int, torch.Tensor]]:
    rows, kept = [], {}
    for n in sizes:
        keep = _select(cfg, graph, scores, n)
        kept[n] = keep
        rows.append(_point(graph, keep, evaluate.per_pair(keep), full, empty, method=cfg.method, select=cfg.select,
                           size=n))
        bar.update(1)
    # refine the smallest size that reaches the target: bisect between it and the largest size below it
    above = sorted(r["size"] for r in rows if r["faithfulness"] >= cfg.target)
    if above:
        hi = above[0]
        lo = max([r["size"] for r in rows if r["size"] < hi], default=0)
        for _ in range(5):
            if hi - lo <= max(1, lo // 20):
                break
            mid = (lo + hi) // 2
            bar.total += 1  # the bisection's points are counted as they come
            keep = kept[mid] = _select(cfg, graph, scores, mid)
            row = _point(graph, keep, evaluate.per_pair(keep), full, empty, method=cfg.method, select=cfg.select,
                         size=mid)
            rows.append(row)
            bar.update(1)
            lo, hi = (lo, mid) if row["faithfulness"] >= cfg.target else (mid, hi)
    return sorted(rows, key=lambda r: r["size"]), kept


def _node_curve(graph, effects: dict[str, float], evaluate, full, empty, bar) -> list[dict]:
    ranked = sorted(effects, key=lambda n: -abs(effects[n]))
    counts = sorted({int(round(x)) for x in np.geomspace(1, len(ranked), min(10, len(ranked)))})
    rows = []
    for k in counts:
        keep = node_circuit(graph, ranked[:k])
        rows.append(_point(graph, keep, evaluate.per_pair(keep), full, empty, method="nodes", select="single-head",
                           size=k))
        bar.update(1)
    return rows


def run_circuit(config: CircuitConfig | None = None, *, lm: LoadedModel | None = None,
                pairs: Sequence[PromptPair] | None = None, **overrides) -> CircuitResult:
    """Score every edge, choose circuits, measure their faithfulness, run the checks; nothing is written to disk.

    Example::

        result = run_circuit(task="ioi", method="eap", edges=(20, 100, 500))
        result.faithfulness_frame()
    """
    cfg = replace(config or CircuitConfig(), **overrides)
    cfg.validate()
    if lm is None:
        lm = load_checked(cfg.model, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    pcfg = PairsConfig(model=cfg.model, task=cfg.task, pairs_file=cfg.pairs_file or ("<python>" if pairs else None),
                       n_pairs=cfg.n_pairs, design=cfg.design, seed=cfg.seed, metric=cfg.metric).resolved()
    batch, design, filtered = _pairs_for(pcfg, lm, pairs)
    hooks_before = count_hooks(lm.model)
    graph = build_graph(lm.adapter)
    don, don_logits = sender_outputs(lm, graph, batch, "donor")  # the recipient's are recorded while scoring
    with torch.inference_mode():
        rec_logits = last_logits(lm, batch.recipient_ids.to(lm.device), batch.attention_mask.to(lm.device),
                                 batch.position("END"))
    answers, wrong = batch.answers()
    rec_f = rec_logits.float()

    def score(logits: torch.Tensor, rows: slice) -> torch.Tensor:
        return task_scores(pcfg.metric, logits, answers[rows], wrong[rows], rec_f[rows])[pcfg.metric]

    rows = cfg.max_rows or max(1, 2048 // batch.recipient_ids.shape[1])
    evaluate = Evaluator(lm, graph, batch, don, score, rows)
    steps = None if cfg.method == "eap" else cfg.ig_steps
    disable = {True: False, None: None, False: True}[cfg.progress]
    sizes = sorted(set(cfg.edges or default_sizes(graph.n_edges)))
    grad_rows = min(rows, group_rows(batch))
    with tqdm(total=len(range(0, len(batch), grad_rows)) * (steps or 1), desc=f"{cfg.method} scores", disable=disable,
              dynamic_ncols=True) as bar:
        scores = edge_scores(lm, graph, batch, score, don, steps=steps, max_rows=grad_rows, bar=bar)
    full, empty = score(rec_logits, slice(None)).float().cpu(), evaluate.per_pair(torch.zeros_like(graph.allowed))
    effects = head_effects(lm, graph, batch, score, float(full.mean()))
    with tqdm(total=len(sizes) + min(10, len(effects)), desc="faithfulness", disable=disable, dynamic_ncols=True) as bar:
        curve, kept = _curve(cfg, graph, scores, evaluate, full, empty, sizes, bar)
        nodes = _node_curve(graph, effects, evaluate, full, empty, bar)
    chosen = _choose(cfg, graph, scores, evaluate, curve, kept, full, empty, disable)
    checks = run_circuit_checks(lm, graph, batch, don, rec_logits, don_logits, rows, effects, chosen["keep"])
    checks.append(check_no_hooks_left(lm, hooks_before))
    att = attribution_check(graph, scores, evaluate, full)
    select = lambda sc: _same_size(cfg, graph, sc, chosen)  # noqa: E731
    stab = stability(lm, graph, batch, don, score, steps, select, chosen["keep"], cfg.resamples, cfg.seed,
                     disable) if cfg.resamples and cfg.select != "exact" else {}
    return _result(cfg, pcfg.metric, lm, batch, graph, design, filtered, scores, chosen, curve + nodes, checks, att,
                   stab, full, empty, effects, head_classes(lm, batch))


def _drawn_patterns(lm, batch, edges: list) -> dict | None:
    """The report's drill-down: attention patterns, on two example prompts, of the attention nodes met first along
    the circuit's edges, strongest first (``analysis.patterns.node_patterns``); None where the model gives none."""
    order = list(dict.fromkeys(n for e in edges for n in e[:2]))
    try:
        return node_patterns(lm, batch.select(list(range(min(2, len(batch))))), order)
    except UnsupportedArchitectureError:
        return None


def _choose(cfg, graph, scores, evaluate, curve, kept, full, empty, disable) -> dict:
    """The circuit to report: the smallest reaching the target (or exact pruning's), else the largest evaluated."""
    reached = [r for r in curve if r["faithfulness"] >= cfg.target]
    if cfg.select == "exact":
        tau = cfg.exact_threshold * abs(float(full.mean() - empty.mean()))
        with tqdm(total=graph.n_edges, desc="exact pruning", disable=disable, dynamic_ncols=True) as bar:
            keep = exact_prune(graph, scores, evaluate, tau, bar=bar)
        point = _point(graph, keep, evaluate.per_pair(keep), full, empty, method=cfg.method, select="exact", size=int(keep.sum()))
        return {"keep": keep, "point": point, "reached": point["faithfulness"] >= cfg.target}
    row = min(reached, key=lambda r: r["size"]) if reached else max(curve, key=lambda r: r["size"])
    return {"keep": kept[row["size"]], "point": row, "reached": bool(reached)}


def _result(cfg, metric, lm, batch, graph, design, filtered, scores, chosen, curve, checks, att, stab, full, empty, effects,
            classes):
    df = graph.edges()
    r_idx, s_idx = torch.tensor(df.r.to_numpy()), torch.tensor(df.s.to_numpy())
    df["score"] = scores[r_idx, s_idx].numpy()
    df = df.reindex(df.score.abs().sort_values(ascending=False).index)
    keep = chosen["keep"]
    sel = df[keep[torch.tensor(df.r.to_numpy()), torch.tensor(df.s.to_numpy())].numpy()]
    circuit = {"method": cfg.method, "select": chosen["point"]["select"], "target": cfg.target,
               "reached_target": chosen["reached"], "n_edges": int(keep.sum()), "faithfulness": chosen["point"]["faithfulness"],
               "nodes": circuit_nodes(graph, keep), "heads": circuit_heads(graph, keep),
               "edges": [[r.sender, r.receiver, r.input, float(r.score)] for r in sel.itertuples()],
               "smallest_faithful": chosen["point"] if chosen["reached"] else None,
               "scores_are": "estimates (attribution); faithfulness is measured by exact edge patching"}
    record = {**asdict(cfg), "metric": metric, "model": lm.info.get("spec", cfg.model), "design": design,
              **({"filtered": filtered} if filtered else {})}
    baseline = {"n_pairs": len(batch), "metric": metric, "model_metric": float(full.mean()),
                "empty_circuit_metric": float(empty.mean()), "head_effects": effects, "head_classes": classes,
                "patterns": _drawn_patterns(lm, batch, circuit["edges"])}
    info = {"n_edges": graph.n_edges, "n_senders": len(graph.senders), "n_receivers": len(graph.receivers),
            "head_senders": graph.head_senders, "n_layers": graph.n_layers, "n_heads": graph.n_heads}
    return CircuitResult(config=record, model=dict(lm.info), environment=environment(), baseline=baseline,
                         edges=df[["sender", "receiver", "input", "score"]].to_dict("records"), circuit=circuit,
                         faithfulness=curve, sanity={c.name: c.to_dict() for c in checks}, attribution_check=att,
                         stability=stab, graph=info)
