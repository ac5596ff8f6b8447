"""The Markdown report: the finding in numbers, the sanity checks, and how to reproduce the run.

    text = render_report(result, plots=["layers.png", "heads_abc.png"])

It reads only the ``IOIResult``. Tables are rendered with ``tabulate``.
"""

from __future__ import annotations

import numpy as np
from tabulate import tabulate

from .results import IOIResult

FLIP = 0.0    # a mean logit difference below this means the model now prefers S: the answer flipped
STRONG = 0.3  # |normalised effect| from which an all-heads patch counts as more than a nudge


def _where(position: str) -> str:
    return {"all": "all positions", "last": "END only"}.get(position, f"at {position} only")


def _f(x: float) -> str:
    return f"{x:.2f}"


def _baseline_table(result: IOIResult) -> str:
    rows = []
    for design, base in result.baseline["designs"].items():
        for who in ("recipient", "donor"):
            b = base[who]
            rows.append([design, who, _f(b["accuracy"]), _f(b["mean_logit_diff"]), _f(b["median_logit_diff"]),
                         f"{b['mean_p_io']:.3f}", f"{b['mean_p_s']:.3f}", _f(b["top1_rate"])])
    head = ["design", "prompts", "accuracy (IO>S)", "mean LD", "median LD", "P(IO)", "P(S)", "IO top-1"]
    return tabulate(rows, head, tablefmt="github")


def _layer_table(result: IOIResult, design: str) -> str:
    rows = []
    for rec in result.layer_records():
        cells = []
        for exp in ("hidden", "all_heads"):
            for pos in ("all", "last"):
                v = rec[exp].get(design, {}).get(pos)
                cells.append("" if v is None else (f"**{_f(v['logit_diff'])}**" if v["logit_diff"] < FLIP else _f(v["logit_diff"])))
        heads = rec["all_heads"].get(design, {})
        effect = max((heads[p]["normalised_effect"] for p in heads), default=float("nan"), key=abs)
        rows.append([rec["layer"], *cells, _f(effect)])
    head = ["layer", "hidden, all pos", "hidden, END", "all heads, all pos", "all heads, END", "all heads: largest norm. effect"]
    return tabulate(rows, head, tablefmt="github")


def _findings(result: IOIResult, design: str) -> list[str]:
    df = result.to_dataframe()
    d = df[df.design == design]
    base = result.baseline["designs"][design]
    rec, don = base["recipient"]["mean_logit_diff"], base["donor"]["mean_logit_diff"]

    def layers_where(exp: str, pos: str) -> list[int]:
        sel = d[(d.experiment == exp) & (d.position == pos)]
        return sorted(int(L) for L in sel[sel.logit_diff < FLIP].layer)

    heads = d[d.experiment == "all_heads"]
    strongest = heads.loc[heads.normalised_effect.abs().idxmax()] if len(heads) else None
    hidden_end = layers_where("hidden", "last")
    out = [
        f"Unpatched recipients: mean LD {_f(rec)}; donors scored with the recipient's names: {_f(don)}.",
        "Hidden-state patching at **all positions** replaces the whole run from that layer on, so it gives the donor's LD "
        "at every layer; that is a correctness check, not a finding.",
        f"Hidden-state patching at **END only** flips the answer (mean LD < 0) at layers: {hidden_end or 'none'}"
        + (f" (first at layer {hidden_end[0]}, depth {hidden_end[0] / result.n_layers:.0%})." if hidden_end else "."),
    ]
    flips = sorted(set(layers_where("all_heads", "all")) | set(layers_where("all_heads", "last")))
    if strongest is not None:
        out.append(
            f"All-heads patching flips the answer at layers: {flips or 'none'}. Its strongest effect is at layer "
            f"{int(strongest.layer)} ({_where(strongest.position)}): LD {_f(strongest.logit_diff)}, normalised effect "
            f"{_f(strongest.normalised_effect)} (1 = donor behaviour)."
        )
        median = float(heads.normalised_effect.abs().median())
        strong = sorted({int(L) for L in heads[heads.normalised_effect.abs() >= STRONG].layer})
        out.append(
            f"Typical all-heads effect: median abs(normalised effect) {median:.3f} over the layers and positions swept. "
            + (f"Layers where all heads together move LD by at least {STRONG:.0%} of the donor gap: {strong}; "
               "everywhere else the heads only nudge the metric." if strong else
               f"No layer's heads move LD by {STRONG:.0%} of the donor gap: heads only nudge the metric.")
        )
    top = result.top_heads(design, 5)
    if top:
        out.append("Top single heads (exact, all positions, Δ LD): " + ", ".join(
            f"L{c['layer']}H{c['head']} {c['delta_logit_diff']:+.2f}" for c in top) + ".")
    if result.has("head_attribution", design):
        att = result.top_heads(design, 5, experiment="head_attribution")
        out.append("Top heads by attribution patching (gradient estimate, all positions): " + ", ".join(
            f"L{c['layer']}H{c['head']} {c['delta_logit_diff']:+.2f}" for c in att) + ".")
        cmp = result.attribution_vs_exact(design)
        if cmp["n_heads"] >= 3:
            out.append(f"Attribution vs exact over the {cmp['n_heads']} heads patched both ways: Spearman ρ = "
                       f"{cmp['spearman']:.3f}.")
            misses = _attribution_misses(result, design)
            if misses:
                out.append("Attribution is a first-order estimate; it is furthest from exact patching at "
                           + ", ".join(misses) + ". Trust exact patching for these heads.")
    return out


def _attribution_misses(result: IOIResult, design: str, k: int = 3) -> list[str]:
    """Heads where attribution and exact patching disagree by more than a quarter of the largest exact effect."""
    exact = result.head_grid(design).values
    approx = result.head_grid(design, experiment="head_attribution").values
    gap = abs(exact - approx)
    scale = float(np.nanmax(abs(exact))) if np.isfinite(exact).any() else 0.0
    order = [i for i in np.argsort(-np.nan_to_num(gap, nan=-1.0), axis=None)[:k] if gap.flat[i] > 0.25 * scale > 0]
    n_heads = result.n_heads
    return [f"L{result.layers[i // n_heads]}H{i % n_heads} (exact {exact.flat[i]:+.2f}, attribution {approx.flat[i]:+.2f})"
            for i in order]


def render_report(result: IOIResult, plots: list[str] | None = None) -> str:
    """The full Markdown report for ``result``; ``plots`` are image paths relative to the report."""
    m, cfg = result.model, result.config
    status = "PASSED" if result.passed else "FAILED: do not trust these numbers"
    lines = [
        f"# IOI activation patching: hidden states vs attention heads — {m.get('model_id')}",
        "",
        f"Model `{m.get('model_id')}` ({m.get('architecture')}, {result.n_layers} layers x {result.n_heads} heads, "
        f"d_head {m.get('d_head')}; {m.get('dtype')} on {m.get('device')}). Pairs: {int(result.baseline['n_pairs'])} per "
        f"design, seed {cfg.get('seed')}. Sanity checks: **{status}**.",
        "",
        "Metric: logit difference LD = logit(IO) - logit(S) at the last real token, always with the *recipient's* "
        "IO and S names. Donor activations are transplanted into the recipient run; normalised effect = "
        "(patched - recipient) / (donor - recipient): 0 = unchanged, 1 = donor behaviour. "
        "The seed's probability ratio P(IO)/P(S) equals exp(LD).",
        "",
        "## Baseline",
        "",
        _baseline_table(result),
        "",
    ]
    for ex in result.examples:
        lines.append(f"- `{ex['design']}` example: recipient “{ex['recipient']}” → donor “{ex['donor']}” "
                     f"(IO `{ex['answer']}`, S `{ex['wrong']}`)")
    for design in result.designs:
        lines += ["", f"## Findings, donor design `{design}`", ""]
        lines += [f"- {s}" for s in _findings(result, design)]
        lines += ["", "Mean LD after patching each layer (bold: answer flipped):", "", _layer_table(result, design)]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Sanity checks", ""]
    lines.append(tabulate(
        [[name, "pass" if c["passed"] else "**FAIL**", c["detail"]] for name, c in result.sanity.items()],
        ["check", "result", "detail"], tablefmt="github"))
    env = result.environment
    lines += [
        "", "## Reproduce", "",
        f"- command: `{cfg.get('command') or 'actpatch.run_ioi(...)'}`",
        f"- model: {m.get('model_id')} (source {m.get('source')}, revision {m.get('revision')})",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
        f"- python {env['python']} on {env['platform']}",
        "- full config and environment: `results.json` (`config`, `model`, `environment`)",
        "",
    ]
    return "\n".join(lines)
