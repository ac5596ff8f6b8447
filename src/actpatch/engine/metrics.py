"""Metrics: pure functions of END logits and answer token ids (no model, no I/O).

    ld = logit_diff(logits, answer_ids, wrong_ids)           # (B,) logit(IO) - logit(S)
    effect = normalised_effect(patched_ld, recipient_ld, donor_ld)   # 0 = unchanged, 1 = donor
    ld = set_logit_diff(logits, answer, answer_mask, wrong, wrong_mask)  # answer sets: padded (B, K) + mask
    kl = kl_from(recipient_logits, patched_logits)           # needs no answers

Logit difference is the headline metric. The seed's probability ratio P(IO) / P(S) equals
exp(logit difference) exactly (the softmax normaliser cancels), so it is reported as a
companion, not as an independent number. Every function computes in at least float32.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import DataError


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


# --- answer sets and task-neutral metrics ---------------------------------------------------------------
# A set of answer tokens per row is a padded (B, K) id tensor with a (B, K) mask of the real entries, so rows
# may hold sets of different sizes. A single token is the set of one: every function below then agrees with
# its single-token counterpart above.


def set_logsumexp(
    logits: Float[Tensor, "*batch vocab"], ids: Int[Tensor, "batch k"], mask: Bool[Tensor, "batch k"]
) -> Float[Tensor, "*batch"]:
    """log Σ_{t in set} exp(logit_t) per row, over the masked-in entries of ``ids``.

    Example::

        set_logsumexp(logits, torch.tensor([[262, 257]]), torch.tensor([[True, False]]))  # == logits[..., 262]
    """
    if ids.shape != mask.shape or ids.dim() != 2:
        raise DataError(f"an answer set is a (batch, k) id tensor with a mask of the same shape; got ids "
                        f"{tuple(ids.shape)} and mask {tuple(mask.shape)}. Pad the sets to one k and mask the padding.")
    if not bool(mask.any(dim=-1).all()):
        rows = (~mask.any(dim=-1)).nonzero().flatten().tolist()
        raise DataError(f"every row needs at least one answer token; rows {rows} have an empty set. "
                        "Give each pair at least one token in `answer` and in `wrong`.")
    ids, mask = ids.to(logits.device), mask.to(logits.device)
    picked = _f32(logits.gather(-1, ids.expand(*logits.shape[:-1], ids.shape[-1])))  # (*, B, K)
    return picked.masked_fill(~mask, float("-inf")).logsumexp(dim=-1)


def set_logit_diff(
    logits: Float[Tensor, "*batch vocab"], answer: Int[Tensor, "batch k"], answer_mask: Bool[Tensor, "batch k"],
    wrong: Int[Tensor, "batch j"], wrong_mask: Bool[Tensor, "batch j"],
) -> Float[Tensor, "*batch"]:
    """logsumexp(answer logits) - logsumexp(wrong logits): exp of it stays P(answer set) / P(wrong set).

    Example::

        set_logit_diff(logits, answer, answer_mask, wrong, wrong_mask)  # (B,)
    """
    return set_logsumexp(logits, answer, answer_mask) - set_logsumexp(logits, wrong, wrong_mask)


def set_logprob(
    logits: Float[Tensor, "*batch vocab"], answer: Int[Tensor, "batch k"], answer_mask: Bool[Tensor, "batch k"]
) -> Float[Tensor, "*batch"]:
    """log P(answer set): the set's logsumexp minus the softmax normaliser.

    Example::

        set_logprob(logits, answer, answer_mask).exp()  # P(any answer token)
    """
    return set_logsumexp(logits, answer, answer_mask) - torch.logsumexp(_f32(logits), dim=-1)


def prob_diff(
    logits: Float[Tensor, "*batch vocab"], answer: Int[Tensor, "batch k"], answer_mask: Bool[Tensor, "batch k"],
    wrong: Int[Tensor, "batch j"], wrong_mask: Bool[Tensor, "batch j"],
) -> Float[Tensor, "*batch"]:
    """P(answer set) - P(wrong set), each a sum of softmax probabilities.

    Example::

        prob_diff(logits, answer, answer_mask, wrong, wrong_mask)  # in [-1, 1]
    """
    lse = torch.logsumexp(_f32(logits), dim=-1)
    return (set_logsumexp(logits, answer, answer_mask) - lse).exp() - (set_logsumexp(logits, wrong, wrong_mask) - lse).exp()


def kl_from(reference: Float[Tensor, "*batch vocab"], logits: Float[Tensor, "*batch vocab"]) -> Float[Tensor, "*batch"]:
    """KL(P_reference || P_logits) per row, in nats: 0 when the next-token distributions agree. Needs no answers.

    ``reference`` is the unpatched recipient's logits and broadcasts over leading variant dimensions.

    Example::

        kl_from(recipient_logits, patched_logits)  # (K, B) for (K, B, V) patched logits
    """
    ref = torch.log_softmax(_f32(reference), dim=-1)
    return (ref.exp() * (ref - torch.log_softmax(_f32(logits), dim=-1))).sum(dim=-1)


TASK_METRICS = ("logit_diff", "prob_diff", "logprob", "kl")  # what ``actpatch run --metric`` and ``patch`` take


def task_scores(
    metric: str, logits: Float[Tensor, "*batch vocab"], answer: Int[Tensor, "batch k"], wrong: Int[Tensor, "batch j"],
    recipient: Float[Tensor, "batch vocab"] | None = None,
) -> dict[str, Float[Tensor, "*batch"]]:
    """Per-row scores of one run: ``metric`` under its own name, and where the pair has answers the companions
    ``logit_diff`` (over the sets), ``p_answer`` and ``p_wrong``. Sets are (B, K) ids padded with -1; a row with
    no answers is all -1. ``recipient``: the unpatched recipient's logits, which ``kl`` is measured from.

    Example::

        task_scores("kl", patched, *batch.answers(), recipient=recipient_logits)["kl"]   # (K, B)
    """
    if metric not in TASK_METRICS:
        raise DataError(f"metric must be one of {', '.join(TASK_METRICS)}, got {metric!r}")
    out: dict[str, Tensor] = {}
    if bool((answer >= 0).any()):
        am, wm = answer >= 0, wrong >= 0
        a, w = answer.clamp(min=0), wrong.clamp(min=0)
        lse = torch.logsumexp(_f32(logits), dim=-1)  # the softmax normaliser, once
        la, lw = set_logsumexp(logits, a, am), set_logsumexp(logits, w, wm)
        out.update(logit_diff=la - lw, p_answer=(la - lse).exp(), p_wrong=(lw - lse).exp())
        out.update(prob_diff=out["p_answer"] - out["p_wrong"], logprob=la - lse)
    elif metric != "kl":
        raise DataError(f"the {metric} metric reads answer tokens, but these pairs have none; give each pair an "
                        "`answer` and a `wrong` token (or sets), or use --metric kl.")
    if metric == "kl":
        if recipient is None:
            raise DataError("the kl metric is measured from the unpatched recipient's logits; pass recipient=...")
        out["kl"] = kl_from(recipient.to(logits.device), logits)
    keep = (metric, "logit_diff", "p_answer", "p_wrong")
    return {k: v for k, v in out.items() if k in keep}


# --- answers of several tokens (continuations) ----------------------------------------------------------
# A pair's continuations are (B, n, m) ids padded with -1, answers first, with (B, n) sides: +1 answer, -1 wrong,
# 0 an unused slot. A continuation's log-prob is the END logits' log-softmax at its first token plus the tail:
# the summed log-probs of its later tokens at its own positions (teacher forcing; ``engine.continuation``).

ANSWER_REDUCE = ("sum", "mean")
KL_OVER = ("end", "continuation")


def continuation_logprobs(
    end: Float[Tensor, "*batch vocab"], tail: Float[Tensor, "*batch n"], cont_ids: Int[Tensor, "batch n m"],
    reduce: str = "sum",
) -> Float[Tensor, "*batch n"]:
    """log P(continuation | prompt) of every slot, summed over its tokens (``reduce="mean"``: per token); -inf for
    unused slots.

    Example::

        continuation_logprobs(readout.end, readout.tail, batch.cont_ids)   # (B, n)
    """
    if reduce not in ANSWER_REDUCE:
        raise DataError(f"answer reduce (--answer-reduce) must be one of {', '.join(ANSWER_REDUCE)}, got {reduce!r}")
    first = cont_ids[..., 0].to(end.device)  # (B, n)
    logp = torch.log_softmax(_f32(end), dim=-1)  # (*, B, V)
    lp = logp.gather(-1, first.clamp(min=0).expand(*end.shape[:-1], first.shape[-1])) + tail.to(logp.device, logp.dtype)
    if reduce == "mean":
        lp = lp / (cont_ids >= 0).sum(-1).clamp(min=1).to(lp.device, lp.dtype)
    return lp.masked_fill(first < 0, float("-inf"))


def continuation_scores(
    metric: str, end: Float[Tensor, "*batch vocab"], tail: Float[Tensor, "*batch n"], cont_ids: Int[Tensor, "batch n m"],
    cont_side: Int[Tensor, "batch n"], reduce: str = "sum", recipient: Float[Tensor, "batch vocab"] | None = None,
    tail_kl: Float[Tensor, "*batch"] | None = None, kl_over: str = "end",
) -> dict[str, Float[Tensor, "*batch"]]:
    """``task_scores`` for continuations: ``metric`` and the companions ``logit_diff`` (logprob(answer set) -
    logprob(wrong set), each a logsumexp over its continuations), ``p_answer`` and ``p_wrong``. With one-token
    answers these equal ``task_scores``'. ``kl`` is the next-token KL at END from ``recipient``; with
    ``kl_over="continuation"`` it is averaged over the answer's positions (END and its tail, ``tail_kl`` summed).

    Example::

        continuation_scores("logprob", ro.end, ro.tail, batch.cont_ids, batch.cont_side, reduce="mean")["logprob"]
    """
    if metric not in TASK_METRICS:
        raise DataError(f"metric must be one of {', '.join(TASK_METRICS)}, got {metric!r}")
    if kl_over not in KL_OVER:
        raise DataError(f"kl over (--kl-over) must be one of {', '.join(KL_OVER)}, got {kl_over!r}")
    lp = continuation_logprobs(end, tail, cont_ids, reduce)  # (*, B, n)
    side = cont_side.to(lp.device)
    la = lp.masked_fill(side != 1, float("-inf")).logsumexp(-1)
    lw = lp.masked_fill(side != -1, float("-inf")).logsumexp(-1)
    out = {"logit_diff": la - lw, "p_answer": la.exp(), "p_wrong": lw.exp(), "logprob": la}
    out["prob_diff"] = out["p_answer"] - out["p_wrong"]
    if metric == "kl":
        if recipient is None:
            raise DataError("the kl metric is measured from the unpatched recipient's logits; pass recipient=...")
        kl = kl_from(recipient.to(end.device), end)
        if kl_over == "continuation":
            if tail_kl is None:
                raise DataError("kl over the continuation needs the tail's KL (patch_variants(..., tail_kl=True))")
            kl = (kl + tail_kl.to(kl.device, kl.dtype)) / (cont_ids[:, 0] >= 0).sum(-1).to(kl.device, kl.dtype)
        out["kl"] = kl
    keep = (metric, "logit_diff", "p_answer", "p_wrong")
    return {k: v for k, v in out.items() if k in keep}
