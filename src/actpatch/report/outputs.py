"""The output folder of a command: checked before a run, written atomically after it.

    created = prepare_out(Path("runs/x"), overwrite=False, resume=False)   # ConfigError if unusable
    plots = write_outputs(result, Path("runs/x"))   # results, plots, report.md, report.html, config

Everything goes into a staging folder inside ``--out`` and is renamed into place file by file, so
an interrupted run never leaves a half-written file; only fixed file names are used (no path is
built from prompt text or a model spec). ``PARTIAL`` holds an unfinished run's patches (--resume).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ConfigError
from ..experiment.circuit_result import CircuitResult
from ..experiment.pairsresult import PairsResult
from ..experiment.results import IOIResult
from .circuit_report import render_circuit_html, render_circuit_md, save_circuit_plots
from .htmlreport import render_html
from .markdown import render_report
from .pairsreport import render_pairs_html, render_pairs_md, save_pair_plots
from .plots import save_plots

PARTIAL = ".partial"  # finished patches of an unfinished run, for --resume


def prepare_out(out: Path, overwrite: bool, resume: bool) -> bool:
    """Check that ``out`` may be written; create it. Returns True if this call created it."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder; choose another path")
    if resume and not (out / PARTIAL).is_dir():
        raise ConfigError(f"--resume: {out} holds no interrupted run (expected {out / PARTIAL}); run without --resume")
    if not resume and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out} already exists and is not empty; pass --overwrite, --resume (to continue an "
                          "interrupted run) or choose another folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as exc:
        raise ConfigError(f"--out {out} is not writable ({exc.strerror}); choose a folder you can write to") from exc
    if not resume:
        shutil.rmtree(out / PARTIAL, ignore_errors=True)  # --overwrite: a stale partial run must not be resumed
    return created


def write_outputs(result: IOIResult | PairsResult | CircuitResult, out: Path) -> list[str]:
    """Write every output file into a staging folder inside ``out``, then rename each into place.

    Only fixed file names (and donor design names from a fixed list) are used: nothing from prompt
    text becomes a path, and nothing is written outside ``out``.
    """
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        result.save(stage)
        if isinstance(result, CircuitResult):
            plots, md, page = save_circuit_plots(result, stage), render_circuit_md, render_circuit_html
        elif isinstance(result, PairsResult):
            plots, md, page = save_pair_plots(result, stage), render_pairs_md, render_pairs_html
        else:
            plots, md, page = [p.name for p in save_plots(result, stage)], render_report, render_html
        (stage / "report.md").write_text(md(result, plots), encoding="utf-8")
        images = {name: (stage / name).read_bytes() for name in plots}
        (stage / "report.html").write_text(page(result, images), encoding="utf-8")
        written = sorted([f.name for f in stage.iterdir()] + ["config.json"])
        (stage / "config.json").write_text(json.dumps(
            {"config": result.config, "model": result.model, "environment": result.environment, "files": written},
            indent=2) + "\n", encoding="utf-8")
        stale = set(_written_before(out)) - set(written)  # an earlier run's files this run does not rewrite
        for f in stage.iterdir():
            os.replace(f, out / f.name)
        for name in stale:  # only names an earlier actpatch run listed here: never the user's own files
            if Path(name).name == name and not name.startswith("."):
                (out / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return plots


def _written_before(out: Path) -> list[str]:
    """The files an earlier run listed in its config.json (``files``); [] if there is none."""
    try:
        names = json.loads((out / "config.json").read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def discard(out: Path, created: bool) -> None:
    """After a failed run: drop the partial patches, and ``out`` itself if this run created it and it is empty."""
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()
