"""Tests of actpatch.tasks.induction: repeated sequences, round-tripping ids, cue/next positions, errors, one run."""

from __future__ import annotations

import pytest

import actpatch
from actpatch.engine.pairs import PromptPair
from actpatch.errors import DataError
from actpatch.tasks import induction
from actpatch.tasks.registry import get_task


@pytest.fixture(params=["gpt2", "smollm2", "gpt2-bos"])
def tok(request):
    if request.param == "smollm2":
        return request.getfixturevalue("lm").tokenizer
    return request.getfixturevalue("gpt2_tokenizer" if request.param == "gpt2" else "bos_tokenizer")


def one_token(tok, text: str) -> int:
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def split_ids(tok, text: str, n: int) -> tuple[list[int], list[int]]:
    """(leading special tokens, the 2n-1 sampled ids) of ``text`` as tokenize_pairs sees it."""
    ids = tok(text)["input_ids"]
    off = len(ids) - (2 * n - 1)
    assert off >= 0 and all(t in tok.all_special_ids for t in ids[:off]), ids
    return ids[:off], ids[off:]


@pytest.mark.parametrize("n", [10, 4])
def test_sequences_repeat_and_donor_changes_only_the_first_half(tok, n):
    pairs = induction.generate_induction(tok, 6, seed=2, length=n)["fresh"]
    assert len(pairs) == 6 and all(isinstance(p, PromptPair) and p.design == "fresh" for p in pairs)
    for p in pairs:
        prefix, r = split_ids(tok, p.recipient, n)
        d_prefix, d = split_ids(tok, p.donor, n)
        assert prefix == d_prefix
        assert r[n:] == r[: n - 1]                               # the second half repeats t0..t(n-2)
        assert d[n:] == r[n:]                                    # the donor's second half is the same
        assert all(d[k] != r[k] for k in range(n))               # its first half differs at every position
        assert len(set(r[:n] + d[:n])) == 2 * n                  # all distinct within the pair
        assert one_token(tok, p.answer) == r[n - 1]              # answer t(n-1), wrong s(n-1): one token each
        assert one_token(tok, p.wrong) == d[n - 1]
        assert p.template == n


def test_ids_round_trip(tok):
    for p in induction.generate_induction(tok, 8, seed=4)["fresh"]:
        for text in (p.recipient, p.donor):
            _, ids = split_ids(tok, text, 10)
            pieces = [tok.decode([t]) for t in ids]
            assert "".join(pieces) == text
            assert all(s[0] == " " and s[1:].isascii() and s[1:].isalpha() and 3 <= len(s) - 1 <= 10 for s in pieces)
            assert [tok.encode(s, add_special_tokens=False) for s in pieces] == [[t] for t in ids]


def test_cue_next_and_end_positions(tok):
    n = 10
    pairs = induction.generate_induction(tok, 8, seed=1, length=n)["fresh"]
    batch = induction.tokenize_induction(tok, pairs)
    assert list(batch.positions) == ["cue", "next", "END"]
    assert batch.donor_positions is None and batch.donor_mask is None   # position-aligned pairs
    for i, p in enumerate(pairs):
        prefix, _ = split_ids(tok, p.recipient, n)
        off = len(prefix)
        rec, don = batch.recipient_ids[i].tolist(), batch.donor_ids[i].tolist()
        cue, nxt, end = (int(batch.position(k)[i]) for k in ("cue", "next", "END"))
        assert (cue, nxt, end) == (off + n - 2, off + n - 1, off + 2 * n - 2)
        assert rec[cue] == rec[end] and rec.index(rec[end]) == cue           # the first occurrence of END's token
        assert rec[nxt] == one_token(tok, p.answer) == int(batch.answer_ids[i])  # answer = the token after the cue
        assert don[nxt] == one_token(tok, p.wrong) == int(batch.wrong_ids[i])
        assert don[end] == rec[end]


def test_bos_shifts_positions(gpt2_tokenizer, bos_tokenizer):
    plain = induction.tokenize_induction(gpt2_tokenizer, induction.generate_induction(gpt2_tokenizer, 2)["fresh"])
    bos = induction.tokenize_induction(bos_tokenizer, induction.generate_induction(bos_tokenizer, 2)["fresh"])
    for name in ("cue", "next", "END"):
        assert (bos.position(name) == plain.position(name) + 1).all()
    assert (bos.recipient_ids[:, 0] == bos_tokenizer.bos_token_id).all()


def test_deterministic_for_equal_seeds(gpt2_tokenizer):
    a = induction.generate_induction(gpt2_tokenizer, 6, seed=7)
    assert a == induction.generate_induction(gpt2_tokenizer, 6, seed=7)
    assert a != induction.generate_induction(gpt2_tokenizer, 6, seed=8)
    assert list(a) == ["fresh"]


def test_registered(gpt2_tokenizer):
    task = get_task("induction")
    assert task.designs == ("fresh",) and task.positions == ("cue", "next", "END") and task.metric == "logprob"
    pairs = task.generate(gpt2_tokenizer, 3, ("fresh",), 0)["fresh"]
    assert pairs == induction.generate_induction(gpt2_tokenizer, 3)["fresh"]
    assert list(task.tokenize(gpt2_tokenizer, pairs).positions) == ["cue", "next", "END"]


@pytest.mark.parametrize("n", [0, -2, 2.0, False, "8", None])
def test_bad_n_pairs(gpt2_tokenizer, n):
    with pytest.raises(DataError, match="n_pairs must be a positive integer"):
        induction.generate_induction(gpt2_tokenizer, n)


@pytest.mark.parametrize("length", [1, 0, 3.5, True])
def test_bad_length(gpt2_tokenizer, length):
    with pytest.raises(DataError, match="length must be an integer of at least 2"):
        induction.generate_induction(gpt2_tokenizer, 2, length=length)


def test_bad_designs(gpt2_tokenizer):
    with pytest.raises(DataError, match="unknown donor design.*fresh"):
        induction.generate_induction(gpt2_tokenizer, 2, designs=("swap",))
    with pytest.raises(DataError, match="designs is empty"):
        induction.generate_induction(gpt2_tokenizer, 2, designs=())


def test_tokenizer_without_usable_tokens():
    class Digits:  # a vocabulary of ten digits: no " word" tokens at all
        all_special_ids: list = []

        def __len__(self):
            return 10

        def batch_decode(self, seqs):
            return [str(s[0]) for s in seqs]

        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [[int(c)] for c in texts]}

    with pytest.raises(DataError, match="has 0"):
        induction.generate_induction(Digits(), 2)
    assert induction.word_tokens(Digits()) == ()


def test_too_few_tokens_for_a_long_sequence(gpt2_tokenizer):
    with pytest.raises(DataError, match="at least 200000 vocabulary tokens"):
        induction.generate_induction(gpt2_tokenizer, 1, length=100000)


def test_tokenize_refuses_pairs_that_are_not_induction_pairs(gpt2_tokenizer):
    with pytest.raises(DataError, match="repeated sequence"):
        induction.tokenize_induction(gpt2_tokenizer, [PromptPair(" house cat dog", " tree cat dog", " cat", " tree")])
    good = induction.generate_induction(gpt2_tokenizer, 1)["fresh"][0]
    with pytest.raises(DataError, match="one answer and one wrong token"):
        bad = PromptPair(good.recipient, good.donor, (good.answer,), good.wrong)
        induction.tokenize_induction(gpt2_tokenizer, [bad])


def test_run_pairs_on_bundled_model(lm):
    from actpatch.experiment.contrast import run_pairs

    result = run_pairs(task="induction", n_pairs=4, layers=(0, 29), sites=("hidden",), lm=lm, metric="logprob",
                       progress=False)
    assert result.passed
    assert result.config["positions"] == ["cue", "next", "END"]
    assert result.baseline["recipient"]["mean_logprob"] > result.baseline["donor"]["mean_logprob"]
