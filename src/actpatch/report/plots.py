"""Figures from an ``IOIResult`` (plots only read results; matplotlib with the Agg backend).

    fig = plot_layers(result)          # hidden-state vs all-heads logit difference per layer
    fig = plot_heads(result, "abc")    # layer x head heatmap of the single-head sweep
    save_plots(result, "runs/demo")    # layers.png, heads_<design>.png, positions_<design>.png, ...
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..errors import ConfigError  # noqa: E402
from ..tasks.ioi import POSITION_NAMES  # noqa: E402
from ..experiment.results import PLOTTERS, IOIResult  # noqa: E402

STYLES = {
    ("hidden", "all"): dict(color="tab:blue", ls="-", marker="o", label="hidden state, all positions"),
    ("hidden", "END"): dict(color="tab:blue", ls="--", marker="s", label="hidden state, END only"),
    ("all_heads", "all"): dict(color="tab:red", ls="-", marker="o", label="all heads of the layer, all positions"),
    ("all_heads", "END"): dict(color="tab:red", ls="--", marker="s", label="all heads of the layer, END only"),
}


def plot_layers(result: IOIResult) -> plt.Figure:
    """One panel per donor design: mean logit difference after each layer's patch."""
    designs = result.designs
    fig, axes = plt.subplots(1, len(designs), figsize=(6.5 * len(designs), 4.8), squeeze=False, sharey=True)
    df = result.to_dataframe()
    for ax, design in zip(axes[0], designs):
        base = result.baseline["designs"][design]
        for (experiment, position), style in STYLES.items():
            sel = df[(df.design == design) & (df.experiment == experiment) & (df.position == position)].sort_values("layer")
            ax.plot(sel.layer, sel.logit_diff, markersize=3, lw=1.4, **style)
        ax.axhline(base["recipient"]["mean_logit_diff"], color="green", lw=1, ls=":", label="recipient (unpatched)")
        ax.axhline(base["donor"]["mean_logit_diff"], color="black", lw=1, ls=":", label="donor")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(f"donor design: {design}  (n={int(result.baseline['n_pairs'])} pairs)")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean logit(IO) - logit(S) after patching")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"{result.model.get('model_id')}\nhidden-state vs attention-head patching (crossing 0 = answer flipped)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def plot_heads(result: IOIResult, design: str, metric: str = "delta_logit_diff", experiment: str = "head") -> plt.Figure:
    """Heatmap of the single-head sweep (exact, or attribution's estimate): change in LD per (layer, head)."""
    grid = result.head_grid(design, metric, experiment=experiment)
    lim = float(np.nanmax(np.abs(grid.values))) or 1.0
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * result.n_heads + 2), max(3.0, 0.22 * len(grid.layers) + 1.5)))
    im = ax.imshow(grid.values, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_yticks(range(len(grid.layers)), [str(L) for L in grid.layers], fontsize=7)
    ax.set_xticks(range(result.n_heads), [str(h) for h in range(result.n_heads)], fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="Δ logit diff (patched - recipient)")
    what = "single-head patching" if experiment == "head" else "attribution estimate"
    ax.set_title(f"{what}, all positions, donor: {design}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_attribution(result: IOIResult, design: str) -> plt.Figure:
    """Scatter of attribution's estimate against the exact single-head effect, with Spearman's rho."""
    cmp = result.attribution_vs_exact(design)
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.scatter(cmp["exact"], cmp["attribution"], s=12, alpha=0.7, color="tab:purple")
    both = np.concatenate([cmp["exact"], cmp["attribution"]]) if cmp["n_heads"] else np.zeros(1)
    lo, hi = float(both.min()), float(both.max())
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label="y = x")
    ax.set_xlabel("exact Δ logit diff (patch one head, all positions)")
    ax.set_ylabel("attribution estimate")
    ax.set_title(f"donor {design}: {cmp['n_heads']} heads, Spearman ρ = {cmp['spearman']:.3f}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


NAMED = POSITION_NAMES


def has_positions(result: IOIResult, design: str) -> bool:
    return any(c["design"] == design and c["experiment"] == "hidden" and c["position"] == "IO" for c in result.cells)


def _require_positions(result: IOIResult, design: str) -> None:
    if not has_positions(result, design):
        raise ConfigError(f"design {design!r} has no per-position cells to plot; run with by_position=True "
                          "(--by-position)")


def plot_positions(result: IOIResult, design: str) -> plt.Figure:
    """Layer x named-position heatmaps of Δ LD: hidden states (left) and all heads of the layer (right)."""
    _require_positions(result, design)
    df = result.to_dataframe()
    d = df[df.design == design]
    grids = [d[d.experiment == exp].pivot(index="layer", columns="position", values="delta_logit_diff")
             .reindex(index=result.layers, columns=list(NAMED)).to_numpy(dtype=float)  # (L, positions), NaN if absent
             for exp in ("hidden", "all_heads")]
    lim = float(np.nanmax(np.abs(np.stack(grids)))) or 1.0
    fig, axes = plt.subplots(1, 2, figsize=(8, max(3.0, 0.2 * len(result.layers) + 1.8)), sharey=True,
                             layout="constrained")  # room for the title above the panel titles
    for ax, grid, title in zip(axes, grids, ("hidden state", "all heads of the layer")):
        im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(range(len(NAMED)), NAMED, fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].set_yticks(range(len(result.layers)), [str(L) for L in result.layers], fontsize=7)
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=axes, label="Δ logit diff (patched - recipient)")
    fig.suptitle(f"patching at one named position, donor: {design}", fontsize=10)
    return fig


def plot_heads_by_position(result: IOIResult, design: str) -> plt.Figure:
    """One (layer, head) heatmap of single-head Δ LD per named position, on a shared colour scale."""
    _require_positions(result, design)
    grids = [result.head_grid(design, position=p).values for p in NAMED]
    lim = float(np.nanmax(np.abs(np.stack(grids)))) if np.isfinite(np.stack(grids)).any() else 1.0
    fig, axes = plt.subplots(1, len(NAMED), figsize=(2.2 * len(NAMED) + 1.5, max(3.0, 0.2 * len(result.layers) + 1.8)),
                             sharey=True, layout="constrained")
    for ax, grid, pos in zip(axes, grids, NAMED):
        im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_title(pos, fontsize=9)
        ax.set_xlabel("head", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # heads are whole numbers
        ax.tick_params(axis="x", labelsize=7)
    axes[0].set_yticks(range(len(result.layers)), [str(L) for L in result.layers], fontsize=7)
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=list(axes), label="Δ logit diff")
    fig.suptitle(f"single heads patched at one named position, donor: {design}", fontsize=10)
    return fig


def save_plots(result: IOIResult, out_dir: str | Path) -> list[Path]:
    """Write every figure as PNG into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    paths = []
    figures = [("layers.png", lambda: plot_layers(result))]  # drawn one at a time: at most one open figure
    for d in result.designs:
        if result.has("head", d):
            figures.append((f"heads_{d}.png", partial(plot_heads, result, d)))
        if result.has("head_attribution", d):
            figures.append((f"heads_attribution_{d}.png", partial(plot_heads, result, d, experiment="head_attribution")))
        if result.has("head_attribution", d) and result.attribution_vs_exact(d)["n_heads"] >= 3:
            figures.append((f"attribution_vs_exact_{d}.png", partial(plot_attribution, result, d)))
        if has_positions(result, d):
            figures.append((f"positions_{d}.png", partial(plot_positions, result, d)))
            if result.has("head", d):
                figures.append((f"heads_by_position_{d}.png", partial(plot_heads_by_position, result, d)))
    for name, draw in figures:
        fig = draw()
        try:
            fig.savefig(out / name, dpi=120, bbox_inches="tight")  # nothing clipped: legends, long tick labels
        finally:
            plt.close(fig)
        paths.append(out / name)
    return paths


PLOTTERS.update(
    layers=lambda result, design, **kw: plot_layers(result),
    heads=lambda result, design, **kw: plot_heads(result, design, **kw),
    heads_attribution=lambda result, design, **kw: plot_heads(result, design, experiment="head_attribution", **kw),
    attribution=lambda result, design, **kw: plot_attribution(result, design),
    positions=lambda result, design, **kw: plot_positions(result, design),
    heads_by_position=lambda result, design, **kw: plot_heads_by_position(result, design),
)
