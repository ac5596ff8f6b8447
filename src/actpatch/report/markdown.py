"""The Markdown report: the finding in numbers, the sanity checks, and how to reproduce the run.

    text = render_report(result, plots=["layers.png", "heads_abc.png"])

It reads only the ``IOIResult``. Tables are rendered with ``tabulate``.
"""

from __future__ import annotations

import numpy as np
from tabulate import tabulate

from ..analysis.summary import NEAR_FLIP, NUDGE
from ..engine.sanity import CHECK_DESCRIPTIONS
from ..experiment.results import IOIResult

STRONG = 0.3  # |normalised effect| from which an all-heads patch counts as more than a nudge


def _where(position: str) -> str:
    return {"all": "all positions", "END": "END only"}.get(position, f"at {position} only")


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


def _flipped(ld: float, recipient: float) -> bool:
    """The preferred name changed: LD has the other sign than the unpatched recipient's."""
    return ld * recipient < 0


def _layer_table(result: IOIResult, design: str) -> str:
    rec_ld = result.baseline["designs"][design]["recipient"]["mean_logit_diff"]
    rows = []
    for rec in result.layer_records():
        cells = []
        for exp in ("hidden", "all_heads"):
            for pos in ("all", "END"):
                v = rec[exp].get(design, {}).get(pos)
                cells.append("" if v is None else (f"**{_f(v['logit_diff'])}**" if _flipped(v["logit_diff"], rec_ld)
                                                   else _f(v["logit_diff"])))
        heads = rec["all_heads"].get(design, {})
        effect = max((heads[p]["normalised_effect"] for p in heads), default=float("nan"), key=abs)
        rows.append([rec["layer"], *cells, _f(effect)])
    head = ["layer", "hidden, all pos", "hidden, END", "all heads, all pos", "all heads, END", "all heads: largest norm. effect"]
    return tabulate(rows, head, tablefmt="github")


def findings(result: IOIResult, design: str) -> list[str]:
    """The plain-language findings for one donor design, one Markdown-inline sentence group per item."""
    df = result.to_dataframe()
    d = df[df.design == design]
    base = result.baseline["designs"][design]
    rec, don = base["recipient"]["mean_logit_diff"], base["donor"]["mean_logit_diff"]

    def layers_where(exp: str, pos: str) -> list[int]:
        sel = d[(d.experiment == exp) & (d.position == pos)]
        return sorted(int(L) for L in sel[sel.logit_diff * rec < 0].layer)

    heads = d[d.experiment == "all_heads"]
    strongest = heads.loc[heads.normalised_effect.abs().idxmax()] if len(heads) else None
    hidden_end = layers_where("hidden", "END")
    out = [
        f"Unpatched recipients: mean LD {_f(rec)}; donors scored with the recipient's names: {_f(don)}.",
        "Hidden-state patching at **all positions** replaces the whole run from that layer on, so it gives the donor's LD "
        "at every layer; that is a correctness check, not a finding.",
        f"Hidden-state patching at **END only** flips the answer (mean LD changes sign) at layers: {hidden_end or 'none'}"
        + (f" (first at layer {hidden_end[0]}, depth {hidden_end[0] / result.n_layers:.0%})." if hidden_end else "."),
    ]
    flips = sorted(set(layers_where("all_heads", "all")) | set(layers_where("all_heads", "END")))
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


MAIN_CLASSES = ("name mover", "negative name mover", "S-inhibition", "S suppressor", "backup name mover", "induction")


def _head_section(heads: dict) -> list[str]:
    classes = heads.get("classes", [])
    rows = []
    for c in classes:
        main = [k for k in c["classes"] if k in MAIN_CLASSES]
        if main:
            e = c["evidence"]
            rows.append([", ".join(c["classes"]), f"L{c['layer']}H{c['head']}"] + [
                e.get(k, "") for k in ("END->IO", "END->S2", "S2->S1", "S2->S1+1", "S1+1->S1", "dla", "copy", "neg_copy")])
    out = ["", "## Which heads do IOI", "",
           f"Every head on the recipients: mean attention between named positions, direct logit attribution (DLA) to "
           f"LD at END (recipient LD {heads['recipient_logit_diff']:.2f}), and copy scores over {heads['n_names']} names "
           "(the fraction whose representation after block 0, sent through the head's OV circuit, the final norm and "
           "the unembedding, comes out in the top 5; negative: the same for minus the OV output). Classes follow the "
           "IOI paper by thresholds (`actpatch.analysis.heads.classify`).", ""]
    if rows:
        out.append(tabulate(rows, ["class", "head", "END→IO", "END→S2", "S2→S1", "S2→S1+1", "S1+1→S1", "DLA", "copy",
                                   "neg. copy"], tablefmt="github"))
    else:
        out.append("No head meets the name-mover, S-inhibition or induction thresholds on this model.")
    for cls in ("duplicate token", "previous token"):
        found = [f"L{c['layer']}H{c['head']}" for c in classes if cls in c["classes"]]
        out.append(f"\n{cls.capitalize()} heads: {', '.join(found) or 'none'}.")
    if heads.get("class_rules"):
        out += ["", "Thresholds, and the heads that nearly qualified (every criterion of the class but one; for a class "
                "of one criterion, half its threshold or more), closest first:", ""]
        near = heads.get("near_misses", {})
        out.append(tabulate([[cls, rule, "; ".join(f"L{r['layer']}H{r['head']} missed {r['missed']}"
                                                   for r in near.get(cls, [])[:3]) or "–"]
                             for cls, rule in heads["class_rules"].items()],
                            ["class", "criteria", "nearly qualified"], tablefmt="github"))
    if "paper_comparison" in heads:
        out += ["", "Compared with Wang et al. 2022 (GPT-2 small):", "", tabulate(
            [[r["class"], f"{r['layer']}.{r['head']}", ", ".join(r["found_as"]) or "–", "yes" if r["agrees"] else "no"]
             for r in heads["paper_comparison"]], ["paper class", "head", "classified here as", "agrees"], tablefmt="github")]
    return out


GAP_HEADERS = ["layer", "‖Δh‖/‖h‖ hidden", "‖Δa‖/‖h‖ heads", "‖a‖/‖h‖", "hidden ΔLD", "hidden direct",
               "hidden indirect", "heads ΔLD", "heads direct", "heads indirect"]


def gap_rows(info: dict) -> list[list]:
    """The account of the gap as table rows (``GAP_HEADERS``), one per layer, formatted."""
    return [[r["layer"], f"{r['hidden_delta']:.2f}", f"{r['heads_delta']:.2f}", f"{r['attn_share']:.2f}",
             *(f"{r[k]:+.2f}" if k in r else "" for k in ("hidden_total", "hidden_direct", "hidden_indirect",
                                                         "heads_total", "heads_direct", "heads_indirect"))]
            for r in info["gap"]]


def gap_text(result: IOIResult, design: str, info: dict) -> tuple[str, list[str]]:
    """The account's summary paragraph, and one line per nudge summary and path patch (Markdown inline)."""
    gap = info["gap"]
    med = {k: float(np.median([r[k] for r in gap])) for k in ("hidden_delta", "heads_delta", "attn_share")}
    para = (f"At END, a hidden-state patch changes the residual stream by a median {med['hidden_delta']:.0%} of its norm "
            f"across layers; an all-heads patch changes it by {med['heads_delta']:.0%}. The attention block's output is a "
            f"median {med['attn_share']:.0%} of the residual norm, and under an all-heads patch everything else in the "
            "residual (embeddings, earlier layers, this layer's MLP input) stays the recipient's. ΔLD at END splits into "
            "the direct path (the change read straight off by the unembedding, final-norm scale frozen) and the indirect "
            "path through later layers (total - direct).")
    lines = []
    for pos, n in info["nudge"].items():
        st = n["strongest"]
        lines.append(
            f"All heads, {_where(pos)}: “heads only nudge” (|normalised effect| < {NUDGE}) holds at {len(n['nudge_layers'])} "
            f"of {n['n_layers']} layers. The answer flips at layers {n['flip_layers'] or 'none'}"
            f"{f'; nearly flips (normalised effect ≥ {NEAR_FLIP}) at ' + str(n['near_flip_layers']) if n['near_flip_layers'] else ''}. "
            f"Strongest: layer {st['layer']}, LD {st['logit_diff']:.2f} (normalised effect {st['normalised_effect']:.2f}).")
    rec = result.baseline["designs"][design]["recipient"]["mean_logit_diff"]
    for p in info["paths"]:
        senders = ", ".join(f"L{L}H{h}" for L, h in p["senders"])
        receivers = p["receivers"] if isinstance(p["receivers"], str) else ", ".join(f"L{L}H{h}" for L, h in p["receivers"])
        lines.append(f"{p['what']}: senders {senders}; receivers {receivers}: LD {rec:.2f} → {p['logit_diff']:.2f}.")
        lines += [shift_line(senders, a) for a in p.get("attention", [])]
    return para, lines


def shift_line(senders: str, entry: dict) -> str:
    """"Patching these heads moves name mover X's attention from IO to S by Y", with the numbers."""
    L, h = entry["head"]
    io, s2 = entry["keys"]["IO"], entry["keys"]["S2"]
    ways = {(False, True): "from IO to S2", (True, False): "from S2 to IO", (True, True): "towards both names",
            (False, False): "away from both names"}
    towards = "barely (under 0.01 on both names)" if max(abs(io["change"]), abs(s2["change"])) < 0.01 \
        else ways[(io["change"] > 0, s2["change"] > 0)]
    return (f"Patching {senders} into name mover L{L}H{h}'s query (path patching) moves its attention {towards}: "
            f"END → IO {io['unpatched']:.2f} → {io['patched']:.2f} ({io['change']:+.2f}), END → S2 "
            f"{s2['unpatched']:.2f} → {s2['patched']:.2f} ({s2['change']:+.2f}), means over pairs.")


def _gap_section(result: IOIResult, design: str, info: dict) -> list[str]:
    para, lines = gap_text(result, design, info)
    return ["", f"## Why heads move LD less than hidden states, donor design `{design}`", "", para, "",
            tabulate(gap_rows(info), GAP_HEADERS, tablefmt="github", disable_numparse=True), ""] + [f"- {x}" for x in lines]


def render_report(result: IOIResult, plots: list[str] | None = None) -> str:
    """The full Markdown report for ``result``; ``plots`` are image paths relative to the report."""
    m, cfg = result.model, result.config
    status = "PASSED" if result.passed else "FAILED: do not trust these numbers"
    lines = [
        f"# IOI activation patching: hidden states vs attention heads — {m.get('model_id')}",
        "",
        f"Model `{m.get('model_id')}` ({m.get('architecture')}, {result.n_layers} layers x {result.n_heads} heads, "
        f"d_head {m.get('d_head')}; {m.get('dtype')} on {m.get('device')}). Pairs: {int(result.baseline['n_pairs'])} per "
        + (f"design, from `{cfg['pairs_file']}` (sha256 {str(cfg.get('pairs_file_sha256'))[:12]}…)"
           if cfg.get("pairs_file") else f"design, seed {cfg.get('seed')}") + f". Sanity checks: **{status}**.",
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
        lines += [f"- {s}" for s in findings(result, design)]
        lines += ["", "Mean LD after patching each layer (bold: the answer flipped, LD changed sign):", "",
                  _layer_table(result, design)]
    analysis = result.analysis or {}
    if "heads" in analysis:
        lines += _head_section(analysis["heads"])
    for design, info in analysis.get("designs", {}).items():
        lines += _gap_section(result, design, info)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Sanity checks", ""]
    lines.append(tabulate(
        [[name, "pass" if c["passed"] else "**FAIL**", CHECK_DESCRIPTIONS.get(name, ""), c["detail"]]
         for name, c in result.sanity.items()],
        ["check", "result", "what it asserts", "detail"], tablefmt="github"))
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
