"""Tests of actpatch.tasks.sva: pair generation, number flips, named positions, errors, and one run on SmolLM2."""

from __future__ import annotations

import re

import pytest

import actpatch
from actpatch.engine.pairs import PromptPair
from actpatch.errors import DataError
from actpatch.tasks import sva
from actpatch.tasks.registry import get_task

SINGULAR = {s for s, _ in sva.NOUNS}
PLURAL = {p for _, p in sva.NOUNS}
OTHER = {**{s: p for s, p in sva.NOUNS}, **{p: s for s, p in sva.NOUNS}}
PROMPT = re.compile(r"The (\w+) (" + "|".join(map(re.escape, sva.PREPOSITIONS)) + r") (\w+)")


@pytest.fixture(params=["gpt2", "smollm2", "gpt2-bos"])
def tok(request):
    if request.param == "smollm2":
        return request.getfixturevalue("lm").tokenizer
    return request.getfixturevalue("gpt2_tokenizer" if request.param == "gpt2" else "bos_tokenizer")


def parse(prompt: str) -> tuple[str, str, str]:
    m = PROMPT.fullmatch(prompt)
    assert m, prompt
    return m.group(1), m.group(2), m.group(3)


def one_token(tok, text: str) -> int:
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def test_word_lists():
    assert len(sva.NOUNS) >= 30 and len(SINGULAR) == len(PLURAL) == len(sva.NOUNS)
    assert not SINGULAR & PLURAL
    assert {"to the", "near the", "behind the", "next to the", "of the", "on the"} <= set(sva.PREPOSITIONS)
    assert sva.VERBS == (" is", " are") and sva.DESIGNS == ("number",)


def test_pair_count_balance_and_single_token_answers(tok):
    out = sva.generate_sva(tok, 10)
    assert list(out) == ["number"]
    pairs = out["number"]
    assert len(pairs) == 10 and all(isinstance(p, PromptPair) and p.design == "number" for p in pairs)
    assert [p.answer for p in pairs] == [" is", " are"] * 5
    assert [p.wrong for p in pairs] == [" are", " is"] * 5
    assert one_token(tok, " is") != one_token(tok, " are")
    assert len(sva.generate_sva(tok, 1, designs="number")["number"]) == 1


def test_donor_flips_subject_number_and_keeps_attractor(tok):
    for p in sva.generate_sva(tok, 24, seed=3)["number"]:
        r_subj, r_prep, r_attr = parse(p.recipient)
        d_subj, d_prep, d_attr = parse(p.donor)
        assert d_subj == OTHER[r_subj] and d_subj != r_subj          # same noun, other number
        assert (d_prep, d_attr) == (r_prep, r_attr)                   # attractor and preposition unchanged
        assert OTHER[r_attr] not in (r_subj, d_subj) and r_attr not in (r_subj, d_subj)  # a different noun
        singular = r_subj in SINGULAR
        assert (r_attr in PLURAL) == singular                         # attractor: the opposite number
        assert p.answer == (" is" if singular else " are") and p.wrong == (" are" if singular else " is")
        assert p.order == ("singular" if singular else "plural")
        assert sva.PREPOSITIONS[p.template] == r_prep


def test_named_positions_point_at_subject_and_attractor(tok):
    pairs = sva.generate_sva(tok, 12, seed=1)["number"]
    batch = sva.tokenize_sva(tok, pairs)
    assert list(batch.positions) == ["subject", "attractor", "END"]
    sides = (("recipient", [p.recipient for p in pairs], batch.recipient_ids, batch.lengths()),
             ("donor", [p.donor for p in pairs], batch.donor_ids, batch.lengths("donor")))
    for side, prompts, ids, lengths in sides:
        pos = batch.side_positions(side)
        for i, prompt in enumerate(prompts):
            subj, _, attr = parse(prompt)
            row = ids[i].tolist()
            assert row[: int(lengths[i])] == tok(prompt)["input_ids"]
            s, a, e = int(pos["subject"][i]), int(pos["attractor"][i]), int(pos["END"][i])
            assert tok.decode([row[s]]) == " " + subj     # every built-in noun is one token for these tokenizers
            assert tok.decode([row[a]]) == " " + attr
            assert e == int(lengths[i]) - 1 and a == e    # the prompt stops at the attractor
            assert tok.decode(row[s + 1: a + 1]).startswith(" " + parse(prompt)[1])


def test_positions_of_multi_token_nouns_and_different_lengths(gpt2_tokenizer):
    tok = gpt2_tokenizer
    pair = PromptPair("The zyzzyva near the keys", "The zyzzyvas near the keys", " is", " are",
                      positions=(("subject", "The zyzzyva", "The zyzzyvas"),
                                 ("attractor", "The zyzzyva near the keys", "The zyzzyvas near the keys")))
    batch = sva.tokenize_sva(tok, [pair])
    rec, don = tok(pair.recipient)["input_ids"], tok(pair.donor)["input_ids"]
    s, ds = int(batch.position("subject")[0]), int(batch.donor_position("subject")[0])
    assert tok.decode(rec[: s + 1]) == "The zyzzyva" and tok.decode(don[: ds + 1]) == "The zyzzyvas"
    assert tok.decode(rec[int(batch.position("attractor")[0])]) == " keys"
    assert tok.decode(don[int(batch.donor_position("attractor")[0])]) == " keys"


def test_deterministic_for_equal_seeds(gpt2_tokenizer):
    a = sva.generate_sva(gpt2_tokenizer, 16, seed=5)
    assert a == sva.generate_sva(gpt2_tokenizer, 16, seed=5)
    assert a != sva.generate_sva(gpt2_tokenizer, 16, seed=6)


def test_registered():
    task = get_task("sva")
    assert task.designs == ("number",) and task.positions == ("subject", "attractor", "END")
    assert task.metric == "logit_diff" and task.tokenize is sva.tokenize_sva


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "4", None])
def test_bad_n_pairs(gpt2_tokenizer, n):
    with pytest.raises(DataError, match="n_pairs must be a positive integer"):
        sva.generate_sva(gpt2_tokenizer, n)


def test_bad_designs(gpt2_tokenizer):
    with pytest.raises(DataError, match="unknown donor design.*number"):
        sva.generate_sva(gpt2_tokenizer, 4, designs=("swap",))
    with pytest.raises(DataError, match="designs is empty"):
        sva.generate_sva(gpt2_tokenizer, 4, designs=())


def test_tokenizer_without_single_token_verbs():
    class Chars:  # a character-level tokenizer: " is" is three tokens
        def encode(self, text, add_special_tokens=True):
            return [ord(c) for c in text]

    with pytest.raises(DataError, match="one distinct token each"):
        sva.generate_sva(Chars(), 4)


def test_tokenize_refuses_pairs_without_positions_or_with_answer_sets(gpt2_tokenizer):
    with pytest.raises(DataError, match="'subject' and 'attractor'"):
        sva.tokenize_sva(gpt2_tokenizer, [PromptPair("The key to the boxes", "The keys to the boxes", " is", " are")])
    good = sva.generate_sva(gpt2_tokenizer, 1)["number"][0]
    with pytest.raises(DataError, match="one answer and one wrong verb"):
        sva.tokenize_sva(gpt2_tokenizer, [PromptPair(good.recipient, good.donor, (" is", " was"), " are",
                                                     positions=good.positions)])


def test_run_pairs_on_bundled_model(lm):
    from actpatch.experiment.contrast import run_pairs

    result = run_pairs(task="sva", n_pairs=4, layers=(0, 29), sites=("hidden",), lm=lm, metric="logit_diff",
                       progress=False)
    assert result.passed
    assert result.config["positions"] == ["subject", "attractor", "END"]
    assert result.baseline["n_pairs"] == 4
