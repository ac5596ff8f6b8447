"""Attribution patching: a first-order estimate of every patch from one backward pass.

For an activation a with donor value a' the effect of patching it on the metric m is estimated as
(a' - a) . dm/da, with the gradient taken at the recipient run (Nanda 2023; Kramár et al. 2024,
"AtP"). One recipient forward with gradients plus one backward scores every head at every position
and every layer's hidden state at every position; the donor activations come from the usual
capture pass. So 2 forwards + 1 backward replace thousands of patched forwards.

    att = attribute(lm, batch, donor_cache)            # donor_cache: HeadSite(L) and HiddenSite(L) per layer
    att.heads                                           # (L, H, B, T): estimated change of the mean LD
    att.head_effect()                                   # (L, H): summed over positions ("all positions")

The metric is the mean logit difference over pairs, so every score estimates a change of the
*mean* LD, the same number the exact sweeps report as ``delta_logit_diff``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import DataError
from ..model.models import LoadedModel
from .batch import PairBatch
from .capture import ActivationCache, last_logits, split_heads
from .hooks import hooks
from .sites import HeadSite, HiddenSite


@dataclass(frozen=True)
class Attribution:
    """Attribution scores of one donor design: estimated change of the mean logit difference.

    Example::

        att = attribute(lm, batch, donor); att.head_effect()  # (L, H) estimated change of the mean LD
    """

    heads: Float[Tensor, "layer head batch pos"]   # per head, per pair, per position
    hidden: Float[Tensor, "layer batch pos"]       # per block output, per pair, per position
    layers: tuple[int, ...]                        # the model layers of the first axis
    recipient_logit_diff: float

    def head_effect(self) -> Float[Tensor, "layer head"]:
        """Patching a head at all positions: sum over positions, summed over pairs (the mean is built in)."""
        return self.heads.sum(dim=(2, 3))

    def at_positions(self, scores: Tensor, index: Tensor) -> Tensor:
        """Scores gathered at one position per pair (``index``: (B,)), summed over pairs."""
        idx = index.to(scores.device).view(*([1] * (scores.dim() - 2)), -1, 1)
        idx = idx.expand(*scores.shape[:-1], 1)  # (..., B, 1)
        return scores.gather(-1, idx).squeeze(-1).sum(-1)


GRAD_TOKENS = 256  # tokens per backward pass: the autograd graph holds every layer's activations


def attribute(
    lm: LoadedModel, batch: PairBatch, donor: ActivationCache, layers: Sequence[int] | None = None,
    max_rows: int | None = None,
) -> Attribution:
    """Gradient x (donor - recipient) for every head and hidden state of every layer and position.

    Pairs are independent (each pair's logit difference depends only on its own row), so the
    backward pass runs over groups of ``max_rows`` pairs (default: about ``GRAD_TOKENS`` tokens),
    which bounds the autograd graph's memory; the scores do not depend on the grouping beyond float
    summation order. Leaves the model unchanged: parameters keep ``requires_grad`` as they were and
    receive no gradient (the graph starts at the embedding output, made a leaf that requires grad).

    Example::

        donor, _ = capture(lm, batch.donor_ids, batch, [HeadSite(L) for L in range(n)] + [HiddenSite(L) for L in range(n)])
        att = attribute(lm, batch, donor)

    """
    if batch.donor_mask is not None or batch.donor_positions is not None:
        raise DataError("attribution multiplies donor - recipient at the same positions, so it needs position-aligned "
                        f"pairs (equal lengths, the same named positions); this batch's pairs {batch.unequal_rows()[:8]} "
                        "(or named positions) differ. Use exact patching (--method exact) for such pairs.")
    layers = tuple(range(lm.adapter.n_layers)) if layers is None else tuple(layers)
    rows = max_rows or max(1, GRAD_TOKENS // batch.recipient_ids.shape[1])
    heads, hidden, metric = [], [], 0.0
    with _activation_gradients_only(lm):
        for lo in range(0, len(batch), rows):
            part = slice(lo, lo + rows)
            sub = ActivationCache({key: value[part] for key, value in donor.items()})
            h, hd, m = _attribute_rows(lm, batch.select(part), sub, layers, len(batch))
            heads.append(h)
            hidden.append(hd)
            metric += m
    return Attribution(torch.cat(heads, dim=2), torch.cat(hidden, dim=1), layers, metric)


@contextlib.contextmanager
def _activation_gradients_only(lm: LoadedModel) -> Iterator[None]:
    """Weights get no gradient (requires_grad restored afterwards, even on error). Offloaded modules
    (device map) get their weights only inside their forward, and autograd would keep each one on
    the GPU until the backward pass, all at once: saved tensors then go to the CPU."""
    # (offloaded parameters sit on meta and are swapped for real ones in every forward: left alone)
    params = [p for p in lm.model.parameters() if p.requires_grad and not p.is_meta]
    offloaded = any(p.is_meta for p in lm.model.parameters())
    saving = (torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) if offloaded
              else contextlib.nullcontext())
    try:
        for p in params:
            p.requires_grad_(False)
        with saving:
            yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _attribute_rows(
    lm: LoadedModel, batch: PairBatch, donor: ActivationCache, layers: tuple[int, ...], n_total: int,
) -> tuple[Tensor, Tensor, float]:
    """Scores (L, H, b, T) and (L, b, T) for one group of pairs, as parts of the mean over ``n_total`` pairs."""
    a = lm.adapter
    z_rec: dict[int, Tensor] = {}
    h_rec: dict[int, Tensor] = {}

    def leaf(x: Tensor) -> Tensor:
        return x.detach().requires_grad_(True)

    def keep(store: dict, layer: int):
        def fn(x: Tensor) -> None:
            x.retain_grad()
            store[layer] = x

        return fn

    specs = [(lm.model.get_input_embeddings(), "output", leaf)]
    specs += [(a.attn_out(L), "input", keep(z_rec, L)) for L in layers]
    specs += [(a.block(L), "output", keep(h_rec, L)) for L in layers]
    dev = lm.device
    with torch.enable_grad(), hooks(specs):
        # only IO's and S's logits: the backward pass skips the rest of the unembedding
        logits = last_logits(lm, batch.recipient_ids.to(dev), batch.attention_mask.to(dev), batch.position("END"),
                             columns=batch.answer_columns())  # (b, 2), float32
        # backward from the sum, divided by n_total afterwards: in float16 the per-pair gradients of a
        # mean over many pairs would sink below the dtype's normal range
        metric = (logits[:, 0] - logits[:, 1]).sum()
        metric.backward()
    with torch.no_grad():
        heads, hidden = [], []
        for L in layers:
            grad_z = split_heads(z_rec[L].grad, a.n_heads, a.d_head)  # (B, T, H, Dh)
            # each layer's own device: with --device-map the layers may sit on different GPUs
            dz = donor[HeadSite(L)].to(z_rec[L].device).float() - split_heads(z_rec[L].detach(), a.n_heads, a.d_head).float()
            heads.append((dz * grad_z.float()).sum(-1).permute(2, 0, 1).cpu())  # (H, B, T), off each layer's GPU
            dh = donor[HiddenSite(L)].to(h_rec[L].device).float() - h_rec[L].detach().float()
            hidden.append((dh * h_rec[L].grad.float()).sum(-1).cpu())  # (B, T)
    return torch.stack(heads) / n_total, torch.stack(hidden) / n_total, float(metric.detach()) / n_total
