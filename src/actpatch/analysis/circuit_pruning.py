"""Circuits: sets of edges of a ``Graph``, chosen from edge scores, and what they contain.

    keep = top_edges(graph, scores, 200)          # (R, S) bool: the 200 edges of largest |score|, then pruned
    keep = top_edges_with(graph, scores, 135)     # the smallest such circuit with at least 135 edges after pruning
    keep = greedy_edges(graph, scores, 200)       # grown from the logits, one best edge at a time
    keep = exact_prune(graph, scores, evaluate)   # ACDC-style: drop each edge whose exact removal changes little
    circuit_nodes(graph, keep)                    # the nodes it contains
    circuit_heads(graph, keep)                    # the heads that read and write inside it
    node_circuit(graph, ["a9.h6", "a10.h0"])      # every edge among these heads, all MLPs, input and logits

A circuit keeps its edges at the recipient's values; everything outside it is patched to the donor. Pruning
drops edges whose sender is not reached from the input or whose receiver's node does not reach the logits:
such edges cannot carry anything from the input to the output inside the circuit.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..engine.circuit_graph import Graph
from ..errors import ConfigError


def fed_senders(graph: Graph) -> list[list[int]]:
    """For every receiver, the senders (nodes) whose computation reads it: [] for the logits."""
    out = []
    for r in graph.receivers:
        if r.input == "logits":
            out.append([])
        elif r.input == "mlp":
            out.append([graph.sender_index(r.node)])
        else:
            heads = graph.heads_reading(r)
            names = heads if graph.head_senders else [f"a{r.layer}"]
            out.append(sorted({graph.sender_index(n) for n in names}))
    return out


def prune(graph: Graph, keep: Bool[Tensor, "receiver sender"]) -> Bool[Tensor, "receiver sender"]:
    """``keep`` without the edges that lie on no path from the input to the logits inside ``keep``."""
    feeds = fed_senders(graph)
    S = len(graph.senders)
    reached = torch.zeros(S, dtype=torch.bool)
    reached[0] = True
    order = sorted(range(len(graph.receivers)), key=lambda r: graph.receivers[r].layer)
    for r in order:  # forwards: a node is reached when one of its inputs has a kept edge from a reached sender
        if bool((keep[r] & reached).any()):
            reached[feeds[r]] = True
    useful = torch.zeros(S, dtype=torch.bool)
    live = torch.zeros(len(graph.receivers), dtype=torch.bool)
    for r in reversed(order):  # backwards: a receiver is live when it feeds the logits or a useful node
        live[r] = graph.receivers[r].input == "logits" or bool(useful[feeds[r]].any())
        if live[r]:
            useful |= keep[r]
    return keep & live.unsqueeze(1) & (reached & useful).unsqueeze(0)


def _check_n(graph: Graph, n: int) -> None:
    if not isinstance(n, int) or not 1 <= n <= graph.n_edges:
        raise ConfigError(f"a circuit size must be an int in [1, {graph.n_edges}] (the model's edges), got {n!r}")


def top_edges(graph: Graph, scores: Float[Tensor, "receiver sender"], n: int, absolute: bool = True) -> Tensor:
    """The ``n`` allowed edges of largest |score| (or score), then ``prune``d (so it may hold fewer)."""
    _check_n(graph, n)
    s = (scores.abs() if absolute else scores).masked_fill(~graph.allowed, float("-inf"))
    idx = s.flatten().topk(n).indices
    keep = torch.zeros(graph.allowed.numel(), dtype=torch.bool)
    keep[idx] = True
    return prune(graph, keep.view(graph.allowed.shape))


def top_edges_with(graph: Graph, scores: Float[Tensor, "receiver sender"], n_edges: int, absolute: bool = True) -> Tensor:
    """The smallest ``top_edges`` circuit that keeps at least ``n_edges`` edges after pruning: circuits of one size
    (in edges) from other scores, to compare edge for edge. Pruning only grows with n, so this bisects on n."""
    _check_n(graph, n_edges)
    lo, hi = n_edges, graph.n_edges  # every allowed edge lies on a path from the input to the logits
    while lo < hi:
        mid = (lo + hi) // 2
        if int(top_edges(graph, scores, mid, absolute).sum()) >= n_edges:
            hi = mid
        else:
            lo = mid + 1
    return top_edges(graph, scores, lo, absolute)


def greedy_edges(graph: Graph, scores: Float[Tensor, "receiver sender"], n: int, absolute: bool = True) -> Tensor:
    """Grow from the logits: repeatedly add the best edge into a receiver of a node already in the circuit."""
    _check_n(graph, n)
    s = (scores.abs() if absolute else scores).masked_fill(~graph.allowed, float("-inf"))
    feeds = fed_senders(graph)
    receivers_of: dict[int, list[int]] = {}
    for r, senders in enumerate(feeds):
        for j in senders:
            receivers_of.setdefault(j, []).append(r)
    live = torch.zeros(len(graph.receivers), dtype=torch.bool)
    live[graph.receiver_index("logits")] = True
    keep = torch.zeros_like(graph.allowed)
    for _ in range(n):
        cand = s.masked_fill(~live.unsqueeze(1) | keep, float("-inf"))
        best = int(cand.flatten().argmax())
        if cand.flatten()[best] == float("-inf"):
            break
        r, j = divmod(best, s.shape[1])
        keep[r, j] = True
        live[receivers_of.get(j, [])] = True
    return prune(graph, keep)


def exact_prune(
    graph: Graph, scores: Float[Tensor, "receiver sender"], evaluate: Callable[[Tensor], float], threshold: float,
    max_edges: int = 3000, bar=None,
) -> Tensor:
    """ACDC-style: from the full graph, visit receivers from the logits back to layer 0, and within each its edges
    from the smallest |score| up; remove an edge when the exact metric (``evaluate(keep)``) moves by less than
    ``threshold`` from the current circuit's. One forward per edge, so only for small graphs (``max_edges``)."""
    if graph.n_edges > max_edges:
        raise ConfigError(f"exact pruning runs one forward pass per edge; this model has {graph.n_edges} edges, more "
                          f"than max_edges={max_edges}. Use --select top or greedy, or raise --max-exact-edges.")
    keep = graph.allowed.clone()
    current = evaluate(keep)
    order = sorted(range(len(graph.receivers)), key=lambda r: -graph.receivers[r].layer)
    for r in order:
        for j in sorted(graph.allowed[r].nonzero().flatten().tolist(), key=lambda j: float(scores[r, j].abs())):
            keep[r, j] = False
            value = evaluate(keep)
            if abs(value - current) < threshold:
                current = value
            else:
                keep[r, j] = True
            if bar is not None:
                bar.update(1)
    return prune(graph, keep)


def node_circuit(graph: Graph, heads: Sequence[str]) -> Bool[Tensor, "receiver sender"]:
    """Every allowed edge among the input, all MLPs, the logits and ``heads`` (attention senders)."""
    kept_senders = torch.tensor([n == "input" or n.startswith("m") or n in set(heads) for n in graph.senders])
    feeds = fed_senders(graph)
    kept_receivers = torch.tensor([not f or bool(kept_senders[f].any()) for f in feeds])
    return graph.allowed & kept_receivers.unsqueeze(1) & kept_senders.unsqueeze(0)


def circuit_nodes(graph: Graph, keep: Bool[Tensor, "receiver sender"]) -> list[str]:
    """The senders with a kept edge out, the nodes fed by a receiver with a kept edge in, and the logits."""
    feeds = fed_senders(graph)
    nodes = set(keep.any(dim=0).nonzero().flatten().tolist())
    for r in keep.any(dim=1).nonzero().flatten().tolist():
        nodes.update(feeds[r])
    names = [graph.senders[j] for j in sorted(nodes)]
    return names + (["logits"] if bool(keep[graph.receiver_index("logits")].any()) else [])


def circuit_heads(graph: Graph, keep: Bool[Tensor, "receiver sender"]) -> list[str]:
    """The heads (``a5.h3``) that both read and write inside the circuit: a kept edge into their q, or into the k or
    v of their KV head, and a kept edge out of the sender that carries their write (the layer's attention where
    heads are not separable, so there a head counts when its layer writes and it reads)."""
    reads = keep.any(dim=1)
    out = []
    for L in range(graph.n_layers):
        for h in range(graph.n_heads):
            name = graph.attention_sender(L, h)
            writes = bool(keep[:, graph.sender_index(name)].any())
            mine = [i for i in graph.layer_receivers(L, ("q", "k", "v"))
                    if f"a{L}.h{h}" in graph.heads_reading(graph.receivers[i])]
            if writes and bool(reads[mine].any()):
                out.append(f"a{L}.h{h}")
    return out


def jaccard(a: Bool[Tensor, "..."], b: Bool[Tensor, "..."]) -> float:
    """|a & b| / |a | b| of two edge sets (1.0 for two empty sets)."""
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union
