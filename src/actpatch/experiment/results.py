"""The result of an IOI patching run: a dataclass with named axes, saved as JSON + CSV.

    result.to_dataframe()                    # one row per cell: experiment, design, layer, head, position, ...
    result.head_grid("abc")                  # HeadGrid(values (layer, head), layers, metric)
    result.save("runs/x"); IOIResult.load("runs/x")

``results.json`` has the top-level keys ``baseline``, ``layers`` (one record per layer),
``heads`` (the layer x head grid per design), ``sanity``, ``config``, plus ``model``,
``environment`` and ``examples``; ``results.csv`` has every cell. Writes are atomic (temp file +
rename), so an interrupted save never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..engine.sites import POSITION_ALIASES
from ..errors import ConfigError

# kind -> function(result, design, **kw) -> matplotlib Figure; filled in by actpatch.report.plots, so that
# plotting reads results while this module never imports the plotting code
PLOTTERS: dict[str, Callable] = {}

CELL_COLUMNS = [
    "experiment", "design", "direction", "layer", "head", "position", "depth", "logit_diff", "delta_logit_diff",
    "normalised_effect", "flip_rate", "p_io", "p_s", "n_pairs",
]
LAYER_METRICS = ("logit_diff", "normalised_effect", "flip_rate", "p_io")
METRICS = ("logit_diff", "delta_logit_diff", "normalised_effect", "flip_rate", "p_io", "p_s")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN with fewer than 3 points."""
    if len(x) < 3:
        return float("nan")
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    return float(np.corrcoef(rx, ry)[0, 1])


@dataclass(frozen=True)
class HeadGrid:
    """A metric over (layer, head); ``layers`` labels the rows (a sweep may cover a subset).

    Example::

        grid = result.head_grid("swap"); grid.values.shape  # (len(grid.layers), n_heads)
    """

    values: np.ndarray
    layers: tuple[int, ...]
    metric: str
    axes: tuple[str, str] = ("layer", "head")


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared like the other outputs
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(obj):
    """``obj`` with every NaN or infinite float replaced by None: results.json stays strict JSON."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def save_tables(out_dir: str | os.PathLike, record: dict, cells: pd.DataFrame) -> Path:
    """Write ``record`` as strict JSON (``results.json``) and ``cells`` as ``results.csv``, atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "results.json", json.dumps(_finite(record), indent=2, allow_nan=False) + "\n")
    _atomic_write(out / "results.csv", cells.to_csv(index=False))
    return out


def load_tables(out_dir: str | os.PathLike) -> tuple[dict, list[dict]]:
    """``results.json`` and the cells of ``results.csv`` (NaN read as None, layer and head as ints)."""
    out = Path(out_dir)
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    df = pd.read_csv(out / "results.csv").astype({"head": "Int64"})
    cells = [{k: (None if pd.isna(v) else v) for k, v in row.items()} for row in df.to_dict("records")]
    for c in cells:
        c["layer"], c["head"] = int(c["layer"]), None if c["head"] is None else int(c["head"])
    return data, cells


@dataclass
class RunRecord:
    """What every run's result holds: config, model, environment, baseline, cells, sanity checks, model shape.

    Example::

        result.passed, result.config["command"], result.sanity["no_hooks_left"]["detail"]
    """

    config: dict
    model: dict
    environment: dict
    baseline: dict
    cells: list[dict]
    sanity: dict
    n_layers: int
    n_heads: int
    layers: list[int]

    @property
    def passed(self) -> bool:
        """True when every sanity check passed."""
        return all(check["passed"] for check in self.sanity.values())


@dataclass
class IOIResult(RunRecord):
    """Everything one ``actpatch ioi`` run found: cells with named axes, baseline, sanity, analysis, provenance.

    Example::

        result = actpatch.run_ioi(n_pairs=8)
        result.to_dataframe()          # one row per cell: experiment, design, direction, layer, head, position, ...
        result.plot("heads", "swap")   # a matplotlib figure
        result.save("runs/x"); IOIResult.load("runs/x")
    """

    examples: list[dict] = field(default_factory=list)
    analysis: dict = field(default_factory=dict)   # head classes, gap account, path patching (actpatch.analysis.summary)
    pairs: dict[str, list[dict]] = field(default_factory=dict)  # every prompt pair, per design

    @property
    def designs(self) -> list[str]:
        return list(self.baseline["designs"])

    def to_dataframe(self) -> pd.DataFrame:
        df = pd.DataFrame(self.cells, columns=CELL_COLUMNS)
        return df.astype({"head": "Int64"})

    def head_grid(
        self, design: str, metric: str = "delta_logit_diff", *, experiment: str = "head", position: str = "all"
    ) -> HeadGrid:
        """A (layer, head) array of ``metric``: the exact single-head sweep (``experiment="head"``) or
        its gradient estimate (``"head_attribution"``), at all positions or one named position.
        Heads that were not patched (e.g. outside attribution's top-k) are NaN."""
        self._check_design(design)
        if metric not in METRICS:
            raise ConfigError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if not self.has(experiment, design):
            raise ConfigError(f"this result has no {experiment!r} cells for design {design!r}; it has "
                              f"{', '.join(sorted({c['experiment'] for c in self.cells if c['design'] == design}))} "
                              "(the single-head sweep needs head_sweep=True; head_attribution needs method "
                              "'attribution' or 'both')")
        grid = np.full((len(self.layers), self.n_heads), np.nan)
        row = {L: i for i, L in enumerate(self.layers)}
        for c in self.cells:
            if c["experiment"] == experiment and c["design"] == design and c["position"] == position:
                grid[row[c["layer"]], c["head"]] = c[metric]
        return HeadGrid(grid, tuple(self.layers), metric)

    def _check_design(self, design: str) -> None:
        if design not in self.designs:
            raise ConfigError(f"design {design!r} is not in this result; it has {', '.join(self.designs)}")

    def has(self, experiment: str, design: str) -> bool:
        return any(c["experiment"] == experiment and c["design"] == design for c in self.cells)

    def attribution_vs_exact(self, design: str) -> dict[str, object]:
        """Heads with both an exact and an attribution estimate (all positions), and their Spearman rank correlation."""
        self._check_design(design)
        if not (self.has("head", design) and self.has("head_attribution", design)):
            empty = np.zeros(0)
            return {"exact": empty, "attribution": empty, "n_heads": 0, "spearman": float("nan")}
        exact = self.head_grid(design).values.ravel()
        approx = self.head_grid(design, experiment="head_attribution").values.ravel()
        both = ~(np.isnan(exact) | np.isnan(approx))
        return {"exact": exact[both], "attribution": approx[both], "n_heads": int(both.sum()),
                "spearman": spearman(exact[both], approx[both])}

    def layer_records(self) -> list[dict]:
        """One record per swept layer: hidden-state and all-heads effects per design and position."""
        records = {L: {"layer": L, "depth": L / self.n_layers, "hidden": {}, "all_heads": {}} for L in self.layers}
        for c in self.cells:
            if c["experiment"] in ("hidden", "all_heads"):
                by_pos = records[c["layer"]][c["experiment"]].setdefault(c["design"], {})
                by_pos[c["position"]] = {m: c[m] for m in LAYER_METRICS}
        return list(records.values())

    def top_heads(self, design: str, k: int = 10, experiment: str = "head") -> list[dict]:
        """The ``k`` heads whose patch at all positions moves the logit difference most (largest |delta|)."""
        self._check_design(design)
        heads = [c for c in self.cells if c["experiment"] == experiment and c["design"] == design and c["position"] == "all"]
        return sorted(heads, key=lambda c: -abs(c["delta_logit_diff"]))[:k]

    def plot(self, kind: str = "layers", design: str | None = None, **kwargs):
        """A matplotlib figure of this result (nothing is written)::

            fig = result.plot()                        # hidden states vs heads per layer, every design
            fig = result.plot("heads", "abc")          # layer x head heatmap of the single-head sweep
            fig = result.plot("positions", "swap")     # layer x named position (needs by_position=True)

        ``kind``: layers, heads, heads_attribution, attribution, positions or heads_by_position;
        ``design`` defaults to the first donor design.
        """
        if kind not in PLOTTERS:
            raise ConfigError(f"plot kind must be one of {', '.join(PLOTTERS)}, got {kind!r}")
        design = design or self.designs[0]
        self._check_design(design)
        return PLOTTERS[kind](self, design, **kwargs)

    def to_json(self) -> dict:
        def grid(d: str, m: str, experiment: str = "head") -> list:
            return [[None if np.isnan(v) else float(v) for v in row] for row in self.head_grid(d, m, experiment=experiment).values]

        heads = {
            "position": "all", "layers": self.layers, "n_heads": self.n_heads,
            "designs": {
                d: {
                    **({m: grid(d, m) for m in ("logit_diff", "delta_logit_diff", "normalised_effect")}
                       if self.has("head", d) else {}),
                    **({"attribution_delta_logit_diff": grid(d, "delta_logit_diff", "head_attribution")}
                       if self.has("head_attribution", d) else {}),
                    **({"spearman_attribution_vs_exact": self.attribution_vs_exact(d)["spearman"]}
                       if self.has("head_attribution", d) and self.has("head", d) else {}),
                }
                for d in self.designs if self.has("head", d) or self.has("head_attribution", d)
            },
        }
        return {
            "baseline": self.baseline, "layers": self.layer_records(), "heads": heads, "sanity": self.sanity,
            "config": self.config, "model": self.model, "environment": self.environment,
            "examples": self.examples, "n_layers": self.n_layers, "n_heads": self.n_heads,
            "analysis": self.analysis, "pairs": self.pairs,
        }

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``results.json`` and ``results.csv`` into ``out_dir`` (created if needed)."""
        return save_tables(out_dir, self.to_json(), self.to_dataframe())

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "IOIResult":
        data, cells = load_tables(out_dir)
        for c in cells:
            # results saved by 0.1.0 named END "last" on layer cells
            c["position"] = POSITION_ALIASES.get(c["position"], c["position"])
        return cls(
            config=data["config"], model=data["model"], environment=data["environment"], baseline=data["baseline"],
            cells=cells, sanity=data["sanity"], n_layers=data["n_layers"], n_heads=data["n_heads"],
            layers=data["heads"]["layers"], examples=data.get("examples", []), analysis=data.get("analysis", {}),
            pairs=data.get("pairs", {}),
        )
