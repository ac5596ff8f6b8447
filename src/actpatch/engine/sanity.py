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

from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..model.models import LoadedModel
from .batch import PairBatch
from .capture import ActivationCache, recipient_logits
from .hooks import count_hooks, hooks
from .patching import patched, run_chunk
from .reference import reference_logit_diff, reference_logits, site_columns, site_positions
from .sites import AttnOutSite, EmbedSite, HeadSite, HiddenSite, MlpOutSite, QKVSite, Site


# what each check asserts, in one line (the reports' sanity tables); README's table says it at length
CHECK_DESCRIPTIONS = {
    "hooks_transparent": "no-op hooks on every block and projection leave the logits bit-identical",
    "self_patch_identity": "patching the recipient with its own activations changes nothing",
    "patch_writes_exactly": "every kind of patch at every position writes the donor's value at exactly its entries",
    "donor_differs_from_recipient": "the donor's activations are not the recipient's (no silent no-op patches)",
    "hidden_patch_reproduces_donor": "a hidden-state patch at all positions reproduces the donor's logits",
    "head_decomposition": "the heads times W_O, plus the bias, sum to the projection's output",
    "end_logits_match_full_forward": "the END-only read-out equals model(...).logits at END",
    "fast_path_matches_reference": "sampled sweep cells equal an independent one-forward-per-patch reference",
    "dla_matches_attention_output": "per layer, the heads' DLA sums to the direct effect of attention's real write",
    "gap_matches_forward": "the gap account's attention columns equal attention's measured writes",
    "path_patch_identity": "path patching with no senders reproduces the recipient",
    "no_hooks_left": "the model has as many hooks afterwards as before",
    "full_circuit_is_recipient": "a circuit of every edge reproduces the recipient's logits exactly",
    "empty_circuit_is_donor": "patching every edge (and every edge but the logits' own) reproduces the donor's logits",
    "edge_patch_matches_plain_patch": "patching all edges out of a head equals an ordinary patch of that head",
    "circuit_sums_agree": "the chosen circuit gives the same logits with every receiver's input summed out in full",
}


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


def self_pairs(batch: PairBatch) -> PairBatch:
    """The batch with every recipient as its own donor."""
    return replace(batch, donor_ids=batch.recipient_ids, donor_mask=None, donor_positions=None, noise_mask=None)


def check_self_patch(lm: LoadedModel, batch: PairBatch, rec_cache: ActivationCache, rec_logits: Tensor, layers: Sequence[int]) -> SanityCheck:
    """Patching the recipient with its own activations (every head of every layer; hidden states) changes nothing."""
    variants = [[HeadSite(L) for L in layers]] + [[HiddenSite(L)] for L in _check_layers(layers)]
    own = self_pairs(batch)  # the recipient is its own donor (pairs of different lengths included)
    d = max(_diff(run_chunk(lm, own, rec_cache, [v])[0], rec_logits) for v in variants)
    tol = _exact_tol(lm, float(rec_logits.abs().max()))
    return SanityCheck("self_patch_identity", d <= tol, f"{len(variants)} self-patches: max abs dlogit = {d:.3g}", d, tol)


def _observer(store: list):
    def fn(x: Tensor) -> None:
        store.append(x.detach().clone())
    return fn


def _sample_sites(lm: LoadedModel, batch: PairBatch, donor_cache: ActivationCache, layers: Sequence[int]) -> tuple[list[list[Site]], int, int]:
    """Variants that together hold every (site kind, position) at each checked layer, the number of kinds and of positions.
    Kinds: one head, two heads, all heads, hidden state, and the attention and MLP outputs, one query, key and
    value head and the embeddings when the donor cache holds them. Sites of different modules share a forward
    pass; head sites of one module do not (nor q, k and v, which GPT-2 and GPT-NeoX make in one module)."""
    a = lm.adapter
    checked = _check_layers(layers)
    positions = ([] if batch.unequal_rows() else [None]) + ["END"] + [p for p in batch.positions if p != "END"]
    shared = [lambda L, p: HeadSite(L, L % a.n_heads, p), lambda L, p: HiddenSite(L, p)]
    for cls in (AttnOutSite, MlpOutSite):
        if all(cls(L) in donor_cache for L in checked):
            shared.append(lambda L, p, c=cls: c(L, p))
    groups = [shared, [lambda L, p: HeadSite(L, None, p)]]
    if a.n_heads > 2:
        groups.append([lambda L, p: HeadSite(L, ((L + 1) % a.n_heads, (L + 2) % a.n_heads), p)])
    for which in "qkv":
        n = a.n_heads if which == "q" else a.n_kv_heads
        if all(QKVSite(L, which, 0) in donor_cache for L in checked):
            groups.append([lambda L, p, w=which, n=n: QKVSite(L, w, L % n, p)])
    variants = [[make(L, pos) for make in group for L in checked] for group in groups for pos in positions]
    if EmbedSite() in donor_cache:  # one site, before layer 0
        variants += [[EmbedSite(pos)] for pos in positions]
    return variants, sum(len(g) for g in groups) + (EmbedSite() in donor_cache), len(positions)


def _sample_rows(batch: PairBatch, n: int = 4) -> list[int]:
    """Up to ``n`` rows, the shortest and the longest prompt among them (rows of different lengths and END)."""
    lengths = batch.attention_mask.sum(dim=1)
    picks = [int(lengths.argmin()), int(lengths.argmax())] + list(range(len(batch)))
    return sorted(dict.fromkeys(picks))[:n] if len(batch) > n else list(range(len(batch)))


def check_patch_writes_exactly(
    lm: LoadedModel, batch: PairBatch, donor_cache: ActivationCache, layers: Sequence[int],
) -> SanityCheck:
    """Every kind of patch, at every position, writes the donor's value at exactly its (row, position, head)
    entries and leaves every other entry of the activation as it was.

    Observers are plain hooks on the patched module, one registered before the patch hook (what the
    module would have seen) and one after it (what it sees); the expected entries come from
    ``reference.site_positions`` / ``site_columns``, not from the patch code. Padding is not compared.
    The patch hook is the same for every row, so up to four rows are observed, the shortest and the
    longest prompt among them: the check's cost does not grow with the chunk of pairs.
    """
    rows = _sample_rows(batch)
    batch = batch.select(rows)
    donor_cache = ActivationCache({k: v[rows] for k, v in donor_cache.items()})
    problems, moved, n_sites = [], 0, 0
    real = batch.attention_mask.bool()  # (B, T)
    variants, n_kinds, n_positions = _sample_sites(lm, batch, donor_cache, layers)
    for variant in variants:
        before: dict[int, list] = {id(s): [] for s in variant}
        after: dict[int, list] = {id(s): [] for s in variant}
        where = lambda s: "input" if s.reads_input else "output"  # noqa: E731
        with hooks([(s.module(lm.adapter), where(s), _observer(before[id(s)])) for s in variant]):
            with patched(lm, batch, donor_cache, [variant]):
                with hooks([(s.module(lm.adapter), where(s), _observer(after[id(s)])) for s in variant]):
                    recipient_logits(lm, batch)
        for s in variant:
            n_sites += 1
            old, got = before[id(s)][0].cpu(), after[id(s)][0].cpu()
            src = donor_cache[s].cpu().flatten(2)  # heads (B, Td, H, Dh) -> (B, Td, H*Dh)
            want = old.clone()
            reads = site_positions(s, batch, "donor")  # the donor's own index of each written position
            for b, row in enumerate(site_positions(s, batch)):
                for p, q in zip(row, reads[b]):
                    for c in site_columns(lm, s):
                        want[b, p, c] = src[b, q, c]
            if not torch.equal(got[real], want[real]):
                problems.append(f"{s} wrote other entries than its own")
            moved += int(not torch.equal(want[real], old[real]))
    detail = (f"{n_sites} patched sites ({n_kinds} kinds x {n_positions} "
              f"positions x layers {_check_layers(layers)}, rows {rows}): the donor's value at exactly the site's "
              f"(row, position, head) entries, every other entry untouched (torch.equal, hooks before and after the "
              f"patch); {moved} of them changed a value")
    return SanityCheck("patch_writes_exactly", not problems, detail if not problems else "; ".join(problems[:6]), None, 0.0)


def check_donor_differs(
    lm: LoadedModel, batch: PairBatch, rec_cache: ActivationCache, donor_cache: ActivationCache,
) -> SanityCheck:
    """For every pair whose donor prompt differs from its recipient, the donor's activations differ from
    the recipient's somewhere: a donor cache captured from the recipient by mistake makes every patch a no-op."""
    w = min(batch.recipient_ids.shape[1], batch.donor_ids.shape[1])
    real = batch.attention_mask[:, :w].bool()
    unequal = batch.lengths() != batch.lengths("donor")  # (B,) prompts of different lengths differ
    differs = ((batch.donor_ids[:, :w] != batch.recipient_ids[:, :w]) & real).any(dim=1) | unequal  # (B,)
    if batch.noise_mask is not None:
        differs |= batch.noise_mask.any(dim=1)  # a noised donor differs from its recipient even with the same text
    keys = [k for k in donor_cache if k in rec_cache]
    moved = torch.zeros(len(batch), dtype=torch.bool)
    for k in keys:
        d, r = donor_cache[k][:, :w], rec_cache[k][:, :w].to(donor_cache[k].device)
        # a row compares its real tokens only: a shorter donor's padding is not its activation
        both = (real & batch.donor_attention_mask[:, :w].bool()).to(d.device)  # (B, w)
        moved |= ((d != r).flatten(2).any(dim=2) & both).any(dim=1).cpu()  # (B,)
    bad = (differs & ~moved).nonzero().flatten().tolist()
    controls = int((~differs).sum())
    detail = (f"{int(differs.sum())} pairs with different prompts: donor activations differ from the recipient's at "
              f"{len(keys)} cached sites" + (f"; {controls} control pairs (donor == recipient) left out" if controls else ""))
    if bad:
        detail = (f"pairs {bad[:8]} have different donor and recipient prompts, but identical activations at every one "
                  f"of {len(keys)} cached sites: the donor cache holds the recipient's run, and every patch is a no-op")
    return SanityCheck("donor_differs_from_recipient", not bad, detail)


def check_hidden_patch_is_donor(lm: LoadedModel, batch: PairBatch, donor_cache: ActivationCache, don_logits: Tensor, layers: Sequence[int]) -> SanityCheck:
    """Patching the hidden state at all positions of a layer reproduces the donor's logits; for pairs of different
    lengths, the last layer's hidden state at END does (it is all the unembedding reads)."""
    checked = _check_layers(layers)
    if batch.unequal_rows():
        last = lm.adapter.n_layers - 1
        d = _diff(run_chunk(lm, batch, donor_cache, [[HiddenSite(last, "END")]])[0], don_logits)
        what = f"last layer's hidden state at END (pairs of different lengths)"
    else:
        d = max(_diff(run_chunk(lm, batch, donor_cache, [[HiddenSite(L)]])[0], don_logits) for L in checked)
        what = f"layers {checked}"
    tol = _exact_tol(lm, float(don_logits.abs().max()))
    return SanityCheck("hidden_patch_reproduces_donor", d <= tol, f"{what}: max abs(logit - donor logit) = {d:.3g}", d, tol)


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
    end = batch.position("END").to(lm.device)
    with torch.inference_mode():  # the model's own LM head, at each row's END only: (B, 1, V)
        full = lm.model(input_ids=batch.recipient_ids.to(lm.device), attention_mask=batch.attention_mask.to(lm.device),
                        logits_to_keep=end[:, None]).logits
    d = _diff(full[:, 0], rec_logits)
    scale = float(rec_logits.abs().max())
    # float32: a row-subset matmul sums in another order; half precision: the full forward's logits are
    # rounded to the model's dtype while ours keep IO and S in float32 (Adapter.unembed's exact columns)
    tol = 1e-4 * max(1.0, scale) if lm.dtype == torch.float32 else _ulps(lm, scale, 4)
    return SanityCheck("end_logits_match_full_forward", d <= tol, f"max abs dlogit vs model(...).logits = {d:.3g} (row-subset matmul)", d, tol)


def check_fast_path(
    lm: LoadedModel, batch: PairBatch, donor_cache: ActivationCache, variants: Sequence[Sequence[Site]], fast_ld: Tensor,
    score: Callable[[Tensor], Tensor] | None = None, name: str = "LD", reference: Callable | None = None,
) -> SanityCheck:
    """The sweep's fast path (stacked variants + prefix reuse) equals the independent reference patcher
    (``actpatch.engine.reference``: plain hooks, explicit indices, one full forward pass per patch).

    Recomputed: the first and last cell of every kind of patch (site type, one head or all, position),
    so every named position and each position's prefix arithmetic is exercised, plus cells at a third
    and two thirds of the sweep. ``score``: the sweep's metric as a function of (B, V) END logits, for a sweep
    that recorded another metric than the logit difference (``fast_ld`` then holds that metric, named ``name``);
    the reference then gives the model's own full logits (``reference.reference_logits``). ``reference``: what the
    reference reads per variant instead (``reference_readout`` for answers of several tokens), scored by ``score``.
    """
    first_last: dict[tuple, list[int]] = {}
    for i, v in enumerate(variants):
        kind = tuple((type(s).__name__, getattr(s, "head", None) is None, s.pos) for s in v)
        first_last.setdefault(kind, [i, i])[1] = i
    spread = {0, len(variants) // 3, 2 * len(variants) // 3, len(variants) - 1} if variants else set()
    picks = sorted(spread.union(*map(set, first_last.values())))
    d, scale = 0.0, 1.0
    for i in picks:
        if reference is not None:
            ref = score(reference(variants[i])).float().cpu()
        elif score is None:
            ref = reference_logit_diff(lm, batch, donor_cache, variants[i])
        else:
            ref = score(reference_logits(lm, batch, donor_cache, variants[i])).float().cpu()
        d, scale = max(d, _diff(ref, fast_ld[i])), max(scale, float(ref.abs().max()))
    # half precision: other batch shapes may pick other kernels, whose roundings differ by a few steps
    # of the dtype at the logits' scale (float16 ~0.01, bfloat16 ~0.1 at logits of 20)
    tol = 1e-4 if lm.dtype == torch.float32 else max(5e-2, _ulps(lm, scale, 2))
    why = ("within float summation-order differences (the batch shape changes)" if d <= tol else
           "the batched sweep disagrees with plain forward passes: its numbers are wrong; please report this "
           "with the command line")
    return SanityCheck(
        "fast_path_matches_reference", d <= tol,
        f"{len(picks)} sweep cells ({len(first_last)} kinds of patch) recomputed by the independent reference patcher, "
        f"one full forward each: max abs d{name} = {d:.3g}, {why}", d, tol,
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
        check_patch_writes_exactly(lm, batch, donor_cache, layers),
        check_donor_differs(lm, batch, rec_cache, donor_cache),
        check_hidden_patch_is_donor(lm, batch, donor_cache, don_logits, layers),
        check_head_decomposition(lm, rec_cache, layers),
        check_last_logits_parity(lm, batch, rec_logits),
    ]
