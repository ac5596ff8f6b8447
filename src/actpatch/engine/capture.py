"""Run a model and keep the activations at chosen sites (the donor side of patching).

    cache, logits = capture(lm, batch.donor_ids, batch, [HeadSite(9), HiddenSite(3)])
    cache[HeadSite(9)]          # (B, T, H, Dh): the o_proj input of layer 9, split into heads
    logits                      # (B, V): logits at each row's last real token (END)

Only the final position is unembedded (``last_logits``): the final norm runs inside the base model,
then the LM head is applied to the gathered END rows. That equals ``model(...).logits`` at END
(tested) and avoids full-vocabulary logits at every position.
"""

from __future__ import annotations

from typing import Iterable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import DataError, NumericalError, SiteError
from ..model.models import LoadedModel
from .batch import PairBatch
from .hooks import hooks
from .noise import noise_hook
from .patternsite import PatternSite, pattern_entries
from .sites import Site


class ActivationCache(dict):
    """``(kind, layer) -> activation``; index it with a site. Head activations are (B, T, H, Dh).

    Example::

        cache, _ = capture(lm, batch.donor_ids, batch, [HeadSite(9)]); cache[HeadSite(9)].shape  # (B, T, H, Dh)
    """

    def __getitem__(self, key) -> Tensor:
        k = key.key if hasattr(key, "key") else key
        try:
            return super().__getitem__(k)
        except KeyError:
            have = ", ".join(f"{kind} of layer {layer}" for kind, layer in sorted(self)) or "nothing"
            raise SiteError(
                f"no captured activation for {key!r} in this cache; it holds: {have}. "
                "Capture it first: capture(lm, ids, batch, [that site, ...])"
            ) from None

    def __contains__(self, key) -> bool:
        return super().__contains__(key.key if hasattr(key, "key") else key)


def split_heads(x: Float[Tensor, "batch pos hd"], n_heads: int, d_head: int) -> Float[Tensor, "batch pos head d_head"]:
    """The attention output projection's input, viewed per head."""
    return x.view(*x.shape[:-1], n_heads, d_head)  # (B, T, H*Dh) -> (B, T, H, Dh)


def rows_at(x: Float[Tensor, "batch pos ..."], pos: Int[Tensor, "batch"], device) -> Float[Tensor, "batch ..."]:
    """``x[b, pos[b]]`` for every row b, picked where ``x`` lives and only then moved to ``device``.

    Example::

        resid_end = rows_at(cache[HiddenSite(11)], batch.position("END"), "cpu")  # (B, D)
    """
    rows = torch.arange(x.shape[0], device=x.device)
    return x[rows, pos.to(x.device)].to(device)


def last_logits(
    lm: LoadedModel,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    end: Int[Tensor, "batch"],
    columns: Int[Tensor, "batch n"] | None = None,
    exact: Int[Tensor, "batch m"] | None = None,
) -> Float[Tensor, "batch vocab"]:
    """Logits at each row's END token (right padding), computed from the base model's final hidden states.

    ``columns`` restricts the unembedding to those token ids per row (e.g. IO and S): (B, n).
    ``exact`` (B, m): in half precision, these ids' logits are computed in float32 (``Adapter.unembed``).

    Example::

        logits = last_logits(lm, batch.recipient_ids, batch.attention_mask, batch.position("END"))  # (B, V)

    """
    out = lm.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state  # (B, T, D), already final-normed
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return lm.adapter.unembed(hidden[rows, end.to(hidden.device)], columns, exact)  # (B, V) or (B, n)


def side_of(input_ids: Tensor, batch: PairBatch) -> str:
    """Which prompts of ``batch`` ``input_ids`` are: "donor" when they are ``batch.donor_ids`` (the same tensor, or
    equal to it and not to the recipient's), else "recipient"."""
    if input_ids is batch.donor_ids:
        return "donor"
    if input_ids is batch.recipient_ids:
        return "recipient"
    ids = input_ids.cpu()
    same = lambda t: ids.shape == t.shape and torch.equal(ids, t.cpu())  # noqa: E731
    return "donor" if same(batch.donor_ids) and not same(batch.recipient_ids) else "recipient"


def recipient_logits(lm: LoadedModel, batch: PairBatch) -> Float[Tensor, "batch vocab"]:
    """END logits of the batch's recipient prompts (no hooks of its own; callers may install some)."""
    dev = lm.device
    return last_logits(lm, batch.recipient_ids.to(dev), batch.attention_mask.to(dev), batch.position("END"),
                       exact=batch.answer_columns())


def locate_nonfinite(
    lm: LoadedModel, input_ids: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"]
) -> str:
    """Name the first module (embeddings, block L, final norm) whose output has NaN/inf at a real token."""
    adapter, bad = lm.adapter, []
    real = attention_mask.to(lm.device).bool()  # (B, T): padding may hold anything

    def watch(name: str):
        def fn(act: Tensor) -> None:
            if not bad and not torch.isfinite(act[real.to(act.device)]).all():  # layers may sit on other GPUs
                bad.append(name)
        return fn

    specs = [(lm.model.get_input_embeddings(), "output", watch("the token embeddings"))]
    specs += [(adapter.block(L), "output", watch(f"layer {L} (its block output)")) for L in range(adapter.n_layers)]
    if adapter.final_norm() is not None:
        specs.append((adapter.final_norm(), "output", watch("the final norm")))
    with torch.inference_mode(), hooks(specs):
        lm.model.base_model(input_ids=input_ids.to(lm.device), attention_mask=real.long(), use_cache=False)
    return bad[0] if bad else "the unembedding (LM head)"


def nonfinite_rows(logits: Float[Tensor, "rows ..."]) -> list[int]:
    """Indices of the rows (first dimension) holding any NaN or inf; [] when all is finite."""
    return (~torch.isfinite(logits)).flatten(1).any(dim=1).nonzero().flatten().tolist()


def check_finite(
    lm: LoadedModel, logits: Tensor, input_ids: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"],
    what: str,
) -> None:
    """Raise ``NumericalError`` naming the first layer that produced NaN/inf if ``logits`` are not finite."""
    rows = nonfinite_rows(logits)
    if not rows:
        return
    where = locate_nonfinite(lm, input_ids, attention_mask)
    dtype = lm.dtype
    raise NumericalError(
        f"the {what} logits contain NaN or inf (rows {rows[:8]}{' ...' if len(rows) > 8 else ''}); expected finite "
        f"values. They first appear in {where}. " + (
            f"The model runs in {str(dtype).removeprefix('torch.')}, which can overflow: try --dtype float32. "
            if dtype != torch.float32 else "") + "Check the checkpoint's weights for NaN/inf."
    )


def capture(
    lm: LoadedModel,
    input_ids: Int[Tensor, "batch pos"],
    batch: PairBatch,
    sites: Iterable[Site],
) -> tuple[ActivationCache, Float[Tensor, "batch vocab"]]:
    """One forward pass of ``input_ids`` (donor or recipient rows of ``batch``) that records ``sites``.

    ``batch.donor_ids`` run with the donor's mask and END (``side_of``), so donors may be longer or shorter; a
    noised donor (``batch.noise_mask``) runs with its embedding noise (``engine.noise``).

    Whole activations are kept per (kind, layer), whatever the sites' heads and positions, so one
    donor run serves every later patch of that layer. Pattern and values sites (``PatternSite``) add a donor and
    a recipient forward that build every head's swapped output (``patternsite.pattern_entries``).

    Example::

        cache, logits = capture(lm, batch.donor_ids, batch, [HeadSite(9), HiddenSite(3)])

    """
    adapter = lm.adapter
    side = side_of(input_ids, batch)
    mask = batch.donor_attention_mask if side == "donor" else batch.attention_mask
    end = batch.donor_position("END") if side == "donor" else batch.position("END")
    if input_ids.shape != mask.shape:
        raise DataError(f"capture got ids of shape {tuple(input_ids.shape)}, but the batch's {side} prompts are "
                        f"{tuple(mask.shape)}; pass batch.recipient_ids or batch.donor_ids of the same batch.")
    cache = ActivationCache()
    sites = list(sites)
    swaps = {s.key for s in sites if isinstance(s, PatternSite)}
    if swaps:
        for s in sites:
            s.validate(adapter)
        if side != "donor":
            raise SiteError("pattern and values sites are built from the donor and the recipient together; capture "
                            "them with the donor's ids: capture(lm, batch.donor_ids, batch, sites)")
        cache.update(pattern_entries(lm, batch, swaps))
        sites = [s for s in sites if not isinstance(s, PatternSite)]
    noise = noise_hook(lm, batch) if side == "donor" else None
    specs = [] if noise is None else [noise]  # a noised donor: the noise is added before anything reads
    seen = set()
    for site in sites:
        site.validate(adapter)
        if site.key in seen:
            continue
        seen.add(site.key)

        def store(act: Tensor, key=site.key, head=site.kind == "head") -> None:
            act = act.detach().clone()
            cache[key] = split_heads(act, adapter.n_heads, adapter.d_head) if head else act

        specs.append((site.module(adapter), "input" if site.reads_input else "output", store))
    with torch.inference_mode(), hooks(specs):
        logits = last_logits(lm, input_ids.to(lm.device), mask.to(lm.device), end, exact=batch.answer_columns())
    check_finite(lm, logits, input_ids, mask, "captured run's")
    return cache, logits

