"""The subject-verb agreement task (Linzen et al. 2016; Finlayson et al. 2021): a subject, an attractor, the verb.

A recipient is a subject noun phrase with a prepositional attractor of the opposite number, cut before the
verb ("The key to the cabinets" -> answer " is", wrong " are"); its donor flips the subject's number and
keeps the attractor ("The keys to the cabinets"). Half the recipients have a singular subject, half a plural
one. Named positions: "subject" (the subject noun's last token), "attractor" (the attractor noun's last token,
which is also END since the prompt stops there) and END. Usage::

    pairs = generate_sva(tokenizer, 32, designs=("number",), seed=0)["number"]
    batch = tokenize_sva(tokenizer, pairs)                     # PairBatch with subject, attractor and END
    run_pairs(task="sva", n_pairs=16, metric="logit_diff")     # actpatch run sva
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..engine.batch import PairBatch, tokenize_pairs
from ..engine.pairs import PromptPair
from ..errors import DataError
from .registry import Task, register

# (singular, plural): subjects and attractors; distinct lemmas, a few irregular plurals.
NOUNS: tuple[tuple[str, str], ...] = (
    ("key", "keys"), ("cabinet", "cabinets"), ("table", "tables"), ("box", "boxes"), ("door", "doors"),
    ("window", "windows"), ("book", "books"), ("chair", "chairs"), ("picture", "pictures"), ("lamp", "lamps"),
    ("bottle", "bottles"), ("shelf", "shelves"), ("knife", "knives"), ("letter", "letters"),
    ("painting", "paintings"), ("computer", "computers"), ("bag", "bags"), ("car", "cars"), ("house", "houses"),
    ("tree", "trees"), ("building", "buildings"), ("bridge", "bridges"), ("wall", "walls"), ("room", "rooms"),
    ("garden", "gardens"), ("man", "men"), ("woman", "women"), ("child", "children"), ("student", "students"),
    ("teacher", "teachers"), ("dog", "dogs"), ("report", "reports"), ("author", "authors"), ("road", "roads"),
)
PREPOSITIONS: tuple[str, ...] = (
    "to the", "near the", "behind the", "next to the", "of the", "on the", "beside the", "under the", "above the",
    "in front of the",
)
VERBS: tuple[str, str] = (" is", " are")  # (singular, plural)
DESIGNS: tuple[str, ...] = ("number",)
POSITION_NAMES: tuple[str, ...] = ("subject", "attractor", "END")
NUMBERS: tuple[str, str] = ("singular", "plural")


def _check_args(n_pairs: int, designs: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(designs, str):
        designs = (designs,)
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, int) or n_pairs < 1:
        raise DataError(f"n_pairs must be a positive integer, got {n_pairs!r}; ask for at least 1 pair.")
    designs = tuple(designs)
    if not designs:
        raise DataError(f"designs is empty; pass one or more of {', '.join(DESIGNS)}.")
    unknown = [d for d in designs if d not in DESIGNS]
    if unknown:
        raise DataError(f"unknown donor design(s) {unknown} for sva; the valid designs are {', '.join(DESIGNS)}.")
    return designs


def _check_verbs(tokenizer) -> None:
    """DataError unless " is" and " are" are one distinct token each for ``tokenizer``."""
    ids = [tokenizer.encode(v, add_special_tokens=False) for v in VERBS]
    if any(len(t) != 1 for t in ids) or ids[0] == ids[1]:
        raise DataError(
            f"sva reads the verbs {VERBS[0]!r} and {VERBS[1]!r}, which must be one distinct token each, but this "
            f"tokenizer gives {ids[0]} and {ids[1]}; use a tokenizer with word-level tokens for them (GPT-2, Llama, "
            "SmolLM2 ...), or write your own pairs with single-token answers in a JSONL pairs file."
        )


def generate_sva(
    tokenizer, n_pairs: int, designs: Sequence[str] = ("number",), seed: int = 0
) -> dict[str, list[PromptPair]]:
    """Generate ``n_pairs`` subject-verb agreement pairs: "The {subject} {preposition} {attractor}" -> verb.

    Pair i has a singular subject for even i (answer " is", wrong " are") and a plural one for odd i (answer
    " are", wrong " is"); the attractor, a different noun, always has the other number. Nouns and preposition
    come from ``random.Random(seed)``. The "number" donor flips the subject's number and keeps the attractor, so
    its subject agrees with its attractor. ``order`` is the recipient subject's number ("singular"/"plural"),
    ``template`` the preposition's index in ``PREPOSITIONS``. Nouns may be several tokens: the named positions
    (subject, attractor) are substrings, found on each side separately.

    Example::

        pairs = generate_sva(lm.tokenizer, 16)["number"]
        pairs[0].recipient, pairs[0].donor, pairs[0].answer   # 'The key to the cabinets', 'The keys to ...', ' is'
    """
    designs = _check_args(n_pairs, designs)
    _check_verbs(tokenizer)
    rng = random.Random(seed)
    pairs: list[PromptPair] = []
    for i in range(n_pairs):
        num = i % 2  # 0: singular subject, 1: plural subject
        subject, attractor = rng.sample(NOUNS, 2)
        p_idx = rng.randrange(len(PREPOSITIONS))
        prep = PREPOSITIONS[p_idx]
        rec_subj, don_subj, attr = subject[num], subject[1 - num], attractor[1 - num]
        recipient, donor = f"The {rec_subj} {prep} {attr}", f"The {don_subj} {prep} {attr}"
        positions = (("subject", f"The {rec_subj}", f"The {don_subj}"), ("attractor", recipient, donor))
        pairs.append(PromptPair(recipient, donor, VERBS[num], VERBS[1 - num], "number", p_idx, NUMBERS[num],
                                positions))
    return {d: list(pairs) for d in designs}


def tokenize_sva(tokenizer, pairs: Sequence[PromptPair]) -> PairBatch:
    """Tokenize sva pairs: one answer and one wrong verb each; "subject", "attractor" and END on each side.

    Donor and recipient may differ in length (e.g. " key" vs " keys" split differently): every named position
    is found on each prompt by its own substring (the token holding its last character).

    Example::

        batch = tokenize_sva(lm.tokenizer, generate_sva(lm.tokenizer, 8)["number"])
        batch.position("subject"), batch.donor_position("subject")
    """
    for i, pair in enumerate(pairs):
        if not isinstance(pair.answer, str) or not isinstance(pair.wrong, str):
            raise DataError(f"pair {i} ({pair.recipient!r}): sva needs one answer and one wrong verb, got "
                            f"answer={pair.answer!r}, wrong={pair.wrong!r}; use generate_sva's pairs.")
        names = [p[0] for p in pair.positions]
        if "subject" not in names or "attractor" not in names:
            raise DataError(f"pair {i} ({pair.recipient!r}): expected the named positions 'subject' and 'attractor', "
                            f"got {names}; generate the pairs with generate_sva, or add both positions.")
    return tokenize_pairs(tokenizer, pairs, single_token=True)


register(Task("sva", "subject-verb agreement across an attractor noun (Linzen et al. 2016; Finlayson et al. 2021)",
              generate=generate_sva, tokenize=tokenize_sva, designs=DESIGNS, positions=POSITION_NAMES,
              metric="logit_diff"))
