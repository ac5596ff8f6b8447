"""Path patching (Wang et al. 2022, App. B): the effect of sender heads through chosen receivers only.

    logits = path_patch(lm, batch, donor, senders=[HeadSite(7, 3, "END")], receivers=[Receiver("q", 9, 9)])
    logit_diff(logits, batch.answer_ids, batch.wrong_ids)       # (B,)
    logits, att = path_patch_attention(..., watch=[(9, 9)])    # and head 9.9's attention weights under it

Three runs:
1. the donor run, captured beforehand: ``donor`` holds ``HeadSite(L)`` for every sender layer;
2. the recipient run with the senders set to their donor values and every other head frozen to its
   recipient value (MLPs and norms are recomputed, as in the paper; ``freeze_mlps=True`` freezes
   them too). It records what the receivers read: a later head's query, key or value
   (``Receiver("q" | "k" | "v", layer, head)``), or the whole residual stream at the end
   (``Receiver("logits")``: the path from the senders straight to the unembedding);
3. the recipient run with only the receivers' inputs replaced by the recorded ones.
The result is the END logits of run 3 (for ``"logits"``, of run 2). Under grouped-query attention a
query head's k and v belong to its KV group, so a k or v receiver changes every head of the group.
Where q and k are normalised over the whole projection (OLMo 2's ``q_norm``/``k_norm``), receivers read
and write them after that norm, so one head's slice never leaks into the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import SiteError
from ..model.models import LoadedModel
from .batch import PairBatch
from .capture import ActivationCache, capture, recipient_logits
from .hooks import hooks
from .sites import HeadSite, MlpOutSite, resolve_pos


@dataclass(frozen=True)
class Receiver:
    """What a path ends in: ``"q"``, ``"k"`` or ``"v"`` of head ``(layer, head)``, or ``"logits"``.

    Example::

        Receiver("q", 23, 0)       # the query of head 23.0
        Receiver("logits")         # the residual stream at the end, read by the unembedding
    """

    kind: str
    layer: int | None = None
    head: int | None = None

    def validate(self, lm: LoadedModel) -> None:
        a = lm.adapter
        if self.kind == "logits":
            return
        if self.kind not in ("q", "k", "v"):
            raise SiteError(f"receiver kind must be 'q', 'k', 'v' or 'logits', got {self.kind!r}")
        if not isinstance(self.layer, int) or not 0 <= self.layer < a.n_layers:
            raise SiteError(f"receiver layer must be an int in [0, {a.n_layers - 1}], got {self.layer!r}")
        if not isinstance(self.head, int) or not 0 <= self.head < a.n_heads:
            raise SiteError(f"receiver head must be an int in [0, {a.n_heads - 1}], got {self.head!r}")


def _frozen_heads(lm: LoadedModel, batch: PairBatch, recipient: ActivationCache, donor: ActivationCache,
                  senders: Sequence[HeadSite]) -> dict[int, Tensor]:
    """Per layer, the o_proj input of run 2: recipient values, with the senders' slices from the donor."""
    a = lm.adapter
    lengths = batch.attention_mask.sum(dim=1)
    rows = torch.arange(len(batch))
    frozen = {L: recipient[HeadSite(L)] for L in range(a.n_layers)}  # (B, T, H, Dh) each, read only
    for s in senders:
        s.validate(a)
        if s.key not in donor:
            raise SiteError(f"the donor cache lacks layer {s.layer}'s heads; capture HeadSite({s.layer}) first")
        if frozen[s.layer] is recipient[HeadSite(s.layer)]:  # copy only the layers that get senders' slices
            frozen[s.layer] = frozen[s.layer].clone()
        hs = torch.as_tensor(s.heads(a))
        src, dst = donor[s].to(frozen[s.layer].device), frozen[s.layer]
        idx = resolve_pos(s.pos, batch.positions, lengths)
        if idx is None:
            dst[:, :, hs] = src[:, :, hs]
        else:
            r, p = rows[:, None], idx.cpu()[:, None]
            dst[r, p, hs[None, :]] = src[r, p, hs[None, :]]
    return frozen


def path_patch(
    lm: LoadedModel,
    batch: PairBatch,
    donor: ActivationCache,
    senders: Sequence[HeadSite],
    receivers: Sequence[Receiver],
    *,
    freeze_mlps: bool = False,
    recipient: ActivationCache | None = None,
) -> Float[Tensor, "batch vocab"]:
    """END logits after patching ``senders`` (donor values) along the paths into ``receivers`` only.

    ``recipient``: the recipient's own cache, if already captured (it needs ``HeadSite(L)`` of every
    layer, and ``MlpOutSite(L)`` with ``freeze_mlps``); otherwise one recipient pass captures it.

    Example::

        logits = path_patch(lm, batch, donor, [HeadSite(20, 0, "END")], [Receiver("q", 23, 0)])
        logit_diff(logits, batch.answer_ids, batch.wrong_ids).mean()
    """
    if not senders or not receivers:
        raise SiteError("path patching needs at least one sender head and one receiver")
    return paths_run(lm, batch, donor, senders, receivers, freeze_mlps=freeze_mlps, recipient=recipient)


def path_patch_attention(
    lm: LoadedModel, batch: PairBatch, donor: ActivationCache, senders: Sequence[HeadSite],
    receivers: Sequence[Receiver], watch: Sequence[tuple[int, int]], *, freeze_mlps: bool = False,
    recipient: ActivationCache | None = None,
) -> tuple[Float[Tensor, "batch vocab"], dict[tuple[int, int], Float[Tensor, "batch query key"]]]:
    """``path_patch``, and the attention weights (B, T, T) of the ``watch`` heads [(layer, head)] in the run whose
    receivers read the senders' paths: how patching S-inhibition heads into a name mover's query moves where it
    looks. Needs q or k receivers (a "logits" receiver changes no attention).

    Example::

        logits, att = path_patch_attention(lm, batch, donor, [HeadSite(8, 6, "END")], [Receiver("q", 9, 9)], [(9, 9)])
        att[(9, 9)][rows, end, io]   # (B,): END -> IO of head 9.9 under the path patch
    """
    if not senders or not receivers:
        raise SiteError("path patching needs at least one sender head and one receiver")
    if any(r.kind == "logits" for r in receivers):
        raise SiteError("a 'logits' receiver changes no attention weights; watch heads through q or k receivers")
    seen: dict[tuple[int, int], Tensor] = {}
    logits = paths_run(lm, batch, donor, senders, receivers, freeze_mlps=freeze_mlps, recipient=recipient,
                       watch=watch, seen=seen)
    return logits, seen


def paths_run(
    lm: LoadedModel, batch: PairBatch, donor: ActivationCache, senders: Sequence[HeadSite], receivers: Sequence[Receiver],
    *, freeze_mlps: bool = False, recipient: ActivationCache | None = None,
    watch: Sequence[tuple[int, int]] = (), seen: dict | None = None,
) -> Float[Tensor, "batch vocab"]:
    """``path_patch`` without its argument check: with no senders it must reproduce the recipient (a sanity check).
    ``watch``: heads whose attention weights (B, T, T) in the last run go into ``seen``."""
    for r in receivers:
        r.validate(lm)
    if any(r.kind == "logits" for r in receivers) and any(r.kind != "logits" for r in receivers):
        raise SiteError("a 'logits' receiver cannot be combined with q/k/v receivers; run them separately")
    a = lm.adapter
    sites = [HeadSite(L) for L in range(a.n_layers)] + ([MlpOutSite(L) for L in range(a.n_layers)] if freeze_mlps else [])
    if recipient is None or any(site not in recipient for site in sites):
        recipient, _ = capture(lm, batch.recipient_ids, batch, sites)
    frozen = _frozen_heads(lm, batch, recipient, donor, senders)

    def replace_with(t: Tensor):
        return lambda act: t.to(device=act.device, dtype=act.dtype).view(act.shape)

    run2 = [(a.attn_out(L), "input", replace_with(frozen[L])) for L in range(a.n_layers)]
    if freeze_mlps:
        run2 += [(a.mlp(L), "output", replace_with(recipient[MlpOutSite(L)])) for L in range(a.n_layers)]
    recorded: dict[Receiver, Tensor] = {}

    def record(r: Receiver, view):
        def fn(out: Tensor) -> None:
            recorded[r] = view(out).detach().clone()  # (B, T, Dh)
        return fn

    slots = {r: a.qkv_slot(r.layer, r.kind, r.head) for r in receivers if r.kind != "logits"}
    run2 += [(module, "output", record(r, view)) for r, (module, view) in slots.items()]
    with torch.inference_mode(), hooks(run2):
        logits2 = recipient_logits(lm, batch)
    if not slots:  # the 'logits' receiver: run 2 is the answer
        return logits2

    def write(r: Receiver, view):
        def fn(out: Tensor) -> Tensor:
            new = out.clone()
            view(new).copy_(recorded[r].to(new.device))  # the receiver's slice only
            return new
        return fn

    def keep(L: int):
        def fn(out) -> None:
            if not isinstance(out, tuple) or len(out) < 2 or out[1] is None:
                raise SiteError(f"layer {L}'s attention returned no weights: watching heads needs eager attention")
            for layer, h in watch:
                if layer == L:
                    seen[(layer, h)] = out[1][:, h].detach().float().cpu()  # (B, T, T)
        return fn

    specs = [(module, "output", write(r, view)) for r, (module, view) in slots.items()]
    specs += [(a.attention(L), "result", keep(L)) for L in sorted({L for L, _ in watch})]
    with torch.inference_mode(), hooks(specs):
        return recipient_logits(lm, batch)
