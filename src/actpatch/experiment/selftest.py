"""The self-test behind ``actpatch check-model``: every patching feature checked on the user's own model.

    report = self_test(lm)
    report.passed, report.to_dataframe()     # feature, status, max_diff, tolerance, detail
    report, lm = check_model("path/or/hub-id")   # load (auto adapter for an unknown model_type), then self_test
    lm = load_checked("path/or/hub-id")          # what runs load: an automatic adapter only if it passes

The checks themselves (``experiment.modelchecks``) patch two random pairs of token ids at a few layers, heads and
positions through the fast path and recompute each patch with the independent reference patcher. Each feature gets
PASS, FAIL or UNSUPPORTED (with the reason) and the largest difference seen. The model is left as found.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Callable

import pandas as pd
from tabulate import tabulate

from ..engine.capture import capture
from ..engine.hooks import count_hooks
from ..engine.sites import HeadSite
from ..errors import ActpatchError, UnsupportedArchitectureError
from ..model.autoadapt import entry_source
from ..model.models import LoadedModel, load_model
from .modelchecks import (FeatureCheck, check_attribution, check_circuits, check_dla_sums, check_gap_account,
                          check_identity, check_logits, check_paths, check_qkv_layout, check_sites, random_batch,
                          site_cases, unsupported)

log = logging.getLogger(__name__)

FEATURES = ("logits", "identity", "hidden", "all_heads", "head", "attn", "mlp", "embed", "q", "k", "v",
            "qkv_layout", "paths", "attribution", "dla", "gap", "circuits")


@dataclass
class SelfTest:
    """The self-test's result: one ``FeatureCheck`` per feature, and the model it ran on.

    Example::

        report = self_test(lm); report.passed; report.to_dataframe(); print(report.table())
    """

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
    cases = {f: v for f, v in site_cases(a, layers, heads).items() if not unsupported(lm, f)}
    sites = [s for vs in cases.values() for v in vs for s in v] + [HeadSite(layer) for layer in range(L)]  # paths
    state: dict = {}
    report = SelfTest(model={**lm.info, "n_kv_heads": KV})

    def prepare():
        state["donor"], _ = capture(lm, batch.donor_ids, batch, sites)
        state["rec"], rec_logits = capture(lm, batch.recipient_ids, batch, sites)
        picked = rec_logits.gather(1, batch.answer_columns().to(rec_logits.device)).double().cpu()  # (B, 2)
        state["rec_ld"] = picked[:, 0] - picked[:, 1]

    checks: list[tuple[str, Callable[[], FeatureCheck]]] = [("logits", lambda: check_logits(lm, batch))]
    checks.append(("identity", lambda: check_identity(lm, batch, state, layers)))
    for feature in FEATURES[2:11]:  # the site families (an unsupported one has no cases)
        checks.append((feature, lambda f=feature: check_sites(lm, batch, state, f, cases[f])))
    checks += [("qkv_layout", lambda: check_qkv_layout(lm, batch, state, layers)),
               ("paths", lambda: check_paths(lm, batch, state)),
               ("attribution", lambda: check_attribution(lm, batch, layers)), ("dla", lambda: check_dla_sums(lm, batch)),
               ("gap", lambda: check_gap_account(lm, batch)),
               ("circuits", lambda: check_circuits(lm, batch))]
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


def load_checked(spec: str, **load_kwargs) -> LoadedModel:
    """``load_model(spec, ...)``; for a model_type with no adapter entry, an automatic adapter that is accepted only
    when ``self_test`` passes on the model (logged in one line and recorded in the model info that runs save).

    Example::

        lm = load_checked("my-org/my-new-arch")   # UnsupportedArchitectureError when the automatic adapter fails
    """
    lm = load_model(spec, auto_adapter=True, **load_kwargs)
    if not lm.adapter.auto:
        return lm
    report = self_test(lm)
    failed = [c.feature for c in report.checks if c.status == "FAIL"]
    if failed:
        raise UnsupportedArchitectureError(
            f"{lm.model.config.model_type!r} has no adapter entry, and the automatic one failed the self-test "
            f"on {', '.join(failed)}: its results cannot be trusted. See `actpatch check-model {spec}`, and write an "
            f"entry by hand in actpatch/model/architectures.py, starting from: {entry_source(lm.adapter.arch)}")
    passed = sum(c.status == "PASS" for c in report.checks)
    lm.info["adapter"] = f"automatic (built from the module tree; self-test passed on {passed} features)"
    log.warning("%s: automatic adapter, built from the module tree; the self-test passed on %d features",
                lm.info.get("model_id"), passed)
    return lm


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
