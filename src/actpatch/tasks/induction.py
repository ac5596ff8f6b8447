"""The induction task: a random token sequence, repeated; the model should copy the token that came next.

A recipient is ``length`` random tokens t0..t(n-1) followed by t0..t(n-2), so the next token is t(n-1)
(the answer); its "fresh" donor starts with other random tokens s0..s(n-1) before the same t0..t(n-2), so
an induction head finds nothing to copy (the wrong token is s(n-1)). Tokens are whole words with a leading
space (" house") drawn from the tokenizer's vocabulary, distinct within a pair, and every prompt tokenizes
back to exactly the sampled ids. Named positions: "cue" (the first occurrence of END's token), "next" (the
token after it, the one an induction head copies) and END. The metric is "logprob" of the answer. Usage::

    pairs = generate_induction(tokenizer, 32, designs=("fresh",), seed=0, length=10)["fresh"]
    batch = tokenize_induction(tokenizer, pairs)                 # PairBatch with cue, next and END
    run_pairs(task="induction", n_pairs=16, metric="logprob")    # actpatch run induction --metric logprob
"""

from __future__ import annotations

import random
import re
import weakref
from collections.abc import Sequence

from ..engine.batch import PairBatch, PositionFinder, tokenize_pairs
from ..engine.pairs import PromptPair
from ..errors import DataError
from .registry import Task, register

DESIGNS: tuple[str, ...] = ("fresh",)
POSITION_NAMES: tuple[str, ...] = ("cue", "next", "END")
WORD = re.compile(r" [A-Za-z]{3,10}")  # a usable token's decoded text
MAX_TRIES = 200  # resamples of one pair before giving up
_CANDIDATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (vocab size, ids)


def word_tokens(tokenizer) -> tuple[int, ...]:
    """Token ids, ascending, whose decoded text is a space and 3-10 ASCII letters and encodes back to that one id.

    Example::

        word_tokens(lm.tokenizer)[:3]     # ids of tokens like " the", " and", " for"
    """
    size = len(tokenizer)
    try:
        cached = _CANDIDATES.get(tokenizer)
    except TypeError:  # an object that cannot be weakly referenced: no cache
        cached = None
    if cached is not None and cached[0] == size:
        return cached[1]
    texts = tokenizer.batch_decode([[i] for i in range(size)])
    found = [i for i, text in enumerate(texts) if WORD.fullmatch(text)]
    encoded = tokenizer([texts[i] for i in found], add_special_tokens=False)["input_ids"] if found else []
    ids = tuple(i for i, enc in zip(found, encoded) if list(enc) == [i])
    try:
        _CANDIDATES[tokenizer] = (size, ids)
    except TypeError:
        pass
    return ids


def _check_args(n_pairs: int, designs: Sequence[str] | str, length: int) -> tuple[str, ...]:
    if isinstance(designs, str):
        designs = (designs,)
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, int) or n_pairs < 1:
        raise DataError(f"n_pairs must be a positive integer, got {n_pairs!r}; ask for at least 1 pair.")
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise DataError(f"length must be an integer of at least 2 (tokens before the repeat), got {length!r}; "
                        "the default is 10.")
    designs = tuple(designs)
    if not designs:
        raise DataError(f"designs is empty; pass one or more of {', '.join(DESIGNS)}.")
    unknown = [d for d in designs if d not in DESIGNS]
    if unknown:
        raise DataError(f"unknown donor design(s) {unknown} for induction; the valid designs are {', '.join(DESIGNS)}.")
    return designs


def _round_trips(tokenizer, text: str, ids: list[int]) -> bool:
    """True when ``tokenizer(text)`` (as tokenize_pairs calls it) gives ``ids``, after leading special tokens only."""
    got = list(tokenizer(text)["input_ids"])
    extra = len(got) - len(ids)
    special = set(tokenizer.all_special_ids)
    return extra >= 0 and got[extra:] == ids and all(t in special for t in got[:extra])


def _text(tokenizer, ids: list[int]) -> str:
    """The prompt of ``ids``: each token's own decoded text (" house"), joined (no clean-up of spaces)."""
    return "".join(tokenizer.decode([t]) for t in ids)


def generate_induction(
    tokenizer, n_pairs: int, designs: Sequence[str] = ("fresh",), seed: int = 0, length: int = 10
) -> dict[str, list[PromptPair]]:
    """Generate ``n_pairs`` repeated-sequence pairs of ``length`` random word tokens (answer t(n-1), wrong s(n-1)).

    For each pair, 2 * ``length`` distinct tokens are drawn from ``word_tokens(tokenizer)`` with
    ``random.Random(seed)``; a draw whose recipient or donor does not tokenize back to exactly its ids
    (after any BOS) is drawn again. ``template`` holds ``length``.

    Example::

        pairs = generate_induction(lm.tokenizer, 8, length=10)["fresh"]
        pairs[0].answer       # the token after the first occurrence of the recipient's last token
    """
    designs = _check_args(n_pairs, designs, length)
    candidates = word_tokens(tokenizer)
    if len(candidates) < 2 * length:
        raise DataError(
            f"induction needs at least {2 * length} vocabulary tokens that decode to a space and 3-10 ASCII letters "
            f"(like ' house') and encode back to themselves; this tokenizer ({type(tokenizer).__name__}) has "
            f"{len(candidates)}. Use a byte-level BPE tokenizer (GPT-2, SmolLM2, Llama 3 ...) or a smaller length."
        )
    rng = random.Random(seed)
    pairs: list[PromptPair] = []
    for i in range(n_pairs):
        for _ in range(MAX_TRIES):
            drawn = rng.sample(candidates, 2 * length)
            t, s = drawn[:length], drawn[length:]
            rec_ids, don_ids = t + t[:-1], s + t[:-1]
            recipient, donor = _text(tokenizer, rec_ids), _text(tokenizer, don_ids)
            if _round_trips(tokenizer, recipient, rec_ids) and _round_trips(tokenizer, donor, don_ids):
                break
        else:
            raise DataError(
                f"pair {i}: {MAX_TRIES} draws of {2 * length} word tokens did not tokenize back to their own ids "
                f"with {type(tokenizer).__name__}; expected tokenizer(decode(ids)) == ids. Use a byte-level BPE "
                "tokenizer, or a smaller length."
            )
        pairs.append(PromptPair(recipient, donor, tokenizer.decode([t[-1]]), tokenizer.decode([s[-1]]), "fresh",
                                length, None))
    return {d: list(pairs) for d in designs}


def induction_positions() -> PositionFinder:
    """Induction's named positions by token index: "cue" = the first occurrence of the recipient's last token,
    "next" = the token after it (it must be the answer); the same indices on the donor (equal lengths)."""

    def find(i: int, pair: PromptPair, rec: list, don: list, answer: list, wrong: list) -> tuple[dict, dict]:
        hits = [k for k, tok in enumerate(rec[:-1]) if tok == rec[-1]]
        if len(rec) != len(don) or len(hits) != 1 or rec[hits[0] + 1] != answer[0]:
            raise DataError(
                f"pair {i} ({pair.recipient[:60]!r}...): expected a repeated sequence whose last token occurs once "
                f"before (found {len(hits)} times), followed by the answer {pair.answer!r}, and a donor of the same "
                f"length ({len(rec)} vs {len(don)} tokens); generate the pairs with generate_induction for this "
                "tokenizer."
            )
        found = {"cue": hits[0], "next": hits[0] + 1}
        return found, dict(found)

    return find


def tokenize_induction(tokenizer, pairs: Sequence[PromptPair]) -> PairBatch:
    """Tokenize induction pairs: one answer and one wrong token each; "cue", "next" and END by token index.

    Example::

        batch = tokenize_induction(lm.tokenizer, generate_induction(lm.tokenizer, 8)["fresh"])
        batch.position("cue"), batch.position("next")
    """
    for i, pair in enumerate(pairs):
        if not isinstance(pair.answer, str) or not isinstance(pair.wrong, str):
            raise DataError(f"pair {i} ({pair.recipient[:60]!r}...): induction needs one answer and one wrong token, "
                            f"got answer={pair.answer!r}, wrong={pair.wrong!r}; use generate_induction's pairs.")
    return tokenize_pairs(tokenizer, pairs, find=induction_positions(), single_token=True)


register(Task("induction", "copying a repeated random token sequence (induction heads; Olsson et al. 2022)",
              generate=generate_induction, tokenize=tokenize_induction, designs=DESIGNS, positions=POSITION_NAMES,
              metric="logprob"))
