"""The result of a contrastive-task run (``actpatch run``): cells with named axes, saved as JSON + CSV.

    result.to_dataframe()        # one row per cell: task, metric, experiment, layer, head, position, values
    result.layer_table()         # the headline: hidden state vs all heads per layer, one column per position
    result.save("runs/facts"); PairsResult.load("runs/facts")

The metric's own columns are ``<metric>``, ``delta_<metric>`` (``delta_logit_diff`` for the default) and
``normalised_effect`` ((patched - recipient) / (donor - recipient) on means: 0 = unchanged, 1 = donor; for
``kl``, KL(patched) / KL(donor)); pairs with answers add ``logit_diff``, ``flip_rate``, ``p_answer``, ``p_wrong``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .results import RunRecord, load_tables, save_tables

ID_COLUMNS = ["task", "metric", "experiment", "layer", "head", "position", "depth"]


@dataclass
class PairsResult(RunRecord):
    """Everything one ``actpatch run`` found: cells, baseline, sanity checks and provenance.

    Example::

        result = run_pairs(pairs_file="facts.jsonl"); result.passed, result.to_dataframe()
    """

    pairs: list[dict] = field(default_factory=list)
    generations: list[dict] = field(default_factory=list)  # --generate: what the patched recipient says

    @property
    def metric(self) -> str:
        return self.config["metric"]

    @property
    def delta(self) -> str:
        """The column of the change the metric measures: ``delta_logit_diff`` for the default metric."""
        return "delta_logit_diff" if self.metric == "logit_diff" else f"delta_{self.metric}"

    def to_dataframe(self) -> pd.DataFrame:
        df = pd.DataFrame(self.cells)
        order = ID_COLUMNS + [c for c in df.columns if c not in ID_COLUMNS]
        return df[[c for c in order if c in df.columns]].astype({"head": "Int64"})

    def layer_table(self, value: str | None = None) -> pd.DataFrame:
        """(layer) x (experiment, position) of ``value`` (default: the metric) for hidden states and all heads."""
        df = self.to_dataframe()
        df = df[df.experiment.isin(["hidden", "all_heads"])]
        return df.pivot_table(index="layer", columns=["experiment", "position"], values=value or self.metric, sort=False)

    def head_grid(self, position: str, value: str | None = None) -> pd.DataFrame:
        """(layer) x (head) of ``value`` (default: the metric's delta) for single heads at ``position``."""
        df = self.to_dataframe()
        df = df[(df.experiment == "head") & (df.position == position)]
        return df.pivot_table(index="layer", columns="head", values=value or self.delta)

    def to_json(self) -> dict:
        return {"config": self.config, "model": self.model, "environment": self.environment, "baseline": self.baseline,
                "sanity": self.sanity, "n_layers": self.n_layers, "n_heads": self.n_heads, "layers": self.layers,
                "pairs": self.pairs, "generations": self.generations}

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``results.json`` and ``results.csv`` into ``out_dir`` (created if needed)."""
        return save_tables(out_dir, self.to_json(), self.to_dataframe())

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "PairsResult":
        data, cells = load_tables(out_dir)
        return cls(cells=cells, generations=data.get("generations", []),
                   **{k: data[k] for k in ("config", "model", "environment", "baseline", "sanity", "n_layers", "n_heads",
                                           "layers", "pairs")})
