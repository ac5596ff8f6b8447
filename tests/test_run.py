"""`actpatch run` and `actpatch.patch`: your own pairs from the command line and from Python, every metric, checked
against values computed by hand from one-pair-at-a-time patched runs (tests/reference.py)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import actpatch
from actpatch.cli import main
from reference import naive_patch_end_logits

PAIRS = [
    {"recipient": "The Eiffel Tower is located in the city of", "donor": "The Statue of Liberty is located in the city of",
     "answer": " Paris", "wrong": [" New", " London"], "positions": {"subject": ["Eiffel Tower", "Statue of Liberty"]}},
    {"recipient": "The Louvre is in the city of", "donor": "The Brandenburg Gate is in the city of",
     "answer": [" Paris", " France"], "wrong": " Berlin", "positions": {"subject": ["Louvre", "Brandenburg Gate"]}},
]
# (recipient position, donor position) of "subject" (the token holding its last character) and END, per pair,
# counted by hand from GPT-2's tokens: "The| E|iff|el| Tower| is| located| in| the| city| of" and so on
WHERE = {"subject": [(4, 3), (2, 3)], "END": [(10, 9), (7, 8)]}


def _by_hand(metric: str, patched: torch.Tensor, recipient: torch.Tensor, tok, pair: dict) -> float:
    """The metric of one pair, written out: log-probabilities over the vocabulary, sets as Python lists."""
    def ids(x):
        return [tok.encode(t)[0] for t in ([x] if isinstance(x, str) else x)]

    logp, ref = torch.log_softmax(patched.double(), -1), torch.log_softmax(recipient.double(), -1)
    p_answer = sum(float(logp[i].exp()) for i in ids(pair["answer"]))
    p_wrong = sum(float(logp[i].exp()) for i in ids(pair["wrong"]))
    return {"logit_diff": torch.log(torch.tensor(p_answer / p_wrong)).item(), "prob_diff": p_answer - p_wrong,
            "logprob": torch.log(torch.tensor(p_answer)).item(),
            "kl": float((ref.exp() * (ref - logp)).sum())}[metric]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "facts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS), encoding="utf-8")
    return path


@pytest.mark.parametrize("metric", ["logit_diff", "prob_diff", "logprob", "kl"])
def test_cli_run_matches_hand_computed_metrics(gpt2_dir, gpt2_tokenizer, pairs_file, tmp_path, metric):
    from transformers import GPT2LMHeadModel

    out = tmp_path / "run"
    code = main(["run", "--model", str(gpt2_dir), "--pairs-file", str(pairs_file), "--positions", "subject", "END",
                 "--metric", metric, "--out", str(out), "--quiet"])
    assert code == 0
    df = pd.read_csv(out / "results.csv")
    assert set(df.task) == {"pairs"} and set(df.metric) == {metric} and set(df.position) == {"subject", "END"}
    assert {"hidden", "all_heads", "head"} == set(df.experiment)
    delta = "delta_logit_diff" if metric == "logit_diff" else f"delta_{metric}"
    assert {metric, delta, "normalised_effect"} <= set(df.columns)
    model = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    tok = gpt2_tokenizer
    for experiment, layer, head, position in [("hidden", 1, None, "subject"), ("all_heads", 2, None, "END"),
                                              ("head", 0, 3, "subject")]:
        values, unpatched = [], []
        for b, pair in enumerate(PAIRS):
            rec, don = tok(pair["recipient"])["input_ids"], tok(pair["donor"])["input_ids"]
            kind, heads = ("hidden", []) if experiment == "hidden" else ("heads", list(range(4)) if head is None else [head])
            patched = naive_patch_end_logits(model, rec, don, kind, layer, heads, [WHERE[position][b]], 8)
            plain = naive_patch_end_logits(model, rec, don, kind, layer, heads, [], 8)
            values.append(_by_hand(metric, patched, plain, tok, pair))
            unpatched.append(_by_hand(metric, plain, plain, tok, pair))
        row = df[(df.experiment == experiment) & (df.layer == layer) & (df.position == position)
                 & ((df["head"] == head) if head is not None else df["head"].isna())]
        assert len(row) == 1
        # float32 engine vs float64 hand computation of the same float32 logits; padding changes summation order
        assert abs(float(row[metric].iloc[0]) - sum(values) / 2) < 1e-4, (experiment, layer, position)
        assert abs(float(row[delta].iloc[0]) - (sum(values) - sum(unpatched)) / 2) < 1e-4
    html = (out / "report.html").read_text(encoding="utf-8")
    assert 0 < html.index('alt="layers.png"') < html.index("<table")  # the headline figure opens the report
    result = actpatch.PairsResult.load(out)
    assert result.passed and result.config["metric"] == metric and result.config["positions"] == ["subject", "END"]


@pytest.mark.parametrize("change, message", [
    ({"positions": {"subject": ["Eiffel Tower", "Colosseum"]}}, r"position 'subject'.*'Colosseum' to occur"),
    ({"answer": []}, r"'answer' is an empty list"),
    ({"wrong": [" Paris", " Rome"]}, r"share the token.*' Paris'"),
    ({"answer": " New York", "wrong": [" Rome", " New York"]}, r"share the token sequence.*' New York'"),
])
def test_bad_pairs_exit_2_with_one_line(gpt2_dir, tmp_path, capsys, change, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({**PAIRS[0], **change}) + "\n" + json.dumps(PAIRS[1]) + "\n", encoding="utf-8")
    code = main(["run", "--model", str(gpt2_dir), "--pairs-file", str(path), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("actpatch: error: "), err
    assert pytest.importorskip("re").search(message, err), err
    assert not (tmp_path / "o").exists()  # nothing left behind


def test_all_positions_on_pairs_of_different_lengths_exits_2_naming_the_pair(gpt2_dir, pairs_file, tmp_path, capsys):
    code = main(["run", "--model", str(gpt2_dir), "--pairs-file", str(pairs_file), "--positions", "all",
                 "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "pair 0 ('The Eiffel Tower is located in the city of') is 11 tokens and its donor 10" in err


def test_run_ioi_is_the_ioi_command(gpt2_dir, capsys):
    args = ["--model", str(gpt2_dir), "--n-pairs", "3", "--donor", "swap", "--dry-run"]
    assert main(["ioi", *args]) == 0
    direct = capsys.readouterr().out
    assert main(["run", "ioi", *args]) == 0
    assert capsys.readouterr().out == direct and "swap" in direct


def test_patch_one_call_with_kl_and_no_answers(tiny_lm):
    pairs = [{k: v for k, v in p.items() if k not in ("answer", "wrong")} for p in PAIRS]
    df = actpatch.patch(tiny_lm, pairs, sites="heads", positions=["subject", "END"], metric="kl", layers=[1])
    assert set(df.experiment) == {"all_heads", "head"} and set(df.layer) == {1} and set(df.metric) == {"kl"}
    assert len(df) == 2 * (1 + tiny_lm.adapter.n_heads) and "logit_diff" not in df.columns
    assert (df.kl > -1e-6).all() and df.kl.max() > 1e-6  # KL >= 0 up to float noise, and the patches do something
    with pytest.raises(actpatch.DataError, match=r"expected an answer and a wrong token.*no answers \(kl\)"):
        actpatch.patch(tiny_lm, pairs, sites="hidden", metric="logit_diff", layers=[0])


def test_max_batch_reaches_the_sweep(tiny_lm, monkeypatch):
    """`--max-batch` / PairsConfig.max_rows caps the rows of the sweep's forward passes (it was once dropped)."""
    from actpatch.experiment import contrast

    seen, original = [], contrast.patch_variants
    monkeypatch.setattr(contrast, "patch_variants", lambda *a, **kw: seen.append(kw["max_rows"]) or original(*a, **kw))
    actpatch.run_pairs(lm=tiny_lm, pairs=[actpatch.engine.pairs.pair_from_dict(p) for p in PAIRS], sites=("hidden",),
                       layers=(0,), positions=("END",), max_rows=3, progress=False)
    assert seen == [3]
