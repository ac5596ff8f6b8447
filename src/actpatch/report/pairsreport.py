"""Figures and reports of a contrastive-task run (``PairsResult``): they only read the result.

    fig = plot_pair_layers(result)        # the headline: hidden state vs all heads per layer, one panel per position
    fig = plot_pair_heads(result)         # single heads: (layer, head) heatmaps of the metric's change per position
    text = render_pairs_md(result, ["layers.png", "heads.png"]); page = render_pairs_html(result, images)

Both reports open with the headline figure, then what it shows in words, then the tables.
"""

from __future__ import annotations

import base64
import html
import json

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..experiment.pairsresult import PairsResult  # noqa: E402

LABELS = {"hidden": "hidden state (block output)", "all_heads": "all heads of the layer", "attn": "attention output",
          "mlp": "MLP output"}
COLOURS = {"hidden": "tab:blue", "all_heads": "tab:red", "attn": "tab:orange", "mlp": "tab:green"}


def _positions(result: PairsResult) -> list[str]:
    return list(result.config.get("positions") or dict.fromkeys(c["position"] for c in result.cells))


def plot_pair_layers(result: PairsResult) -> plt.Figure:
    """One panel per position: the metric after patching each layer's hidden state, all heads, attn or MLP output."""
    df, positions = result.to_dataframe(), _positions(result)
    fig, axes = plt.subplots(1, len(positions), figsize=(5.2 * len(positions), 4.2), squeeze=False, sharey=True)
    rec, don = result.baseline["recipient"][f"mean_{result.metric}"], result.baseline["donor"][f"mean_{result.metric}"]
    for ax, pos in zip(axes[0], positions):
        for family, label in LABELS.items():
            kinds = ("embed", "hidden") if family == "hidden" else (family,)  # embeddings: layer -1 of the residual
            sel = df[df.experiment.isin(kinds) & (df.position == pos)].sort_values("layer")
            if len(sel):
                ax.plot(sel.layer, sel[result.metric], marker="o", color=COLOURS[family], label=label)
        ax.axhline(rec, color="grey", ls=":", label="recipient (unpatched)")
        ax.axhline(don, color="black", ls="--", label="donor")
        ax.set_title(f"patched at {pos}", fontsize=10)
        ax.set_xlabel("layer (-1: the embeddings)" if (df.experiment == "embed").any() else "layer")
    axes[0][0].set_ylabel(result.metric)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{result.config.get('task')}: hidden states vs attention heads ({result.baseline['n_pairs']} pairs)",
                 fontsize=11)
    return fig


def plot_pair_heads(result: PairsResult) -> plt.Figure:
    """One (layer, head) heatmap per position of the metric's change when that single head is patched."""
    positions = [p for p in _positions(result) if len(result.head_grid(p))]
    grids = [result.head_grid(p).reindex(index=result.layers, columns=range(result.n_heads)).to_numpy(float)
             for p in positions]
    lim = float(np.nanmax(np.abs(np.stack(grids)))) if grids and np.isfinite(np.stack(grids)).any() else 1.0
    fig, axes = plt.subplots(1, len(positions), figsize=(0.25 * result.n_heads * len(positions) + 3,
                                                          0.22 * len(result.layers) + 2), squeeze=False, sharey=True)
    for ax, grid, pos in zip(axes[0], grids, positions):
        im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim or 1.0, aspect="auto")
        ax.set_title(pos, fontsize=9)
        ax.set_xlabel("head")
    axes[0][0].set_yticks(range(len(result.layers)), [str(L) for L in result.layers], fontsize=7)
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=list(axes[0]), label=result.delta)
    return fig


def findings(result: PairsResult) -> list[str]:
    """What the run shows, in sentences: per position, where hidden states and all heads move the metric most."""
    df, lines = result.to_dataframe(), []
    for pos in _positions(result):
        parts = []
        for family in ("hidden", "all_heads"):
            sel = df[(df.experiment == family) & (df.position == pos)]
            if len(sel):
                best = sel.loc[sel.normalised_effect.abs().idxmax()]
                parts.append(f"{LABELS[family]} peaks at layer {int(best.layer)} (normalised effect "
                             f"{best.normalised_effect:.2f}, {result.delta} {best[result.delta]:+.3g})")
        heads = df[(df.experiment == "head") & (df.position == pos)]
        if len(heads):
            top = heads.reindex(heads[result.delta].abs().sort_values(ascending=False).index).head(3)
            parts.append("top single heads " + ", ".join(f"L{int(r['layer'])}H{int(r['head'])} ({r[result.delta]:+.3g})"
                                                         for _, r in top.iterrows()))
        lines.append(f"At {pos}: " + "; ".join(parts) + ".")
    multi = result.baseline.get("n_multi_token", 0)
    if multi:
        how = result.config.get("answer_reduce", "sum")
        lines.append(f"{multi} of {result.baseline['n_pairs']} pairs have an answer of several tokens, scored by "
                     f"teacher forcing (log-prob {how} over the answer's tokens).")
    return lines


def _tables(result: PairsResult) -> dict[str, pd.DataFrame]:
    sanity = pd.DataFrame([{"check": n, "passed": c["passed"], "detail": c["detail"]} for n, c in result.sanity.items()])
    baseline = pd.DataFrame([{"prompts": side, **vals} for side, vals in result.baseline.items() if isinstance(vals, dict)])
    layers = result.layer_table()
    layers.columns = [f"{LABELS.get(e, e)}, {p}" for e, p in layers.columns]
    tables = {"sanity checks": sanity, "baseline": baseline, f"{result.metric} after patching each layer": layers.reset_index()}
    if result.generations:
        cols = ["pair", "recipient", "recipient_says", "donor_says", "patch", "normalised_effect", "patched_says"]
        tables["what the patched model says (greedy)"] = pd.DataFrame(result.generations)[cols]
    return tables


def markdown_page(title: str, intro: str, plots: list[str], notes: list[str], tables: dict[str, pd.DataFrame],
                  command: str) -> str:
    """A report.md: title, one line of context, the figures, the notes as bullets, the tables, the command."""
    lines = [f"# {title}", "", intro, ""]
    lines += [f"![{name}]({name})" for name in plots] + [""] + [f"- {x}" for x in notes] + [""]
    for name, table in tables.items():
        lines += [f"## {name.capitalize()}", "", table.to_markdown(index=False, floatfmt=".4g"), ""]
    lines += ["## Reproduce", "", "```", command, "```", ""]
    return "\n".join(lines)


def html_page(title: str, head: list[str], notes: list[str], tables: dict[str, pd.DataFrame], figures: list[str],
              record: dict, command: str) -> str:
    """A self-contained report.html: ``head`` (HTML snippets), the notes, the tables, the figures, the config."""
    body = [f"<h1>{html.escape(title)}</h1>", *head]
    body.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in notes) + "</ul>")
    for name, table in tables.items():
        body += [f"<h2>{html.escape(name.capitalize())}</h2>", table.to_html(index=False, float_format=lambda x: f"{x:.4g}")]
    body += figures
    body += ["<h2>Reproduce</h2>", f'<pre id="command">{html.escape(command)}</pre>',
             "<pre>" + html.escape(json.dumps(record, indent=2, default=str)) + "</pre>"]
    style = "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px} img{max-width:100%} " \
            "table{border-collapse:collapse;font-size:.85em} td,th{border:1px solid #ccc;padding:2px 6px}"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>\n")


def figure_html(name: str, data: bytes) -> str:
    """A PNG embedded as base64."""
    b64 = base64.b64encode(data).decode("ascii")
    return f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{b64}"></figure>'


def render_pairs_md(result: PairsResult, plots: list[str]) -> str:
    """report.md: the headline figure, the findings, the tables, the command."""
    status = "all sanity checks passed" if result.passed else "SANITY CHECKS FAILED: do not trust these numbers"
    return markdown_page(f"actpatch: {result.config.get('task')} on {result.model.get('model_id')}",
                         f"Metric `{result.metric}`, {result.baseline['n_pairs']} pairs; {status}.", plots,
                         findings(result), _tables(result), str(result.config.get("command") or "actpatch.run_pairs(...)"))


def render_pairs_html(result: PairsResult, images: dict[str, bytes]) -> str:
    """report.html, self-contained: the headline figure first, then findings, tables, the other plots, the config."""
    ok = result.passed
    head = [figure_html("layers.png", images["layers.png"])] if "layers.png" in images else []
    head.append(f'<p>Metric <code>{html.escape(result.metric)}</code>, {result.baseline["n_pairs"]} pairs. Sanity checks: '
                f'<strong id="status" class="status-{"pass" if ok else "fail"}">{"passed" if ok else "FAILED"}</strong></p>')
    return html_page(f"actpatch: {result.config.get('task')} on {result.model.get('model_id')}", head, findings(result),
                     _tables(result), [figure_html(n, b) for n, b in images.items() if n != "layers.png"],
                     {"config": result.config, "model": result.model, "environment": result.environment},
                     str(result.config.get("command")))


def plot_pair_tracing(result: PairsResult) -> plt.Figure:
    """Causal-tracing heatmaps (Meng et al. 2022): position x layer of the normalised effect, one panel per family
    among hidden states, MLP outputs and attention outputs."""
    df = result.to_dataframe()
    families = [f for f in ("hidden", "mlp", "attn") if (df.experiment == f).any()]
    positions = _positions(result)
    fig, axes = plt.subplots(1, len(families), figsize=(0.22 * len(result.layers) * len(families) + 3,
                                                        0.45 * len(positions) + 1.8), squeeze=False, sharey=True)
    for ax, family in zip(axes[0], families):
        grid = df[df.experiment == family].pivot_table(index="position", columns="layer", values="normalised_effect")
        grid = grid.reindex(index=positions, columns=result.layers)  # (positions, layers)
        im = ax.imshow(grid.to_numpy(float), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_xticks(range(len(result.layers)), result.layers, fontsize=6)
        ax.set_yticks(range(len(positions)), positions, fontsize=8)
        ax.set_title(LABELS.get(family, family), fontsize=10)
        ax.set_xlabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="normalised effect (1 = donor)", shrink=0.9)
    fig.suptitle(f"{result.config.get('task')}: layer x position ({result.baseline['n_pairs']} pairs)", fontsize=11)
    return fig


def save_pair_plots(result: PairsResult, out) -> list[str]:
    """Write layers.png (and heads.png when single heads were patched, tracing.png when MLP or attention outputs
    were) into ``out``; returns the file names."""
    draw = [("layers.png", plot_pair_layers)]
    if any(c["experiment"] == "head" for c in result.cells):
        draw.append(("heads.png", plot_pair_heads))
    if any(c["experiment"] in ("mlp", "attn") for c in result.cells):
        draw.append(("tracing.png", plot_pair_tracing))
    for name, fn in draw:
        fig = fn(result)
        try:
            fig.savefig(out / name, dpi=110, bbox_inches="tight")
        finally:
            plt.close(fig)
    return [name for name, _ in draw]
