"""The cross-task comparison: the verdict from hand-made cells, and `actpatch compare --tasks` end to end."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from actpatch.cli import main
from actpatch.experiment.pairsresult import PairsResult
from actpatch.experiment.taskcompare import summarise


def _result(hidden: list[float], heads: list[float]) -> PairsResult:
    cells = [{"task": "t", "metric": "logprob", "experiment": family, "layer": L, "head": None, "position": pos,
              "depth": L / 4, "logprob": 0.0, "delta_logprob": 0.0, "normalised_effect": v if pos == "END" else 0.0,
              "n_pairs": 2}
             for family, values in (("hidden", hidden), ("all_heads", heads)) for L, v in enumerate(values)
             for pos in ("cue", "END")]
    base = {"recipient": {"mean_logprob": -1.0}, "donor": {"mean_logprob": -9.0}, "n_pairs": 2}
    return PairsResult(config={"task": "t", "design": "d", "metric": "logprob"}, model={}, environment={}, baseline=base,
                       cells=cells, sanity={}, n_layers=4, n_heads=2, layers=[0, 1, 2, 3])


@pytest.mark.parametrize("heads, verdict, flips", [([0.1, 0.2, 0.49, 0.0], "yes", "none"),
                                                    ([0.1, 0.6, 0.2, 0.0], "no", "1 (0.25)")])
def test_summary_row_says_where_each_flips(heads, verdict, flips):
    row = summarise(_result([0.2, 0.4, 0.7, 1.0], heads))
    assert row["heads_only_nudge"] == verdict and row["all_heads_flip_layers"] == flips
    assert row["hidden_first_flip"] == "layer 2 (depth 0.50) at END"
    assert summarise(_result([0.1] * 4, [0.1] * 4))["heads_only_nudge"] == "no flip at all"


def test_compare_tasks_writes_the_table_and_figure(gpt2_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--tasks", "sva", "induction", "--model", str(gpt2_dir), "--n-pairs", "2", "--out",
                 str(out), "--quiet"])
    assert code == 0
    table = pd.read_csv(out / "compare.csv")
    assert table.task.tolist() == ["sva", "induction"] and table.passed.all()
    assert table.metric.tolist() == ["logit_diff", "logprob"]
    assert (out / "compare.png").stat().st_size > 0 and "heads_only_nudge" in (out / "compare.md").read_text()
    assert [t["folder"] for t in json.loads((out / "compare.json").read_text())["tasks"]] == ["task-1", "task-2"]
    assert (out / "task-1" / "results.csv").exists()


def test_compare_needs_models_or_tasks(tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path / "x")]) == 2
    assert "--models" in capsys.readouterr().err
