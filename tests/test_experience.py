"""Researcher experience: result.plot(), the README's Python examples, --dry-run and --log-level."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import matplotlib
import pytest

from actpatch import ConfigError, plan_ioi, run_ioi
from actpatch.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_result_plot_kinds(tiny_lm):
    res = run_ioi(lm=tiny_lm, n_pairs=3, designs=("swap",), by_position=True, progress=False)
    for kind in ("layers", "heads", "heads_attribution", "attribution", "positions", "heads_by_position"):
        fig = res.plot(kind)
        assert isinstance(fig, matplotlib.figure.Figure) and fig.axes
        matplotlib.pyplot.close(fig)
    with pytest.raises(ConfigError, match="plot kind must be one of"):
        res.plot("nope")
    with pytest.raises(ConfigError, match="design 'abc' is not in this result"):
        res.plot("heads", "abc")
    # a typo or a missing sweep is an error, never a silent all-NaN grid or an empty list
    for call in (lambda: res.head_grid("abc"), lambda: res.top_heads("abc"), lambda: res.attribution_vs_exact("abc")):
        with pytest.raises(ConfigError, match="design 'abc' is not in this result"):
            call()
    with pytest.raises(ConfigError, match="metric must be one of"):
        res.head_grid("swap", metric="bogus")
    plain = run_ioi(lm=tiny_lm, n_pairs=3, designs=("swap",), head_sweep=False, method="exact", progress=False,
                    analysis=False)
    with pytest.raises(ConfigError, match="no 'head' cells for design 'swap'"):
        plain.head_grid("swap")
    with pytest.raises(ConfigError, match="by_position=True"):
        plain.plot("positions")
    assert plain.attribution_vs_exact("swap")["n_heads"] == 0


def test_readme_python_examples_run(tmp_path, monkeypatch):
    """Every ```python block of the README, in order, in one namespace (bundled model, offline)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)  # the examples save into runs/
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["result"].passed and (tmp_path / "runs" / "notebook" / "results.json").is_file()
    assert namespace["logits"].shape[0] == 4


def test_dry_run_plans_without_running(gpt2_dir, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["ioi", "--model", str(gpt2_dir), "--n-pairs", "3", "--donor", "swap", "abc", "--dry-run",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "nothing was run (--dry-run)" in text and "swap" in text and "abc" in text
    assert "sweeping layers 0-2" in text  # gpt2_dir has 3 layers
    assert not out.exists()
    from actpatch.cli import _layer_list

    assert _layer_list([20, 23]) == "layers 20, 23" and _layer_list([29]) == "layer 29"
    assert _layer_list([0, 1, 2, 3, 7, 9, 10]) == "layers 0-3, 7, 9, 10"
    plan = plan_ioi(model=str(gpt2_dir), n_pairs=3, designs=("swap",))
    d = plan["designs"]["swap"]
    # 3 layers x (hidden, all heads) x (all, END) + 3 x 4 single heads
    assert d["patches"] == 3 * 2 * 2 + 12 and d["pairs"] == 3 and 0 < d["forward_equivalents"] <= d["patches"]


def test_log_level_info_names_the_steps_and_is_removed_after(gpt2_dir, tmp_path, capsys):
    before = list(logging.getLogger("actpatch").handlers)
    assert main(["--log-level", "INFO", "ioi", "--model", str(gpt2_dir), "--n-pairs", "2", "--donor", "swap",
                 "--out", str(tmp_path / "o"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "actpatch INFO actpatch.experiment.experiments: loading" in err and "sweep 'swap'" in err
    assert logging.getLogger("actpatch").handlers == before
