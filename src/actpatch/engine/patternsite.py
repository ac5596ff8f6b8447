"""Pattern and values sites: one head's attention split into "where it looks" and "what it reads".

    PatternSite(9, 9, "END")                  # the donor's attention weights of head 9.9 at END, recipient's values
    PatternSite(9, 9, "END", part="values")   # the recipient's weights, the donor's values

A head's output at query q is z[q] = sum_k A[q, k] V[k] (A after softmax, V the head's value vectors, its KV
group's under grouped-query attention). A pattern patch makes it sum_k A_donor[q, k] V_recipient[k]; a values
patch sum_k A_recipient[q, k] V_donor[k]. Both are written where a head patch writes, the attention output
projection's input, so the rest of the engine treats them as head sites whose "donor" activation is that z,
built here from one donor and one recipient forward (``pattern_entries``, called by ``capture``).

Pairs of different lengths: a position map m (donor -> recipient) pairs the common token prefix, the common
suffix (aligned from the end) and the named positions; a donor key with weight and no counterpart leaves its
query row unwritable (NaN here; ``check_rows`` refuses a patch that would write it, naming the pair). Pairs of
equal length map position t to t. The recipient's values and weights are its unpatched ones, so a pattern site
combines only with sites at its layer or later (``check_variant``). Needs eager attention (the weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..errors import SiteError, UnsupportedArchitectureError
from ..model.adapters import Adapter
from ..model.models import LoadedModel
from .batch import PairBatch
from .hooks import hooks
from .sites import HeadSite, Position, _Site


@dataclass(frozen=True)
class PatternSite(_Site):
    """Head ``head``'s attention weights (``part="pattern"``) or values (``part="values"``) from the donor.

    Example::

        PatternSite(9, 9, "END"); PatternSite(9, 9, None, "values")
    """

    head: int = 0
    part: str = "pattern"

    reads_input = True

    def __init__(self, layer: int, head: int, pos: Position = None, part: str = "pattern") -> None:
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "pos", pos)
        object.__setattr__(self, "head", head)
        object.__setattr__(self, "part", part)

    @property
    def kind(self) -> str:  # one cache entry per (pattern|values, layer): every head's z
        return self.part

    def module(self, adapter: Adapter) -> nn.Module:
        return adapter.attn_out(self.layer)

    def columns(self, adapter: Adapter) -> tuple[int, ...]:
        Dh = adapter.d_head
        return tuple(range(self.head * Dh, (self.head + 1) * Dh))  # in (B, T, H*Dh)

    def validate(self, adapter: Adapter) -> None:
        super().validate(adapter)
        if self.part not in ("pattern", "values"):
            raise SiteError(f"part must be 'pattern' or 'values', got {self.part!r}")
        HeadSite(self.layer, self.head, self.pos).validate(adapter)


def position_map(batch: PairBatch) -> Int[Tensor, "batch dpos"]:
    """(B, Td): the recipient position of each donor position, -1 where it has none (see the module doc)."""
    B, Td = batch.donor_ids.shape
    out = torch.full((B, Td), -1, dtype=torch.long)
    rec_len, don_len = batch.lengths().tolist(), batch.lengths("donor").tolist()
    don_pos = batch.side_positions("donor")
    for b in range(B):
        nr, nd = rec_len[b], don_len[b]
        if nr == nd:
            out[b, :nd] = torch.arange(nd)
            continue
        r, d = batch.recipient_ids[b, :nr], batch.donor_ids[b, :nd]
        pre = 0
        while pre < min(nr, nd) and r[pre] == d[pre]:
            pre += 1
        suf = 0
        while suf < min(nr, nd) - pre and r[nr - 1 - suf] == d[nd - 1 - suf]:
            suf += 1
        out[b, :pre] = torch.arange(pre)
        out[b, nd - suf:nd] = torch.arange(nr - suf, nr)
        for name, idx in batch.positions.items():
            out[b, int(don_pos[name][b])] = int(idx[b])
    return out


def _run(lm: LoadedModel, ids: Tensor, mask: Tensor, layers: list[int]) -> tuple[dict, dict, dict]:
    """One forward: per layer the weights (B, H, T, T), the values per query head (B, T, H, Dh), and z (B, T, H, Dh)."""
    a = lm.adapter
    A, V, Z = {}, {}, {}
    G = a.n_heads // a.n_kv_heads
    dt = torch.promote_types(lm.dtype, torch.float32)  # float32, or float64 for a float64 model

    def weights(L):
        def fn(out) -> None:
            if not isinstance(out, tuple) or len(out) < 2 or out[1] is None:
                raise UnsupportedArchitectureError(
                    f"layer {L}'s attention returned no weights (attention {lm.model.config._attn_implementation!r}); "
                    "a pattern site needs eager attention. Load the model with attn_implementation='eager'.")
            A[L] = out[1].detach().to(dt)
        return fn

    def values(L):
        def fn(out: Tensor) -> None:
            heads = [a.qkv_slot(L, "v", g * G)[1](out) for g in range(a.n_kv_heads)]  # KV x (B, T, Dh)
            V[L] = torch.stack(heads, 2).repeat_interleave(G, 2).to(dt)  # (B, T, KV, Dh) -> (B, T, H, Dh)
        return fn

    def heads(L):
        def fn(z: Tensor) -> None:
            Z[L] = z.detach().to(dt).view(*z.shape[:2], a.n_heads, a.d_head)  # (B, T, H*Dh) -> (B, T, H, Dh)
        return fn

    specs = [(a.attention(L), "result", weights(L)) for L in layers]
    specs += [(a.qkv_module(L, "v"), "output", values(L)) for L in layers]
    specs += [(a.attn_out(L), "input", heads(L)) for L in layers]
    with torch.inference_mode(), hooks(specs):
        lm.model.base_model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
    return A, V, Z


def _check_decomposition(A: Tensor, V: Tensor, Z: Tensor, mask: Tensor, L: int, side: str) -> None:
    """z must equal sum_k A[q, k] V[k] on real tokens, or this family's heads are not A @ V and the sites lie."""
    real = mask.bool()  # (B, T)
    got = torch.einsum("bhqk,bkhd->bqhd", A, V)[real]
    err = float((got - Z[real]).abs().max()) if real.any() else 0.0
    scale = float(Z[real].abs().max()) if real.any() else 1.0
    if not err <= 1e-3 * max(scale, 1.0):
        raise UnsupportedArchitectureError(
            f"layer {L}'s head outputs on the {side} are not their attention weights times their values (max "
            f"difference {err:.3g}): the pattern and values sites cannot be built on this model; expected z = A V.")


def pattern_entries(lm: LoadedModel, batch: PairBatch, kinds: set[tuple[str, int]]) -> dict:
    """Cache entries (B, Td, H, Dh) for ``kinds`` {("pattern" | "values", layer)}: every head's z under the swap,
    indexed by donor query position (as every donor activation is); NaN on rows that cannot be mapped."""
    layers = sorted({L for _, L in kinds})
    Ad, Vd, Zd = _run(lm, batch.donor_ids, batch.donor_attention_mask, layers)
    Ar, Vr, Zr = _run(lm, batch.recipient_ids, batch.attention_mask, layers)
    for L in layers:
        _check_decomposition(Ad[L].cpu(), Vd[L].cpu(), Zd[L].cpu(), batch.donor_attention_mask, L, "donor")
        _check_decomposition(Ar[L].cpu(), Vr[L].cpu(), Zr[L].cpu(), batch.attention_mask, L, "recipient")
    m = position_map(batch)  # (B, Td)
    B, Td = m.shape
    Tr = batch.recipient_ids.shape[1]
    # onto[b, kd, kr] = 1 where donor position kd is recipient position kr: a (Td, Tr) 0/1 map per row
    onto = torch.zeros(B, Td, Tr, dtype=Ad[layers[0]].dtype)
    b_i, d_i = (m >= 0).nonzero(as_tuple=True)
    onto[b_i, d_i, m[b_i, d_i]] = 1.0
    out = {}
    for part, L in kinds:
        if part == "pattern":  # z[qd] = sum_kd A_don[qd, kd] V_rec[m(kd)]
            Vm = torch.einsum("bdr,brhe->bdhe", onto, Vr[L].cpu())  # (B, Td, H, Dh): V_rec at donor positions
            z = torch.einsum("bhqk,bkhd->bqhd", Ad[L].cpu(), Vm)
            lost = torch.einsum("bhqk,bk->bqh", Ad[L].cpu(), (m < 0).to(onto.dtype))  # weight on keys with no counterpart
            future = (m[:, None, :] > m[:, :, None]).to(onto.dtype)  # (B, Td, Td): key kd maps after query qd's row
            lost = lost + torch.einsum("bhqk,bqk->bqh", Ad[L].cpu(), future) + (m < 0).float()[:, :, None]
        else:  # z[qd] = sum_kr A_rec[m(qd), kr] V_don[m^-1(kr)]
            Aq = torch.einsum("bdr,bhrk->bhdk", onto, Ar[L].cpu())  # (B, H, Td, Tr): A_rec rows at donor rows
            Vm = torch.einsum("bdr,bdhe->brhe", onto, Vd[L].cpu())  # (B, Tr, H, Dh): V_don at recipient positions
            z = torch.einsum("bhqk,bkhd->bqhd", Aq, Vm)
            lost = torch.einsum("bhqk,bk->bqh", Aq, (onto.sum(1) == 0).to(onto.dtype))
            lost = lost + (m < 0).float()[:, :, None]  # a query row with no recipient row
        real = batch.donor_attention_mask.bool()[:, :, None]  # (B, Td, 1): padding rows stay finite (0 x NaN is NaN)
        z = z.masked_fill(((lost > 1e-6) & real)[..., None], float("nan"))
        out[(part, L)] = z.to(lm.dtype)
    return out


def check_rows(site: PatternSite, src: Tensor, src_idx: Tensor | None, batch: PairBatch) -> None:
    """Refuse a pattern/values patch whose rows cannot be mapped between donor and recipient (NaN entries)."""
    rows = torch.arange(src.shape[0])
    z = src[:, :, site.head] if src_idx is None else src[rows, src_idx.cpu(), site.head][:, None]  # (B, T|1, Dh)
    real = batch.donor_attention_mask.bool() if src_idx is None else torch.ones(len(rows), 1, dtype=torch.bool)
    bad = (torch.isnan(z).any(-1) & real).any(1).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise SiteError(
            f"{site!r} cannot be written on pair {i} ({batch.pairs[i].recipient!r} <- {batch.pairs[i].donor!r}): its "
            "query row has no recipient counterpart, or attends to donor tokens that have none (only the common "
            "prefix, the common suffix and named positions are paired between prompts of different lengths). "
            "Use pairs of equal token length, or a named position whose row attends to paired tokens only.")


def check_variant(variant) -> None:
    """A pattern or values site reads the recipient's unpatched values and weights: no other site of the variant
    may change them (a site at an earlier layer, or q/k/v at its own)."""
    for s in variant:
        if not isinstance(s, PatternSite):
            continue
        for o in variant:
            if o.layer < s.layer or (o.layer == s.layer and o.kind in ("q", "k", "v", "embed")):
                raise SiteError(f"{s!r} uses the recipient's unpatched values and weights, but {o!r} in the same "
                                "variant would change them; combine a pattern site only with sites at its layer "
                                "(heads, attention or MLP output) or later.")
