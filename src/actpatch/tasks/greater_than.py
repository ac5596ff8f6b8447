"""The greater-than task (Hanna, Liu & Variengien 2023): does the model continue a time span with a later year?

A recipient is "The war lasted from the year 1732 to the year 17"; its position-aligned donor (design "01")
has the start year's last two digits replaced by 01: "... from the year 1701 to the year 17". The metric is
prob_diff = P(answer set) - P(wrong set) at END. The sets depend on how the tokenizer writes numbers, and
the mode is chosen automatically (``greater_than_mode``):

* ``"year"`` (GPT-2-like: "00".."99" are single tokens and "1732" splits as "17", "32"): the model predicts
  the two-digit token YY'. Answer set = YY' > YY, wrong set = YY' <= YY, as in the paper. Only years whose
  recipient and donor split as [XX][YY] are used, and the sets hold only the YY' that the tokenizer itself
  would write after the prompt (prompt + YY' tokenizes as prompt's tokens + YY'; GPT-2 writes " 1700" as one
  token, so "00" is left out, and " 1302" as " 130", "2"). A prompt missing more than 10 of the 100 is skipped
  (GPT-2: the century 11).
* ``"digit"`` (numbers split into single digits, like the bundled SmolLM2): the model predicts the tens digit
  after "17". With t the start year's tens digit, answer set = digits d > t, wrong set = d < t; t itself is
  ambiguous (17t0..17t9 straddle the start year) and in neither set. t is drawn from 1..8.

Named positions: YY (the token holding the start year's last digit, "32" or "2"; "01"/"1" in the donor) and
END. Usage::

    pairs = generate_greater_than(tokenizer, 32, designs=("01",), seed=0)["01"]
    batch = tokenize_greater_than(tokenizer, pairs)           # PairBatch with YY and END
    run_pairs(task="greater-than", metric="prob_diff", positions=("YY", "END"))
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..engine.batch import PairBatch, substring_positions, tokenize_pairs
from ..engine.pairs import PromptPair
from ..errors import DataError
from .registry import Task, register

# Nouns that "last", in the spirit of Hanna et al.'s list (singular, so "The X lasted" reads well).
NOUNS: tuple[str, ...] = (
    "war", "expedition", "siege", "reign", "drought", "famine", "project", "strike", "voyage", "campaign",
    "dynasty", "epidemic", "occupation", "rebellion", "journey", "pilgrimage", "plague", "treaty", "trial",
    "investigation", "negotiation", "dispute", "rivalry", "alliance", "marriage", "friendship", "invasion",
    "insurgency", "outbreak", "conflict", "crisis", "construction", "program", "tradition", "custody",
    "imprisonment", "captivity", "exile", "quest", "tour", "kingdom", "empire", "feud", "riot", "blockade",
)
CENTURIES: tuple[int, ...] = tuple(range(11, 18))  # XX, as in the paper
DESIGNS: tuple[str, ...] = ("01",)
POSITION_NAMES: tuple[str, ...] = ("YY", "END")
TEMPLATE = "The {noun} lasted from the year {start} to the year {xx}"
MIN_SHARE = 0.9  # a prompt is kept only if at least 90% of the candidate continuations are how it would be written
_PROBE = ("war", 17, 32)


def _spans(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
    except NotImplementedError as exc:  # slow tokenizers give no offsets
        raise DataError(f"greater-than finds the year's tokens by character offsets, which {type(tokenizer).__name__} "
                        "does not give; load the model's fast tokenizer (use_fast=True).") from exc
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _pieces(text: str, offsets: list[tuple[int, int]], start: int, length: int) -> list[str]:
    """The stripped text of every token overlapping text[start:start+length] (whole tokens, not clipped)."""
    return [text[a:b].strip() for a, b in offsets if a < start + length and b > start and b > a]


def _split_ok(mode: str, pieces: list[str], digits: str) -> bool:
    """A number's tokens as the mode expects: two digits a token ("year": [XX, YY] or [XX]), or one a digit."""
    if mode == "year":
        return pieces == [digits[k:k + 2] for k in range(0, len(digits), 2)]
    return pieces == list(digits)


def _candidates(mode: str) -> list[str]:
    return [f"{y:02d}" for y in range(100)] if mode == "year" else [str(d) for d in range(10)]


def _continuations(tokenizer, prompt: str, mode: str) -> list[str]:
    """The candidate next tokens (00..99 or 0..9) that the tokenizer itself would write after ``prompt``."""
    base = list(tokenizer(prompt)["input_ids"])
    cands = _candidates(mode)
    extended = tokenizer([prompt + c for c in cands])["input_ids"]
    return [c for c, ids in zip(cands, extended)
            if list(ids) == base + list(tokenizer.encode(c, add_special_tokens=False))]


def _make_pair(tokenizer, mode: str, noun: str, xx: int, yy: int) -> PromptPair | None:
    """The pair for (noun, XX, YY), or None where the tokenizer does not write it as the mode expects."""
    start, donor_start = f"{xx}{yy:02d}", f"{xx}01"
    recipient = TEMPLATE.format(noun=noun, start=start, xx=xx)
    donor = TEMPLATE.format(noun=noun, start=donor_start, xx=xx)
    at = recipient.index(start)
    rec_ids, rec_off = _spans(tokenizer, recipient)
    don_ids, don_off = _spans(tokenizer, donor)
    if (len(rec_ids) != len(don_ids) or not _split_ok(mode, _pieces(recipient, rec_off, at, 4), start)
            or not _split_ok(mode, _pieces(donor, don_off, at, 4), donor_start)
            or not _split_ok(mode, _pieces(recipient, rec_off, len(recipient) - 2, 2), str(xx))):
        return None
    conts = _continuations(tokenizer, recipient, mode)
    if len(conts) < MIN_SHARE * len(_candidates(mode)):
        return None
    if mode == "year":
        answer, wrong = [c for c in conts if int(c) > yy], [c for c in conts if int(c) <= yy]
    else:
        answer, wrong = [c for c in conts if int(c) > yy // 10], [c for c in conts if int(c) < yy // 10]
    if not answer or not wrong:
        return None
    return PromptPair(recipient, donor, tuple(answer), tuple(wrong), "01", positions=(("YY", start, donor_start),))


def greater_than_mode(tokenizer) -> str:
    """``"year"`` where every two-digit number is one token and "1732" splits as "17", "32" (GPT-2-like), or
    ``"digit"`` where numbers split into single one-token digits (SmolLM2); DataError when neither works (e.g.
    Llama-3's groups of up to three digits).

    Example::

        greater_than_mode(lm.tokenizer)   # 'digit' for the bundled smollm2-135m
    """
    noun, xx, yy = _PROBE
    for mode in ("year", "digit"):
        single = all(len(tokenizer.encode(c, add_special_tokens=False)) == 1 for c in _candidates(mode))
        if single and _make_pair(tokenizer, mode, noun, xx, yy) is not None:
            return mode
    text = TEMPLATE.format(noun=noun, start=f"{xx}{yy}", xx=xx)
    got = [tokenizer.decode([t]) for t in tokenizer(text)["input_ids"]]
    raise DataError(
        f"greater-than needs a tokenizer that writes every two-digit number 00..99 as one token and splits '1732' "
        f"as '17', '32' (GPT-2-like), or one that splits numbers into single one-token digits (SmolLM2-like); "
        f"{type(tokenizer).__name__} tokenizes {text!r} as {got}. Use a model with such a tokenizer, or write your "
        "own pairs with answer sets (a JSONL pairs file, `actpatch run --pairs-file`)."
    )


def generate_greater_than(
    tokenizer, n_pairs: int, designs: Sequence[str] = DESIGNS, seed: int = 0
) -> dict[str, list[PromptPair]]:
    """Generate ``n_pairs`` greater-than pairs per design (only "01": the start year's YY becomes 01).

    Noun, century XX (11..17) and start year YY (02..98 in year mode, tens digit 1..8 in digit mode) come
    from ``random.Random(seed)``; draws the tokenizer does not write as its mode expects are redrawn. Answer
    and wrong are token sets (tuples); see the module docstring for the two modes.

    Example::

        pairs = generate_greater_than(lm.tokenizer, 16, seed=0)["01"]
        pairs[0].recipient, pairs[0].answer      # 'The marriage lasted from the year 1763 to the year 17', ('7', '8', '9')
    """
    if isinstance(designs, str):
        designs = (designs,)
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, int) or n_pairs < 1:
        raise DataError(f"n_pairs must be a positive integer, got {n_pairs!r}; ask for at least 1 pair.")
    if not designs:
        raise DataError(f"designs is empty; pass one or more of {', '.join(DESIGNS)}.")
    unknown = [d for d in designs if d not in DESIGNS]
    if unknown:
        raise DataError(f"unknown donor design(s) {unknown} for greater-than; the valid designs are "
                        f"{', '.join(DESIGNS)} (the start year's last two digits replaced by 01).")
    mode = greater_than_mode(tokenizer)
    years = range(2, 99) if mode == "year" else range(10, 90)
    rng = random.Random(seed)
    pairs: list[PromptPair] = []
    tries = 0
    while len(pairs) < n_pairs:
        tries += 1
        if tries > 50 * n_pairs + 200:
            raise DataError(f"only {len(pairs)} of {n_pairs} greater-than pairs could be written the way the "
                            f"{mode!r} mode expects with this tokenizer after {tries - 1} draws; ask for fewer "
                            "pairs, or write your own pairs file with answer sets.")
        pair = _make_pair(tokenizer, mode, rng.choice(NOUNS), rng.choice(CENTURIES), rng.choice(years))
        if pair is not None:
            pairs.append(pair)
    return {d: list(pairs) for d in designs}


def tokenize_greater_than(tokenizer, pairs: Sequence[PromptPair]) -> PairBatch:
    """Tokenize greater-than pairs: answer sets, YY (from each pair's positions) and END; recipient and donor
    must have the same number of tokens (the donor only changes the start year's last digits).

    Example::

        batch = tokenize_greater_than(lm.tokenizer, generate_greater_than(lm.tokenizer, 8)["01"])
        batch.position("YY"), batch.position("END")
    """
    by_substring = substring_positions(tokenizer)

    def find(i: int, pair: PromptPair, rec: list, don: list, answer: list, wrong: list) -> tuple[dict, dict]:
        if len(rec) != len(don):
            raise DataError(f"pair {i}: recipient {pair.recipient!r} has {len(rec)} tokens but donor {pair.donor!r} "
                            f"has {len(don)}; greater-than pairs must be position-aligned. Generate them with "
                            "generate_greater_than, or change only the start year's last two digits.")
        if "YY" not in {name for name, _, _ in pair.positions}:
            raise DataError(f"pair {i} ({pair.recipient!r}) names no 'YY' position; expected positions like "
                            "(('YY', '1732', '1701'),), the start year in recipient and donor.")
        return by_substring(i, pair, rec, don, answer, wrong)

    return tokenize_pairs(tokenizer, pairs, find=find, single_token=True)


register(Task("greater-than", "years after a start year (Hanna, Liu & Variengien 2023)",
              generate=lambda tok, n, designs, seed: generate_greater_than(tok, n, designs=designs, seed=seed),
              tokenize=tokenize_greater_than, designs=DESIGNS, positions=POSITION_NAMES, metric="prob_diff"))
