"""The feature checks behind ``actpatch check-model`` (``experiment.selftest`` runs them and collects the results).

Each check takes the model, two random pairs of token ids (``random_batch``: rows of different lengths, so padding
is exercised) and the captured donor/recipient activations, and returns a ``FeatureCheck``: PASS, FAIL or
UNSUPPORTED (with the reason), the largest difference seen and the tolerance it was held to. Patches go through the
fast path and are recomputed by the independent reference patcher (``engine.reference``: one full forward per
patch, entries written one at a time). Beyond patching: the adapter's logits against the model's, the identity
patch, q/k/v isolation per head (the fused-layout offsets), path patching against a plain freeze-and-replay, DLA
against attention's measured write, and every edge out of a head against an ordinary patch of that head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..analysis.audit import check_dla, check_gap
from ..analysis.gap import gap_account
from ..analysis.heads import characterise
from ..engine.batch import PairBatch
from ..engine.attribution import attribute
from ..engine.capture import capture
from ..engine.eap_scores import edge_scores
from ..engine.edge_patching import edge_patched_logits, sender_outputs
from ..engine.circuit_graph import build_graph, circuit_refusal
from ..engine.pairs import PromptPair
from ..engine.paths import Receiver, path_patch
from ..engine.patching import patch_variants
from ..engine.reference import reference_logit_diff, reference_logits, site_columns
from ..engine.sites import AttnOutSite, EmbedSite, HeadSite, HiddenSite, MlpOutSite, QKVSite
from ..model.models import LoadedModel


@dataclass
class FeatureCheck:
    feature: str
    status: str                 # PASS, FAIL or UNSUPPORTED
    max_diff: float | None = None
    tolerance: float | None = None
    detail: str = ""


def random_batch(lm: LoadedModel, lengths: tuple[int, ...] = (12, 9), seed: int = 0) -> PairBatch:
    """Pairs of random token ids: each donor differs from its recipient at the named position "X" (index 3) and at
    END; rows of ``lengths`` tokens, right-padded. Needs no tokenizer; seeded with a generator of its own."""
    gen = torch.Generator().manual_seed(seed)
    vocab = int(lm.model.get_input_embeddings().weight.shape[0])
    width, n = max(lengths), len(lengths)
    rec = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for b, length in enumerate(lengths):
        rec[b, :length] = torch.randint(0, vocab, (length,), generator=gen)
        mask[b, :length] = 1
    end = mask.sum(1) - 1
    don = rec.clone()
    rows = torch.arange(n)
    for pos in (torch.full((n,), 3), end):
        don[rows, pos] = (rec[rows, pos] + 1 + torch.randint(0, vocab - 1, (n,), generator=gen)) % vocab
    answers = torch.randint(0, vocab, (2, n), generator=gen)
    answers[1] = torch.where(answers[1] == answers[0], (answers[0] + 1) % vocab, answers[1])
    pairs = tuple(PromptPair(f"<random ids {b}>", f"<random ids {b}, changed at 3 and END>", "<a>", "<w>", "random")
                  for b in range(n))
    return PairBatch(pairs, rec, don, mask, answers[0], answers[1], {"X": torch.full((n,), 3), "END": end})


def _tol(lm: LoadedModel, scale: float) -> float:
    """1e-4 relative in float32 (batch shapes change the summation order); 1e-6 in float64, where the reference
    reads its logits in float32 (6e-8 relative rounding); 8 rounding steps in half precision."""
    if lm.dtype == torch.float64:
        return 1e-6 * max(1.0, scale)
    if lm.dtype == torch.float32:
        return 1e-4 * max(1.0, scale)
    return 8 * torch.finfo(lm.dtype).eps * max(1.0, scale)


def _compare(lm, batch, donor, variants, rec_ld) -> tuple[float, float, str]:
    """Fast path vs the reference on ``variants``: (max diff, tolerance, worst variant)."""
    got = patch_variants(lm, batch, donor, variants, donor_from_batch=True, columns=batch.answer_columns(),
                         reduce=lambda lg: {"ld": lg[..., 0] - lg[..., 1]})["ld"].double().cpu()  # (K, B)
    worst, where = 0.0, ""
    for k, variant in enumerate(variants):
        d = float((got[k] - reference_logit_diff(lm, batch, donor, variant).double()).abs().max())
        if d >= worst:
            worst, where = d, repr(variant[0])
    return worst, _tol(lm, float(rec_ld.abs().max())), where


def unsupported(lm: LoadedModel, feature: str) -> str:
    """Why ``feature`` cannot serve this model ("" when it can)."""
    arch = lm.adapter.arch
    if feature == "mlp" and arch.flat_mlp:
        return "the MLP runs on (batch*positions, d_model) rows"
    if feature in ("dla", "gap") and (arch.post_ln or lm.adapter.final_norm() is None):
        return "norms after the residual add (post-LN): the residual stream is not a sum of writes"
    if feature == "circuits":
        return circuit_refusal(lm.adapter)
    return ""


def site_cases(a, layers, heads) -> dict[str, list[list]]:
    last_kv = a.n_kv_heads - 1
    cases = {
        "hidden": [[HiddenSite(L, p)] for L in layers for p in (None, "X", "END")],
        "all_heads": [[HeadSite(L, None, p)] for L in layers for p in (None, "X")],
        "head": [[HeadSite(L, h, p)] for L in layers for h in heads for p in (None, "X", "END")],
        "attn": [[AttnOutSite(L, p)] for L in layers for p in (None, "X")],
        "mlp": [[MlpOutSite(L, p)] for L in layers for p in (None, "END")],
        "embed": [[EmbedSite(p)] for p in (None, "X", "END")],
    }
    for w in "qkv":
        idx = sorted({0, (a.n_heads - 1) if w == "q" else last_kv})
        cases[w] = [[QKVSite(L, w, h, p)] for L in layers for h in idx for p in (None, "X")]
    return cases


def check_sites(lm, batch, state, feature, variants) -> FeatureCheck:
    d, tol, where = _compare(lm, batch, state["donor"], variants, state["rec_ld"])
    return FeatureCheck(feature, "PASS" if d <= tol else "FAIL", d, tol,
                        f"{len(variants)} patches, fast path vs one full forward each (worst: {where})")


def check_logits(lm, batch) -> FeatureCheck:
    """unembed(finalize(last block output)) == model(...).logits at every real position."""
    a, got = lm.adapter, {}
    handle = a.block(a.n_layers - 1).register_forward_hook(
        lambda m, args, out: got.__setitem__("h", (out[0] if isinstance(out, tuple) else out).detach()))
    try:
        with torch.inference_mode():
            want = lm.model(input_ids=batch.recipient_ids.to(lm.device),
                            attention_mask=batch.attention_mask.to(lm.device)).logits.double()
            real = batch.attention_mask.bool().to(want.device)
            mine = a.unembed(a.finalize(got["h"][real])).double()  # (N, V) over the real tokens
    finally:
        handle.remove()
    d = float((mine - want[real]).abs().max())
    tol = _tol(lm, float(want.abs().max())) / 10
    return FeatureCheck("logits", "PASS" if d <= tol else "FAIL", d, tol,
                        f"adapter's final norm, projection, LM head and logit scale vs the model's logits at "
                        f"{int(real.sum())} positions")


def check_identity(lm, batch, state, layers) -> FeatureCheck:
    """The recipient's own activations patched in change nothing (hidden states, all heads, at every position)."""
    variants = [[HiddenSite(L)] for L in layers] + [[HeadSite(L) for L in layers]]
    got = patch_variants(lm, batch, state["rec"], variants, donor_from_batch=False, columns=batch.answer_columns(),
                         reduce=lambda lg: {"ld": lg[..., 0] - lg[..., 1]})["ld"].double().cpu()
    d = float((got - state["rec_ld"]).abs().max())
    tol = _tol(lm, float(state["rec_ld"].abs().max())) / 10
    return FeatureCheck("identity", "PASS" if d <= tol else "FAIL", d, tol,
                        f"{len(variants)} self-patches vs the unpatched recipient")


def _observe_heads(lm, layer: int, run) -> torch.Tensor:
    """The attention output projection's input (B, T, H*Dh) at ``layer`` during ``run()``, by a plain hook."""
    got = {}
    handle = lm.adapter.attn_out(layer).register_forward_pre_hook(lambda m, args: got.__setitem__("z", args[0].detach().clone()))
    try:
        run()
    finally:
        handle.remove()
    return got["z"]


def check_qkv_layout(lm, batch, state, layers) -> FeatureCheck:
    """A patch of one head's q (or one KV head's k/v) changes that head's output (its group's) and no other's."""
    a, ids, mask = lm.adapter, batch.recipient_ids.to(lm.device), batch.attention_mask.to(lm.device)
    real = batch.attention_mask.bool()
    plain = lambda: lm.model(input_ids=ids, attention_mask=mask)  # noqa: E731
    bad, worst_leak, n = [], 0.0, 0
    group = a.n_heads // a.n_kv_heads
    for L in layers:
        with torch.inference_mode():
            base = _observe_heads(lm, L, plain).view(*ids.shape, a.n_heads, a.d_head)[real.to(ids.device)]  # (N, H, Dh)
        for w in "qkv":
            for h in sorted({0, (a.n_heads if w == "q" else a.n_kv_heads) - 1}):
                site = QKVSite(L, w, h)
                cols = site_columns(lm, site)[0]
                def run(site=site, cols=cols):
                    module = site.module(a)
                    src = state["donor"][site]

                    def write(mod, args, out):
                        out = out.clone()
                        out[..., cols] = src[..., cols].to(out.device, out.dtype)
                        return out
                    handle = module.register_forward_hook(write)
                    try:
                        plain()
                    finally:
                        handle.remove()
                with torch.inference_mode():
                    z = _observe_heads(lm, L, run).view(*ids.shape, a.n_heads, a.d_head)[real.to(ids.device)]
                moved = (z - base).abs().amax(dim=(0, 2)).cpu()  # (H,)
                mine = [h] if w == "q" else list(range(h * group, (h + 1) * group))
                others = [x for x in range(a.n_heads) if x not in mine]
                leak = float(moved[others].max()) if others else 0.0
                worst_leak, n = max(worst_leak, leak), n + 1
                if leak > 0 or float(moved[mine].max()) == 0.0:
                    bad.append(f"{w} head {h} of layer {L} moved heads {[x for x in range(a.n_heads) if moved[x] > 0]}")
    return FeatureCheck("qkv_layout", "FAIL" if bad else "PASS", worst_leak, 0.0,
                        "; ".join(bad[:3]) or f"{n} q/k/v patches each moved exactly their own head(s)")


def check_paths(lm, batch, state) -> FeatureCheck:
    """path_patch from layer 0's heads into q, k, v of the last layer vs a plain two-run freeze-and-replay."""
    a = lm.adapter
    worst, moved = 0.0, 0.0
    for w, layer in ((w, layer) for w in "qkv" for layer in sorted({min(1, a.n_layers - 1), a.n_layers - 1})):
        receiver = Receiver(w, layer, a.n_heads - 1)
        got = path_patch(lm, batch, state["donor"], [HeadSite(0)], [receiver]).double().cpu()
        want = _plain_path(lm, batch, state, receiver).double().cpu()
        plain = _plain_path(lm, batch, state, receiver, sender=False).double().cpu()
        worst, moved = max(worst, float((got - want).abs().max())), max(moved, float((want - plain).abs().max()))
    tol = _tol(lm, float(want.abs().max()))
    ok = worst <= tol and moved > max(100 * worst, 1e-12)  # a path that moves nothing would prove nothing
    return FeatureCheck("paths", "PASS" if ok else "FAIL", worst, tol,
                        f"layer 0's heads -> q, k, v of layer 1 and the last layer: path patching vs freezing every head by hand (the path "
                        f"moves the logits by up to {moved:.2g})")


def _plain_path(lm, batch, state, receiver, sender: bool = True) -> torch.Tensor:
    """Run 1: every head frozen to the recipient's except layer 0's = the donor's (``sender``); keep the
    receiver's q/k/v slice. Run 2: the plain recipient with only that slice written. END logits (B, V)."""
    a, group = lm.adapter, lm.adapter.n_heads // lm.adapter.n_kv_heads
    rec, don = state["rec"], state["donor"]
    slot = receiver.head if receiver.kind == "q" else receiver.head // group
    site = QKVSite(receiver.layer, receiver.kind, slot)
    cols, module = site_columns(lm, site)[0], site.module(a)
    kept, handles = {}, []
    ids, mask = batch.recipient_ids.to(lm.device), batch.attention_mask.to(lm.device)
    try:
        for L in range(a.n_layers):
            z = (don if L == 0 and sender else rec)[HeadSite(L)].flatten(2).clone()  # (B, T, H, Dh) -> (B, T, H*Dh)
            handles.append(a.attn_out(L).register_forward_pre_hook(
                lambda m, args, z=z: (z.to(args[0].device, args[0].dtype),)))
        handles.append(module.register_forward_hook(lambda m, args, out: kept.__setitem__("x", out[..., cols].clone())))
        with torch.inference_mode():
            lm.model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()

    def write(m, args, out):
        out = out.clone()
        out[..., cols] = kept["x"]
        return out
    handle = module.register_forward_hook(write)
    try:
        with torch.inference_mode():
            logits = lm.model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    end = batch.attention_mask.sum(1) - 1
    return logits[torch.arange(len(batch)), end.to(logits.device)]


def _nudged_ld(lm, batch, module, pre: bool, value) -> float:
    """Mean END logit difference with ``module``'s input (``pre``) or output replaced by ``value``, by a plain hook."""
    if pre:
        handle = module.register_forward_pre_hook(lambda m, args: (value.to(args[0].device, args[0].dtype), *args[1:]))
    else:
        handle = module.register_forward_hook(
            lambda m, args, out: (value.to(out[0].device, out[0].dtype), *out[1:]) if isinstance(out, tuple)
            else value.to(out.device, out.dtype))
    try:
        with torch.inference_mode():
            logits = lm.model(input_ids=batch.recipient_ids.to(lm.device), attention_mask=batch.attention_mask.to(lm.device)).logits
    finally:
        handle.remove()
    rows, end = torch.arange(len(batch)), batch.position("END")
    picked = logits[rows, end.to(logits.device)].double().cpu()  # (B, V)
    return float((picked[rows, batch.answer_ids] - picked[rows, batch.wrong_ids]).mean())


def _against_differences(lm, cases, scale: float) -> tuple[float, float, str, float]:
    """Each case (score, f, name) against the central difference (f(eps) - f(-eps)) / 2 eps: (worst |diff|, its
    tolerance, where, the step used). Tolerance: 1 % (curvature) plus the metric's rounding divided by the step. A
    quotient across a kink (an MoE router switching experts inside the step) is wrong, so a failed step is retried
    10x smaller."""
    rounding = (1e-7 if lm.dtype == torch.float64 else 1e-5) * max(1.0, scale)
    for eps in ((1e-3, 1e-4) if lm.dtype == torch.float64 else (1e-2, 1e-3)):
        worst, tol, where = 0.0, 0.0, ""
        for got, run, name in cases:
            fd = (run(eps) - run(-eps)) / (2 * eps)
            t = 1e-2 * abs(fd) + rounding / eps
            if not tol or abs(got - fd) / t > worst / tol:
                worst, tol, where = abs(got - fd), t, f"{name}: {got:.4g} vs {fd:.4g}"
        if worst <= tol:
            break
    return worst, tol, where, eps


def check_attribution(lm, batch, layers) -> FeatureCheck:
    """Attribution of a head (all positions) and of a hidden state against a central finite difference of the metric
    along donor - recipient, written as plain forwards with the activation nudged by a hook."""
    a, L, h = lm.adapter, layers[len(layers) // 2], 0
    sites = [HeadSite(layer) for layer in layers] + [HiddenSite(layer) for layer in layers]
    don, _ = capture(lm, batch.donor_ids, batch, sites)
    rec, _ = capture(lm, batch.recipient_ids, batch, sites)
    att = attribute(lm, batch, don, layers=layers)
    z_rec, z_don = rec[HeadSite(L)], don[HeadSite(L)]  # (B, T, H, Dh)
    h_rec, h_don = rec[HiddenSite(layers[0])], don[HiddenSite(layers[0])]  # (B, T, D)

    def head(e):
        z = z_rec.clone()
        z[:, :, h] += e * (z_don[:, :, h] - z_rec[:, :, h])
        return _nudged_ld(lm, batch, a.attn_out(L), True, z.flatten(2))  # (B, T, H, Dh) -> (B, T, H*Dh)

    def hidden(e):
        return _nudged_ld(lm, batch, a.block(layers[0]), False, h_rec + e * (h_don - h_rec))

    scores = [(float(att.head_effect()[layers.index(L), h]), head, f"head {L}.{h}"),
              (float(att.hidden[0].sum()), hidden, f"hidden {layers[0]}")]
    worst, tol, where, eps = _against_differences(lm, scores, abs(head(0.0)))
    return FeatureCheck("attribution", "PASS" if worst <= tol else "FAIL", worst, tol,
                        f"gradient x (donor - recipient) vs central differences (step {eps:g}) by plain hooks; "
                        f"worst {where}")


def check_gap_account(lm, batch) -> FeatureCheck:
    """The gap account's attention columns against attention's writes measured by residual arithmetic."""
    sites = [HiddenSite(L) for L in range(lm.adapter.n_layers)] + [AttnOutSite(L) for L in range(lm.adapter.n_layers)]
    rec, _ = capture(lm, batch.recipient_ids, batch, sites)
    don, _ = capture(lm, batch.donor_ids, batch, sites)
    check = check_gap(lm, batch, gap_account(lm, batch, rec, don))
    return FeatureCheck("gap", "PASS" if check.passed else "FAIL", check.max_abs_diff, check.tolerance, check.detail)


def check_dla_sums(lm, batch) -> FeatureCheck:
    """Per layer, the heads' DLA plus the bias's equals the direct effect of attention's measured write."""
    prof = characterise(lm, batch, copy=False)
    check = check_dla(lm, batch, prof)
    return FeatureCheck("dla", "PASS" if check.passed else "FAIL", check.max_abs_diff, check.tolerance, check.detail)


def check_circuits(lm, batch) -> FeatureCheck:
    """Every edge out of head (0, last) patched equals an ordinary patch of that head at every position; and EAP's
    scores of the 3 top edges equal central differences of the metric along each edge's patch weight."""
    a = lm.adapter
    graph = build_graph(a)
    donor, _ = sender_outputs(lm, graph, batch, "donor")
    weights = torch.zeros(graph.allowed.shape)
    h = a.n_heads - 1
    weights[:, graph.sender_index(graph.attention_sender(0, h))] = 1.0
    got = edge_patched_logits(lm, graph, batch, donor, weights).double().cpu()
    sites = [HeadSite(0)] if graph.head_senders else [AttnOutSite(0)]
    cache, _ = capture(lm, batch.donor_ids, batch, sites)
    variant = [HeadSite(0, h)] if graph.head_senders else [AttnOutSite(0)]
    want = reference_logits(lm, batch, cache, variant).double()
    d = float((got - want).abs().max())
    tol = _tol(lm, float(want.abs().max()))
    eap_d, eap_tol, where = _eap_vs_differences(lm, graph, batch, donor, scale=float(want.abs().max()))
    status = "PASS" if d <= tol and eap_d <= eap_tol else "FAIL"
    return FeatureCheck("circuits", status, max(d, eap_d), max(tol, eap_tol),
                        f"{graph.n_edges} edges; every edge out of {graph.attention_sender(0, h)} vs patching it "
                        f"({d:.2g} <= {tol:.1g}); EAP of the top 3 edges vs central differences ({eap_d:.2g} <= "
                        f"{eap_tol:.2g}, worst {where})")


def _eap_vs_differences(lm, graph, batch, donor, scale: float) -> tuple[float, float, str]:
    """(worst |EAP - difference quotient|, its tolerance, where) over the 3 edges EAP scores highest."""
    def metric(logits, rows):  # (b, V) logits of the batch's rows ``rows``
        r = torch.arange(len(logits))
        return logits[r, batch.answer_ids[rows].to(logits.device)] - logits[r, batch.wrong_ids[rows].to(logits.device)]

    scores = edge_scores(lm, graph, batch, metric, donor).cpu()  # (receiver, sender)
    top = scores.abs().flatten().topk(3).indices.tolist()
    edges = [divmod(i, scores.shape[1]) for i in top]

    def mean_metric(r, s, e):
        w = torch.zeros(graph.allowed.shape, dtype=torch.float64)
        w[r, s] = e
        return float(metric(edge_patched_logits(lm, graph, batch, donor, w), slice(None)).double().mean())

    cases = [(float(scores[r, s]), lambda e, r=r, s=s: mean_metric(r, s, e),
              f"{graph.senders[s]} -> {graph.receivers[r]}") for r, s in edges]
    worst, tol, where, _ = _against_differences(lm, cases, scale)
    return worst, tol, where
