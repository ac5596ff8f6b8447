"""The seed's comparison across models: hidden states vs attention heads, on a shared depth axis.

    results = run_compare(["smollm2-135m", "gemma3-270m"], IOIConfig(n_pairs=16, head_sweep=False))
    fig = plot_compare(results)          # x = layer / n_layers, so models of any depth share one plot
    text = render_compare(results)       # Markdown: baseline, flips and named heads per model

Each model runs the full ``actpatch ioi`` experiment (``run_ioi``) with the same pairs settings;
the comparison only reads the results.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tabulate import tabulate  # noqa: E402

from ..errors import ConfigError  # noqa: E402
from .config import IOIConfig  # noqa: E402
from .experiments import run_ioi  # noqa: E402
from .results import IOIResult  # noqa: E402

CURVES = (("hidden", "END", "-", "hidden state, END"), ("all_heads", "all", "--", "all heads, all positions"),
          ("all_heads", "END", ":", "all heads, END"))


def run_compare(models: Sequence[str], config: IOIConfig | None = None, on_result=None) -> list[IOIResult]:
    """Run the IOI experiment on every model in ``models`` with the same settings; ``on_result(i, result)``
    is called after each (e.g. to write it out before the next model loads).

    Example::

        results = run_compare(["smollm2-135m", "gemma3-270m"], IOIConfig(n_pairs=16, head_sweep=False))
    """
    if len(models) < 2 or len(set(models)) != len(models):
        raise ConfigError(f"--models: expected at least two different models, got {list(models)!r}")
    results = []
    for i, spec in enumerate(models):
        result = run_ioi(replace(config or IOIConfig(), model=spec))
        results.append(result)
        if on_result is not None:
            on_result(i, result)
    return results


def _label(result: IOIResult) -> str:
    return f"{result.model.get('model_id')} ({result.n_layers}L x {result.n_heads}H)"


def plot_compare(results: Sequence[IOIResult]) -> plt.Figure:
    """Normalised effect of each patch against depth (layer / n_layers), one panel per donor design."""
    designs = [d for d in results[0].designs if all(d in r.designs for r in results)]
    fig, axes = plt.subplots(1, len(designs), figsize=(6.5 * len(designs), 4.8), squeeze=False, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    frames = [r.to_dataframe() for r in results]
    for ax, design in zip(axes[0], designs):
        for k, (result, df) in enumerate(zip(results, frames)):
            for exp, pos, ls, what in CURVES:
                sel = df[(df.design == design) & (df.experiment == exp) & (df.position == pos)].sort_values("layer")
                ax.plot(sel.depth, sel.normalised_effect, ls=ls, color=colors[k % len(colors)], lw=1.3,
                        label=f"{_label(result)}: {what}")
        ax.axhline(0, color="grey", lw=0.6)
        ax.axhline(1, color="black", lw=0.6, ls=":")
        ax.set_title(f"donor design: {design}", fontsize=9)
        ax.set_xlabel("depth (layer / n_layers)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("normalised effect (0 = recipient, 1 = donor)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * len(results), 1, 1))
    return fig


def render_compare(results: Sequence[IOIResult], plot: str | None = "compare.png") -> str:
    """Markdown summary: one row per model and design, plus the named heads of each model."""
    rows = []
    for r in results:
        for design in r.designs:
            base = r.baseline["designs"][design]
            nudge = (r.analysis.get("designs", {}).get(design, {}).get("nudge", {}).get("all") or {})
            flips = nudge.get("flip_layers")
            strongest = nudge.get("strongest")
            rows.append([_label(r), design, f"{base['recipient']['accuracy']:.2f}", f"{base['recipient']['mean_logit_diff']:.2f}",
                         f"{base['donor']['mean_logit_diff']:.2f}",
                         "–" if flips is None else (", ".join(f"{L} ({L / r.n_layers:.2f})" for L in flips) or "none"),
                         "–" if not strongest else f"{strongest['layer']} ({strongest['layer'] / r.n_layers:.2f}): "
                                                   f"{strongest['normalised_effect']:.2f}",
                         "–" if not nudge else f"{len(nudge['nudge_layers'])} / {nudge['n_layers']}"])
    lines = ["# IOI across models: hidden states vs attention heads", "",
             "Depth = layer / n_layers. Normalised effect: 0 = recipient unchanged, 1 = donor behaviour.", "",
             tabulate(rows, ["model", "design", "accuracy", "recipient LD", "donor LD", "all heads flip at layer (depth)",
                             "strongest all-heads layer: effect", "layers where heads only nudge"], tablefmt="github")]
    for r in results:
        classes = r.analysis.get("heads", {}).get("classes", [])
        named = {}
        for c in classes:
            for k in c["classes"]:
                named.setdefault(k, []).append(f"L{c['layer']}H{c['head']}")
        lines += ["", f"- {_label(r)}: " + ("; ".join(f"{k}: {', '.join(v)}" for k, v in named.items()
                                                       if k not in ("previous token", "duplicate token")) or "no heads classed")]
    if plot:
        lines += ["", f"![comparison]({plot})"]
    return "\n".join(lines) + "\n"
