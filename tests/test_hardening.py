"""Hardening: variable-length batches, bad input, NaN, interruption and --resume, determinism, safe loading."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model

from actpatch import (
    HeadSite, HiddenSite, NumericalError, ResumeError, SiteError, capture, count_hooks, generate_pairs,
    patch_variants, run_ioi, tokenize_ioi, wrap_model,
)
from actpatch.engine.checkpoint import Checkpoint, sweep_fingerprint
from actpatch.cli import main
from actpatch.errors import ModelLoadError
from actpatch.engine.metrics import ioi_scores
from actpatch.model.models import load_model

# Batched vs one-pair-at-a-time: different matmul shapes change float32 summation order only.
RTOL, ATOL = 1e-5, 1e-5


def _variants(lm):
    a = lm.adapter
    out = [[HiddenSite(L)] for L in range(a.n_layers)] + [[HeadSite(L)] for L in range(a.n_layers)]
    out += [[HeadSite(L, h)] for L in range(a.n_layers) for h in range(a.n_heads)]
    out += [[HiddenSite(1, "S2")], [HeadSite(1, 0, "END")], [HeadSite(0, 2, "IO")], [HiddenSite(0, 3)]]
    return out


def _sites(lm):
    return [HeadSite(L) for L in range(lm.adapter.n_layers)] + [HiddenSite(L) for L in range(lm.adapter.n_layers)]


def _sweep(lm, batch, variants, **kw):
    donor, _ = capture(lm, batch.donor_ids, batch, _sites(lm))
    return patch_variants(lm, batch, donor, variants, lambda lg: ioi_scores(lg, batch.answer_ids, batch.wrong_ids),
                          donor_from_batch=True, **kw)


def batched_equals_single(lm, n_pairs: int, variants, tol: float = ATOL) -> None:
    pairs = generate_pairs(lm.tokenizer, n_pairs, designs=("swap",), seed=3)["swap"]
    batch = tokenize_ioi(lm.tokenizer, pairs)
    lengths = batch.attention_mask.sum(1)
    assert len(set(lengths.tolist())) > 1, "the test needs prompts of different lengths in one batch"
    together = _sweep(lm, batch, variants)
    for i, pair in enumerate(pairs):
        alone = _sweep(lm, tokenize_ioi(lm.tokenizer, [pair]), variants)
        for key in ("logit_diff", "p_io"):
            torch.testing.assert_close(together[key][:, i], alone[key][:, 0], rtol=RTOL, atol=tol)


def test_variable_length_batch_equals_one_pair_at_a_time(tiny_lm):
    """Right padding with per-row END: every row's numbers equal its own single-pair run (GPT-2 and Llama)."""
    batched_equals_single(tiny_lm, 4, _variants(tiny_lm))


def test_donor_of_other_length_is_a_clear_error(tiny_lm):
    from actpatch import DataError, PromptPair

    pair = PromptPair("When Mary and John went to the store, John gave a drink to",
                      "When Mary and John went to the big old store, Mary gave a drink to", " Mary", " John", "file")
    with pytest.raises(DataError, match="equal lengths"):
        tokenize_ioi(tiny_lm.tokenizer, [pair])


def test_out_of_range_sites_are_site_errors(tiny_lm):
    pairs = generate_pairs(tiny_lm.tokenizer, 2, designs=("swap",))["swap"]
    batch = tokenize_ioi(tiny_lm.tokenizer, pairs)
    donor, _ = capture(tiny_lm, batch.donor_ids, batch, _sites(tiny_lm))
    for bad, text in [(HeadSite(0, 99), "head"), (HeadSite(7, 0), "layer"), (HiddenSite(0, 999), "position"),
                      (HiddenSite(0, -999), "position"), (HiddenSite(0, "NOPE"), "NOPE")]:
        with pytest.raises(SiteError, match=text):
            _sweep(tiny_lm, batch, [[bad]])
    assert count_hooks(tiny_lm.model) == 0


def _nan_model(arch: str, gpt2_tokenizer, layer: int):
    model = tiny_model(arch)
    mlp = model.transformer.h[layer].mlp.c_fc if arch == "gpt2" else model.model.layers[layer].mlp.up_proj
    with torch.no_grad():
        mlp.weight[0].fill_(float("nan"))
    return wrap_model(model, gpt2_tokenizer, {"spec": f"nan-{arch}"})


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_nan_in_logits_names_the_first_layer(arch, gpt2_tokenizer):
    lm = _nan_model(arch, gpt2_tokenizer, layer=1)
    with pytest.raises(NumericalError, match=r"first appear in layer 1 \(its block output\)"):
        run_ioi(lm=lm, n_pairs=2, designs=("swap",), progress=False)
    assert count_hooks(lm.model) == 0


def _pairs_file(tmp_path: Path, content: bytes | str, name: str = "pairs.jsonl") -> Path:
    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    return f


GOOD = {"recipient": "When Mary and John went to the store, John gave a drink to",
        "donor": "When Mary and John went to the store, Mary gave a drink to", "answer": " Mary", "wrong": " John"}


def _bad_inputs(tmp_path: Path, gpt2_dir: Path) -> dict[str, tuple[list[str], str]]:
    huge = tmp_path / "huge.jsonl"
    with open(huge, "wb") as fh:  # sparse: 300 MiB that take no disk
        fh.truncate(300 * 2**20)
    a_file = _pairs_file(tmp_path, "x", "plain.txt")
    return {
        "multi-token answer": (["--pairs-file", str(_pairs_file(tmp_path, json.dumps({**GOOD, "answer": " Maryanne-Louise"}), "m.jsonl"))],
                               "must be exactly one token"),
        "answer missing": (["--pairs-file", str(_pairs_file(tmp_path, json.dumps({k: v for k, v in GOOD.items() if k != "answer"}), "a.jsonl"))],
                           "missing field 'answer'"),
        "answer null": (["--pairs-file", str(_pairs_file(tmp_path, json.dumps({**GOOD, "answer": None}), "n.jsonl"))],
                        "field 'answer' is null"),
        "bad json": (["--pairs-file", str(_pairs_file(tmp_path, json.dumps(GOOD) + "\n{oops\n", "j.jsonl"))], "line 2: invalid JSON"),
        "only empty lines": (["--pairs-file", str(_pairs_file(tmp_path, "\n\n  \n", "e.jsonl"))], "contains no pairs"),
        "huge file": (["--pairs-file", str(huge)], "expected at most 256 MiB"),
        "wrong encoding": (["--pairs-file", str(_pairs_file(tmp_path, json.dumps(GOOD).replace("Mary", "M\u00e4ry").encode("latin-1"), "l.jsonl"))],
                           "not valid UTF-8"),
        "missing pairs file": (["--pairs-file", str(tmp_path / "nope.jsonl")], "does not exist"),
        "layer out of range": (["--layers", "3"], "layers (--layers) must be ints in [0, 2]"),
        "non-causal model": (["--model", str(_bert_dir(tmp_path))], "'bert' is not a causal model"),
        "model not available offline": (["--model", "no-such-org/no-such-model"], "not in the local HuggingFace cache"),
        "model path missing": (["--model", str(tmp_path / "missing-model")], "does not exist"),
        "out is a file": (["--out", str(a_file)], "is not a folder"),
        "out under a file": (["--out", str(a_file / "sub")], "is not writable"),
        "zero pairs": (["--n-pairs", "0"], "n_pairs (--n-pairs) must be a positive int"),
        "top-k without attribution": (["--top-k", "5"], "--top-k applies with --method attribution"),
    }


def _bert_dir(tmp_path: Path) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path / "bert"
    if not folder.exists():
        cfg = BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=16, vocab_size=50257)
        BertForMaskedLM(cfg).save_pretrained(folder)
    return folder


CASES = ["multi-token answer", "answer missing", "bad json", "only empty lines", "huge file", "wrong encoding",
         "missing pairs file", "layer out of range", "non-causal model", "model not available offline",
         "model path missing", "out is a file", "out under a file", "zero pairs"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_a_clear_error_and_no_output(case, gpt2_dir, tmp_path, capsys, monkeypatch, gpt2_tokenizer):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gpt2_tokenizer.save_pretrained(_bert_dir(tmp_path))
    args, expected = _bad_inputs(tmp_path, gpt2_dir)[case]
    out = tmp_path / "out"
    argv = ["ioi", "--model", str(gpt2_dir), "--n-pairs", "2", "--out", str(out), "--quiet"] + args
    capsys.readouterr()  # drop what setting up the case printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("actpatch: error: ") and expected in err, err
    assert "Traceback" not in err
    assert not out.exists(), "a failed run must not leave an output folder behind"


def test_nan_model_via_cli_is_exit_2_with_the_layer(tmp_path, capsys, gpt2_tokenizer):
    folder = tmp_path / "nan-gpt2"
    _nan_model("gpt2", gpt2_tokenizer, layer=2).model.save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    capsys.readouterr()
    assert main(["ioi", "--model", str(folder), "--n-pairs", "2", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "first appear in layer 2" in err and not (tmp_path / "o").exists()


class Interrupt:
    """A reduce that presses Ctrl-C during the ``after``-th chunk of a sweep."""

    def __init__(self, batch, after: int):
        self.batch, self.after, self.calls, self.rows = batch, after, 0, 0

    def __call__(self, logits):
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt
        self.rows += logits.shape[0]
        return ioi_scores(logits, self.batch.answer_ids, self.batch.wrong_ids)


def test_ctrl_c_mid_sweep_removes_hooks_keeps_model_and_resumes(tiny_lm, tmp_path):
    pairs = generate_pairs(tiny_lm.tokenizer, 3, designs=("swap",), seed=2)["swap"]
    batch = tokenize_ioi(tiny_lm.tokenizer, pairs)
    donor, _ = capture(tiny_lm, batch.donor_ids, batch, _sites(tiny_lm))
    variants = _variants(tiny_lm)
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    full = patch_variants(tiny_lm, batch, donor, variants, Interrupt(batch, after=0), max_rows=6)
    fp = sweep_fingerprint(tiny_lm, batch, variants)
    path = tmp_path / "ckpt.pt"
    stop = Interrupt(batch, after=4)
    with pytest.raises(KeyboardInterrupt):
        patch_variants(tiny_lm, batch, donor, variants, stop, max_rows=6, checkpoint=Checkpoint(path, fp))
    assert count_hooks(tiny_lm.model) == 0
    after = tiny_lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the model must be left as it was"
    saved = Checkpoint(path, fp, resume=True)
    n_saved = len(saved.done)
    assert n_saved == stop.rows > 0  # every variant of the three finished chunks, and nothing else
    again = Interrupt(batch, after=0)
    resumed = patch_variants(tiny_lm, batch, donor, variants, again, max_rows=6, checkpoint=saved)
    assert again.rows == len(variants) - n_saved, "finished variants must not be run again"
    for key in full:  # other chunk compositions: float32 summation order only
        torch.testing.assert_close(resumed[key], full[key], rtol=RTOL, atol=ATOL)
    with pytest.raises(ResumeError, match="different run"):
        Checkpoint(path, sweep_fingerprint(tiny_lm, batch, variants[:-1]), resume=True)


def test_cli_ctrl_c_then_resume(gpt2_dir, tmp_path, capsys, monkeypatch):
    import actpatch.experiment.sweeps as experiments

    calls = {"n": 0}
    real = experiments.ioi_scores

    def flaky(logits, *a):
        if logits.dim() == 3:  # a patched chunk (k, B, n), not a baseline
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
        return real(logits, *a)

    out = tmp_path / "run"
    argv = ["ioi", "--model", str(gpt2_dir), "--n-pairs", "3", "--donor", "swap", "--out", str(out), "--quiet",
            "--max-batch", "6"]
    monkeypatch.setattr(experiments, "ioi_scores", flaky)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and "interrupted" in err
    assert (out / ".partial" / "swap-0.pt").is_file() and not (out / "results.json").exists()
    monkeypatch.setattr(experiments, "ioi_scores", real)
    assert main(argv) == 2 and "--resume" in capsys.readouterr().err  # the folder is taken: say how to go on
    assert main(argv + ["--resume"]) == 0
    assert not (out / ".partial").exists()
    fresh = tmp_path / "fresh"
    assert main(argv[:-5] + ["--out", str(fresh), "--quiet", "--max-batch", "6"]) == 0
    got = json.loads((out / "results.json").read_text())["heads"]["designs"]["swap"]
    want = json.loads((fresh / "results.json").read_text())["heads"]["designs"]["swap"]
    np.testing.assert_allclose(np.array(got["logit_diff"], float), np.array(want["logit_diff"], float), rtol=RTOL, atol=ATOL)


def test_resume_without_partial_is_refused(gpt2_dir, tmp_path, capsys):
    assert main(["ioi", "--model", str(gpt2_dir), "--out", str(tmp_path / "x"), "--resume"]) == 2
    assert "holds no interrupted run" in capsys.readouterr().err


def test_cli_is_bitwise_deterministic_and_leaves_global_rngs(gpt2_dir, tmp_path):
    states = random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state()
    runs = []
    for name in ("a", "b"):
        assert main(["ioi", "--model", str(gpt2_dir), "--n-pairs", "3", "--seed", "7", "--out", str(tmp_path / name),
                     "--quiet"]) == 0
        runs.append(json.loads((tmp_path / name / "results.json").read_text()))
    strip = ("config", "environment")  # the command line names the output folder
    assert {k: v for k, v in runs[0].items() if k not in strip} == {k: v for k, v in runs[1].items() if k not in strip}
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.random.get_rng_state(), states[2])


def test_outputs_stay_inside_out(gpt2_dir, tmp_path):
    evil = {**GOOD, "recipient": GOOD["recipient"].replace("store", "../../etc/passwd"),
            "donor": GOOD["donor"].replace("store", "../../etc/passwd")}
    f = _pairs_file(tmp_path, json.dumps(evil) + "\n" + json.dumps(GOOD) + "\n")
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "deep" / "out"
    assert main(["ioi", "--model", str(gpt2_dir), "--pairs-file", str(f), "--out", str(out), "--quiet"]) == 0
    new = {p for p in tmp_path.rglob("*")} - before
    assert all(p == out or p == out.parent or out in p.parents for p in new), sorted(new)
    assert not any(p.name.startswith(".") for p in out.iterdir()), "no staging or partial files are left"


def test_remote_code_is_never_run_without_the_flag(tmp_path, gpt2_tokenizer):
    folder = tmp_path / "remote"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    code = f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import PretrainedConfig\n" \
           "class MyConfig(PretrainedConfig):\n    model_type = 'mything'\n"
    (folder / "configuration_mything.py").write_text(code)
    (folder / "modeling_mything.py").write_text(code)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "mything", "auto_map": {"AutoConfig": "configuration_mything.MyConfig",
                                              "AutoModelForCausalLM": "modeling_mything.MyModel"}}))
    gpt2_tokenizer.save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load_model(str(folder))
    assert not marker.exists(), "repository code ran without --trust-remote-code"


def test_a_site_missing_from_the_donor_cache_is_a_site_error(tiny_lm):
    from actpatch import SiteError, capture, generate_pairs, run_chunk, tokenize_ioi

    batch = tokenize_ioi(tiny_lm.tokenizer, generate_pairs(tiny_lm.tokenizer, 2, ("swap",))["swap"])
    cache, _ = capture(tiny_lm, batch.donor_ids, batch, [HeadSite(0)])
    with pytest.raises(SiteError, match=r"no captured activation for HeadSite\(layer=1.*it holds: head of layer 0"):
        run_chunk(tiny_lm, batch, cache, [[HeadSite(1)]])
    assert count_hooks(tiny_lm.model) == 0


def test_a_pairs_file_run_records_what_reproduces_it(gpt2_dir, tmp_path):
    """The file's hash and every pair are saved; n_pairs is the file's count, and no seed is claimed."""
    import hashlib

    other = {**GOOD, "recipient": GOOD["recipient"].replace("store", "park"), "donor": GOOD["donor"].replace("store", "park")}
    f = _pairs_file(tmp_path, json.dumps(GOOD) + "\n" + json.dumps(other) + "\n")
    out = tmp_path / "out"
    assert main(["ioi", "--model", str(gpt2_dir), "--pairs-file", str(f), "--out", str(out), "--quiet",
                 "--no-head-sweep", "--no-analysis"]) == 0
    data = json.loads((out / "results.json").read_text())
    cfg = data["config"]
    assert cfg["pairs_file_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert cfg["n_pairs"] == 2 and cfg["seed"] is None and Path(cfg["pairs_file"]).is_absolute()
    assert [p["recipient"] for p in data["pairs"]["file"]] == [GOOD["recipient"], other["recipient"]]
    assert "from `" in (out / "report.md").read_text() and "seed" not in (out / "report.md").read_text().split("\n")[2]


def test_device_map_under_torchrun_is_refused(gpt2_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before any process group starts
    out = tmp_path / "o"
    code = main(["ioi", "--model", str(gpt2_dir), "--device-map", "auto", "--out", str(out), "--quiet"])
    assert code == 2 and "every rank would load its own split" in capsys.readouterr().err and not out.exists()
