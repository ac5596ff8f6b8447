"""The facts task: pair generation on two tokenizers, its positions and noise, and a small run on the bundled model."""

from __future__ import annotations

import pytest

from actpatch.errors import DataError
from actpatch.tasks import facts
from actpatch.engine.batch import continuation_ids
from actpatch.tasks.facts import RELATIONS, generate_facts, tokenize_facts


@pytest.fixture(params=["gpt2", "smollm2"])
def tok(request, gpt2_tokenizer):
    return gpt2_tokenizer if request.param == "gpt2" else request.getfixturevalue('lm').tokenizer


def test_pairs_are_facts_with_answers_of_any_length(tok):
    pairs = generate_facts(tok, 12, ("subject", "noise"), seed=3)
    known = {(RELATIONS[r][0].format(s), " " + a) for r, (_, fs) in RELATIONS.items() for s, a in fs}
    assert len(pairs["subject"]) == len(pairs["noise"]) == 12
    for sub, noi in zip(pairs["subject"], pairs["noise"]):
        assert sub.recipient == noi.recipient and (sub.recipient, sub.answer) in known
        assert (sub.donor, sub.wrong) in known and sub.wrong != sub.answer  # the donor is another fact
        assert noi.donor == noi.recipient and noi.noise[0] == sub.positions[0][1] and noi.noise[1] == 3.0
        for text in (sub.answer, sub.wrong):
            assert continuation_ids(tok, sub.recipient, text)  # a continuation by the tokenization rule
    lengths = [len(tok(p.recipient)["input_ids"]) != len(tok(p.donor)["input_ids"]) for p in pairs["subject"]]
    assert sum(lengths) >= 6  # subjects of another length wherever the relation has one
    assert generate_facts(tok, 12, ("subject",), seed=3)["subject"] == pairs["subject"]
    many = generate_facts(tok, 100, ("subject",), seed=0)["subject"]
    multi = [p for p in many if len(tok.encode(p.answer, add_special_tokens=False)) > 1]
    assert len(many) == 100 and len(multi) >= 20, len(multi)  # cities, painters, authors of several tokens
    assert tokenize_facts(tok, many[:32]).cont_ids is not None
    assert generate_facts(tok, 12, ("subject",), seed=4)["subject"] != pairs["subject"]


def test_positions_are_the_subjects_first_and_last_token(tok):
    pairs = generate_facts(tok, 8, ("subject", "noise"), seed=0)
    for design in ("subject", "noise"):
        batch = tokenize_facts(tok, pairs[design])
        for b, pair in enumerate(pairs[design]):
            for side, prompt, sub, pos in (("recipient", pair.recipient, pair.positions[0][1], batch.positions),
                                           ("donor", pair.donor, pair.positions[0][2], batch.side_positions("donor"))):
                ids = tok(prompt)["input_ids"]
                first, last = int(pos["subject_first"][b]), int(pos["subject_last"][b])
                assert sub.split()[0] in tok.decode(ids[first:first + 1]) or tok.decode(ids[first:last + 1]).strip().startswith(sub[:2])
                assert tok.decode(ids[first:last + 1]).strip() == sub, (side, prompt)
        if design == "noise":
            assert batch.noise_mask.sum(dim=1).tolist() == (batch.positions["subject_last"] - batch.positions["subject_first"] + 1).tolist()


def test_bad_requests_are_refused(gpt2_tokenizer):
    with pytest.raises(DataError, match="positive integer"):
        generate_facts(gpt2_tokenizer, 0)
    with pytest.raises(DataError, match="subject, noise"):
        generate_facts(gpt2_tokenizer, 2, ("swap",))


def test_run_keeps_correct_pairs_and_passes_its_checks(lm, tmp_path):
    from actpatch.experiment.contrast import run_pairs
    from actpatch.report.outputs import write_outputs

    result = run_pairs(task="facts", design="noise", n_pairs=3, layers=(0, 29), sites=("hidden", "mlp"), lm=lm,
                       progress=False)
    assert result.passed and result.config["metric"] == "logit_diff" and result.config["filtered"]["kept"] == 3
    assert result.baseline["recipient"]["mean_logit_diff"] > 0
    assert facts.DESIGNS == ("subject", "noise")
    (tmp_path / "facts").mkdir()
    plots = write_outputs(result, tmp_path / "facts")
    assert "tracing.png" in plots and "tracing.png" in (tmp_path / "facts" / "report.md").read_text()
