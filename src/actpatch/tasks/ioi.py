"""The IOI task: templates, names, pair generation, and IOI's named positions (IO, S1, S1+1, S2) for tokenizing.

A pair is a clean *recipient* prompt ("When Mary and John went to the store, John gave a drink to") and a
position-aligned corrupted *donor* ("swap": IO and S exchanged, "abc": three fresh names, "s2io": S2 -> IO).
Usage::

    pairs = generate_pairs(tokenizer, 32, designs=("swap", "abc"), seed=0)
    batch = tokenize_ioi(tokenizer, pairs["swap"])            # PairBatch with IO, S1, S1+1, S2 and END
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace

from ..engine.batch import PairBatch, PositionFinder, tokenize_pairs
from ..errors import DataError
from ..engine.pairs import PromptPair, load_pairs_file  # noqa: F401  (load_pairs_file: the IOI pairs file is the generic one)
from .registry import Task, register

# The 15 BABA templates of Wang et al. 2022 (Easy-Transformer ioi_dataset.py), cut before the final " [A]".
BABA_TEMPLATES: tuple[str, ...] = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to",
)
# ABBA: the first [B] and the first [A] exchanged ("Then, [A] and [B] went to ...").
ABBA_TEMPLATES: tuple[str, ...] = tuple(
    t.replace("[B]", "[X]", 1).replace("[A]", "[B]", 1).replace("[X]", "[A]", 1) for t in BABA_TEMPLATES
)

NAMES: tuple[str, ...] = (
    "Mary", "John", "Michael", "Sarah", "David", "James", "Robert", "Jessica", "Daniel", "Emily",
    "Thomas", "Laura", "Paul", "Anna", "Mark", "Lisa", "Kevin", "Rachel", "Steven", "Amy",
    "Brian", "Kate", "Peter", "Susan", "Richard", "Helen", "Eric", "Alice", "Adam", "Emma",
    "Andrew", "Jennifer", "Jason", "Michelle", "George", "Linda", "Tom", "Nancy", "Frank", "Karen",
    "Chris", "Anne", "Ryan", "Julia", "Sam", "William", "Joseph", "Charles", "Christopher", "Matthew",
    "Anthony", "Joshua", "Kenneth", "Timothy", "Jeffrey", "Scott", "Justin", "Brandon", "Benjamin", "Samuel",
    "Gregory", "Patrick", "Jack", "Dennis", "Jerry", "Tyler", "Aaron", "Henry", "Douglas", "Nathan",
    "Kyle", "Walter", "Harold", "Carl", "Arthur", "Roger", "Joe", "Albert", "Jonathan", "Sean",
    "Ian", "Luke", "Alex", "Max", "Simon", "Martin", "Victoria", "Elizabeth", "Maria", "Rebecca",
    "Kelly", "Amanda", "Nicole", "Stephanie", "Angela", "Heather", "Megan", "Grace", "Rose", "Jane",
)
PLACES: tuple[str, ...] = (
    "store", "garden", "restaurant", "school", "hospital", "office", "house", "station", "park", "beach",
    "library", "church", "museum", "market", "bank", "hotel", "airport", "theater", "farm", "lake",
)
OBJECTS: tuple[str, ...] = (
    "ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack", "book", "ball",
    "gift", "flower", "letter", "cake", "key", "hat", "phone", "camera", "bottle", "ticket",
)
DESIGNS: tuple[str, ...] = ("swap", "abc", "s2io")
POSITION_NAMES: tuple[str, ...] = ("IO", "S1", "S1+1", "S2", "END")
_SLOT = re.compile(r"(\[A\]|\[B\])")


def single_token_names(tokenizer, names: Sequence[str] = NAMES) -> tuple[str, ...]:
    """Names that are exactly one token with a leading space (tokenizer.encode(" "+n, add_special_tokens=False))."""
    return tuple(n for n in names if len(tokenizer.encode(" " + n, add_special_tokens=False)) == 1)


def _fill(template: str, roles: Mapping[str, str], place: str, obj: str) -> str:
    """Fill the name slots in order (IO = the [A], S1/S2 = first/second [B]) and [PLACE]/[OBJECT]."""
    parts, seen_b = [], 0
    for piece in _SLOT.split(template):
        if piece == "[A]":
            piece = roles["IO"]
        elif piece == "[B]":
            seen_b += 1
            piece = roles["S1" if seen_b == 1 else "S2"]
        parts.append(piece)
    return "".join(parts).replace("[PLACE]", place).replace("[OBJECT]", obj)


def generate_pairs(
    tokenizer, n_pairs: int, designs: Sequence[str] = ("swap", "abc"), seed: int = 0
) -> dict[str, list[PromptPair]]:
    """Generate ``n_pairs`` IOI recipients (the same for every design) and one donor per design.

    Pair i uses template ``i % 15`` in order ABBA (even i) or BABA (odd i), so 30 pairs cover every template in
    both orders. Names, place, object and the abc names come from ``random.Random(seed)``; only names that are
    one token for ``tokenizer`` are used. Donors: swap = IO and S exchanged everywhere; abc = IO, S1, S2 replaced
    by three distinct fresh names; s2io = S2 replaced by the IO name. Answer/wrong are always the recipient's.

    Example::

        pairs = generate_pairs(lm.tokenizer, 16, designs=("swap", "abc"), seed=0)
        pairs["abc"][0].donor

    """
    if isinstance(designs, str):
        designs = (designs,)
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, int) or n_pairs < 1:
        raise DataError(f"n_pairs must be a positive integer, got {n_pairs!r}; ask for at least 1 pair.")
    if not designs:
        raise DataError(f"designs is empty; pass one or more of {', '.join(DESIGNS)}.")
    unknown = [d for d in designs if d not in DESIGNS]
    if unknown:
        raise DataError(f"unknown donor design(s) {unknown}; the valid designs are {', '.join(DESIGNS)}.")
    names = single_token_names(tokenizer)
    if len(names) < 5:
        raise DataError(
            f"only {len(names)} of the {len(NAMES)} built-in names are a single token with a leading space for this "
            f"tokenizer ({', '.join(names) or 'none'}); at least 5 are needed (IO, S and 3 fresh abc names). "
            "Use a tokenizer with a word-level vocabulary or supply your own pairs with a JSONL pairs file."
        )
    rng = random.Random(seed)
    out: dict[str, list[PromptPair]] = {d: [] for d in designs}
    for i in range(n_pairs):
        t_idx, order = i % len(BABA_TEMPLATES), ("ABBA" if i % 2 == 0 else "BABA")
        template = (ABBA_TEMPLATES if order == "ABBA" else BABA_TEMPLATES)[t_idx]
        io, s = rng.sample(names, 2)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        c_io, c_s1, c_s2 = rng.sample([n for n in names if n not in (io, s)], 3)  # drawn always: same recipients
        recipient = _fill(template, {"IO": io, "S1": s, "S2": s}, place, obj)
        donor_roles = {
            "swap": {"IO": s, "S1": io, "S2": io},
            "abc": {"IO": c_io, "S1": c_s1, "S2": c_s2},
            "s2io": {"IO": io, "S1": s, "S2": io},
        }
        for d in designs:
            donor = _fill(template, donor_roles[d], place, obj)
            out[d].append(PromptPair(recipient, donor, " " + io, " " + s, d, t_idx, order))
    return out


def ioi_positions(positions_from: str = "recipient", require_positions: bool = True) -> PositionFinder:
    """IOI's named positions: IO (the answer's token), S1 and S2 (the wrong name's first two), S1+1; found on the
    recipient's tokens, or the donor's with ``positions_from="donor"``, and the same on both sides (IOI pairs
    are position-aligned)."""

    def find(i: int, pair: PromptPair, rec: list, don: list, answer: list, wrong: list) -> tuple[dict, dict]:
        if len(rec) != len(don):
            raise DataError(
                f"pair {i}: recipient {pair.recipient!r} has {len(rec)} tokens but donor {pair.donor!r} has {len(don)}; "
                "IOI's position-aligned patching needs equal lengths: use the same template and single-token names "
                "(or `actpatch run` with named positions for pairs of different lengths)."
            )
        named = rec if positions_from == "recipient" else don
        hits_a = [k for k, t in enumerate(named) if t == answer[0]]
        hits_w = [k for k, t in enumerate(named) if t == wrong[0]]
        io = hits_a[0] if hits_a else None
        s1 = hits_w[0] if hits_w else None
        s2 = hits_w[1] if len(hits_w) > 1 else None
        if require_positions and (io is None or s2 is None):
            raise DataError(
                f"pair {i} ({pair.recipient!r}): expected the answer {pair.answer!r} once and the wrong name "
                f"{pair.wrong!r} twice among the {positions_from}'s tokens, found them {len(hits_a)} and {len(hits_w)} "
                "times; fix the prompt, or pass require_positions=False to drop the IO/S positions."
            )
        found = {"IO": io, "S1": s1, "S1+1": None if s1 is None or s1 >= len(rec) - 1 else s1 + 1, "S2": s2}
        return found, dict(found)

    return find


def tokenize_ioi(
    tokenizer, pairs: Sequence[PromptPair], *, require_positions: bool = True, positions_from: str = "recipient",
) -> PairBatch:
    """Tokenize IOI pairs and find IO, S1, S1+1, S2 and END (``ioi_positions``); one answer and one wrong token each.

    Example::

        batch = tokenize_ioi(lm.tokenizer, generate_pairs(lm.tokenizer, 8)["swap"])
        batch.position("S2")
    """
    if positions_from not in ("recipient", "donor"):
        raise DataError(f"positions_from must be 'recipient' or 'donor', got {positions_from!r}")
    for i, pair in enumerate(pairs):
        if not isinstance(pair.answer, str) or not isinstance(pair.wrong, str):
            raise DataError(f"pair {i} ({pair.recipient!r}): IOI needs one answer (IO) and one wrong name (S), got "
                            f"answer={pair.answer!r}, wrong={pair.wrong!r}; use `actpatch run` for answer sets.")
    return tokenize_pairs(tokenizer, pairs, find=ioi_positions(positions_from, require_positions), single_token=True)


def denoising(pairs: Sequence[PromptPair]) -> list[PromptPair]:
    """The same pairs in the other direction: the corrupted prompt is the recipient, the clean one the donor.

    The answer stays the clean prompt's IO (the metric asks how much patching restores it), and the
    design gets the suffix ``-denoise``; tokenize with ``positions_from="donor"`` so that IO, S1 and S2
    are found on the clean prompt.
    """
    return [replace(p, recipient=p.donor, donor=p.recipient, design=f"{p.design}-denoise") for p in pairs]


register(Task("ioi", "indirect object identification (Wang et al. 2022)",
              generate=lambda tok, n, designs, seed: generate_pairs(tok, n, designs=designs, seed=seed),
              tokenize=tokenize_ioi, designs=DESIGNS, positions=POSITION_NAMES))
