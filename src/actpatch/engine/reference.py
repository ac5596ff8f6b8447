"""An independent reference patcher: one plain full forward pass per patch, explicit indices.

The runtime checks compare the sweep's fast path and the patch hooks against this module. It shares
no code with ``patching``, ``prefix`` or ``planning``: positions are read from the batch's data (a
named position as stored, END as the last real token, an int counted from the start or the end),
each (row, position, head) is written one at a time, and the logit difference is read from the
model's own full forward pass.

    written = site_positions(HeadSite(5, 2, "S2"), batch)    # per row: the positions a patch writes
    ld = reference_logit_diff(lm, batch, donor_cache, [HeadSite(5, 2, "S2")])   # (B,)
    logits = reference_logits(lm, batch, donor_cache, [HiddenSite(3, "subject")])  # (B, V) at END

A named position is read from the donor at the donor's index and written at the recipient's (pairs of
different lengths).
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..model.models import LoadedModel
from ..model.placement import onloaded
from .batch import PairBatch
from .continuation import Readout
from .sites import Site


def site_positions(site: Site, batch: PairBatch, side: str = "recipient") -> list[list[int]]:
    """For every row, the real-token positions ``site`` covers on the recipient (where it writes) or, with
    ``side="donor"``, on the donor (where it reads); all of them when ``site.pos`` is None."""
    mask = batch.donor_attention_mask if side == "donor" else batch.attention_mask
    named = batch.donor_positions if side == "donor" and batch.donor_positions is not None else batch.positions
    lengths = [int(n) for n in mask.sum(dim=1)]
    pos = site.pos
    if pos is None:
        return [list(range(n)) for n in lengths]
    if pos in ("END", "last"):
        return [[n - 1] for n in lengths]
    if isinstance(pos, str):
        return [[int(p)] for p in named[pos]]
    return [[pos if pos >= 0 else n + pos] for n in lengths]


def site_columns(lm: LoadedModel, site: Site) -> list[slice]:
    """The feature columns ``site`` covers in its module's flat (B, T, F) activation: one slice per head, or all.

    Worked out here from the layouts' definitions, not from ``Site.columns``: heads are H blocks of d_head; a
    separate q/k/v projection is H' blocks (H' = KV heads for k and v); a "blocks" fused one is H query blocks, then
    KV key blocks, then KV value blocks (GPT-2, Phi-3, multi-query); "per_head" is H blocks of [q k v] (GPT-NeoX,
    Bloom); "grouped" is KV groups of [G queries, k, v] (Falcon's new architecture).
    """
    a, dh = lm.adapter, lm.adapter.d_head
    if site.kind == "head":
        heads = range(a.n_heads) if site.head is None else (site.head,) if isinstance(site.head, int) else site.head
        return [slice(h * dh, (h + 1) * dh) for h in heads]
    if site.kind in ("pattern", "values"):  # one head's output, built from the donor's weights or values
        return [slice(site.head * dh, (site.head + 1) * dh)]
    if site.kind in ("q", "k", "v"):
        layout, i, h = a.arch.qkv_layout, "qkv".index(site.kind), site.head
        if layout == "grouped":
            group = a.n_heads // a.n_kv_heads
            if site.kind == "q":  # query head h sits in group h // G, at place h % G
                block = (h // group) * (group + 2) + h % group
            else:  # key/value head h is group h: after its G queries
                block = h * (group + 2) + group + (i - 1)
        else:
            block = {"separate": h, "blocks": [h, a.n_heads + h, a.n_heads + a.n_kv_heads + h][i],
                     "per_head": 3 * h + i}[layout]
        return [slice(block * dh, (block + 1) * dh)]
    return [slice(None)]


def _writer(lm: LoadedModel, batch: PairBatch, site: Site, donor: Tensor):
    """A function (B, T, F) -> (B, T, F) that copies the donor's entries of ``site``, one by one."""
    flat = donor.reshape(*donor.shape[:2], -1)  # (B, Td, H, Dh) -> (B, Td, H*Dh) for heads; (B, Td, D) as is
    writes, reads = site_positions(site, batch), site_positions(site, batch, "donor")
    columns = site_columns(lm, site)
    for b, (w, r) in enumerate(zip(writes, reads)):
        if len(w) != len(r):
            raise ValueError(f"pair {b}: {site} covers {len(w)} recipient but {len(r)} donor positions")

    def write(act: Tensor) -> Tensor:
        new = act.clone()
        for b, (row, donor_row) in enumerate(zip(writes, reads)):
            for p, q in zip(row, donor_row):
                for c in columns:
                    new[b, p, c] = flat[b, q, c].to(new.device, new.dtype)
        return new

    return write


def _register(lm: LoadedModel, site: Site, write):
    module = site.module(lm.adapter)
    if site.reads_input:  # block 0 may get its input by name (hidden_states=...)
        def pre(m, args, kwargs):
            if args:
                return (write(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": write(kwargs["hidden_states"])}
        return module.register_forward_pre_hook(pre, with_kwargs=True)
    return module.register_forward_hook(
        lambda m, args, out: (write(out[0]), *out[1:]) if isinstance(out, tuple) else write(out))


def _patched_forward(lm: LoadedModel, batch: PairBatch, donor: dict, variant: Sequence[Site], module, ids=None, mask=None):
    """``module`` (the base model or the whole LM) run on the recipients (or ``ids``, ``mask``: the recipients with
    more tokens after them) with ``variant`` written by plain hooks, at the recipient prompts' positions only."""
    handles = []
    ids = batch.recipient_ids if ids is None else ids
    mask = batch.attention_mask if mask is None else mask
    try:
        for site in variant:
            handles.append(_register(lm, site, _writer(lm, batch, site, donor[site.key])))
        with torch.inference_mode():
            return module(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def reference_logits(lm: LoadedModel, batch: PairBatch, donor: dict, variant: Sequence[Site]) -> Float[Tensor, "batch vocab"]:
    """The model's own logits (``lm.model(...).logits``, every vocabulary entry) at each row's last real token after
    patching ``variant``, in float32: what any metric of the patched run is computed from.

    Example::

        logits = reference_logits(lm, batch, donor_cache, [HeadSite(5, 2, "subject")])   # (B, V)
    """
    logits = _patched_forward(lm, batch, donor, variant, lm.model).logits  # (B, T, V)
    lengths = batch.attention_mask.sum(dim=1)
    return torch.stack([logits[b, int(lengths[b]) - 1] for b in range(len(batch))]).float().cpu()  # (B, V)


def reference_logit_diff(
    lm: LoadedModel, batch: PairBatch, donor: dict, variant: Sequence[Site],
) -> Float[Tensor, "batch"]:
    """logit(answer) - logit(wrong) at END after patching ``variant``: one full forward, plain hooks.

    ``donor`` maps ``site.key`` to the donor activation. The read-out is the model's final hidden state at
    END times the LM head's two rows, in float32 (soft-capped like the model), so half precision does
    not round the difference. The family's logit scale is read from the config under its HF names.
    """
    out = _patched_forward(lm, batch, donor, variant, lm.model.base_model)
    hidden = out.last_hidden_state  # (B, T, D), final-normed
    lengths = batch.attention_mask.sum(dim=1)
    end = torch.stack([hidden[b, int(lengths[b]) - 1] for b in range(len(batch))]).float()  # (B, D)
    with torch.no_grad(), onloaded(lm.model.get_output_embeddings()) as head:
        rows = head.weight[torch.stack([batch.answer_ids, batch.wrong_ids], 1).to(head.weight.device)].float()  # (B, 2, D)
        logits = torch.einsum("bd,bnd->bn", end.to(rows.device), rows)  # (B, 2)
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[torch.stack([batch.answer_ids, batch.wrong_ids], 1).to(head.bias.device)].float()
    config = lm.model.config  # the families' own config fields: Cohere multiplies, Granite divides, Gemma soft-caps
    logits = logits * float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return (logits[:, 0] - logits[:, 1]).cpu()


def reference_readout(
    lm: LoadedModel, batch: PairBatch, donor: dict, variant: Sequence[Site], tail_kl: bool = False,
) -> Readout:
    """Multi-token answers: for each continuation slot, one full forward of the recipients followed by that slot's
    tokens (all but the last), ``variant`` written at the prompts' positions only; the model's own logits read at
    explicit indices. END logits (B, V), tail log-probs (B, n) (tokens 2.. of each continuation) and, with
    ``tail_kl``, KL(unpatched || patched) summed over the first answer's tail positions (B,).

    Example::

        ro = reference_readout(lm, batch, donor_cache, [HiddenSite(3, "subject")])   # ro.end, ro.tail
    """
    B, n, _ = batch.cont_ids.shape
    lengths = [int(x) for x in batch.attention_mask.sum(dim=1)]
    end, tail, kl = [None] * B, torch.zeros(B, n, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)
    for c in range(n):
        conts = [[int(t) for t in batch.cont_ids[b, c] if t >= 0] for b in range(B)]
        rows = [batch.recipient_ids[b, :lengths[b]].tolist() + conts[b][:-1] for b in range(B)]
        width = max(len(r) for r in rows)
        ids = torch.zeros(B, width, dtype=torch.long)
        mask = torch.zeros(B, width, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r)
            mask[b, :len(r)] = 1
        logits = _patched_forward(lm, batch, donor, variant, lm.model, ids, mask).logits  # (B, W, V)
        logp = torch.log_softmax(logits.double(), -1)
        base = None
        if tail_kl and c == 0:
            base = torch.log_softmax(_patched_forward(lm, batch, donor, [], lm.model, ids, mask).logits.double(), -1)
        for b in range(B):
            last = lengths[b] - 1  # the prompt's last token: it predicts the continuation's first
            if c == 0:
                end[b] = logits[b, last].float().cpu()  # causal: the prompt's END logits, whatever follows
            for i in range(1, len(conts[b])):  # token i is predicted at position last + i
                tail[b, c] += logp[b, last + i, conts[b][i]]
                if base is not None:
                    kl[b] += (base[b, last + i].exp() * (base[b, last + i] - logp[b, last + i])).sum()
    return Readout(torch.stack(end), tail.float(), kl.float() if tail_kl else None)
