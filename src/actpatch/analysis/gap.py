"""Why patching heads moves the IOI metric less than patching hidden states: the numbers per layer.

A hidden-state patch at layer L replaces the whole residual stream h_L; an all-heads patch at L
changes only the attention block's output a_L = o_proj(z_L), one of the many terms summed into
h_L (h_L = embeddings + sum over earlier blocks of attention and MLP outputs + a_L + MLP_L). So:

    gap_account(lm, batch, recipient_cache, donor_cache, exact)   # -> list of per-layer records

gives, per layer and at END (the position the answer is read from):
- ``resid_norm``: ||h_L|| of the recipient;
- ``hidden_delta``: ||h_L' - h_L|| / ||h_L||, the change a hidden-state patch writes (h' = donor);
- ``heads_delta``: ||a_L' - a_L|| / ||h_L||, the change an all-heads patch writes;
- ``attn_share``: ||a_L|| / ||h_L||, the attention block's share of the residual stream;
  (under a post-attention norm, Gemma 2/3 and OLMo 2, a_L is the norm's output: what attention writes);
- ``hidden_direct`` / ``heads_direct``: the part of each patch's effect on the logit difference
  that goes straight to the unembedding: the written change through the final norm (its scale
  frozen at the recipient's run) onto W_U[IO] - W_U[S], mean over pairs;
- with ``exact`` (the sweeps' mean LD change at END for ``hidden`` and ``all_heads``): the
  ``*_total`` and ``*_indirect`` = total - direct, the part carried through later layers.
Caches need HiddenSite(L) and AttnOutSite(L) of every layer, for recipient and donor.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..engine.batch import PairBatch
from ..engine.capture import ActivationCache, rows_at
from ..engine.sites import AttnOutSite, HiddenSite
from ..model.models import LoadedModel
from .heads import direct_readout


def gap_account(
    lm: LoadedModel, batch: PairBatch, recipient: ActivationCache, donor: ActivationCache,
    exact: Mapping[tuple[str, int], float] | None = None,
) -> list[dict[str, float]]:
    """Per-layer residual-stream arithmetic of hidden-state vs all-heads patches (module docstring)."""
    a = lm.adapter
    dev, end, direct = direct_readout(lm, batch, recipient)
    records = []
    with torch.inference_mode():
        for L in range(a.n_layers):
            h = rows_at(recipient[HiddenSite(L)], end, dev).float()  # (B, D)
            dh = rows_at(donor[HiddenSite(L)], end, dev).float() - h
            # what attention writes into the residual stream (through the post-norm of Gemma 2/3 and OLMo 2)
            att = a.attn_written(L, rows_at(recipient[AttnOutSite(L)], end, dev)).float()
            datt = a.attn_written(L, rows_at(donor[AttnOutSite(L)], end, dev)).float() - att
            norm = h.norm(dim=-1)  # (B,)
            rec = {
                "layer": L, "resid_norm": float(norm.mean()),
                "hidden_delta": float((dh.norm(dim=-1) / norm).mean()),
                "heads_delta": float((datt.norm(dim=-1) / norm).mean()),
                "attn_share": float((att.norm(dim=-1) / norm).mean()),
                "hidden_direct": float(direct(dh).mean()),
                "heads_direct": float(direct(datt).mean()),
            }
            records.append(rec)
    return records if exact is None else with_totals(records, exact)


def with_totals(records: list[dict[str, float]], exact: Mapping[tuple[str, int], float]) -> list[dict[str, float]]:
    """Add ``*_total`` (the sweeps' mean LD change at END) and ``*_indirect`` = total - direct to each layer's record.

    Example::

        with_totals(gap_account(lm, batch, rec, don), {("hidden", 0): -1.2, ("all_heads", 0): -0.1})
    """
    out = []
    for rec in records:
        rec = dict(rec)
        for kind, key in (("hidden", "hidden"), ("heads", "all_heads")):
            if (key, rec["layer"]) in exact:
                rec[f"{kind}_total"] = float(exact[(key, rec["layer"])])
                rec[f"{kind}_indirect"] = rec[f"{kind}_total"] - rec[f"{kind}_direct"]
        out.append(rec)
    return out
