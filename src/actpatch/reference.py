"""An independent reference patcher: one plain full forward pass per patch, explicit indices.

The runtime checks compare the sweep's fast path and the patch hooks against this module. It shares
no code with ``patching``, ``prefix`` or ``planning``: positions are read from the batch's data (a
named position as stored, END as the last real token, an int counted from the start or the end),
each (row, position, head) is written one at a time, and the logit difference is read from the
model's own full forward pass.

    written = site_positions(HeadSite(5, 2, "S2"), batch)    # per row: the positions a patch writes
    ld = reference_logit_diff(lm, batch, donor_cache, [HeadSite(5, 2, "S2")])   # (B,)
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .batch import PairBatch
from .models import LoadedModel
from .placement import onloaded
from .sites import Site


def site_positions(site: Site, batch: PairBatch) -> list[list[int]]:
    """For every row, the real-token positions ``site`` covers (all of them when ``site.pos`` is None)."""
    lengths = [int(n) for n in batch.attention_mask.sum(dim=1)]
    pos = site.pos
    if pos is None:
        return [list(range(n)) for n in lengths]
    if pos in ("END", "last"):
        return [[n - 1] for n in lengths]
    if isinstance(pos, str):
        return [[int(p)] for p in batch.positions[pos]]
    return [[pos if pos >= 0 else n + pos] for n in lengths]


def site_columns(lm: LoadedModel, site: Site) -> list[slice]:
    """The feature columns ``site`` covers in its module's (B, T, F) activation: one slice per head, or all."""
    if site.kind != "head":
        return [slice(None)]
    dh = lm.adapter.d_head
    heads = range(lm.adapter.n_heads) if site.head is None else (site.head,) if isinstance(site.head, int) else site.head
    return [slice(h * dh, (h + 1) * dh) for h in heads]


def _writer(lm: LoadedModel, batch: PairBatch, site: Site, donor: Tensor):
    """A function (B, T, F) -> (B, T, F) that copies the donor's entries of ``site``, one by one."""
    flat = donor.reshape(*donor.shape[:2], -1)  # (B, T, H, Dh) -> (B, T, H*Dh) for heads; (B, T, D) as is
    positions, columns = site_positions(site, batch), site_columns(lm, site)

    def write(act: Tensor) -> Tensor:
        new = act.clone()
        for b, row in enumerate(positions):
            for p in row:
                for c in columns:
                    new[b, p, c] = flat[b, p, c].to(new.device, new.dtype)
        return new

    return write


def _register(lm: LoadedModel, site: Site, write):
    module = site.module(lm.adapter)
    if site.reads_input:
        return module.register_forward_pre_hook(lambda m, args: (write(args[0]), *args[1:]))
    return module.register_forward_hook(
        lambda m, args, out: (write(out[0]), *out[1:]) if isinstance(out, tuple) else write(out))


def reference_logit_diff(
    lm: LoadedModel, batch: PairBatch, donor: dict, variant: Sequence[Site],
) -> Float[Tensor, "batch"]:
    """logit(answer) - logit(wrong) at END after patching ``variant``: one full forward, plain hooks.

    ``donor`` maps ``site.key`` to the donor activation. The read-out is the model's final hidden state at
    END times the LM head's two rows, in float32 (soft-capped like the model), so half precision does
    not round the difference.
    """
    handles = []
    try:
        for site in variant:
            handles.append(_register(lm, site, _writer(lm, batch, site, donor[site.key])))
        with torch.inference_mode():
            out = lm.model.base_model(input_ids=batch.recipient_ids.to(lm.device),
                                      attention_mask=batch.attention_mask.to(lm.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    hidden = out.last_hidden_state  # (B, T, D), final-normed
    lengths = batch.attention_mask.sum(dim=1)
    end = torch.stack([hidden[b, int(lengths[b]) - 1] for b in range(len(batch))]).float()  # (B, D)
    with torch.no_grad(), onloaded(lm.model.get_output_embeddings()) as head:
        rows = head.weight[torch.stack([batch.answer_ids, batch.wrong_ids], 1).to(head.weight.device)].float()  # (B, 2, D)
        logits = torch.einsum("bd,bnd->bn", end.to(rows.device), rows)  # (B, 2)
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[torch.stack([batch.answer_ids, batch.wrong_ids], 1).to(head.bias.device)].float()
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return (logits[:, 0] - logits[:, 1]).cpu()
