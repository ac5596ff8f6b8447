"""The IOI experiment, report and CLI end to end on tiny models (GPT-2 with its real tokenizer)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model

import actpatch
from actpatch import HeadSite, HiddenSite, IOIResult, count_hooks, run_ioi, wrap_model
from actpatch.cli import main


@pytest.fixture(scope="module")
def result(tiny_lm):
    return run_ioi(lm=tiny_lm, n_pairs=6, designs=("swap", "abc", "s2io"), progress=False)


def test_result_structure(result, tiny_lm):
    a = tiny_lm.adapter
    assert result.passed, result.sanity
    expected_checks = {"hooks_transparent", "self_patch_identity", "patch_writes_exactly", "donor_differs_from_recipient",
                       "hidden_patch_reproduces_donor", "head_decomposition", "end_logits_match_full_forward",
                       "fast_path_matches_reference", "gap_matches_forward", "path_patch_identity",
                       "dla_matches_attention_output", "no_hooks_left"}
    assert set(result.sanity) == expected_checks
    df = result.to_dataframe()
    exact = df[df.experiment.isin(["hidden", "all_heads", "head"])]
    # per design: 2 experiments x 2 positions per layer + one cell per head
    assert len(exact) == 3 * (4 * a.n_layers + a.n_layers * a.n_heads)
    # attribution (default method "both"): every head and hidden state, all positions + 5 named positions
    assert len(df) - len(exact) == 3 * 6 * (a.n_layers * a.n_heads + a.n_layers)
    assert set(df.design) == {"swap", "abc", "s2io"}
    assert result.head_grid("abc").values.shape == (a.n_layers, a.n_heads)
    assert count_hooks(tiny_lm.model) == 0


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt_neo", "gemma3"])
def test_every_architecture_passes_the_sanity_checks(arch, gpt2_tokenizer):
    """NeoX (parallel residual), Neo (blocks return tuples) and Gemma 3 (head_dim != d/H, soft-capped logits)."""
    lm = wrap_model(tiny_model(arch), gpt2_tokenizer)
    res = run_ioi(lm=lm, n_pairs=4, designs=("abc",), by_position=True, progress=False)
    assert res.passed, {k: v["detail"] for k, v in res.sanity.items() if not v["passed"]}
    df = res.to_dataframe()
    exact = df[df.experiment.isin(["hidden", "all_heads", "head"])]
    # the sweep's numbers are recomputed here one full forward pass per cell (the simple reference path)
    import actpatch

    batch = actpatch.tokenize_ioi(gpt2_tokenizer, actpatch.generate_pairs(gpt2_tokenizer, 4, designs=("abc",))["abc"])
    a = lm.adapter
    donor, _ = actpatch.capture(lm, batch.donor_ids, batch, [HeadSite(L) for L in range(a.n_layers)] + [HiddenSite(L) for L in range(a.n_layers)])
    for row in exact.sample(12, random_state=0).itertuples():
        pos = {"all": None}.get(row.position, row.position)
        site = HiddenSite(row.layer, pos) if row.experiment == "hidden" else HeadSite(
            row.layer, None if row.experiment == "all_heads" else int(row.head), pos)
        ref = actpatch.logit_diff(actpatch.run_chunk(lm, batch, donor, [[site]])[0], batch.answer_ids, batch.wrong_ids)
        # stacked variants + prefix reuse vs one plain forward: float32 summation order only
        assert abs(float(ref.mean()) - row.logit_diff) < 1e-5
    assert count_hooks(lm.model) == 0


def test_attribution_method_rechecks_top_k_and_by_position(tiny_lm):
    res = run_ioi(lm=tiny_lm, n_pairs=4, designs=("swap",), method="attribution", top_k=3, by_position=True,
                  progress=False)
    assert res.passed
    df = res.to_dataframe()
    exact_heads = df[(df.experiment == "head") & (df.position == "all")]
    assert len(exact_heads) == 3
    att = res.head_grid("swap", experiment="head_attribution").values
    top3 = sorted(abs(att.ravel()))[-3:]
    assert sorted(abs(att[int(r.layer), int(r.head)]) for r in exact_heads.itertuples()) == top3
    # by position: every named position of every exact head and layer
    assert set(df[df.experiment == "head"].position) == {"all", "IO", "S1", "S1+1", "S2", "END"}
    assert set(df[df.experiment == "hidden"].position) == {"all", "END", "IO", "S1", "S1+1", "S2"}
    cmp = res.attribution_vs_exact("swap")
    assert cmp["n_heads"] == 3


def test_hidden_all_positions_is_donor_in_numbers(result):
    df = result.to_dataframe()
    for design, base in result.baseline["designs"].items():
        sel = df[(df.design == design) & (df.experiment == "hidden") & (df.position == "all")]
        # the patched run IS the donor run from that layer on; batching variants reorders float sums (1e-5)
        assert sel.logit_diff.sub(base["donor"]["mean_logit_diff"]).abs().max() < 1e-5


def test_json_contract_and_roundtrip(result, tmp_path):
    result.save(tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert {"baseline", "layers", "heads", "sanity", "config"} <= set(data)
    assert {"accuracy", "mean_logit_diff"} <= set(data["baseline"])
    layer0 = data["layers"][0]
    assert set(layer0["hidden"]["swap"]) == {"all", "END"}
    assert {"logit_diff", "normalised_effect"} <= set(layer0["all_heads"]["abc"]["END"])
    assert data["sanity"]["patch_writes_exactly"]["passed"] is True
    loaded = IOIResult.load(tmp_path)
    assert loaded.to_dataframe().equals(result.to_dataframe())
    assert loaded.baseline == json.loads(json.dumps(result.baseline))


def test_library_leaves_global_rng_alone(tiny_lm):
    py_state, torch_state = random.getstate(), torch.random.get_rng_state()
    run_ioi(lm=tiny_lm, n_pairs=2, designs=("swap",), head_sweep=False, progress=False)
    assert random.getstate() == py_state and torch.equal(torch.random.get_rng_state(), torch_state)


def test_same_seed_same_numbers(tiny_lm):
    kw = dict(lm=tiny_lm, n_pairs=3, designs=("abc",), progress=False, head_sweep=False)
    assert run_ioi(seed=5, **kw).cells == run_ioi(seed=5, **kw).cells


def test_silent_noop_patch_is_caught(tiny_lm, monkeypatch):
    """If the patch hook silently did nothing, the sanity checks fail instead of reporting numbers."""
    import actpatch.engine.patching as patching

    monkeypatch.setattr(patching, "_patch_fn", lambda *a, **k: (lambda act: None))
    bad = run_ioi(lm=tiny_lm, n_pairs=3, designs=("swap",), head_sweep=False, progress=False)
    assert not bad.passed
    assert not bad.sanity["patch_writes_exactly"]["passed"]
    assert not bad.sanity["hidden_patch_reproduces_donor"]["passed"]


def test_cli_writes_report_folder(gpt2_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["ioi", "--model", str(gpt2_dir), "--n-pairs", "4", "--donor", "swap", "abc", "--out", str(out), "--quiet"])
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert {"results.json", "results.csv", "report.md", "config.json", "layers.png", "heads_swap.png", "heads_abc.png"} <= names
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["command"].startswith("actpatch ioi --model")
    assert data["model"]["source"] == "local" and data["model"]["architecture"] == "gpt2"
    report = (out / "report.md").read_text()
    assert "Sanity checks: **PASSED**" in report and "## Findings, donor design `abc`" in report
    for name in ("patch_writes_exactly", "donor_differs_from_recipient", "dla_matches_attention_output",
                 "gap_matches_forward", "path_patch_identity"):
        assert f"| {name}" in report  # the sanity table names the checks
    assert (out / "layers.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_refuses_nonempty_out_and_bad_layers(gpt2_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["ioi", "--model", str(gpt2_dir), "--out", str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    code = main(["ioi", "--model", str(gpt2_dir), "--out", str(tmp_path / "new"), "--layers", "9"])
    assert code == 2 and "layers (--layers) must be ints in [0, 2]" in capsys.readouterr().err


def test_cli_pairs_file(gpt2_dir, tmp_path):
    lines = [
        {"recipient": "When Mary and John went to the store, John gave a drink to",
         "donor": "When Mary and John went to the store, Mary gave a drink to", "answer": " Mary", "wrong": " John"},
        {"recipient": "Then, Sarah and Paul had fun. Paul gave a ring to",
         "donor": "Then, Kate and Adam had fun. Eric gave a ring to", "answer": " Sarah", "wrong": " Paul"},
    ]
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "run"
    assert main(["ioi", "--model", str(gpt2_dir), "--pairs-file", str(f), "--out", str(out), "--quiet"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert list(data["baseline"]["designs"]) == ["file"] and data["baseline"]["n_pairs"] == 2


def test_cli_bad_pairs_file_line_number(gpt2_dir, tmp_path, capsys):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"recipient": "a", "donor": "b", "answer": " A", "wrong": " B"}\n{not json\n')
    assert main(["ioi", "--model", str(gpt2_dir), "--pairs-file", str(f), "--out", str(tmp_path / "o")]) == 2
    assert "line 2" in capsys.readouterr().err


def test_help_documents_every_option():
    out = subprocess.run([sys.executable, "-m", "actpatch.cli", "ioi", "--help"], capture_output=True, text=True, check=True).stdout
    for opt in ("--model", "--n-pairs", "--pairs-file", "--donor", "--seed", "--out", "--device", "--dtype", "--layers",
                "--no-head-sweep", "--max-batch", "--quiet", "--overwrite", "--method", "--top-k", "--by-position"):
        assert opt in out


def test_public_api_is_declared():
    import inspect

    public = sorted(n for n in dir(actpatch) if not n.startswith("_") and not inspect.ismodule(getattr(actpatch, n)))
    assert sorted(actpatch.__all__) == public
    assert all(getattr(actpatch, n).__doc__ for n in actpatch.__all__ if callable(getattr(actpatch, n)))
    no_example = [n for n in actpatch.__all__ if callable(getattr(actpatch, n)) and "Example::" not in getattr(actpatch, n).__doc__]
    assert not no_example, f"public names without a usage example in their docstring: {no_example}"


@pytest.mark.parametrize("n_layer,n_head,n_embd", [(12, 12, 768), (24, 16, 1024)], ids=["gpt2-small", "gpt2-medium"])
def test_gpt2_shapes_with_real_tokenizer(gpt2_tokenizer, n_layer, n_head, n_embd):
    """GPT-2 small / medium shapes with random weights: adapter, IOI positions, patches and sanity checks."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    cfg._attn_implementation = "eager"
    lm = wrap_model(GPT2LMHeadModel(cfg).eval(), gpt2_tokenizer)
    assert (lm.adapter.n_layers, lm.adapter.n_heads, lm.adapter.d_head) == (n_layer, n_head, 64)
    assert lm.adapter.attn_out(0) is lm.model.transformer.h[0].attn.c_proj
    res = run_ioi(lm=lm, n_pairs=2, designs=("swap",), layers=(0, n_layer // 2, n_layer - 1), head_sweep=False,
                  progress=False)
    assert res.passed, res.sanity


def test_report_flags_heads_where_attribution_misses():
    from actpatch.report.markdown import _attribution_misses

    cells = []
    for L in range(2):
        for h in range(2):
            exact = -4.0 if (L, h) == (1, 0) else 0.1 * h
            approx = 0.2 if (L, h) == (1, 0) else 0.1 * h
            for experiment, value in (("head", exact), ("head_attribution", approx)):
                cells.append({"experiment": experiment, "design": "swap", "layer": L, "head": h, "position": "all",
                              "delta_logit_diff": value})
    res = IOIResult(config={}, model={}, environment={}, baseline={"designs": {"swap": {}}}, cells=cells, sanity={},
                    n_layers=2, n_heads=2, layers=[0, 1])
    assert _attribution_misses(res, "swap") == ["L1H0 (exact -4.00, attribution +0.20)"]


def test_both_directions_are_recorded_side_by_side(tiny_lm):
    res = run_ioi(lm=tiny_lm, n_pairs=3, designs=("swap",), direction="both", head_sweep=False, progress=False)
    assert res.passed
    assert res.designs == ["swap", "swap-denoise"]
    df = res.to_dataframe()
    assert set(df.direction) == {"noising", "denoising"}
    assert set(df[df.design == "swap-denoise"].direction) == {"denoising"}
    noise, denoise = (res.baseline["designs"][d] for d in ("swap", "swap-denoise"))
    # the same prompts, roles exchanged: recipient of one direction is the donor of the other (same tokens, same LD)
    assert noise["recipient"]["mean_logit_diff"] == denoise["donor"]["mean_logit_diff"]
    assert noise["donor"]["mean_logit_diff"] == denoise["recipient"]["mean_logit_diff"]


def test_overwrite_removes_the_previous_runs_stale_files_only(gpt2_dir, tmp_path):
    """A rerun with fewer outputs must not leave the earlier run's plots beside the new results."""
    out = tmp_path / "run"
    base = ["ioi", "--model", str(gpt2_dir), "--n-pairs", "3", "--out", str(out), "--quiet", "--no-analysis"]
    assert main(base + ["--donor", "swap", "abc"]) == 0
    assert (out / "heads_abc.png").is_file()
    (out / "my_notes.txt").write_text("mine")
    assert main(base + ["--donor", "swap", "--no-head-sweep", "--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "heads_abc.png" not in names and "heads_swap.png" not in names
    assert "my_notes.txt" in names and "results.json" in names
    assert set(json.loads((out / "config.json").read_text())["files"]) == names - {"my_notes.txt"}
    assert oct((out / "results.json").stat().st_mode & 0o777) == oct(0o644)


def test_results_json_is_strict_json_even_with_nan(tiny_lm, tmp_path):
    """One head re-checked exactly: Spearman over < 3 heads is NaN, saved as null (strict parsers reject NaN)."""
    res = run_ioi(lm=tiny_lm, n_pairs=3, designs=("swap",), layers=(2,), method="attribution", top_k=1,
                  progress=False, analysis=False)
    res.save(tmp_path)

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    data = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert data["heads"]["designs"]["swap"]["spearman_attribution_vs_exact"] is None
