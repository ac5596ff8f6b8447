"""The checks of every circuit run, single-head patching for node-level circuits, and the circuit's stability.

    run_circuit_checks(...)   # full == recipient, empty == donor, edge patch == plain patch, both sums agree
    head_classes(lm, batch)   # IOI pairs: the IOI head class of each head (``analysis.heads``), to line up with circuits
    attribution_check(...)    # Spearman of attribution estimates against exact single-edge patches
    stability(...)            # edge Jaccard of circuits from resampled pairs, and of halves split by template

The plain patches here come from the ordinary patching engine (``patch_variants`` on ``HeadSite`` or, where one
head's write is not separable, ``AttnOutSite``), not from edge patching: the comparison is between two
independent routes to the same number.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..analysis.circuit_pruning import jaccard
from ..analysis.headclasses import classify
from ..analysis.heads import characterise
from ..engine.capture import capture
from ..engine.eap_scores import edge_scores
from ..engine.edge_patching import edge_patched_logits
from ..engine.circuit_graph import Graph
from ..engine.patching import patch_variants
from ..engine.sanity import SanityCheck, _diff, _exact_tol, _ulps
from ..engine.sites import AttnOutSite, HeadSite
from ..errors import UnsupportedArchitectureError
from ..experiment.results import spearman


def _sites(graph: Graph) -> dict[str, object]:
    """Each attention sender and the plain patch site that writes the same thing."""
    if graph.head_senders:
        return {f"a{L}.h{h}": HeadSite(L, h) for L in range(graph.n_layers) for h in range(graph.n_heads)}
    return {f"a{L}": AttnOutSite(L) for L in range(graph.n_layers)}


def _plain(lm, batch, names: list[str], sites: dict, reduce, donor=None) -> dict[str, torch.Tensor]:
    """Plain patches (all positions) of ``names``' sites, reduced per variant: {key: (K, B)}."""
    if donor is None:
        donor, _ = capture(lm, batch.donor_ids, batch, [sites[n] for n in names])
    return patch_variants(lm, batch, donor, [[sites[n]] for n in names], reduce=reduce, donor_from_batch=True)


def head_effects(lm, graph: Graph, batch, score, base: float) -> dict[str, float]:
    """Mean change of the metric from ``base`` (the unpatched recipient's) when one attention sender (head, or layer
    attention) is patched at all positions."""
    sites = _sites(graph)
    names = list(sites)
    donor, _ = capture(lm, batch.donor_ids, batch, list(sites.values()))  # one donor pass for every variant
    out = {}
    for lo in range(0, len(names), 64):  # variants in groups: the plain engine sizes its own passes
        group = names[lo:lo + 64]
        m = _plain(lm, batch, group, sites, lambda lg: {"m": score(lg, slice(None))}, donor)["m"]  # (K, B)
        out.update({n: float(v.float().mean()) - base for n, v in zip(group, m)})
    return out


IOI_POSITIONS = ("IO", "S1", "S1+1", "S2", "END")


def head_classes(lm, batch) -> dict[str, list[str]] | None:
    """IOI head classes (``analysis.heads``: attention, DLA and copy-score thresholds) of the heads that get one, as
    {"a5.h3": ["name mover", ...]}; None when the pairs lack IOI's named positions or the family is unsupported."""
    if not all(p in batch.positions for p in IOI_POSITIONS):
        return None
    try:
        found = classify(characterise(lm, batch))
    except UnsupportedArchitectureError:
        return None
    return {f"a{c['layer']}.h{c['head']}": c["classes"] for c in found}


def _float_tol(lm, scale: float) -> float:
    """Two routes that sum the residual stream differently: 1e-4 of the logits' scale in float32, 64 rounding steps
    of the model's dtype in half precision."""
    return 1e-4 * max(1.0, scale) if lm.dtype == torch.float32 else _ulps(lm, scale, 64)


def run_circuit_checks(lm, graph: Graph, batch, donor, rec_logits, don_logits, rows: int,
                       effects: dict[str, float], circuit: torch.Tensor) -> list[SanityCheck]:
    """Full circuit == recipient (exact), empty circuit == donor, all edges out of a sender == a plain patch, and
    the chosen ``circuit`` the same when every receiver's sum is written out."""
    allowed = graph.allowed.float()

    def logits(weights, explicit=False):
        parts = [edge_patched_logits(lm, graph, batch.select(slice(lo, lo + rows)), donor[:, lo:lo + rows], weights,
                                     explicit) for lo in range(0, len(batch), rows)]
        return torch.cat(parts)

    scale = float(rec_logits.abs().max())
    d_full, tol_full = _diff(logits(torch.zeros_like(allowed)), rec_logits), _exact_tol(lm, scale)
    # every edge patched: the logits read the donor's senders by construction, so this checks that the senders add
    # up to the residual stream; every edge but the logits' own: the run itself must have become the donor's
    inner = allowed.clone()
    inner[graph.receiver_index("logits")] = 0
    d_empty = max(_diff(logits(allowed), don_logits), _diff(logits(inner), don_logits))
    tol = _float_tol(lm, scale)
    checks = [
        SanityCheck("full_circuit_is_recipient", d_full <= tol_full,
                    f"every edge kept: max abs dlogit vs the recipient = {d_full:.3g}", d_full, tol_full),
        SanityCheck("empty_circuit_is_donor", d_empty <= tol,
                    f"every edge patched, and every edge but the logits' own: max abs dlogit vs the donor = {d_empty:.3g}", d_empty, tol),
    ]
    ranked = sorted(effects, key=lambda n: -abs(effects[n]))
    names = list(dict.fromkeys([ranked[0], ranked[len(ranked) // 2], list(effects)[-1]]))
    plain = _plain(lm, batch, names, _sites(graph), lambda lg: {"logits": lg})["logits"]  # (K, B, V)
    worst = 0.0
    for name, ref in zip(names, plain):
        w = torch.zeros_like(allowed)
        w[:, graph.sender_index(name)] = 1.0
        worst = max(worst, _diff(logits(w), ref))
    outside = (graph.allowed & ~circuit).float()
    d_sums = _diff(logits(outside), logits(outside, explicit=True))
    checks.append(SanityCheck("circuit_sums_agree", d_sums <= tol,
                              f"the chosen circuit ({int(circuit.sum())} edges) with shared inputs and stream "
                              f"differences vs every receiver's written-out sum: max abs dlogit = {d_sums:.3g}", d_sums,
                              tol))
    checks.append(SanityCheck("edge_patch_matches_plain_patch", worst <= tol,
                              f"all edges out of {', '.join(names)} vs a plain patch of each: max abs dlogit = "
                              f"{worst:.3g}", worst, tol))
    return checks


def attribution_check(graph: Graph, scores: torch.Tensor, evaluate, full: torch.Tensor, n_top: int = 20,
                      n_random: int = 10) -> dict:
    """Exact single-edge patches of the top-|score| edges and a few random ones, against their estimates."""
    flat = scores.abs().masked_fill(~graph.allowed, -1).flatten()
    top = flat.topk(min(n_top, graph.n_edges)).indices.tolist()
    rest = [i for i in graph.allowed.flatten().nonzero().flatten().tolist() if i not in set(top)]
    gen = torch.Generator().manual_seed(0)
    extra = [rest[i] for i in torch.randperm(len(rest), generator=gen)[:n_random].tolist()]
    rows, S = [], scores.shape[1]
    base = float(full.mean())
    for i in top + extra:
        r, s = divmod(i, S)
        w = torch.zeros(graph.allowed.shape)
        w[r, s] = 1.0
        exact = float(evaluate.per_pair(None, weights=w).mean()) - base
        rows.append({"sender": graph.senders[s], "receiver": graph.receivers[r].label, "estimate": float(scores[r, s]),
                     "exact": exact, "top": i in top})
    est = torch.tensor([x["estimate"] for x in rows]).numpy()
    exa = torch.tensor([x["exact"] for x in rows]).numpy()
    return {"spearman": spearman(est, exa), "sign_agreement": float(((est > 0) == (exa > 0)).mean()) if rows else None,
            "n_edges": len(rows), "edges": rows,
            "note": "edge scores are first-order estimates; these edges were re-measured by exact edge patching"}


def stability(lm, graph: Graph, batch, don, score, steps: tuple, select, keep, resamples: int, seed: int,
              disable) -> dict:
    """``steps``: (IG steps or None, what is interpolated[, whether IG's gradients are buffered]), as the run scored. Edge Jaccard of circuits with as many edges as the chosen one (``select``): with the chosen circuit, for
    ``resamples`` bootstrap resamples of the pairs; and between the two disjoint halves of a split of the pairs, by
    template (when the pairs have templates) and at random (the same question without the templates: how much two
    halves agree by chance)."""
    n, subsets = len(batch), []
    for i in range(resamples):
        gen = torch.Generator().manual_seed(1000 * seed + i + 1)
        subsets.append((f"resample {i}", sorted(torch.randint(0, n, (n,), generator=gen).tolist())))
    splits = {"random": random_halves(n, seed), "template": template_halves([p.template for p in batch.pairs])}
    splits = {k: v for k, v in splits.items() if v is not None and min(map(len, v)) >= 2}
    subsets += [(f"{kind} half {'AB'[j]}", half) for kind, halves in splits.items() for j, half in enumerate(halves)]
    circuits, out, work = {}, [], {}  # work: the scoring's scratch memory, reused by every subset
    for name, idx in tqdm(subsets, desc="stability", disable=disable, dynamic_ncols=True):
        sub = batch.select(idx)
        sc = edge_scores(lm, graph, sub, lambda lg, rows, idx=idx: score(lg, torch.tensor(idx)[rows]),
                         don[:, idx], steps=steps[0], interpolate=steps[1], workspace=work,
                         accumulate=steps[2] if len(steps) > 2 else True)
        circuits[name] = select(sc)
        out.append({"subset": name, "n_pairs": len(idx), "pairs": idx, "jaccard": jaccard(circuits[name], keep)})
    res = [x["jaccard"] for x in out if x["subset"].startswith("resample")]
    between = {k: jaccard(circuits[f"{k} half A"], circuits[f"{k} half B"]) for k in splits}
    return {"resample_jaccard_mean": sum(res) / len(res) if res else None,
            "template_split_jaccard": between.get("template"), "random_split_jaccard": between.get("random"),
            "subsets": out}


def random_halves(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Pairs 0..n-1 in two disjoint halves at random (sizes n // 2 and the rest), reproducibly from ``seed``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1000 * seed + 999)).tolist()
    return sorted(perm[:n // 2]), sorted(perm[n // 2:])


def template_halves(templates: list) -> tuple[list[int], list[int]] | None:
    """The pairs in two halves that share no template, as even in size as whole templates allow (the most
    frequent templates placed first, each in the smaller half); None when fewer than two templates are known."""
    if any(t is None for t in templates) or len(set(templates)) < 2:
        return None
    by = {t: [i for i, x in enumerate(templates) if x == t] for t in set(templates)}
    halves: tuple[list[int], list[int]] = ([], [])
    for t in sorted(by, key=lambda t: (-len(by[t]), str(t))):
        min(halves, key=len).extend(by[t])  # the first of two equal halves on a tie
    return sorted(halves[0]), sorted(halves[1])
