"""Noised donor runs (causal tracing, Meng et al. 2022): Gaussian noise on the embeddings of chosen donor tokens.

A pair's ``noise`` (span, scale, seed) marks donor tokens in ``PairBatch.noise_mask``; ``capture`` then runs the
donor with ``noise_hook`` on the input embeddings, so every donor activation (and the donor logits) is the noised
run's. The noise of row i is ``scale_i x embedding_std(lm) x randn(n_i, D)`` from a generator seeded with the row's
seed: the same numbers whatever the chunk or batch the pair runs in. Usage::

    spec = noise_hook(lm, batch)            # None when no pair of the batch is noised
    with hooks([spec]): model(batch.donor_ids ...)
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from ..model.models import LoadedModel
from .batch import PairBatch
from .hooks import HookSpec

SAMPLE_ROWS = 4096  # embedding rows the standard deviation is estimated from (every k-th token id)


def embedding_std(lm: LoadedModel) -> float:
    """The standard deviation of the input embeddings' outputs over every entry of a fixed sample of token ids
    (the embedding module's own output, so a model that scales its embeddings, like Gemma, is measured scaled)."""
    emb = lm.model.get_input_embeddings()
    n = emb.num_embeddings
    ids = torch.arange(0, n, max(1, n // SAMPLE_ROWS), device=emb.weight.device)
    with torch.inference_mode():
        return float(emb(ids).float().std())


def row_noise(n_tokens: int, dim: int, seed: int) -> Float[Tensor, "n dim"]:
    """Standard normal noise for one row's ``n_tokens`` noised tokens, from its own seeded generator (CPU)."""
    return torch.randn(n_tokens, dim, generator=torch.Generator().manual_seed(int(seed)))


def noise_hook(lm: LoadedModel, batch: PairBatch, rows: Tensor | None = None) -> HookSpec | None:
    """An output hook on the input embeddings that adds each noised row's noise at its marked donor tokens.
    ``rows`` (R,): the pair of each row of the forward pass, for passes that repeat a pair's donor prompt (its
    continuations as rows of their own, prompt first); by default row i is pair i."""
    if batch.noise_mask is None or not bool(batch.noise_mask.any()):
        return None
    std = embedding_std(lm)
    mask = batch.noise_mask  # (B, Td)
    pair_of = torch.arange(len(mask)) if rows is None else rows.cpu()

    def add(emb: Tensor) -> Tensor:  # (R, T, D), T >= Td: a donor prompt starts every row
        out = emb.clone()
        for r, i in enumerate(pair_of.tolist()):
            cols = mask[i].nonzero().flatten()
            if len(cols) == 0:
                continue
            z = row_noise(len(cols), emb.shape[-1], int(batch.noise_seed[i])) * float(batch.noise_scale[i]) * std
            out[r, cols.to(emb.device)] += z.to(emb.device, emb.dtype)
        return out

    return lm.model.get_input_embeddings(), "output", add
