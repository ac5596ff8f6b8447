"""Tests of actpatch.tasks.greater_than on GPT-2's tokenizer ("year" mode) and the bundled SmolLM2's ("digit" mode)."""

from __future__ import annotations

import re

import pytest

import actpatch
from actpatch.errors import DataError
from actpatch.tasks import greater_than
from actpatch.tasks.greater_than import generate_greater_than, greater_than_mode, tokenize_greater_than
from actpatch.tasks.registry import get_task

PROMPT = re.compile(r"The (\w+) lasted from the year (\d\d)(\d\d) to the year (\d\d)")
MODES = {"gpt2": "year", "smollm2": "digit"}


@pytest.fixture(params=["gpt2", "smollm2"])
def case(request) -> tuple[str, object]:
    """(expected mode, tokenizer): GPT-2's real tokenizer, and the bundled SmolLM2's."""
    if request.param == "gpt2":
        return MODES["gpt2"], request.getfixturevalue("gpt2_tokenizer")
    return MODES["smollm2"], request.getfixturevalue("lm").tokenizer


def parse(prompt: str) -> tuple[str, int, int]:
    """(noun, century XX, start YY) of a prompt, the plain way."""
    m = PROMPT.fullmatch(prompt)
    assert m, prompt
    assert m.group(2) == m.group(4), prompt
    return m.group(1), int(m.group(2)), int(m.group(3))


def ids(tok, text: str) -> list[int]:
    return list(tok(text)["input_ids"])


def test_mode_detection(case):
    mode, tok = case
    assert greater_than_mode(tok) == mode


def test_pairs_count_lengths_and_donor(case):
    mode, tok = case
    pairs = generate_greater_than(tok, 24, seed=3)
    assert list(pairs) == ["01"]
    assert len(pairs["01"]) == 24
    for p in pairs["01"]:
        noun, xx, yy = parse(p.recipient)
        assert noun in greater_than.NOUNS and xx in greater_than.CENTURIES
        assert p.donor == p.recipient.replace(f"{xx}{yy:02d}", f"{xx}01", 1)
        assert parse(p.donor) == (noun, xx, 1)
        assert len(ids(tok, p.recipient)) == len(ids(tok, p.donor))
        assert p.design == "01" and p.positions == (("YY", f"{xx}{yy:02d}", f"{xx}01"),)
        assert (2 <= yy <= 98) if mode == "year" else (1 <= yy // 10 <= 8)


def test_answer_sets_single_tokens_disjoint_and_relative_to_start_year(case):
    mode, tok = case
    for p in generate_greater_than(tok, 24, seed=1)["01"]:
        assert isinstance(p.answer, tuple) and isinstance(p.wrong, tuple)
        assert not set(p.answer) & set(p.wrong) and p.answer and p.wrong
        for s in p.answer + p.wrong:
            assert len(tok.encode(s, add_special_tokens=False)) == 1, s
        _, xx, yy = parse(p.recipient)
        if mode == "year":
            every = {f"{y:02d}" for y in range(100)}
            kept = set(p.answer) | set(p.wrong)
            assert set(p.answer) == {s for s in kept if int(s) > yy}
            assert set(p.wrong) == {s for s in kept if int(s) <= yy}
            assert len(kept) >= 90
            for s in every - kept:  # left out only where the tokenizer would not write the year that way
                assert ids(tok, p.recipient + s) != ids(tok, p.recipient) + tok.encode(s, add_special_tokens=False)
        else:
            t = yy // 10
            assert set(p.answer) == {str(d) for d in range(10) if d > t}
            assert set(p.wrong) == {str(d) for d in range(10) if d < t}


def test_yy_position_holds_last_digit_of_start_year(case):
    _, tok = case
    pairs = generate_greater_than(tok, 12, seed=2)["01"]
    batch = tokenize_greater_than(tok, pairs)
    assert set(batch.positions) == {"YY", "END"}
    for i, p in enumerate(pairs):
        _, xx, yy = parse(p.recipient)
        for side, prompt, year in (("recipient", p.recipient, f"{xx}{yy:02d}"), ("donor", p.donor, f"{xx}01")):
            pos = int(batch.side_positions(side)["YY"][i])
            last = prompt.index(year) + 3  # the character of the year's last digit
            a, b = tok(prompt, return_offsets_mapping=True)["offset_mapping"][pos]
            assert a <= last < b, (prompt, pos)
            assert tok.decode([ids(tok, prompt)[pos]]).endswith(year[-1])
            assert int(batch.side_positions(side)["END"][i]) == len(ids(tok, prompt)) - 1


def test_deterministic_per_seed(case):
    _, tok = case
    a = generate_greater_than(tok, 10, seed=7)
    assert a == generate_greater_than(tok, 10, seed=7)
    assert a != generate_greater_than(tok, 10, seed=8)


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "4", None])
def test_bad_n_pairs(gpt2_tokenizer, n):
    with pytest.raises(DataError, match="positive integer"):
        generate_greater_than(gpt2_tokenizer, n)


def test_unknown_design(gpt2_tokenizer):
    with pytest.raises(DataError, match="01"):
        generate_greater_than(gpt2_tokenizer, 4, designs=("swap",))


def test_unaligned_pair_is_refused(gpt2_tokenizer):
    pair = greater_than.PromptPair("The war lasted from the year 1732 to the year 17",
                                   "The long war lasted from the year 1701 to the year 17", ("33",), ("31",),
                                   positions=(("YY", "1732", "1701"),))
    with pytest.raises(DataError, match="position-aligned"):
        tokenize_greater_than(gpt2_tokenizer, [pair])


def test_other_tokenizer_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "The war lasted from the year to".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(DataError, match="two-digit number"):
        greater_than_mode(word_level)


def test_registered(gpt2_tokenizer):
    task = get_task("greater-than")
    assert task.designs == ("01",) and task.positions == ("YY", "END") and task.metric == "prob_diff"
    pairs = task.generate(gpt2_tokenizer, 3, ("01",), 0)["01"]
    assert pairs == generate_greater_than(gpt2_tokenizer, 3, seed=0)["01"]
    assert set(task.tokenize(gpt2_tokenizer, pairs).positions) == {"YY", "END"}


def test_run_pairs_on_bundled_model(lm):
    from actpatch.experiment.contrast import run_pairs

    result = run_pairs(task="greater-than", n_pairs=4, layers=(0, 29), sites=("hidden",), metric="prob_diff", lm=lm,
                       progress=False)
    assert result.passed, {n: c for n, c in result.sanity.items() if not c["passed"]}
    assert result.config["design"] == "01" and result.baseline["n_pairs"] == 4
