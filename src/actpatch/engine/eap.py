"""Edge attribution patching: an estimate of every edge's effect from gradients (EAP, EAP-IG).

    rec, _ = sender_outputs(lm, graph, batch, "recipient"); don, _ = sender_outputs(lm, graph, batch, "donor")
    scores = edge_scores(lm, graph, batch, metric, rec, don)             # EAP: (R, S)
    scores = edge_scores(lm, graph, batch, metric, rec, don, steps=5)    # EAP-IG

The score of edge s -> r estimates the change of the mean metric when r reads the donor's output of s:
(donor_s - recipient_s) . dm/dx_r, summed over positions (Syed, Rager & Conmy 2023). EAP takes the gradient at
the recipient run: one recipient forward and one backward (plus the two recording passes). EAP-IG (Hanna,
Pezzelle & Belinkov 2024) averages it over ``steps`` runs whose input embeddings move from the donor's to the
recipient's (alpha = k / steps, k = 1..steps), so one step is EAP. Both are estimates; exact edge patching
(``engine.edges``) measures. Each receiver's input gradient is summed over the steps and scored once: one
(R, b*T*D) x (b*T*D, S) product per group of pairs, whatever the number of steps.
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
from .edges import receiver_inputs
from .graph import Graph

EAP_TOKENS = 128  # tokens per gradient pass; the pass keeps d metric / d input for every receiver: R x 128 x D floats
_BLOCKS = 4  # sender blocks of the score product: 4 skips about 3/8 of a full (R, S) product
MetricFn = Callable[[Tensor, slice], Tensor]  # (END logits (b, V), which rows of the batch) -> per-pair metric (b,)


def edge_scores(
    lm: LoadedModel, graph: Graph, batch: PairBatch, metric: MetricFn,
    recipient: Float[Tensor, "sender batch pos d_model"], donor: Float[Tensor, "sender batch pos d_model"],
    steps: int | None = None, max_rows: int | None = None, bar=None,
) -> Float[Tensor, "receiver sender"]:
    """Estimated change of the mean metric when each edge alone is patched to the donor (0 where no edge).

    ``steps`` None: EAP; an int >= 1: EAP-IG with that many interpolation steps. Pairs are processed in groups of
    ``max_rows`` (default about ``EAP_TOKENS`` tokens). Leaves the model as it was (no weight gets a gradient).

    Example::

        scores = edge_scores(lm, graph, batch, lambda logits, rows: logit_diff(logits, a[rows], w[rows]), rec, don, steps=5)
    """
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps (--ig-steps) must be an int >= 1, got {steps!r}")
    alphas = [None] if steps is None else [k / steps for k in range(1, steps + 1)]
    rows = max_rows or max(1, EAP_TOKENS // batch.recipient_ids.shape[1])
    scores = torch.zeros(graph.allowed.shape, dtype=torch.float64)
    dev = lm.device
    with _activation_gradients_only(lm):
        for lo in range(0, len(batch), rows):
            part = batch.select(slice(lo, lo + rows))
            grads = None  # (R, b, T, D): d metric / d each receiver's input, summed over the steps
            for alpha in alphas:
                with torch.enable_grad(), receiver_inputs(lm, graph, alpha, donor[0, lo:lo + rows]) as flow:
                    logits = last_logits(lm, part.recipient_ids.to(dev), part.attention_mask.to(dev), part.position("END"))
                    # the sum, divided by the batch size afterwards (a mean's per-pair gradients underflow in float16)
                    metric(logits, slice(lo, lo + len(part))).float().sum().backward()
                with torch.no_grad():
                    for receivers, grad in flow.receiver_grads():
                        if grads is None:  # every receiver is written at the first step, so no zero fill
                            grads = torch.empty(len(graph.receivers), *grad.shape[1:], device=grad.device)
                        if alpha == alphas[0]:
                            grads[receivers] = grad.float()
                        else:
                            grads[receivers] += grad.float()
                if bar is not None:
                    bar.update(1)
            with torch.no_grad():  # the steps share each sender's donor - recipient, so one product scores them all
                scores += _dot(graph, grads, donor[:, lo:lo + rows], recipient[:, lo:lo + rows])
    scores = scores / (len(batch) * len(alphas))
    return (scores * graph.allowed).float()


def _dot(graph: Graph, grads: Float[Tensor, "receiver b pos d_model"], donor: Float[Tensor, "sender b pos d_model"],
         recipient: Float[Tensor, "sender b pos d_model"]) -> Float[Tensor, "receiver sender"]:
    """grads[r] . (donor[s] - recipient[s]) for every edge: a few large matmuls over blocks of senders, each against
    only the receivers after the block's first sender (each tensor is read a few times, not once per receiver
    group), with only one block's differences in memory at a time."""
    S = len(graph.senders)
    out = torch.zeros(graph.allowed.shape, dtype=torch.float64)
    g = grads.flatten(1)  # (R, b*T*D)
    step = -(-S // _BLOCKS)
    for s0 in range(0, S, step):
        s1 = min(S, s0 + step)
        r0 = int(graph.allowed[:, s0:s1].any(1).nonzero().min())  # the first receiver that reads this block
        diff = (donor[s0:s1] - recipient[s0:s1]).to(g.device, torch.float32).flatten(1)  # (S', b*T*D)
        out[r0:, s0:s1] = (g[r0:] @ diff.T).double().cpu()  # (R', S')
    return out

