"""Checks of the analysis against forward passes: head DLA, the gap account and path patching.

The analysis computes its numbers from cached activations (each head's write through W_O, norms
linearised with frozen scales, the adapter's post-attention norm). These checks measure the same
quantities from the residual stream itself, in forward passes with plain observing hooks, so a head
decomposition that forgets a norm or reads the wrong layer or position fails them:

- ``dla_matches_attention_output``: per layer, the heads' direct logit attribution plus the bias's
  equals the direct effect of what the attention block really added to the residual stream (the
  residual between attention and MLP minus the block input; under a parallel residual, the block
  output minus its input minus the MLP's output);
- ``gap_matches_forward``: the gap account's ``heads_delta``, ``attn_share`` and ``heads_direct``
  equal the same numbers computed from attention's measured writes in the recipient and donor runs
  (its ``*_indirect`` columns are ``total - direct`` by definition, so they need no check of their own);
- ``path_patch_identity``: path patching with no senders reproduces the recipient's logits.

    writes = attention_writes(lm, batch.recipient_ids, batch)   # {"write": (L, B, D), "resid": (L, B, D)}
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..engine.batch import PairBatch
from ..engine.capture import ActivationCache, rows_at
from ..engine.hooks import hooks
from ..engine.paths import Receiver, paths_run
from ..engine.sanity import SanityCheck, _diff, _exact_tol, _ulps
from ..model.models import LoadedModel
from .heads import HeadProfile, ld_readout


def attention_writes(lm: LoadedModel, input_ids: Tensor, batch: PairBatch) -> dict[str, Tensor]:
    """At each row's last real token, per layer: what attention added to the residual stream ("write"),
    the block's input ("input") and output ("resid"), each (L, B, D) in float32, by residual arithmetic."""
    a = lm.adapter
    inp: dict[int, Tensor] = {}
    mid: dict[int, Tensor] = {}
    out: dict[int, Tensor] = {}
    mlp: dict[int, Tensor] = {}

    def keep(store: dict, L: int):
        def fn(x: Tensor) -> None:
            store[L] = x.detach().clone()  # Falcon adds attention into the MLP's output in place
        return fn

    def keep_call(L: int):
        def fn(args: tuple, kwargs: dict) -> None:
            inp[L] = (args[0] if args else kwargs["hidden_states"]).detach()
        return fn

    specs = [(a.block(L), "call", keep_call(L)) for L in range(a.n_layers)]
    specs += [(a.block(L), "output", keep(out, L)) for L in range(a.n_layers)]
    if a.parallel_residual:
        specs += [(a.mlp(L), "output", keep(mlp, L)) for L in range(a.n_layers)]
    else:
        specs += [(a.resid_mid(L), "input", keep(mid, L)) for L in range(a.n_layers)]
    with torch.inference_mode(), hooks(specs):
        lm.model.base_model(input_ids=input_ids.to(lm.device), attention_mask=batch.attention_mask.to(lm.device),
                            use_cache=False)
    end = batch.attention_mask.sum(dim=1) - 1  # (B,) each row's last real token, counted here
    dev = lm.device
    writes, resid = [], []
    for L in range(a.n_layers):
        x = rows_at(inp[L], end, dev).float()  # (B, D)
        after = rows_at(out[L], end, dev).float()
        if a.parallel_residual:
            w = after - x - a.resid_scale * rows_at(mlp[L], end, dev).float()
        else:  # OPT runs the MLP half on (B*T, D) rows: back to (B, T, D)
            w = rows_at(mid[L].view(inp[L].shape), end, dev).float() - x
        writes.append(w)
        resid.append(after)
    inputs = torch.stack([rows_at(inp[L], end, dev).float() for L in range(a.n_layers)])
    return {"write": torch.stack(writes), "resid": torch.stack(resid), "input": inputs}


def _tolerance(lm: LoadedModel, scale: float) -> float:
    """float32: 1e-4 relative (per-head products are summed in another order than the fused matmul);
    half precision: the residual stream is rounded to the dtype, about 4 rounding steps at its scale."""
    return 1e-4 * max(1.0, scale) if lm.dtype in (torch.float32, torch.float64) else _ulps(lm, scale, 4)


@torch.inference_mode()
def check_dla(lm: LoadedModel, batch: PairBatch, prof: HeadProfile) -> SanityCheck:
    """Per layer: sum over heads of DLA, plus the bias's, equals the direct effect of attention's measured write."""
    a = lm.adapter
    measured = attention_writes(lm, batch.recipient_ids, batch)
    direct = ld_readout(lm, batch, measured["resid"][-1])
    got = direct(measured["write"]).mean(-1).cpu()  # (L,)
    want = prof.dla.sum(-1) + (prof.bias_dla if prof.bias_dla is not None else 0.0)  # (L,)
    d = float((got - want).abs().max())
    tol = _tolerance(lm, float(direct(measured["input"]).abs().max()))
    worst = int((got - want).abs().argmax())
    return SanityCheck(
        "dla_matches_attention_output", d <= tol,
        f"{a.n_layers} layers: sum_h DLA + bias vs the direct effect of what attention added to the residual stream "
        f"(measured by residual arithmetic): max abs diff = {d:.3g} (layer {worst}: {float(want[worst]):.4g} vs "
        f"{float(got[worst]):.4g})", d, tol,
    )


@torch.inference_mode()
def check_gap(lm: LoadedModel, batch: PairBatch, gap: Sequence[dict]) -> SanityCheck:
    """The gap account's attention columns equal the ones computed from attention's measured writes."""
    rec = attention_writes(lm, batch.recipient_ids, batch)
    don = attention_writes(lm, batch.donor_ids, batch)
    direct = ld_readout(lm, batch, rec["resid"][-1])
    delta = don["write"] - rec["write"]  # (L, B, D)
    norm = rec["resid"].norm(dim=-1)  # (L, B)
    measured = {"heads_delta": (delta.norm(dim=-1) / norm).mean(-1), "attn_share": (rec["write"].norm(dim=-1) / norm).mean(-1),
                "heads_direct": direct(delta).mean(-1)}
    d, worst = 0.0, ""
    for key, values in measured.items():
        got = torch.tensor([r[key] for r in gap])
        diff = (got - values.cpu()).abs()
        if float(diff.max()) > d:
            d, worst = float(diff.max()), f"{key} at layer {int(diff.argmax())}"
    tol = _tolerance(lm, float(direct(rec["input"]).abs().max()))
    return SanityCheck(
        "gap_matches_forward", d <= tol,
        f"{len(gap)} layers: heads_delta, attn_share, heads_direct vs attention's writes measured in the recipient and "
        f"donor runs: max abs diff = {d:.3g}" + (f" ({worst})" if worst else ""), d, tol,
    )


@torch.inference_mode()
def check_path_identity(
    lm: LoadedModel, batch: PairBatch, rec_cache: ActivationCache, rec_logits: Tensor, movers: Sequence[tuple[int, int]],
) -> SanityCheck:
    """Path patching with no senders (every head frozen to its recipient value) reproduces the recipient."""
    last = lm.adapter.n_layers - 1
    qkv = [Receiver(w, last, 0) for w in "qkv"] + [Receiver("q", L, h) for L, h in movers]
    d = max(_diff(paths_run(lm, batch, rec_cache, [], receivers, recipient=rec_cache), rec_logits)
            for receivers in ([Receiver("logits")], qkv))
    tol = _exact_tol(lm, float(rec_logits.abs().max()))
    return SanityCheck(
        "path_patch_identity", d <= tol,
        f"path patching with no senders, into the logits and into {len(qkv)} q/k/v receivers: max abs dlogit vs the "
        f"recipient = {d:.3g}", d, tol,
    )
