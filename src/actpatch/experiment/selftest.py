"""The self-test behind ``actpatch check-model``: every patching feature checked on the user's own model.

Two random pairs of token ids (no tokenizer needed; rows of different lengths, so padding is exercised) are
patched at a few layers, heads and positions through the fast path, and the same patches are recomputed by the
independent reference patcher (``engine.reference``: one full forward per patch, entries written one at a time).
Each feature gets PASS, FAIL or UNSUPPORTED (with the reason) and the largest difference seen::

    report = self_test(lm)
    report.passed, report.to_dataframe()     # feature, status, max_diff, tolerance, detail

Checks beyond patching: the adapter's logits equal the model's at every position; patching the recipient's own
activations changes nothing; a q/k/v patch of one head changes that head's output (or its key/value group's) and
no other head's (the fused-layout offsets); path patching equals a plain freeze-and-replay; DLA sums to what
attention wrote; every edge out of a head equals an ordinary patch of that head.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Callable

import pandas as pd
import torch
from tabulate import tabulate

from ..analysis.audit import check_dla
from ..analysis.heads import characterise
from ..engine.batch import PairBatch
from ..engine.capture import capture
from ..engine.edges import edge_patched_logits, sender_outputs
from ..engine.graph import build_graph, circuit_refusal
from ..engine.hooks import count_hooks
from ..engine.pairs import PromptPair
from ..engine.paths import Receiver, path_patch
from ..engine.patching import patch_variants
from ..engine.reference import reference_logit_diff, reference_logits, site_columns
from ..engine.sites import AttnOutSite, EmbedSite, HeadSite, HiddenSite, MlpOutSite, QKVSite
from ..errors import ActpatchError
from ..model.autoadapt import entry_source
from ..model.models import LoadedModel, load_model

FEATURES = ("logits", "identity", "hidden", "all_heads", "head", "attn", "mlp", "embed", "q", "k", "v",
            "qkv_layout", "paths", "dla", "circuits")


@dataclass
class FeatureCheck:
    feature: str
    status: str                 # PASS, FAIL or UNSUPPORTED
    max_diff: float | None = None
    tolerance: float | None = None
    detail: str = ""


@dataclass
class SelfTest:
    """The self-test's result: one ``FeatureCheck`` per feature, and the model it ran on."""

    model: dict
    checks: list[FeatureCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every supported feature passed."""
        return all(c.status != "FAIL" for c in self.checks)

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(c) for c in self.checks])

    def table(self) -> str:
        cut = lambda t: t if len(t) <= 110 else t[:107] + "..."  # noqa: E731  (--json has the whole detail)
        rows = [(c.feature, c.status, "" if c.max_diff is None else f"{c.max_diff:.2e}",
                 "" if c.tolerance is None else f"{c.tolerance:.1e}", cut(c.detail)) for c in self.checks]
        return tabulate(rows, headers=["feature", "status", "max diff", "tolerance", "detail"], tablefmt="github")

    def to_json(self) -> str:
        return json.dumps({"model": self.model, "passed": self.passed, "checks": [asdict(c) for c in self.checks]},
                          indent=2, default=str) + "\n"


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


def self_test(lm: LoadedModel, seed: int = 0) -> SelfTest:
    """Run every feature check on ``lm`` (see the module docstring). The model is left as found.

    Example::

        report = self_test(load_model("smollm2-135m")); print(report.table())
    """
    a, hooks_before = lm.adapter, count_hooks(lm.model)
    batch = random_batch(lm, seed=seed)
    L, H, KV = a.n_layers, a.n_heads, a.n_kv_heads
    layers = sorted({0, L // 2, L - 1})
    heads = sorted({0, H - 1})
    cases = {f: v for f, v in _site_cases(a, layers, heads).items() if not unsupported(lm, f)}
    sites = [s for vs in cases.values() for v in vs for s in v] + [HeadSite(layer) for layer in range(L)]  # paths
    state: dict = {}
    report = SelfTest(model={**lm.info, "n_kv_heads": KV})

    def prepare():
        state["donor"], _ = capture(lm, batch.donor_ids, batch, sites)
        state["rec"], rec_logits = capture(lm, batch.recipient_ids, batch, sites)
        picked = rec_logits.gather(1, batch.answer_columns().to(rec_logits.device)).double().cpu()  # (B, 2)
        state["rec_ld"] = picked[:, 0] - picked[:, 1]

    checks: list[tuple[str, Callable[[], FeatureCheck]]] = [("logits", lambda: _logits(lm, batch))]
    checks.append(("identity", lambda: _identity(lm, batch, state, layers)))
    for feature in FEATURES[2:11]:  # the site families (an unsupported one has no cases)
        checks.append((feature, lambda f=feature: _sites_check(lm, batch, state, f, cases[f])))
    checks += [("qkv_layout", lambda: _qkv_layout(lm, batch, state, layers)),
               ("paths", lambda: _paths(lm, batch, state)), ("dla", lambda: _dla(lm, batch)),
               ("circuits", lambda: _circuits(lm, batch))]
    try:
        prepare()
    except ActpatchError as exc:
        report.checks.append(FeatureCheck("capture", "FAIL", detail=f"capturing the donor failed: {exc}"))
        return report
    for feature, fn in checks:
        why = unsupported(lm, feature)
        if why:
            report.checks.append(FeatureCheck(feature, "UNSUPPORTED", detail=why))
            continue
        try:
            report.checks.append(fn())
        except Exception as exc:  # a feature that crashes on this model fails; the others still run
            report.checks.append(FeatureCheck(feature, "FAIL", detail=f"{type(exc).__name__}: {exc}"))
    if count_hooks(lm.model) != hooks_before:
        report.checks.append(FeatureCheck("no_hooks_left", "FAIL", detail="hooks were left on the model"))
    return report


def unsupported(lm: LoadedModel, feature: str) -> str:
    """Why ``feature`` cannot serve this model ("" when it can)."""
    arch = lm.adapter.arch
    if feature == "mlp" and arch.flat_mlp:
        return "the MLP runs on (batch*positions, d_model) rows"
    if feature == "dla" and (arch.post_ln or lm.adapter.final_norm() is None):
        return "norms after the residual add (post-LN): the residual stream is not a sum of writes"
    if feature == "circuits":
        return circuit_refusal(lm.adapter)
    return ""


def _site_cases(a, layers, heads) -> dict[str, list[list]]:
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


def _sites_check(lm, batch, state, feature, variants) -> FeatureCheck:
    d, tol, where = _compare(lm, batch, state["donor"], variants, state["rec_ld"])
    return FeatureCheck(feature, "PASS" if d <= tol else "FAIL", d, tol,
                        f"{len(variants)} patches, fast path vs one full forward each (worst: {where})")


def _logits(lm, batch) -> FeatureCheck:
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


def _identity(lm, batch, state, layers) -> FeatureCheck:
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


def _qkv_layout(lm, batch, state, layers) -> FeatureCheck:
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


def _paths(lm, batch, state) -> FeatureCheck:
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


def _dla(lm, batch) -> FeatureCheck:
    """Per layer, the heads' DLA plus the bias's equals the direct effect of attention's measured write."""
    prof = characterise(lm, batch, copy=False)
    check = check_dla(lm, batch, prof)
    return FeatureCheck("dla", "PASS" if check.passed else "FAIL", check.max_abs_diff, check.tolerance, check.detail)


def _circuits(lm, batch) -> FeatureCheck:
    """Every edge out of head (0, last) patched equals an ordinary patch of that head at every position."""
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
    return FeatureCheck("circuits", "PASS" if d <= tol else "FAIL", d, tol,
                        f"{graph.n_edges} edges; every edge out of {graph.attention_sender(0, h)} vs patching it")


def check_model(spec: str, *, device: str | None = None, dtype: str = "float32",
                trust_remote_code: bool = False) -> tuple[SelfTest, LoadedModel]:
    """Load ``spec`` (a hub id, a local folder with or without a tokenizer, a .gguf or a bundled name) with its adapter,
    or an automatic one for an unknown model_type, and run ``self_test`` on it.

    Example::

        report, lm = check_model("smollm2-135m"); report.passed
    """
    lm = load_model(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code, require_tokenizer=False,
                    auto_adapter=True)
    report = self_test(lm)
    report.model["adapter"] = "automatic" if lm.adapter.auto else lm.adapter.arch.name
    if lm.adapter.auto:
        report.model["entry"] = entry_source(lm.adapter.arch)
    return report, lm


def summary(report: SelfTest) -> str:
    """One line per outcome, for the command line."""
    count = {k: sum(c.status == k for c in report.checks) for k in ("PASS", "FAIL", "UNSUPPORTED")}
    head = (f"check-model: {report.model.get('model_id')} ({report.model.get('model_type')}, adapter "
            f"{report.model.get('adapter')}): {count['PASS']} passed, {count['FAIL']} failed, "
            f"{count['UNSUPPORTED']} unsupported")
    if report.model.get("adapter") == "automatic":
        verdict = ("the automatic adapter passed the self-test; to make it permanent, add this entry to "
                   "actpatch/model/architectures.py:\n    " if report.passed else
                   "the automatic adapter FAILED the self-test: do not trust results from it; write an entry by hand "
                   "(starting from this one) in actpatch/model/architectures.py:\n    ")
        head += "\n" + verdict + str(report.model.get("entry"))
    return head
