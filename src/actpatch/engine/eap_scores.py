"""Edge attribution patching: an estimate of every edge's effect from gradients (EAP, EAP-IG).

    don, _ = sender_outputs(lm, graph, batch, "donor")
    scores = edge_scores(lm, graph, batch, metric, don)             # EAP: (R, S)
    scores = edge_scores(lm, graph, batch, metric, don, steps=5)    # EAP-IG

The score of edge s -> r estimates the change of the mean metric when r reads the donor's output of s:
(donor_s - recipient_s) . dm/dx_r, summed over positions (Syed, Rager & Conmy 2023). EAP takes the gradient at
the recipient run: one forward and backward of the recipient, which also records each sender's donor - recipient
(so, with the donor's recording, three passes in all). EAP-IG (Hanna, Pezzelle & Belinkov 2024) averages it over
``steps`` runs whose input embeddings move from the donor's to the recipient's (alpha = k / steps, k = 1..steps),
so one step is EAP; the alpha = 1 run goes first and records. Both are estimates; exact edge patching
(``engine.edge_patching``) measures. After each backward pass the receivers are scored a chunk of layers at a time: their
input gradients (``engine.edge_gradients``, R' x N x D) times the differences of the senders before them, over the N
non-padding positions; nothing of size all receivers x positions is kept.
"""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from ..model.models import LoadedModel
from .attribution import _activation_gradients_only
from .batch import PairBatch
from .capture import last_logits
from .edge_gradients import receiver_inputs, reused_block
from .circuit_graph import Graph
from .planning import row_prefixes
from ..errors import ConfigError

EAP_TOKENS = 512  # tokens per gradient pass, at most: each pass keeps S x N x D floats of donor - recipient
_CHUNK = 128  # receivers per score product: each product reads the senders' differences once (buffer CHUNK x N x D)
INTERPOLATIONS = ("inputs", "activations")  # EAP-IG's two variants (MIB: EAP-IG-inputs, EAP-IG-activations)
MetricFn = Callable[[Tensor, slice], Tensor]  # (END logits (b, V), which rows of the batch) -> per-pair metric (b,)


def edge_scores(
    lm: LoadedModel, graph: Graph, batch: PairBatch, metric: MetricFn,
    donor: Float[Tensor, "sender batch pos d_model"], steps: int | None = None, max_rows: int | None = None, bar=None,
    interpolate: str = "inputs", accumulate: bool = True, workspace: dict | None = None,
) -> Float[Tensor, "receiver sender"]:
    """Estimated change of the mean metric when each edge alone is patched to the donor (0 where no edge).

    ``donor``: the donor run's recording (``sender_outputs``). ``steps`` None: EAP; an int >= 1:
    EAP-IG with that many interpolation steps, on ``interpolate`` = "inputs" (the input embeddings move from the
    donor's to the recipient's) or "activations" (every sender's write does; see ``engine.edge_gradients``). Pairs are
    processed in groups of ``max_rows`` (default about ``EAP_TOKENS`` tokens). ``accumulate`` (EAP-IG): sum the
    steps' receiver gradients in one (receivers, positions, d_model) buffer and score them once (faster); False scores
    every step as it comes, as EAP does, with no buffer (less memory). ``workspace``: a dict the caller keeps between
    calls, one call at a time, so that their large scratch blocks are reused rather than allocated afresh (they hold
    memory only: every value in them is written before it is read, and no weight is kept there). Leaves the model as
    it was (no weight gets a gradient).

    Example::

        scores = edge_scores(lm, graph, batch, lambda logits, rows: logit_diff(logits, a[rows], w[rows]), don, steps=5)
    """
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ConfigError(f"steps (--ig-steps) must be an int >= 1, got {steps!r}")
    if interpolate not in INTERPOLATIONS:
        raise ConfigError(f"interpolate must be one of {', '.join(INTERPOLATIONS)}, got {interpolate!r}")
    if not isinstance(accumulate, bool):
        raise ConfigError(f"accumulate must be True (one gradient buffer) or False (no buffer), got {accumulate!r}")
    alphas = [None] if steps is None else [k / steps for k in range(steps, 0, -1)]  # alpha = 1 (the recipient) first
    rows = max_rows or group_rows(batch)
    reach = [int(r.nonzero().max()) + 1 if bool(r.any()) else 0 for r in graph.allowed]  # senders before each receiver
    scores = torch.zeros(graph.allowed.shape, dtype=torch.float64)
    dev, cache = lm.device, {}  # cache: the receivers' rows of the q/k/v projections and the norms' forms, read once
    blocks = {} if workspace is None else workspace  # scratch memory, reused by every pass (and call)
    buffered = accumulate and len(alphas) > 1
    with _activation_gradients_only(lm):
        for lo in range(0, len(batch), rows):
            part = batch.select(slice(lo, lo + rows))
            sl, keep = slice(lo, lo + len(part)), _scored(part).to(dev)  # (b, T): the positions scored
            diff, total = None, None  # diff (S, N, D): donor - recipient per sender; total (R, N, D): summed gradients
            later: list = []  # EAP-IG: per layer, the product of its heads' summed gradients, done once
            _reserve(blocks, buffered, (len(graph.receivers), int(keep.sum()), donor.shape[-1]), lm.adapter.d_head, dev)
            for alpha in alphas:
                with torch.enable_grad(), receiver_inputs(lm, graph, alpha, donor[:, sl], keep, diff is None, cache,
                                                          mix=interpolate == "activations", blocks=blocks) as flow:
                    logits = last_logits(lm, part.recipient_ids.to(dev), part.attention_mask.to(dev), part.position("END"))
                    # the sum, divided by the batch size afterwards (a mean's per-pair gradients underflow in float16)
                    metric(logits, sl).float().sum().backward()
                diff = flow.written if diff is None else diff
                with torch.no_grad():
                    if not buffered:  # EAP: each chunk of receivers is multiplied as it comes, nothing kept
                        _score(flow.receiver_grads(), diff, reach, scores,
                               reused_block(blocks, "chunk", (_CHUNK, *diff.shape[1:]), diff.dtype, diff.device))
                    else:  # EAP-IG: the steps' gradients are summed first, and multiplied once (see EAP_TOKENS)
                        total = _accumulate(flow.receiver_grads(), total, blocks, diff,
                                            (len(graph.receivers), lm.adapter.d_head), later)
                del flow, logits  # this pass's kept tensors go before the next pass allocates its own
                if bar is not None:
                    bar.update(1)
            if total is not None:
                with torch.no_grad():
                    for finish in later:
                        finish()
                    _score_all(total, diff, reach, scores)
    scores = scores / (len(batch) * len(alphas))
    return (scores * graph.allowed).float()


def _reserve(blocks: dict, buffered: bool, shape: tuple[int, int, int], d_head: int, device) -> None:
    """Take the score phase's blocks before the forward pass: they are large enough to be fresh pages, while the
    small tensors that the pass frees afterwards stay with the allocator; reserved after it, they would add to its
    peak. ``shape``: (receivers R, scored positions N, d_model D)."""
    R, N, D = shape
    if buffered:
        reused_block(blocks, "total", (R, N, D), torch.float32, device)
        reused_block(blocks, "head sums", (R, N, d_head), torch.float32, device)
    else:
        reused_block(blocks, "chunk", (_CHUNK, N, D), torch.float32, device)


def _scored(part: PairBatch) -> Tensor:
    """(b, T) bool: the positions whose donor - recipient can differ, where scores are summed. Padding has no
    gradient; before a row's first differing token (or noise) every sender writes the same in both runs (a causal
    model reads only earlier positions), so those add exactly nothing to any score (EAP-IG's mixed runs too: there
    donor + alpha (recipient - donor) is the donor)."""
    T = part.recipient_ids.shape[1]
    return part.attention_mask.bool() & (torch.arange(T) >= row_prefixes(part).unsqueeze(1))


def _accumulate(grads, total: Tensor | None, cache: dict, diff: Tensor, shape: tuple[int, int], later: list) -> Tensor:
    """Add each receiver's input gradient into ``total`` (R, N, D) float32: the first step writes it, the others add
    in place (no block per step). A closed-form layer's heads add only their norm's correction here, and sum their
    1/rms-scaled projection gradients in a (R, N, Dh) block (``shape`` = (R, Dh)); the first step puts in ``later``
    what multiplies those sums by the projection rows, once, after the last step."""
    first = total is None
    R, Dh = shape
    total = reused_block(cache, "total", (R, *diff.shape[1:]), diff.dtype, diff.device) if first else total
    heads = reused_block(cache, "head sums", (R, diff.shape[1], Dh), diff.dtype, diff.device)
    for receivers, fill in grads:
        lo, hi = receivers[0], receivers[-1] + 1
        if receivers != list(range(lo, hi)):
            raise RuntimeError(f"receivers {receivers} are not numbered one after another")  # the graph's order
        finish = fill(total[lo:hi], add=not first, heads=heads[lo:hi])
        if first and finish is not None:
            later.append(finish)
    return total


def _score_all(total: Tensor, diff: Tensor, reach: list[int], scores: Tensor) -> None:
    """``_score`` of every receiver's summed gradient in ``total`` (R, N, D), ``_CHUNK`` receivers per product."""
    for lo in range(0, total.shape[0], _CHUNK):
        hi = min(lo + _CHUNK, total.shape[0])
        _product(total[lo:hi].flatten(1), list(range(lo, hi)), diff, reach, scores)


def _product(g: Tensor, receivers: list[int], diff: Tensor, reach: list[int], scores: Tensor) -> None:
    """scores[receivers, s] += g[r] . diff[s] over every sender s before the last receiver."""
    end = max(reach[r] for r in receivers)
    scores[receivers, :end] += (g @ diff[:end].flatten(1).T).double().cpu()  # (R', N*D) @ (N*D, S') -> (R', S')


def group_rows(batch: PairBatch) -> int:
    """Pairs per gradient pass: groups of at most ``EAP_TOKENS`` tokens (one pair if longer), as even as can be."""
    n, T = len(batch), batch.recipient_ids.shape[1]
    groups = -(-n // max(1, EAP_TOKENS // T))
    return -(-n // groups)


def _score(grads, diff: Float[Tensor, "sender pos d_model"], reach: list[int], scores: Tensor, buf: Tensor) -> None:
    """Add grad[r] . diff[s] (summed over positions and d_model) to ``scores`` for every receiver ``grads`` yields
    (in layer order) and every sender before it: one product per up to ``_CHUNK`` receivers (``buf``: (_CHUNK, N,
    D)), so each chunk reads the senders' differences once (a layer's few receivers alone would make the product
    memory-bound)."""
    rows: list[int] = []
    for receivers, fill in grads:
        if rows and len(rows) + len(receivers) > _CHUNK:
            _product(buf[:len(rows)].flatten(1), rows, diff, reach, scores)
            rows = []
        if len(receivers) > _CHUNK:  # a layer with more receivers than a chunk holds: on its own
            _product(fill(diff.new_empty(len(receivers), *diff.shape[1:])).flatten(1), receivers, diff, reach, scores)
            continue
        fill(buf[len(rows):len(rows) + len(receivers)])
        rows += receivers
    if rows:
        _product(buf[:len(rows)].flatten(1), rows, diff, reach, scores)
