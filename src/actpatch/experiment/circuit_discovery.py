"""Find a task's circuit and measure it: edge scores (EAP, EAP-IG), selection, faithfulness curves, checks.

    result = run_circuit(CircuitConfig(task="ioi", method="eap-ig-activations", ig_steps=5))
    result = run_circuit(task="pairs", pairs_file="facts.jsonl", metric="logprob", select="greedy")
    result = run_circuit(task="greater-than", compare=True)    # every method side by side: result.side_by_side()

The steps: record the donor (``engine.edge_patching``), score every edge (``engine.eap_scores``), measure the
faithfulness curve at MIB's edge fractions (``experiment.faithfulness_curve``) next to node-level circuits of the
heads that matter most when patched one at a time, optionally the other methods (``experiment.method_comparison``),
choose the circuit (``analysis.circuit_pruning``), then the checks and stability of ``experiment.circuit_checks``,
which run every time.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..analysis.circuit_pruning import circuit_heads, circuit_nodes, exact_prune, top_edges_with
from ..analysis.mib_scores import MIB_FRACTIONS
from ..analysis.patterns import node_patterns
from ..engine.capture import last_logits
from ..engine.eap_scores import edge_scores, group_rows
from ..engine.edge_patching import sender_outputs
from ..engine.circuit_graph import Graph, build_graph
from ..engine.hooks import count_hooks
from ..engine.metrics import TASK_METRICS, task_scores
from ..engine.sanity import check_no_hooks_left
from ..engine.pairs import PromptPair
from ..errors import ConfigError, UnsupportedArchitectureError
from ..model.models import DEFAULT_MODEL, LoadedModel
from .circuit_checks import attribution_check, head_classes, head_effects, run_circuit_checks, stability
from .circuit_result import CircuitResult
from .config import environment
from .contrast import PairsConfig, _pairs_for
from .faithfulness_curve import Evaluator, measure_curve, node_curve, point, select_circuit
from .method_comparison import ALIASES, METHODS, compare_methods, steps_of
from .selftest import load_checked

log = logging.getLogger(__name__)
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
    method: str = "eap-ig"             # eap, eap-ig-inputs (= eap-ig), eap-ig-activations
    ig_steps: int = 5
    ig_buffer: bool = True             # EAP-IG: sum the steps' gradients in one buffer (faster; False: less memory)
    compare: bool = False              # also score with the other methods, and exact edge patching, curve by curve
    exact_candidates: int = 353        # compare: exact single-edge patches of the union of each method's top-n
    select: str = "top"                # top: top-n then pruned; greedy: grown from the logits; exact: ACDC-style
    edges: tuple[int, ...] | None = None   # circuit sizes measured besides MIB's grid of edge fractions
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
        if self.method not in METHODS + tuple(ALIASES):
            raise ConfigError(f"method (--method) must be one of {', '.join(METHODS + tuple(ALIASES))}, got "
                              f"{self.method!r}")
        if not isinstance(self.exact_candidates, int) or self.exact_candidates < 1:
            raise ConfigError(f"exact_candidates (--exact-candidates) must be an int >= 1, got {self.exact_candidates!r}")
        if self.select not in SELECTIONS:
            raise ConfigError(f"select (--select) must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if not isinstance(self.ig_steps, int) or self.ig_steps < 1:
            raise ConfigError(f"ig_steps (--ig-steps) must be an int >= 1, got {self.ig_steps!r}")
        if not isinstance(self.ig_buffer, bool):
            raise ConfigError(f"ig_buffer (--ig-no-buffer) must be True or False, got {self.ig_buffer!r}")
        if self.metric is not None and self.metric not in TASK_METRICS:
            raise ConfigError(f"metric (--metric) must be one of {', '.join(TASK_METRICS)}, got {self.metric!r}")
        if self.edges is not None and (not self.edges or any(not isinstance(n, int) or n < 1 for n in self.edges)):
            raise ConfigError(f"edges (--edges) must be positive ints, got {self.edges!r}")
        if not 0 < self.target <= 1:
            raise ConfigError(f"target (--target) must be in (0, 1], got {self.target!r}")


def _same_size(cfg: CircuitConfig, graph: Graph, scores: torch.Tensor, chosen: dict) -> torch.Tensor:
    """A circuit from other scores with as many edges as the chosen one (top: after pruning), for stability."""
    n = int(chosen["keep"].sum())
    if cfg.select == "top" and n:
        return top_edges_with(graph, scores, n)
    return select_circuit(cfg, graph, scores, int(chosen["point"]["size"]))


def run_circuit(config: CircuitConfig | None = None, *, lm: LoadedModel | None = None,
                pairs: Sequence[PromptPair] | None = None, **overrides) -> CircuitResult:
    """Score every edge, choose circuits, measure their faithfulness, run the checks; nothing is written to disk.

    Example::

        result = run_circuit(task="ioi", method="eap", edges=(20, 100, 500))
        result.faithfulness_frame()
    """
    cfg = replace(config or CircuitConfig(), **overrides)
    cfg.validate()
    cfg = replace(cfg, method=ALIASES.get(cfg.method, cfg.method))
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
    steps, what = steps_of(cfg, cfg.method)
    disable = {True: False, None: None, False: True}[cfg.progress]
    sizes = sorted(set(cfg.edges or ()))
    grad_rows = min(rows, group_rows(batch))
    with tqdm(total=len(range(0, len(batch), grad_rows)) * (steps or 1), desc=f"{cfg.method} scores", disable=disable,
              dynamic_ncols=True) as bar:
        scores = edge_scores(lm, graph, batch, score, don, steps=steps, max_rows=grad_rows, bar=bar, interpolate=what,
                              accumulate=cfg.ig_buffer)
    full, empty = score(rec_logits, slice(None)).float().cpu(), evaluate.per_pair(torch.zeros_like(graph.allowed))
    effects = head_effects(lm, graph, batch, score, float(full.mean()))
    with tqdm(total=len(MIB_FRACTIONS) + len(sizes) + min(10, len(effects)), desc="faithfulness", disable=disable,
              dynamic_ncols=True) as bar:
        curve, kept = measure_curve(cfg, graph, scores, evaluate, full, empty, sizes, bar)
        nodes = node_curve(graph, effects, evaluate, full, empty, bar)
    others = compare_methods(cfg, lm, graph, batch, don, score, evaluate, full, empty, {cfg.method: scores},
                             disable) if cfg.compare else []
    chosen = _choose(cfg, graph, scores, evaluate, curve, kept, full, empty, disable)
    checks = run_circuit_checks(lm, graph, batch, don, rec_logits, don_logits, rows, effects, chosen["keep"])
    checks.append(check_no_hooks_left(lm, hooks_before))
    att = attribution_check(graph, scores, evaluate, full)
    select = lambda sc: _same_size(cfg, graph, sc, chosen)  # noqa: E731
    stab = stability(lm, graph, batch, don, score, (steps, what, cfg.ig_buffer), select, chosen["keep"], cfg.resamples, cfg.seed,
                     disable) if cfg.resamples and cfg.select != "exact" else {}
    return _result(cfg, pcfg.metric, lm, batch, graph, design, filtered, scores, chosen, curve + nodes + others, checks,
                   att, stab, full, empty, effects, head_classes(lm, batch))


def _drawn_patterns(lm, batch, edges: list) -> dict | None:
    """The report's drill-down: attention patterns, on two example prompts, of the attention nodes met first along
    the circuit's edges, strongest first (``analysis.patterns.node_patterns``); None where the model gives none."""
    order = list(dict.fromkeys(n for e in edges for n in e[:2]))
    try:
        return node_patterns(lm, batch.select(list(range(min(2, len(batch))))), order)
    except UnsupportedArchitectureError:
        return None


def _choose(cfg, graph, scores, evaluate, curve, kept, full, empty, disable) -> dict:
    """The circuit to report: the smallest reaching the target (or exact pruning's), else the largest evaluated of
    at most a third of the edges."""
    small = [r for r in curve if r["size"] <= max(1, graph.n_edges // 3)]  # MIB's 50% and 100% are no small circuit
    reached = [r for r in small if r["faithfulness"] >= cfg.target]
    if cfg.select == "exact":
        tau = cfg.exact_threshold * abs(float(full.mean() - empty.mean()))
        with tqdm(total=graph.n_edges, desc="exact pruning", disable=disable, dynamic_ncols=True) as bar:
            keep = exact_prune(graph, scores, evaluate, tau, bar=bar)
        row = point(graph, keep, evaluate.per_pair(keep), full, empty, method=cfg.method, select="exact",
                    size=int(keep.sum()), fraction=int(keep.sum()) / graph.n_edges, grid=False)
        return {"keep": keep, "point": row, "reached": row["faithfulness"] >= cfg.target}
    row = min(reached, key=lambda r: r["size"]) if reached else max(small or curve, key=lambda r: r["size"])
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
