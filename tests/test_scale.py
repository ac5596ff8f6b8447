"""Streaming pairs in chunks: the same numbers as one chunk, activations never held for more pairs than a chunk."""

from __future__ import annotations

import math

import pytest
import torch

import actpatch.experiment.sweeps as sweeps
from actpatch import run_ioi
from actpatch.cli import main, memory_size
from actpatch.engine.planning import pair_bytes, pair_chunk


def _budget_for(lm, pairs_per_chunk: int, width: int = 20) -> int:
    return 4 * pairs_per_chunk * pair_bytes(lm, width) + 3


@pytest.fixture(scope="module")
def runs(tiny_lm):
    kw = dict(lm=tiny_lm, n_pairs=7, designs=("swap", "s2io"), by_position=True, progress=False)
    one = run_ioi(**kw, max_memory=2**34)
    assert min(one.config["pair_chunks"].values()) >= 7, "the reference run holds every pair in one chunk"
    return one, run_ioi(**kw, max_memory=_budget_for(tiny_lm, 2))


def test_chunked_runs_give_the_numbers_of_one_chunk(runs):
    one, chunked = runs
    assert chunked.config["pair_chunks"] == {"swap": 2, "s2io": 2} and one.passed and chunked.passed
    a, b = one.to_dataframe(), chunked.to_dataframe()
    assert a[["experiment", "design", "layer", "head", "position", "n_pairs"]].equals(
        b[["experiment", "design", "layer", "head", "position", "n_pairs"]])
    # chunks stack other rows into each forward pass and trim padding: float summation order only, 1e-5
    for col in ("logit_diff", "delta_logit_diff", "p_io", "p_s", "flip_rate"):
        torch.testing.assert_close(torch.tensor(b[col].values), torch.tensor(a[col].values), rtol=1e-5, atol=1e-5,
                                   equal_nan=True, msg=col)
    assert one.baseline["designs"].keys() == chunked.baseline["designs"].keys()
    for design, base in one.baseline["designs"].items():
        for side in ("recipient", "donor"):
            for key, value in base[side].items():
                assert math.isclose(chunked.baseline["designs"][design][side][key], value, rel_tol=1e-5, abs_tol=1e-6), key


def test_chunked_analysis_equals_one_chunk(runs):
    one, chunked = runs
    for key in ("dla", "copy", "neg_copy"):
        torch.testing.assert_close(torch.tensor(chunked.analysis["heads"][key]), torch.tensor(one.analysis["heads"][key]),
                                   rtol=0, atol=2e-4, msg=key)  # rounded to 4 decimals when saved
    for design, info in one.analysis["designs"].items():
        other = chunked.analysis["designs"][design]
        for ra, rb in zip(info["gap"], other["gap"]):
            for key, value in ra.items():
                assert math.isclose(rb[key], value, rel_tol=1e-4, abs_tol=1e-5), (design, key)
        for pa, pb in zip(info["paths"], other["paths"]):
            assert math.isclose(pb["logit_diff"], pa["logit_diff"], rel_tol=1e-4, abs_tol=1e-5)
    assert "chunks of pairs" in chunked.sanity["fast_path_matches_reference"]["detail"]


def test_no_activation_is_held_for_more_pairs_than_a_chunk(tiny_lm, monkeypatch):
    """Every capture (donor and recipient caches) and every recorded recipient state covers at most one chunk."""
    seen = []
    original = sweeps.capture

    def spy(lm, ids, batch, sites):
        seen.append(ids.shape[0])
        return original(lm, ids, batch, sites)

    monkeypatch.setattr(sweeps, "capture", spy)
    run = run_ioi(lm=tiny_lm, n_pairs=9, designs=("abc",), progress=False, max_memory=_budget_for(tiny_lm, 3))
    assert run.passed and len(run.pairs["abc"]) == 9
    assert seen and max(seen) == 3 and sum(seen) == 3 * 9  # attribution pass + recipient + donor, 3 pairs each


def test_pair_chunk_grows_with_the_budget(tiny_lm):
    small, large = pair_chunk(tiny_lm, 20, _budget_for(tiny_lm, 2)), pair_chunk(tiny_lm, 20, _budget_for(tiny_lm, 50))
    assert (small, large) == (2, 50) and pair_chunk(tiny_lm, 20, 1) == 1  # never fewer than one pair


@pytest.mark.parametrize("text,expected", [("2GB", 2 * 10**9), ("1.5GiB", int(1.5 * 2**30)), ("512MiB", 512 * 2**20),
                                           ("800M", 800 * 10**6), ("4096", 4096)])
def test_max_memory_sizes(text, expected):
    assert memory_size(text) == expected


def test_bad_max_memory_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["ioi", "--max-memory", "lots"])
    assert exit_.value.code == 2 and "expected a size such as 2GB" in capsys.readouterr().err


def test_one_progress_bar_covers_the_whole_run(tiny_lm, capsys):
    run_ioi(lm=tiny_lm, n_pairs=5, designs=("swap", "abc"), progress=True, analysis=False, method="exact",
            max_memory=_budget_for(tiny_lm, 2))
    err = capsys.readouterr().err
    n = 2 * 3 * (2 * 2 * 3 + 3 * 4)  # designs x chunks x (layer cells + head cells)
    assert f"{n}/{n}" in err and "abc 3/3" in err


def test_rows_of_full_vocabulary_logits_are_capped(tiny_lm):
    """A pass of END patches computes one position per row: a token cap alone would stack rows of logits
    without bound. With full logits every pass stays within ``logit_rows``; reading two columns, it need not."""
    from actpatch import HeadSite, generate_pairs, tokenize_ioi
    from actpatch.engine.planning import logit_rows, plan_sweep

    batch = tokenize_ioi(tiny_lm.tokenizer, generate_pairs(tiny_lm.tokenizer, 5, designs=("abc",))["abc"])
    variants = [[HeadSite(L, h, "END")] for L in range(3) for h in range(4)]
    budget = 2 * 10 * 50257 * (4 + 8)  # ten rows of float32 logits (and the metrics' copies) in half of it
    assert logit_rows(tiny_lm, budget) == 10
    capped, _ = plan_sweep(tiny_lm, batch, variants, budget=budget)
    assert max(len(c) for c in capped.chunks) * len(batch) <= 10
    columns, _ = plan_sweep(tiny_lm, batch, variants, budget=budget, full_logits=False)
    assert len(columns.chunks) < len(capped.chunks)
