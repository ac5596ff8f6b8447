"""The seed's question across tasks: do hidden states flip the answer while all heads of a layer only nudge it?

    results = run_task_compare(["ioi", "facts", "greater-than", "sva", "induction"], PairsConfig(n_pairs=16))
    table = task_summary(results)          # DataFrame, one row per task
    fig = plot_task_compare(results)       # normalised effect per depth, hidden states vs all heads, per task

Every task runs ``run_pairs`` on the same model with hidden-state and all-heads patching at each of its named
positions. A cell "flips" (noising) or "recovers" (denoising) the answer when its normalised effect reaches
``FLIP`` = 0.5: the patch moves the metric at least half-way from the recipient's value to the donor's. "Heads
only nudge" holds for a task when hidden states reach that at some layer and all heads of no layer do.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..errors import ConfigError  # noqa: E402
from ..model.models import LoadedModel  # noqa: E402
from ..tasks.registry import get_task  # noqa: E402
from .contrast import PairsConfig, run_pairs  # noqa: E402
from .pairsresult import PairsResult  # noqa: E402

FLIP = 0.5


def run_task_compare(tasks: Sequence[str], config: PairsConfig | None = None, *, lm: LoadedModel | None = None,
                     on_result: Callable[[int, PairsResult], None] | None = None) -> list[PairsResult]:
    """Run every task (its default design and metric) with hidden-state and all-heads patching on one model.

    Example::

        results = run_task_compare(["ioi", "sva"], PairsConfig(n_pairs=8), lm=lm)
    """
    if not tasks or len(set(tasks)) != len(tasks):
        raise ConfigError(f"--tasks: expected one or more different task names, got {list(tasks)!r}")
    for t in tasks:
        if get_task(t).generate is None:
            raise ConfigError(f"--tasks: {t!r} generates no pairs; expected registered tasks such as ioi, facts, "
                              "greater-than, sva, induction.")
    base = replace(config or PairsConfig(), sites=("hidden", "all_heads"), metric=None, design=None, positions=None)
    results = []
    for i, task in enumerate(tasks):
        result = run_pairs(replace(base, task=task), lm=lm)
        results.append(result)
        if on_result is not None:
            on_result(i, result)
    return results


def _first(df: pd.DataFrame) -> str:
    if not len(df):
        return "never"
    row = df.sort_values(["layer", "normalised_effect"], ascending=[True, False]).iloc[0]
    return f"layer {int(row.layer)} (depth {row.depth:.2f}) at {row.position}"


def summarise(result: PairsResult) -> dict:
    """One task's row: baseline, where hidden states first flip, where all heads do, and the verdict."""
    df = result.to_dataframe()
    hidden, heads = df[df.experiment == "hidden"], df[df.experiment == "all_heads"]
    h_flip, a_flip = hidden[hidden.normalised_effect >= FLIP], heads[heads.normalised_effect >= FLIP]
    strongest = heads.loc[heads.normalised_effect.idxmax()]
    m = result.metric
    verdict = "yes" if len(h_flip) and not len(a_flip) else ("no" if len(a_flip) else "no flip at all")
    return {
        "task": result.config["task"], "design": result.config["design"], "metric": m,
        "n_pairs": result.baseline["n_pairs"], "n_layers": result.n_layers,
        "recipient": round(result.baseline["recipient"][f"mean_{m}"], 3),
        "donor": round(result.baseline["donor"][f"mean_{m}"], 3),
        "heads_only_nudge": verdict,
        "hidden_first_flip": _first(h_flip),
        "all_heads_flip_layers": ", ".join(f"{L} ({L / result.n_layers:.2f})" for L in sorted(set(a_flip.layer))) or "none",
        "strongest_all_heads": f"{strongest.normalised_effect:.2f} at layer {int(strongest.layer)}, {strongest.position}",
        "passed": result.passed,
    }


def task_summary(results: Sequence[PairsResult]) -> pd.DataFrame:
    """The cross-task table: one row per task (see ``summarise``)."""
    return pd.DataFrame([summarise(r) for r in results])


def plot_task_compare(results: Sequence[PairsResult]) -> plt.Figure:
    """One panel per task: the largest normalised effect over positions, per depth, hidden states vs all heads."""
    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results), 3.6), squeeze=False, sharey=True)
    for ax, result in zip(axes[0], results):
        df = result.to_dataframe()
        for family, style, label in (("hidden", "-", "hidden state"), ("all_heads", "--", "all heads of the layer")):
            best = df[df.experiment == family].groupby("layer").agg(depth=("depth", "first"),
                                                                  effect=("normalised_effect", "max"))
            ax.plot(best.depth, best.effect, style, lw=1.5, label=label)
        ax.axhline(FLIP, color="grey", lw=0.6, ls=":")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(f"{result.config['task']} ({result.metric})", fontsize=9)
        ax.set_xlabel("depth (layer / n_layers)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("normalised effect, best position")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def render_task_compare(results: Sequence[PairsResult], plot: str | None = "compare.png") -> str:
    """compare.md: the question, the threshold, the table and the figure."""
    table = task_summary(results)
    lines = ["# Hidden states vs all heads of a layer, across tasks", "",
             f"Model: {results[0].model.get('model_id')}. A patch flips (or recovers) the answer when its normalised effect "
             f"reaches {FLIP} (half-way from the recipient's metric to the donor's), at any named position. \"Heads only "
             "nudge\" holds when hidden states flip at some layer and all heads of no layer do.", "",
             table.drop(columns=["passed", "n_layers"]).to_markdown(index=False)]
    if not table.passed.all():
        lines += ["", "SANITY CHECKS FAILED for: " + ", ".join(table.task[~table.passed])]
    if plot:
        lines += ["", f"![tasks]({plot})"]
    return "\n".join(lines) + "\n"
