"""``actpatch compare``: the IOI experiment on several models side by side on a shared depth axis (--models), or
several tasks on one model (--tasks), each run in its own numbered folder under --out."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from ..errors import ConfigError
from ..experiment.compare import plot_compare, render_compare, run_compare
from ..experiment.config import IOIConfig
from ..experiment.contrast import PairsConfig
from ..experiment.taskcompare import plot_task_compare, render_task_compare, run_task_compare, task_summary
from ..model.models import DEFAULT_MODEL
from ..report.outputs import discard, prepare_out, write_outputs
from .common import _add_run_options


def add_parser(sub) -> None:
    """Register ``compare`` and its options."""
    cmp = sub.add_parser(
        "compare", help="run the IOI experiment on several models and compare them on a shared depth axis",
        description="The seed's comparison across models (e.g. gpt2 vs gpt2-medium, or the bundled model vs a local "
        "or GGUF model): each model gets the full ioi run in DIR/model-<i>/; DIR/compare.md, compare.png and "
        "compare.json put them side by side with depth = layer / n_layers.",
    )
    cmp.add_argument("--models", nargs="+", metavar="SPEC", help="two or more model specs (as --model)")
    cmp.add_argument("--tasks", nargs="+", metavar="TASK",
                     help="instead of --models: one model, several tasks (ioi facts greater-than sva induction); each "
                     "runs hidden-state and all-heads patching at its named positions, and DIR/compare.md, compare.csv, "
                     "compare.png and compare.json say per task whether heads only nudge")
    cmp.add_argument("--model", default=DEFAULT_MODEL, metavar="SPEC", help="with --tasks: the model (default: %(default)s)")
    _add_run_options(cmp, out="runs/compare", n_pairs=16)
    cmp.add_argument("--head-sweep", action="store_true", help="also run every model's single-head sweep (slower)")


def _save_png(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` and close it, written or not."""
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")  # long model names: nothing clipped
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def _saver(out: Path, prefix: str, label, quiet: bool):
    """The ``on_result`` callback that writes result i into ``out/<prefix>-<i+1>/`` and says so unless quiet."""

    def save(i: int, result) -> None:
        folder = out / f"{prefix}-{i + 1}"  # numbered: no path is built from user input (a task name, a model spec)
        folder.mkdir(exist_ok=True)
        write_outputs(result, folder)
        if not quiet:
            print(f"{label(i, result)}: sanity {'passed' if result.passed else 'FAILED'}; wrote {folder}")

    return save


def cmd_compare_tasks(args: argparse.Namespace, argv: list[str]) -> int:
    out = Path(args.out)
    created = prepare_out(out, args.overwrite, resume=False)
    cfg = PairsConfig(model=args.model, n_pairs=args.n_pairs, seed=args.seed, device=args.device, dtype=args.dtype,
                      max_memory=args.max_memory, progress=False if args.quiet else None,
                      command=shlex.join(["actpatch", *argv]))

    save = _saver(out, "task", lambda i, result: args.tasks[i], args.quiet)
    try:
        results = run_task_compare(args.tasks, cfg, on_result=save)
        table = task_summary(results)
        _save_png(plot_task_compare(results), out / "compare.png")
        table.to_csv(out / "compare.csv", index=False)
        (out / "compare.md").write_text(render_task_compare(results), encoding="utf-8")
        (out / "compare.json").write_text(json.dumps({
            "tasks": [{"folder": f"task-{i + 1}", **row} for i, row in enumerate(table.to_dict("records"))],
            "model": results[0].model, "command": cfg.command}, indent=2, default=str) + "\n", encoding="utf-8")
    except BaseException:
        discard(out, created)
        raise
    if not args.quiet:
        print(table[["task", "heads_only_nudge", "hidden_first_flip", "all_heads_flip_layers"]].to_string(index=False))
        print(f"wrote {out}/compare.md, compare.csv, compare.png, compare.json")
    return 0 if all(r.passed for r in results) else 1


def cmd_compare(args: argparse.Namespace, argv: list[str]) -> int:
    if (args.models is None) == (args.tasks is None):
        raise ConfigError("compare needs --models SPEC SPEC ... (IOI on several models) or --tasks TASK ... (several "
                          "tasks on one model), one of the two")
    if args.tasks is not None:
        return cmd_compare_tasks(args, argv)
    out = Path(args.out)
    created = prepare_out(out, args.overwrite, resume=False)
    cfg = IOIConfig(n_pairs=args.n_pairs, designs=tuple(dict.fromkeys(args.donor)), seed=args.seed, device=args.device,
                    dtype=args.dtype, head_sweep=args.head_sweep, method="exact" if args.head_sweep else "both",
                    max_memory=args.max_memory,
                    progress=False if args.quiet else None, command=shlex.join(["actpatch", *argv]))

    save = _saver(out, "model", lambda i, result: result.model.get("model_id"), args.quiet)
    try:
        results = run_compare(args.models, cfg, on_result=save)
        _save_png(plot_compare(results), out / "compare.png")
        (out / "compare.md").write_text(render_compare(results), encoding="utf-8")
        (out / "compare.json").write_text(json.dumps({
            "models": [{"folder": f"model-{i + 1}", "model": r.model, "n_layers": r.n_layers, "n_heads": r.n_heads,
                        "passed": r.passed, "baseline": r.baseline} for i, r in enumerate(results)],
            "command": cfg.command}, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        discard(out, created)
        raise
    if not args.quiet:
        print(f"wrote {out}/compare.md, compare.png, compare.json")
    return 0 if all(r.passed for r in results) else 1
