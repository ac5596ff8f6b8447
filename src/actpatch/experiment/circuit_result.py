"""What ``actpatch circuit`` found: edge scores, the chosen circuit, faithfulness curves, checks and stability.

    result = run_circuit(task="ioi", method="eap-ig")
    result.edges_frame()        # sender, receiver, input, score (an estimate: attribution)
    result.faithfulness_frame() # method, size, edges, nodes, metric, faithfulness, per-pair quartiles
    result.benchmark_scores()   # CPR and CMD of each curve (MIB: edge fractions 0.1% .. 100%, trapezoids)
    result.side_by_side()       # faithfulness per method at equal edge counts, CPR, CMD (``--compare``)
    result.circuit              # {"edges": [[sender, receiver, input, score], ...], "nodes": [...], ...}
    result.save("runs/circuit"); CircuitResult.load("runs/circuit")

Files: ``edges.csv``, ``circuit.json``, ``faithfulness.csv`` and ``results.json`` (config, model, environment,
baseline, checks, attribution check, stability, and each curve's CPR and CMD).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..analysis.mib_scores import MIB_FRACTIONS, cpr_cmd
from .method_comparison import grid_scores, side_by_side
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

    def benchmark_scores(self) -> pd.DataFrame:
        """CPR and CMD (``analysis.mib_scores``) of each curve: method, select, grid, cpr, cmd. Edge curves use the
        MIB grid (NaN where the curve does not cover it: exact patching of candidates); the node-level curve is
        scored on its own grid, the fraction of heads kept."""
        frame, rows = self.faithfulness_frame(), []
        if frame.empty or "fraction" not in frame:
            return pd.DataFrame(columns=["method", "select", "grid", "cpr", "cmd"])
        for (m, s), part in frame.groupby(["method", "select"], sort=False):
            if m == "nodes":
                cpr, cmd = cpr_cmd(part.fraction, part.faithfulness)
                rows.append({"method": m, "select": s, "grid": "fraction of heads", "cpr": cpr, "cmd": cmd})
                continue
            cpr, cmd = grid_scores(part)
            rows.append({"method": m, "select": s, "grid": f"MIB ({int((part.grid == True).sum())} of "  # noqa: E712
                         f"{len(MIB_FRACTIONS)} points)", "cpr": cpr, "cmd": cmd})
        return pd.DataFrame(rows, columns=["method", "select", "grid", "cpr", "cmd"])

    def side_by_side(self) -> pd.DataFrame:
        """Faithfulness of every method's circuit at each MIB edge fraction, then CPR and CMD (``--compare``)."""
        return side_by_side(self.faithfulness_frame(), int(self.graph.get("n_edges") or 0))

    def to_json(self) -> dict:
        return {"config": self.config, "model": self.model, "environment": self.environment, "baseline": self.baseline,
                "sanity": self.sanity, "attribution_check": self.attribution_check, "stability": self.stability,
                "graph": self.graph}

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``results.json``, ``edges.csv``, ``circuit.json`` and ``faithfulness.csv`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        data = {**self.to_json(), "benchmark_scores": self.benchmark_scores().to_dict("records")}  # derived: CPR, CMD
        _atomic_write(out / "results.json", json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")
        _atomic_write(out / "circuit.json", json.dumps(_finite(self.circuit), indent=2, allow_nan=False) + "\n")
        _atomic_write(out / "edges.csv", self.edges_frame().to_csv(index=False))
        _atomic_write(out / "faithfulness.csv", self.faithfulness_frame().to_csv(index=False))
        return out

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "CircuitResult":
        out = Path(out_dir)
        data = json.loads((out / "results.json").read_text(encoding="utf-8"))
        data.pop("benchmark_scores", None)  # recomputed from faithfulness.csv
        circuit = json.loads((out / "circuit.json").read_text(encoding="utf-8"))
        edges = pd.read_csv(out / "edges.csv", keep_default_na=False).to_dict("records")
        faith = pd.read_csv(out / "faithfulness.csv").to_dict("records")
        return cls(edges=edges, circuit=circuit, faithfulness=faith, **data)
