"""IOI metrics: pure functions of END logits and answer token ids (no model, no I/O).

    ld = logit_diff(logits, answer_ids, wrong_ids)           # (B,) logit(IO) - logit(S)
    effect = normalised_effect(patched_ld, recipient_ld, donor_ld)   # 0 = unchanged, 1 = donor

Logit difference is the headline metric. The seed's probability ratio P(IO) / P(S) equals
exp(logit difference) exactly (the softmax normaliser cancels), so it is reported as a
companion, not as an independent number. Every function computes in at least float32.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


def _f32(x: Tensor) -> Tensor:
    """At least float32: half-precision logits are promoted, float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _pick(logits: Tensor, ids: Tensor) -> Tensor:
    ids = ids.to(logits.device)  # gather first, then promote: no float32 copy of the whole vocabulary
    return _f32(logits.gather(-1, ids.expand(*logits.shape[:-1]).unsqueeze(-1)).squeeze(-1))


def logit_diff(
    logits: Float[Tensor, "*batch vocab"], answer_ids: Int[Tensor, "batch"], wrong_ids: Int[Tensor, "batch"]
) -> Float[Tensor, "*batch"]:
    """logit(IO) - logit(S) per row; leading variant dimensions broadcast over the batch.

    Example::

        ld = logit_diff(logits, batch.answer_ids, batch.wrong_ids)  # (B,)
    """
    return _pick(logits, answer_ids) - _pick(logits, wrong_ids)


def token_prob(logits: Float[Tensor, "*batch vocab"], ids: Int[Tensor, "batch"]) -> Float[Tensor, "*batch"]:
    """Softmax probability of ``ids`` at each row.

    Example::

        token_prob(logits, batch.answer_ids).mean()  # P(IO)
    """
    return torch.exp(_pick(logits, ids) - torch.logsumexp(_f32(logits), dim=-1))


def prob_ratio(
    logits: Float[Tensor, "*batch vocab"], answer_ids: Int[Tensor, "batch"], wrong_ids: Int[Tensor, "batch"]
) -> Float[Tensor, "*batch"]:
    """The seed's P(IO) / P(S); identical to exp(logit_diff).

    Example::

        prob_ratio(logits, batch.answer_ids, batch.wrong_ids)  # == logit_diff(...).exp()
    """
    return torch.exp(logit_diff(logits, answer_ids, wrong_ids))


def top1_is(logits: Float[Tensor, "*batch vocab"], ids: Int[Tensor, "batch"]) -> Float[Tensor, "*batch"]:
    """1.0 where ``ids`` is the argmax token, else 0.0."""
    return (logits.argmax(dim=-1) == ids.to(logits.device).expand(*logits.shape[:-1])).float()


def normalised_effect(
    patched: Float[Tensor, "..."] | float, recipient: Float[Tensor, "..."] | float, donor: Float[Tensor, "..."] | float
) -> Float[Tensor, "..."]:
    """(patched - recipient) / (donor - recipient): 0 = recipient unchanged, 1 = donor behaviour.

    Apply it to *means* over pairs; per-pair ratios explode when a donor is close to its recipient.

    Example::

        normalised_effect(patched=-1.0, recipient=4.0, donor=-5.5)  # 0.53: half-way to the donor

    """
    patched, recipient, donor = (torch.as_tensor(x, dtype=torch.float32) for x in (patched, recipient, donor))
    return (patched - recipient) / (donor - recipient)


def ioi_scores(
    logits: Float[Tensor, "*batch vocab"], answer_ids: Int[Tensor, "batch"], wrong_ids: Int[Tensor, "batch"]
) -> dict[str, Float[Tensor, "*batch"]]:
    """Every per-row IOI score at once: logit_diff, p_io, p_s, correct (IO > S) and top1 (IO is argmax).

    Example::

        scores = ioi_scores(logits, batch.answer_ids, batch.wrong_ids)
        scores["logit_diff"].mean(), scores["correct"].mean()
    """
    ld = logit_diff(logits, answer_ids, wrong_ids)
    lse = torch.logsumexp(_f32(logits), dim=-1)  # the softmax normaliser, once for both probabilities
    return {
        "logit_diff": ld,
        "p_io": torch.exp(_pick(logits, answer_ids) - lse),
        "p_s": torch.exp(_pick(logits, wrong_ids) - lse),
        "correct": (ld > 0).float(),
        "top1": top1_is(logits, answer_ids),
    }
