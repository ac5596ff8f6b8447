"""Mandatory sanity checks: evidence that the hooks did exactly what the numbers claim.

Each check compares tensors directly (the seed's ``head_xb == head_xa``) and returns a
``SanityCheck``. They run with every experiment; a failure makes ``actpatch ioi`` exit non-zero.

    checks = run_sanity_checks(lm, batch, recipient_cache, donor_cache, rec_logits, don_logits, layers)

Tolerances: checks marked exact use ``torch.equal`` on CPU, because the same batch shape runs the
same kernels; on CUDA they allow 1e-4 in float32, two rounding steps at the logits' scale in half
precision (non-deterministic reductions). The head decomposition
sums per-head products in a different order than the fused projection, so it allows 1e-5 x the
output scale in float32 (2e-2 in half precision).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import Tensor

from .batch import PairBatch
from .capture import ActivationCache, recipient_logits
from .hooks import count_hooks, hooks
from .metrics import logit_diff
from .models import LoadedModel
from .patching import patched, run_chunk
from .sites import AttnOutSite, HeadSite, HiddenSite, Site


@dataclass(frozen=True)
class SanityCheck:
    """One mandatory check: its name, whether it passed, and the measured detail.

    Example::

        for check in run_sanity_checks(lm, batch, rec_cache, don_cache, rec_logits, don_logits, [0, 1]):
            print(check.name, check.passed, check.detail)
    """

    name: str
    passed: bool
    detail: str
    max_abs_diff: float | None = None
    tolerance: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _diff(a: Tensor, b: Tensor) -> float:
    # b may come from another device under a device map (e.g. the LM head's GPU vs the input's)
    return float((a.float() - b.to(a.device).float()).abs().max()) if a.numel() else 0.0


def _ulps(lm: LoadedModel, scale: float, n: float) -> float:
    """``n`` rounding steps of the model's dtype at magnitude ``scale`` (half precision tolerances)."""
    return n * torch.finfo(lm.dtype).eps * max(1.0, scale)


def _exact_tol(lm: LoadedModel, scale: float = 1.0) -> float:
    """0 on CPU (the same batch shape runs the same kernels); on CUDA, non-deterministic reductions:
    1e-4 in float32, two rounding steps at the logits' scale in half precision."""
    if lm.device.type == "cpu":
        return 0.0
    return 1e-4 if lm.dtype == torch.float32 else _ulps(lm, scale, 2)


def _check_layers(layers: Sequence[int]) -> list[int]:
    return sorted({layers[0], layers[len(layers) // 2], layers[-1]})


def check_hooks_transparent(lm: LoadedModel, batch: PairBatch, rec_logits: Tensor) -> SanityCheck:
    """Hooks that return their activation unchanged on every block and o_proj leave logits bit-identical."""
    a = lm.adapter
    specs = [(a.block(L), "output", lambda x: x.clone()) for L in range(a.n_layers)]
    specs += [(a.attn_out(L), "input", lambda x: x.clone()) for L in range(a.n_layers)]
    with torch.inference_mode(), hooks(specs):
        logits = recipient_logits(lm, batch)
    d, tol = _diff(logits, rec_logits), _exact_tol(lm, float(rec_logits.abs().max()))
    return SanityCheck("hooks_transparent", d <= tol, f"no-op hooks on all {a.n_layers} layers: max abs dlogit = {d:.3g}", d, tol)


def check_self_patch(lm: LoadedModel, batch: PairBatch, rec_cache: ActivationCache, rec_logits: Tensor, layers: Sequence[int]) -> SanityCheck:
    """Patching the recipient with its own activations (every head of every layer; hidden states) changes nothing."""
    variants = [[HeadSite(L) for L in layers]] + [[HiddenSite(L)] for L in _check_layers(layers)]
    d = max(_diff(run_chunk(lm, batch, rec_cache, [v])[0], rec_logits) for v in variants)
    tol = _exact_tol(lm, float(rec_logits.abs().max()))
    return SanityCheck("self_patch_identity", d <= tol, f"{len(variants)} self-patches: max abs dlogit = {d:.3g}", d, tol)


def check_head_patch_exact(
    lm: LoadedModel, batch: PairBatch, rec_cache: ActivationCache, donor_cache: ActivationCache, layers: Sequence[int]
) -> SanityCheck:
    """After patching one head, the o_proj input holds the donor's slice there and the recipient's elsewhere."""
    a = lm.adapter
    problems, moved = [], 0
    for L in _check_layers(layers):
        head = L % a.n_heads
        seen: list[Tensor] = []

        def observe(x: Tensor) -> None:  # a pre-hook registered after the patch sees the patched input
            seen.append(x.detach().view(*x.shape[:-1], a.n_heads, a.d_head))  # (B, T, H*Dh) -> (B, T, H, Dh)

        with torch.inference_mode(), patched(lm, batch, donor_cache, [[HeadSite(L, head)]]):
            with hooks([(a.attn_out(L), "input", observe)]):
                recipient_logits(lm, batch)
        z, z_don, z_rec = seen[0].cpu(), donor_cache[HeadSite(L)].cpu(), rec_cache[HeadSite(L)].cpu()
        others = [h for h in range(a.n_heads) if h != head]
        if not torch.equal(z[:, :, head], z_don[:, :, head]):
            problems.append(f"L{L}H{head} != donor")
        if not torch.equal(z[:, :, others], z_rec[:, :, others]):
            problems.append(f"L{L} other heads != recipient")
        moved += int(not torch.equal(z_don[:, :, head], z_rec[:, :, head]))
    checked = len(_check_layers(layers))
    detail = (
        f"{checked} single-head patches: patched slice == donor, other heads == recipient (torch.equal); "
        f"donor differed from recipient at {moved}/{checked}"
    )
    return SanityCheck("head_patch_exact", not problems, detail if not problems else "; ".join(problems), None, 0.0)


def check_hidden_patch_is_donor(lm: LoadedModel, batch: PairBatch, donor_cache: ActivationCache, don_logits: Tensor, layers: Sequence[int]) -> SanityCheck:
    """Patching the hidden state at all positions of a layer reproduces the donor's logits."""
    checked = _check_layers(layers)
    d = max(_diff(run_chunk(lm, batch, donor_cache, [[HiddenSite(L)]])[0], don_logits) for L in checked)
    tol = _exact_tol(lm, float(don_logits.abs().max()))
    return SanityCheck("hidden_patch_reproduces_donor", d <= tol, f"layers {checked}: max abs(logit - donor logit) = {d:.3g}", d, tol)


def check_head_decomposition(lm: LoadedModel, rec_cache: ActivationCache, layers: Sequence[int]) -> SanityCheck:
    """sum_h z_h W_O[h] + b_O equals the attention output projection's output."""
    a = lm.adapter
    worst, worst_rel = 0.0, 0.0
    for L in _check_layers(layers):
        z = rec_cache[HeadSite(L)].float()  # (B, T, H, Dh)
        w = a.head_weights(L).float().to(z.device)  # (H, Dh, D)
        total = torch.einsum("bthd,hde->bte", z, w)  # (B, T, D)
        bias = a.head_bias(L)
        if bias is not None:
            total = total + bias.float().to(z.device)
        out = rec_cache[AttnOutSite(L)].float()
        d = _diff(total, out)
        worst, worst_rel = max(worst, d), max(worst_rel, d / max(1.0, float(out.abs().max())))
    tol = 1e-5 if lm.dtype == torch.float32 else 2e-2
    return SanityCheck(
        "head_decomposition", worst_rel <= tol,
        f"max abs(sum_h z_h W_O[h] + b_O - o_proj out) = {worst:.3g} (relative {worst_rel:.3g}, float summation order)", worst, tol,
    )


def check_last_logits_parity(lm: LoadedModel, batch: PairBatch, rec_logits: Tensor) -> SanityCheck:
    """Our END-only unembedding equals the full model's logits at END."""
    with torch.inference_mode():
        full = lm.model(input_ids=batch.recipient_ids.to(lm.device), attention_mask=batch.attention_mask.to(lm.device)).logits
    rows = torch.arange(len(batch), device=full.device)
    d = _diff(full[rows, batch.position("END").to(full.device)], rec_logits)
    scale = float(rec_logits.abs().max())
    # float32: a row-subset matmul sums in another order; half precision: the full forward's logits are
    # rounded to the model's dtype while ours keep IO and S in float32 (Adapter.unembed's exact columns)
    tol = 1e-4 * max(1.0, scale) if lm.dtype == torch.float32 else _ulps(lm, scale, 4)
    return SanityCheck("end_logits_match_full_forward", d <= tol, f"max abs dlogit vs model(...).logits = {d:.3g} (row-subset matmul)", d, tol)


def check_fast_path(
    lm: LoadedModel, batch: PairBatch, donor_cache: ActivationCache, variants: Sequence[Sequence[Site]], fast_ld: Tensor,
) -> SanityCheck:
    """The sweep's fast path (stacked variants + prefix reuse) equals one full forward pass per patch.

    Recomputed: the first and last cell of every kind of patch (site type, one head or all, position),
    so each position's prefix arithmetic is exercised, plus cells at a third and two thirds of the sweep.
    """
    first_last: dict[tuple, list[int]] = {}
    for i, v in enumerate(variants):
        kind = tuple((type(s).__name__, getattr(s, "head", None) is None, s.pos) for s in v)
        first_last.setdefault(kind, [i, i])[1] = i
    spread = {0, len(variants) // 3, 2 * len(variants) // 3, len(variants) - 1} if variants else set()
    picks = sorted(spread.union(*map(set, first_last.values())))
    d, scale = 0.0, 1.0
    for i in picks:
        logits = run_chunk(lm, batch, donor_cache, [variants[i]])[0]
        ref = logit_diff(logits, batch.answer_ids, batch.wrong_ids)
        d, scale = max(d, _diff(ref.cpu(), fast_ld[i])), max(scale, float(logits.abs().max()))
    # half precision: other batch shapes may pick other kernels, whose roundings differ by a few steps
    # of the dtype at the logits' scale (float16 ~0.01, bfloat16 ~0.1 at logits of 20)
    tol = 1e-4 if lm.dtype == torch.float32 else max(5e-2, _ulps(lm, scale, 2))
    why = ("within float summation-order differences (the batch shape changes)" if d <= tol else
           "the batched sweep disagrees with plain forward passes: its numbers are wrong; please report this "
           "with the command line")
    return SanityCheck(
        "fast_path_matches_reference", d <= tol,
        f"{len(picks)} sweep cells ({len(first_last)} kinds of patch) recomputed with one full forward each: "
        f"max abs dLD = {d:.3g}, {why}", d, tol,
    )


def check_no_hooks_left(lm: LoadedModel, hooks_before: int) -> SanityCheck:
    n = count_hooks(lm.model)
    return SanityCheck("no_hooks_left", n == hooks_before, f"{n} hooks on the model after the run (before: {hooks_before})")


def run_sanity_checks(
    lm: LoadedModel, batch: PairBatch, rec_cache: ActivationCache, donor_cache: ActivationCache,
    rec_logits: Tensor, don_logits: Tensor, layers: Sequence[int],
) -> list[SanityCheck]:
    """All the tensor-level checks for one donor design (``no_hooks_left`` runs at the very end).

    Example::

        checks = run_sanity_checks(lm, batch, rec_cache, don_cache, rec_logits, don_logits, layers=[0, 1])
        all(c.passed for c in checks)
    """
    with torch.inference_mode():
        return _run_all(lm, batch, rec_cache, donor_cache, rec_logits, don_logits, layers)


def _run_all(lm, batch, rec_cache, donor_cache, rec_logits, don_logits, layers) -> list[SanityCheck]:
    return [
        check_hooks_transparent(lm, batch, rec_logits),
        check_self_patch(lm, batch, rec_cache, rec_logits, layers),
        check_head_patch_exact(lm, batch, rec_cache, donor_cache, layers),
        check_hidden_patch_is_donor(lm, batch, donor_cache, don_logits, layers),
        check_head_decomposition(lm, rec_cache, layers),
        check_last_logits_parity(lm, batch, rec_logits),
    ]
