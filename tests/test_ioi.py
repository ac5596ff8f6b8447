"""Tests of actpatch.tasks.ioi: templates, word lists, pair generation, JSONL loading, tokenization and positions."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from actpatch.errors import DataError, PairsFileError, SiteError
from actpatch.tasks.ioi import (
    ABBA_TEMPLATES,
    BABA_TEMPLATES,
    DESIGNS,
    NAMES,
    OBJECTS,
    PLACES,
    POSITION_NAMES,
    PromptPair,
    generate_pairs,
    load_pairs_file,
    single_token_names,
)
from actpatch.engine.batch import PairBatch, substring_position
from actpatch.tasks.ioi import tokenize_ioi

CLEAN = "When Mary and John went to the store, John gave a drink to"
#        0    1     2   3     4    5  6   7     8 9     10   11 12    13   (GPT-2 tokens)


def tid(tok, text: str) -> int:
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def slot_names(template: str, prompt: str) -> list[str]:
    """The words filling the [A]/[B] slots of ``template`` in ``prompt``, in order."""
    pattern = re.escape(template)
    for slot in (r"\[A\]", r"\[B\]"):
        pattern = pattern.replace(re.escape(slot.replace("\\", "")), r"(\w+)")
    pattern = pattern.replace(re.escape("[PLACE]"), r"\w+").replace(re.escape("[OBJECT]"), r"\w+")
    m = re.fullmatch(pattern, prompt)
    assert m, (template, prompt)
    return list(m.groups())


# --------------------------------------------------------------------------- templates and word lists


def test_templates_15_each_and_abba_swaps_first_names():
    assert len(BABA_TEMPLATES) == 15 and len(ABBA_TEMPLATES) == 15
    assert BABA_TEMPLATES[0] == "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to"
    assert ABBA_TEMPLATES[0] == "Then, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to"
    for baba, abba in zip(BABA_TEMPLATES, ABBA_TEMPLATES):
        assert re.findall(r"\[[AB]\]", baba) == ["[B]", "[A]", "[B]"]
        assert re.findall(r"\[[AB]\]", abba) == ["[A]", "[B]", "[B]"]
        assert not baba.endswith("[A]") and baba.endswith(" to")
        assert abba.replace("[A]", "[X]").replace("[B]", "[X]") == baba.replace("[A]", "[X]").replace("[B]", "[X]")


def test_word_lists_nonempty_unique_single_words(gpt2_tokenizer):
    for words in (NAMES, PLACES, OBJECTS):
        assert len(set(words)) == len(words)
        assert all(w and w == w.strip() and " " not in w for w in words)
    assert len(NAMES) >= 90 and len(PLACES) >= 15 and len(OBJECTS) >= 15
    assert len(single_token_names(gpt2_tokenizer)) >= 0.9 * len(NAMES)
    for w in PLACES + OBJECTS:  # place/object are shared by recipient and donor, but keep them one token anyway
        assert len(gpt2_tokenizer.encode(" " + w, add_special_tokens=False)) == 1, w
    assert DESIGNS == ("swap", "abc", "s2io")
    assert POSITION_NAMES == ("IO", "S1", "S1+1", "S2", "END")


def test_single_token_names_filters(gpt2_tokenizer):
    assert single_token_names(gpt2_tokenizer, ["Mary", "Zyxwvutsrq", "John"]) == ("Mary", "John")


# --------------------------------------------------------------------------- generate_pairs


def test_generate_deterministic_and_global_rng_untouched(gpt2_tokenizer):
    random.seed(1234)
    state = random.getstate()
    a = generate_pairs(gpt2_tokenizer, 20, designs=DESIGNS, seed=3)
    assert random.getstate() == state
    assert a == generate_pairs(gpt2_tokenizer, 20, designs=DESIGNS, seed=3)
    assert a != generate_pairs(gpt2_tokenizer, 20, designs=DESIGNS, seed=4)
    assert random.getstate() == state


def test_generate_same_recipients_for_every_design_and_coverage(gpt2_tokenizer):
    out = generate_pairs(gpt2_tokenizer, 30, designs=DESIGNS, seed=0)
    assert set(out) == set(DESIGNS)
    rec = [p.recipient for p in out["swap"]]
    for d in DESIGNS:
        assert len(out[d]) == 30 and [p.recipient for p in out[d]] == rec
        assert all(p.design == d for p in out[d])
    # Recipients do not depend on which designs were asked for.
    assert [p.recipient for p in generate_pairs(gpt2_tokenizer, 30, designs=("s2io",))["s2io"]] == rec
    combos = {(p.template, p.order) for p in out["swap"]}
    assert combos == {(t, o) for t in range(15) for o in ("ABBA", "BABA")}


def test_generate_donor_structure(gpt2_tokenizer):
    allowed = set(single_token_names(gpt2_tokenizer))
    out = generate_pairs(gpt2_tokenizer, 45, designs=DESIGNS, seed=7)
    for sw, abc, s2io in zip(out["swap"], out["abc"], out["s2io"]):
        tmpl = (ABBA_TEMPLATES if sw.order == "ABBA" else BABA_TEMPLATES)[sw.template]
        io, s = sw.answer.strip(), sw.wrong.strip()
        assert sw.answer == " " + io and sw.wrong == " " + s and io != s
        # Slot order in the template text: ABBA -> IO, S1, S2; BABA -> S1, IO, S2.
        def roles(names):
            return dict(zip(("IO", "S1", "S2") if sw.order == "ABBA" else ("S1", "IO", "S2"), names))

        r = roles(slot_names(tmpl, sw.recipient))
        assert r == {"IO": io, "S1": s, "S2": s}
        assert roles(slot_names(tmpl, sw.donor)) == {"IO": s, "S1": io, "S2": io}
        c = roles(slot_names(tmpl, abc.donor))
        assert len({c["IO"], c["S1"], c["S2"]}) == 3 and not {c["IO"], c["S1"], c["S2"]} & {io, s}
        assert {c["IO"], c["S1"], c["S2"]} <= allowed
        assert roles(slot_names(tmpl, s2io.donor)) == {"IO": io, "S1": s, "S2": io}
        # Answer and wrong are always the recipient's, whatever the donor.
        for p in (abc, s2io):
            assert (p.answer, p.wrong) == (sw.answer, sw.wrong)
        # Non-name text (place, object) is shared.
        every_name = r"\b(" + "|".join({io, s, c["IO"], c["S1"], c["S2"]}) + r")\b"

        def strip(text: str) -> str:
            return re.sub(every_name, "N", text)

        assert strip(sw.recipient) == strip(sw.donor) == strip(abc.donor) == strip(s2io.donor)


def test_generated_pairs_tokenize_with_equal_lengths_and_positions(gpt2_tokenizer):
    out = generate_pairs(gpt2_tokenizer, 60, designs=DESIGNS, seed=1)
    for d in DESIGNS:
        batch = tokenize_ioi(gpt2_tokenizer, out[d])
        assert len(batch) == 60 and set(batch.positions) == set(POSITION_NAMES)
        assert torch.equal(batch.recipient_ids != gpt2_tokenizer.eos_token_id, batch.attention_mask.bool())
        assert torch.equal(batch.donor_ids != gpt2_tokenizer.eos_token_id, batch.attention_mask.bool())
        rows = torch.arange(60)
        rec = batch.recipient_ids
        assert torch.equal(rec[rows, batch.position("IO")], batch.answer_ids)
        assert torch.equal(rec[rows, batch.position("S1")], batch.wrong_ids)
        assert torch.equal(rec[rows, batch.position("S2")], batch.wrong_ids)
        assert (batch.position("S1") < batch.position("S2")).all()
        assert torch.equal(batch.position("S1+1"), batch.position("S1") + 1)
        assert torch.equal(batch.position("END"), batch.attention_mask.sum(1) - 1)
        assert (rec[rows, batch.position("END")] == tid(gpt2_tokenizer, " to")).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_pairs": 0}, "n_pairs"),
        ({"n_pairs": -3}, "n_pairs"),
        ({"n_pairs": 4, "designs": ("swap", "bogus")}, "swap, abc, s2io"),
        ({"n_pairs": 4, "designs": ()}, "designs"),
    ],
)
def test_generate_errors(gpt2_tokenizer, kwargs, match):
    with pytest.raises(DataError, match=match):
        generate_pairs(gpt2_tokenizer, **kwargs)


def test_generate_too_few_single_token_names():
    class CharTokenizer:  # every character is a token, so no name is a single token
        def encode(self, text, add_special_tokens=False):
            return [ord(ch) for ch in text]

    with pytest.raises(DataError, match="at least 5"):
        generate_pairs(CharTokenizer(), 4)


# --------------------------------------------------------------------------- tokenize_ioi


def test_positions_hand_written_example(gpt2_tokenizer):
    tok = gpt2_tokenizer
    batch = tokenize_ioi(tok, [PromptPair(CLEAN, CLEAN.replace("Mary", "Anna"), " Mary", " John", "file")])
    rec = batch.recipient_ids[0]
    assert rec.tolist() == tok(CLEAN)["input_ids"] and rec.dtype == torch.long and rec.shape == (14,)
    expected = {"IO": 1, "S1": 3, "S1+1": 4, "S2": 9, "END": 13}
    assert {k: v.tolist() for k, v in batch.positions.items()} == {k: [v] for k, v in expected.items()}
    assert rec[13] == tid(tok, " to") and rec[1] == tid(tok, " Mary") and rec[3] == rec[9] == tid(tok, " John")
    assert rec[4] == tid(tok, " went")
    assert batch.answer_ids.tolist() == [tid(tok, " Mary")] and batch.wrong_ids.tolist() == [tid(tok, " John")]
    assert batch.donor_ids[0, 1] == tid(tok, " Anna") and batch.attention_mask.tolist() == [[1] * 14]


def test_positions_come_from_ids_shifted_prefix_and_bos(gpt2_tokenizer):
    from transformers import GPT2TokenizerFast

    pair = PromptPair("Yesterday " + CLEAN, "Yesterday " + CLEAN.replace("Mary", "Anna"), " Mary", " John", "file")
    shifted = tokenize_ioi(gpt2_tokenizer, [pair])
    assert {k: v.item() for k, v in shifted.positions.items()} == {"IO": 2, "S1": 4, "S1+1": 5, "S2": 10, "END": 14}
    # A tokenizer that adds BOS: the same GPT-2 files with add_bos_token=True.
    bos_tok = GPT2TokenizerFast.from_pretrained(gpt2_tokenizer.name_or_path, add_bos_token=True)
    pair = PromptPair(CLEAN, CLEAN.replace("Mary", "Anna"), " Mary", " John", "file")
    batch = tokenize_ioi(bos_tok, [pair])
    assert batch.recipient_ids[0, 0] == bos_tok.bos_token_id and batch.recipient_ids.shape == (1, 15)
    assert {k: v.item() for k, v in batch.positions.items()} == {"IO": 2, "S1": 4, "S1+1": 5, "S2": 10, "END": 14}


def test_right_padding_mixed_lengths(gpt2_tokenizer):
    tok = gpt2_tokenizer
    short = PromptPair(CLEAN, CLEAN.replace("Mary", "Anna"), " Mary", " John", "file")
    long_text = "Then, Mary and John had a lot of fun at the park. John gave a ring to"
    long = PromptPair(long_text, long_text.replace("John", "Paul"), " Mary", " John", "file")
    batch = tokenize_ioi(tok, [short, long])
    n_long = len(tok(long_text)["input_ids"])
    assert n_long > 14 and batch.recipient_ids.shape == (2, n_long) == batch.donor_ids.shape
    assert batch.position("END").tolist() == [13, n_long - 1]
    assert batch.attention_mask.sum(1).tolist() == [14, n_long]
    pad = tok.eos_token_id  # GPT-2 has no pad token
    assert (batch.recipient_ids[0, 14:] == pad).all() and (batch.donor_ids[0, 14:] == pad).all()
    assert (batch.attention_mask[0, 14:] == 0).all()
    assert batch.position("S2").tolist() == [9, len(tok("Then, Mary and John had a lot of fun at the park. John")["input_ids"]) - 1]


def test_pairbatch_position_errors_and_to(gpt2_tokenizer):
    batch = tokenize_ioi(gpt2_tokenizer, generate_pairs(gpt2_tokenizer, 3)["swap"])
    with pytest.raises(SiteError, match="IO, S1, S1\\+1, S2, END"):
        batch.position("S3")
    moved = batch.to("cpu")
    assert isinstance(moved, PairBatch) and len(moved) == 3 and torch.equal(moved.recipient_ids, batch.recipient_ids)
    assert torch.equal(moved.position("END"), batch.position("END"))


def test_tokenize_errors(gpt2_tokenizer):
    tok = gpt2_tokenizer
    ok = PromptPair(CLEAN, CLEAN.replace("Mary", "Anna"), " Mary", " John", "file")
    with pytest.raises(DataError, match="no prompt pairs"):
        tokenize_ioi(tok, [])
    with pytest.raises(DataError, match=r"pair 1 .*Zyxwvutsrq.*exactly one token"):
        tokenize_ioi(tok, [ok, PromptPair(CLEAN, CLEAN, " Zyxwvutsrq", " John", "file")])
    with pytest.raises(DataError, match=r"pair 0 .*wrong.*exactly one token"):
        tokenize_ioi(tok, [PromptPair(CLEAN, CLEAN, " Mary", " Zyxwvutsrq", "file")])
    with pytest.raises(DataError, match="share the token"):
        tokenize_ioi(tok, [PromptPair(CLEAN, CLEAN, " Mary", " Mary", "file")])
    with pytest.raises(DataError, match=r"14 tokens but donor .* has 20"):
        tokenize_ioi(tok, [PromptPair(CLEAN, CLEAN.replace("Mary", "Zyxwvutsrq"), " Mary", " John", "file")])
    missing_io = PromptPair(CLEAN, CLEAN, " Anna", " John", "file")
    with pytest.raises(DataError, match=r"pair 0 \('When Mary"):
        tokenize_ioi(tok, [missing_io])
    # Without require_positions, a position missing in any row is left out; found ones stay.
    batch = tokenize_ioi(tok, [ok, missing_io], require_positions=False)
    assert set(batch.positions) == {"S1", "S1+1", "S2", "END"}
    with pytest.raises(SiteError, match="available: S1, S1\\+1, S2, END"):
        batch.position("IO")


# --------------------------------------------------------------------------- load_pairs_file


def _write(tmp_path, lines, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n", encoding="utf-8")
    return path


ROW = {"recipient": CLEAN, "donor": CLEAN.replace("Mary", "Anna"), "answer": " Mary", "wrong": " John"}


def test_load_pairs_round_trip_blank_lines_extra_fields(tmp_path, gpt2_tokenizer):
    row2 = dict(ROW, recipient=CLEAN.replace("store", "park"), donor=CLEAN.replace("store", "park"), note="extra")
    path = _write(tmp_path, ["", ROW, "   ", row2, ""])
    pairs = load_pairs_file(path)
    assert pairs == [
        PromptPair(ROW["recipient"], ROW["donor"], " Mary", " John", "file"),
        PromptPair(row2["recipient"], row2["donor"], " Mary", " John", "file"),
    ]
    assert pairs[0].template is None and pairs[0].order is None
    assert load_pairs_file(str(path)) == pairs
    batch = tokenize_ioi(gpt2_tokenizer, pairs, require_positions=False)
    assert set(batch.positions) == set(POSITION_NAMES)


@pytest.mark.parametrize(
    "bad, match",
    [
        ('{"recipient": "x", ', "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('"just a string"', "expected a JSON object"),
        (json.dumps({k: v for k, v in ROW.items() if k != "donor"}), "missing field 'donor'"),
        (json.dumps(dict(ROW, answer=5)), "field 'answer' must be a non-empty string, got 5"),
        (json.dumps(dict(ROW, wrong="  ")), "field 'wrong' must be a non-empty string"),
    ],
)
def test_load_pairs_bad_line_reports_line_number(tmp_path, bad, match):
    path = _write(tmp_path, [ROW, "", bad, ROW])
    with pytest.raises(PairsFileError, match=match) as info:
        load_pairs_file(path)
    assert info.value.line_no == 3 and info.value.path == str(path)
    assert "line 3:" in str(info.value)


def test_load_pairs_non_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((json.dumps(ROW) + "\n").encode() + '{"recipient": "Zoë"}\n'.encode("latin-1"))
    with pytest.raises(PairsFileError, match="UTF-8") as info:
        load_pairs_file(path)
    assert info.value.line_no == 2


def test_load_pairs_empty_and_missing(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="no pairs"):
        load_pairs_file(empty)
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="nope.jsonl") as info:
        load_pairs_file(missing)
    assert not isinstance(info.value, PairsFileError)


def test_load_pairs_warns_without_leading_space(tmp_path):
    path = _write(tmp_path, [dict(ROW, answer="Mary")])
    with pytest.warns(UserWarning, match="leading space"):
        (pair,) = load_pairs_file(path)
    assert pair.answer == "Mary"


def test_denoising_swaps_roles_and_keeps_clean_positions(gpt2_tokenizer):
    from actpatch.tasks.ioi import denoising

    pairs = generate_pairs(gpt2_tokenizer, 4, designs=("abc",), seed=2)["abc"]
    noise = tokenize_ioi(gpt2_tokenizer, pairs)
    denoise = tokenize_ioi(gpt2_tokenizer, denoising(pairs), positions_from="donor")
    assert torch.equal(denoise.recipient_ids, noise.donor_ids) and torch.equal(denoise.donor_ids, noise.recipient_ids)
    assert all(torch.equal(denoise.positions[k], noise.positions[k]) for k in noise.positions)
    assert torch.equal(denoise.answer_ids, noise.answer_ids)
    assert {p.design for p in denoising(pairs)} == {"abc-denoise"}
    with pytest.raises(DataError, match="expected the answer"):  # abc's corrupted prompt has neither name
        tokenize_ioi(gpt2_tokenizer, denoising(pairs))


# --- substring_position: named positions from substrings (pairs of any length) -----------------------------

def _by_prefix_decoding(tokenizer, prompt: str, substring: str) -> int:
    """The plain reference: decode growing prefixes of the ids until the text reaches the substring's last char."""
    ids = tokenizer(prompt)["input_ids"]
    last = prompt.find(substring) + len(substring) - 1
    for i in range(len(ids)):
        # startswith, not length: a token of part of a character's bytes decodes to '\ufffd', not the character
        if tokenizer.decode(ids[: i + 1], skip_special_tokens=True).startswith(prompt[: last + 1]):
            return i
    raise AssertionError("the prefixes never reach the substring")


@pytest.mark.parametrize("prompt, substring", [
    ("The Eiffel Tower is located in the city of", "Eiffel Tower"),
    ("The Eiffel Tower is located in the city of", "Eiffel"),
    ("The Eiffel Tower is located in the city of", "Eif"),           # ends inside a token: that token
    ("The Colosseum is located in the city of", "Colosseum"),
    ("When Mary and John went to the store, John gave a drink to", "John"),  # the first occurrence
    ("The war lasted from the year 1732 to the year 17", "1732"),
    ("Paris, then Paris again", "Paris"),
    ("The café in Zürich", "Zürich"),                                # multi-byte characters
    ("The café in Zürich", "café"),                                  # ends on a character of two bytes
    ("Ein Fluß, ein Ærø und ein 東京", "東京"),
])
def test_substring_position_matches_prefix_decoding(gpt2_tokenizer, prompt, substring):
    got = substring_position(gpt2_tokenizer, prompt, substring)
    assert got == _by_prefix_decoding(gpt2_tokenizer, prompt, substring)


def test_substring_position_by_hand(gpt2_tokenizer):
    prompt = "When Mary and John went to the store, John gave a drink to"
    ids = gpt2_tokenizer(prompt)["input_ids"]
    assert gpt2_tokenizer.decode(ids[substring_position(gpt2_tokenizer, prompt, "John")]) == " John"
    assert substring_position(gpt2_tokenizer, prompt, "John") == 3        # When(0) Mary(1) and(2) John(3)
    # When(0) Mary(1) and(2) John(3) went(4) to(5) the(6) store(7) ,(8) John(9) gave(10) a(11) drink(12) to(13)
    assert substring_position(gpt2_tokenizer, prompt, "John gave") == 10
    assert substring_position(gpt2_tokenizer, prompt, "to") == 5          # the first " to", not END's
    assert substring_position(gpt2_tokenizer, prompt, "drink to") == len(ids) - 1 == 13


@pytest.mark.parametrize("substring", ["Berlin", ""])
def test_substring_not_in_the_prompt_is_a_clear_error(gpt2_tokenizer, substring):
    with pytest.raises(DataError, match="expected .* to occur in the prompt"):
        substring_position(gpt2_tokenizer, "The Eiffel Tower is in", substring)
