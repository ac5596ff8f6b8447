"""What ``actpatch circuit`` found: edge scores, the chosen circuit, faithfulness curves, checks and stability.

    result = run_circuit(task="ioi", method="eap-ig")
    result.edges_frame()        # sender, receiver, input, score (an estimate: attribution)
    result.faithfulness_frame() # method, size, edges, nodes, metric, faithfulness, per-pair quartiles
    result.areas()              # the area under each curve (log size from the empty circuit to the whole graph)
    result.circuit              # {"edges": [[sender, receiver, input, score], ...], "nodes": [...], ...}
    result.save("runs/circuit"); CircuitResult.load("runs/circuit")

Files: ``edges.csv``, ``circuit.json``, ``faithfulness.csv`` and ``results.json`` (config, model, environment,
baseline, checks, attribution check, stability).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..analysis.circuits import curve_area
from .results import _atomic_write, _finite


@dataclass
class CircuitResult:
    """One circuit run. ``edges``: every edge's score; ``faithfulness``: one row per evaluated circuit.

    Example::

        result = run_circuit(task="ioi"); result.passed, result.circuit["n_edges"], result.smallest_faithful
    """

    config: dict
    model: dict
    environment: dict
    baseline: dict
    edges: list[dict]
    circuit: dict
    faithfulness: list[dict]
    sanity: dict
    attribution_check: dict
    stability: dict = field(default_factory=dict)
    graph: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when every sanity check passed."""
        return all(check["passed"] for check in self.sanity.values())

    @property
    def smallest_faithful(self) -> dict | None:
        """The smallest circuit of the run's method whose faithfulness reached the target, or None."""
        return self.circuit.get("smallest_faithful")

    def edges_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.edges, columns=["sender", "receiver", "input", "score"])

    def faithfulness_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.faithfulness)

    def areas(self) -> pd.DataFrame:
        """Area under each faithfulness curve (``analysis.circuits.curve_area``): method, select, area."""
        n = int(self.graph.get("n_edges") or 0)
        rows = [{"method": m, "select": s, "area": curve_area(part.edges, part.faithfulness, n)}
                for (m, s), part in self.faithfulness_frame().groupby(["method", "select"], sort=False)] if n else []
        return pd.DataFrame(rows, columns=["method", "select", "area"])

    def to_json(self) -> dict:
        return {"config": self.config, "model": self.model, "environment": self.environment, "baseline": self.baseline,
                "sanity": self.sanity, "attribution_check": self.attribution_check, "stability": self.stability,
                "graph": self.graph}

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``results.json``, ``edges.csv``, ``circuit.json`` and ``faithfulness.csv`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / "results.json", json.dumps(_finite(self.to_json()), indent=2, allow_nan=False) + "\n")
        _atomic_write(out / "circuit.json", json.dumps(_finite(self.circuit), indent=2, allow_nan=False) + "\n")
        _atomic_write(out / "edges.csv", self.edges_frame().to_csv(index=False))
        _atomic_write(out / "faithfulness.csv", self.faithfulness_frame().to_csv(index=False))
        return out

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "CircuitResult":
        out = Path(out_dir)
        data = json.loads((out / "results.json").read_text(encoding="utf-8"))
        circuit = json.loads((out / "circuit.json").read_text(encoding="utf-8"))
        edges = pd.read_csv(out / "edges.csv", keep_default_na=False).to_dict("records")
        faith = pd.read_csv(out / "faithfulness.csv").to_dict("records")
        return cls(edges=edges, circuit=circuit, faithfulness=faith, **data)
