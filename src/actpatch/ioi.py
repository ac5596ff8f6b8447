"""IOI prompt pairs for activation patching: templates, names, generation, JSONL loading (``batch`` tokenizes).

A pair is a clean *recipient* prompt ("When Mary and John went to the store, John gave a drink to") and a
position-aligned corrupted *donor* ("swap": IO and S exchanged, "abc": three fresh names, "s2io": S2 -> IO).
Usage::

    pairs = generate_pairs(tokenizer, 32, designs=("swap", "abc"), seed=0)
    pairs = load_pairs_file("my_pairs.jsonl")               # or your own: recipient, donor, answer, wrong
"""

from __future__ import annotations

import json
import random
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path

from .errors import DataError, PairsFileError

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
_FIELDS = ("recipient", "donor", "answer", "wrong")
_SLOT = re.compile(r"(\[A\]|\[B\])")


@dataclass(frozen=True)
class PromptPair:
    """A clean recipient prompt, its position-aligned donor, and the recipient's answer (IO) and wrong (S) tokens.

    Example::

        PromptPair("When Mary and John went to the store, John gave a drink to",
                   "When Mary and John went to the store, Mary gave a drink to", " Mary", " John", "swap")
    """

    recipient: str
    donor: str
    answer: str
    wrong: str
    design: str
    template: int | None = None
    order: str | None = None


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


MAX_PAIRS_FILE_BYTES = 256 * 2**20


def load_pairs_file(path: str | PathLike) -> list[PromptPair]:
    """Read a JSONL file of {"recipient", "donor", "answer", "wrong"} objects (blank lines skipped; extra keys ignored).

    Example::

        pairs = load_pairs_file("pairs.jsonl")
        batch = tokenize_pairs(lm.tokenizer, pairs, require_positions=False)
    """
    p, where = Path(path), str(path)
    try:
        size = p.stat().st_size
        if size > MAX_PAIRS_FILE_BYTES:
            raise DataError(
                f"pairs file {where!r} is {size / 2**20:.0f} MiB; expected at most {MAX_PAIRS_FILE_BYTES // 2**20} MiB "
                "(about a million pairs, far more than a patching sweep can use). Split it, or pass a sample."
            )
        if p.is_dir():
            raise DataError(f"pairs file {where!r} is a folder; expected a JSONL file.")
        raw = p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"pairs file {where!r} does not exist; check the path (expected a JSONL file).") from None
    except OSError as e:
        raise DataError(f"pairs file {where!r} cannot be read ({e.strerror or e}); pass a readable JSONL file.") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = raw[: e.start].count(b"\n") + 1
        raise PairsFileError(
            where, line_no, f"is not valid UTF-8 (byte {raw[e.start]:#04x}); save the file as UTF-8."
        ) from None
    example = '{"recipient": "...", "donor": "...", "answer": " Mary", "wrong": " John"}'
    pairs: list[PromptPair] = []
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PairsFileError(where, line_no, f"invalid JSON ({e.msg}, column {e.colno}); expected {example}") from None
        except RecursionError:
            raise PairsFileError(where, line_no, f"JSON nested too deeply; expected a flat object like {example}") from None
        if not isinstance(obj, dict):
            raise PairsFileError(where, line_no, f"expected a JSON object like {example}, got {type(obj).__name__}.")
        for key in _FIELDS:
            if key not in obj:
                raise PairsFileError(where, line_no, f"missing field {key!r}; every line needs {', '.join(_FIELDS)}.")
            if not isinstance(obj[key], str) or not obj[key].strip():
                raise PairsFileError(
                    where, line_no, f"field {key!r} must be a non-empty string, got {obj[key]!r:.200}; expected {example}"
                )
            try:
                obj[key].encode("utf-8")
            except UnicodeEncodeError:
                raise PairsFileError(where, line_no, f"field {key!r} holds an unpaired surrogate escape (\\ud8xx); "
                                     "expected text that is valid Unicode.") from None
        for key in ("answer", "wrong"):
            if not obj[key].startswith(" "):
                warnings.warn(
                    f"{where}, line {line_no}: {key} {obj[key]!r} has no leading space; in the prompt the name follows "
                    f"a space, so you probably want {' ' + obj[key]!r}.",
                    stacklevel=2,
                )
        pairs.append(PromptPair(obj["recipient"], obj["donor"], obj["answer"], obj["wrong"], "file"))
    if not pairs:
        raise DataError(f"pairs file {where!r} contains no pairs; expected one JSON object per line like {example}")
    return pairs


def denoising(pairs: Sequence[PromptPair]) -> list[PromptPair]:
    """The same pairs in the other direction: the corrupted prompt is the recipient, the clean one the donor.

    The answer stays the clean prompt's IO (the metric asks how much patching restores it), and the
    design gets the suffix ``-denoise``; tokenize with ``positions_from="donor"`` so that IO, S1 and S2
    are found on the clean prompt.
    """
    return [replace(p, recipient=p.donor, donor=p.recipient, design=f"{p.design}-denoise") for p in pairs]
