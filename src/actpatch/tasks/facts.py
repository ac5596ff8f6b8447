"""The factual-recall task (causal tracing, Meng et al. 2022 "ROME"): subject -> attribute prompts.

A recipient names a subject and asks for its attribute ("The Eiffel Tower is located in the city of" -> " Paris").
Two donor designs, on the same recipients:

- ``subject``: another subject of the same relation with another answer, preferably of another token length
  ("The Colosseum is located in the city of"); the wrong token is that subject's answer (" Rome");
- ``noise``: the recipient's own prompt with Gaussian noise on the subject's token embeddings (3 x the
  embeddings' standard deviation, a fixed seed per pair; ``engine.noise``), as in ROME's corrupted run.

Named positions: ``subject_first`` and ``subject_last`` (the subject's first and last token, found in each prompt
on its own), and END. Answers may span several tokens (cities such as " Rio de Janeiro", painters, authors): the
metric is then the log-prob difference of the two continuations, by teacher forcing. ``actpatch run facts`` keeps
the pairs the model gets right (the recipient prefers its answer, and a ``subject`` donor its own), as ROME does.
Usage::

    pairs = generate_facts(tokenizer, 16, designs=("subject", "noise"), seed=0)
    batch = tokenize_facts(tokenizer, pairs["noise"])    # PairBatch with subject_first, subject_last, END
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..engine.batch import PairBatch, substring_span, tokenize_pairs
from ..engine.pairs import PromptPair
from ..errors import DataError
from .registry import Task, register

# relation -> (template with {} for the subject, ((subject, attribute), ...))
RELATIONS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "city": ("The {} is located in the city of", (
        ("Eiffel Tower", "Paris"), ("Colosseum", "Rome"), ("Big Ben", "London"), ("Brandenburg Gate", "Berlin"),
        ("Kremlin", "Moscow"), ("Forbidden City", "Beijing"), ("Acropolis", "Athens"), ("Prado Museum", "Madrid"),
        ("Louvre", "Paris"), ("Sagrada Familia", "Barcelona"), ("Tower of London", "London"), ("Vatican", "Rome"),
        ("Sydney Opera House", "Sydney"), ("Hagia Sophia", "Istanbul"), ("Rijksmuseum", "Amsterdam"),
        ("Burj Khalifa", "Dubai"), ("Buckingham Palace", "London"), ("Notre Dame Cathedral", "Paris"),
        ("Parthenon", "Athens"), ("Pantheon", "Rome"), ("White House", "Washington"), ("Sistine Chapel", "Rome"),
        ("Wailing Wall", "Jerusalem"), ("Tokyo Tower", "Tokyo"), ("Arc de Triomphe", "Paris"),
        ("Uffizi Gallery", "Florence"), ("Doge's Palace", "Venice"), ("Space Needle", "Seattle"),
        ("Golden Gate Bridge", "San Francisco"), ("Hollywood Sign", "Los Angeles"), ("Getty Center", "Los Angeles"),
        ("Empire State Building", "New York"), ("Statue of Liberty", "New York"), ("Times Square", "New York"),
        ("Christ the Redeemer statue", "Rio de Janeiro"), ("Petronas Towers", "Kuala Lumpur"),
        ("India Gate", "New Delhi"), ("Victoria Peak", "Hong Kong"), ("Casa Rosada", "Buenos Aires"),
    )),
    "capital": ("The capital of {} is the city of", (
        ("France", "Paris"), ("Italy", "Rome"), ("England", "London"), ("Germany", "Berlin"), ("Russia", "Moscow"),
        ("China", "Beijing"), ("Greece", "Athens"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
        ("Austria", "Vienna"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Poland", "Warsaw"),
        ("Hungary", "Budapest"), ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Finland", "Helsinki"),
        ("Denmark", "Copenhagen"), ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"), ("Canada", "Ottawa"),
        ("South Korea", "Seoul"), ("Kenya", "Nairobi"), ("Cuba", "Havana"), ("the Czech Republic", "Prague"),
    )),
    "language": ("The official language of {} is", (
        ("France", "French"), ("Germany", "German"), ("Italy", "Italian"), ("Spain", "Spanish"),
        ("Brazil", "Portuguese"), ("Japan", "Japanese"), ("China", "Chinese"), ("Russia", "Russian"),
        ("Greece", "Greek"), ("Poland", "Polish"), ("Sweden", "Swedish"), ("the Netherlands", "Dutch"),
        ("Turkey", "Turkish"), ("Egypt", "Arabic"), ("Finland", "Finnish"), ("Hungary", "Hungarian"),
        ("South Korea", "Korean"), ("Vietnam", "Vietnamese"), ("Israel", "Hebrew"), ("Denmark", "Danish"),
    )),
    "painter": ("{} is a famous painting by", (
        ("Mona Lisa", "Leonardo da Vinci"), ("The Last Supper", "Leonardo da Vinci"), ("The Starry Night", "Vincent van Gogh"),
        ("Sunflowers", "Vincent van Gogh"), ("Guernica", "Pablo Picasso"), ("The Night Watch", "Rembrandt"),
        ("The Persistence of Memory", "Salvador Dali"), ("The Birth of Venus", "Sandro Botticelli"),
        ("The Scream", "Edvard Munch"), ("Water Lilies", "Claude Monet"), ("The Kiss", "Gustav Klimt"),
        ("Girl with a Pearl Earring", "Johannes Vermeer"), ("American Gothic", "Grant Wood"),
    )),
    "author": ("{} is a famous novel written by", (
        ("Pride and Prejudice", "Jane Austen"), ("War and Peace", "Leo Tolstoy"), ("Don Quixote", "Miguel de Cervantes"),
        ("Moby-Dick", "Herman Melville"), ("Les Miserables", "Victor Hugo"), ("Crime and Punishment", "Fyodor Dostoevsky"),
        ("Oliver Twist", "Charles Dickens"), ("Great Expectations", "Charles Dickens"), ("Ulysses", "James Joyce"),
        ("The Great Gatsby", "F. Scott Fitzgerald"), ("Nineteen Eighty-Four", "George Orwell"),
        ("Frankenstein", "Mary Shelley"), ("Anna Karenina", "Leo Tolstoy"), ("The Old Man and the Sea", "Ernest Hemingway"),
    )),
}
DESIGNS: tuple[str, ...] = ("subject", "noise")
POSITION_NAMES: tuple[str, ...] = ("subject_first", "subject_last", "END")
NOISE_SCALE = 3.0  # x the embeddings' standard deviation (ROME)


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _facts(tokenizer) -> list[tuple[str, str, str]]:
    """(relation, subject, attribute) for every fact, the relations interleaved (so the first pairs already mix
    them). Attributes of several tokens (" Los Angeles", " Leonardo da Vinci") are scored by teacher forcing."""
    per = [[(r, s, a) for s, a in facts] for r, (_, facts) in RELATIONS.items()]
    return [f for group in zip(*[g + [None] * (max(map(len, per)) - len(g)) for g in per]) for f in group if f]


def _partner(rng: random.Random, fact: tuple[str, str, str], facts: list, tokenizer) -> tuple[str, str, str]:
    """Another subject of the same relation with another answer, of another token length when there is one."""
    rel, subject, attr = fact
    others = [f for f in facts if f[0] == rel and f[2] != attr]
    longer = [f for f in others if _n_tokens(tokenizer, " " + f[1]) != _n_tokens(tokenizer, " " + subject)]
    return rng.choice(longer or others)


def generate_facts(
    tokenizer, n_pairs: int, designs: Sequence[str] = DESIGNS, seed: int = 0,
) -> dict[str, list[PromptPair]]:
    """Up to ``n_pairs`` fact recipients (at most one per built-in fact), the same for every design, in an order
    drawn from ``random.Random(seed)``; donors as the module docstring says.

    Example::

        generate_facts(tok, 4, ("noise",))["noise"][0].noise   # ('Eiffel Tower', 3.0, <seed>)
    """
    designs = (designs,) if isinstance(designs, str) else tuple(designs)
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, int) or n_pairs < 1:
        raise DataError(f"n_pairs must be a positive integer, got {n_pairs!r}; ask for at least 1 pair.")
    unknown = [d for d in designs if d not in DESIGNS]
    if unknown or not designs:
        raise DataError(f"unknown donor design(s) {unknown or designs}; the facts designs are {', '.join(DESIGNS)}.")
    facts = _facts(tokenizer)
    if len(facts) < 2:
        raise DataError(f"only {len(facts)} built-in facts; expected at least 2. Supply your own pairs with a pairs "
                        "file (actpatch run --pairs-file).")
    rng = random.Random(seed)
    order = list(range(len(facts)))
    rng.shuffle(order)
    out: dict[str, list[PromptPair]] = {d: [] for d in designs}
    for i in order[:n_pairs]:
        rel, subject, attr = facts[i]
        _, other, other_attr = _partner(rng, facts[i], facts, tokenizer)  # drawn always: the same recipients
        noise_seed = rng.randrange(2**31)
        template = RELATIONS[rel][0]
        recipient = template.format(subject)
        for d in designs:
            donor, don_subject = (template.format(other), other) if d == "subject" else (recipient, subject)
            out[d].append(PromptPair(recipient, donor, " " + attr, " " + other_attr, d, order=rel,
                                     positions=(("subject", subject, don_subject),),
                                     noise=(subject, NOISE_SCALE, noise_seed) if d == "noise" else None))
    return out


def _find(tokenizer):
    def find(i: int, pair: PromptPair, rec, don, answer, wrong) -> tuple[dict, dict]:
        (_, rec_sub, don_sub), = pair.positions
        sides = []
        for prompt, sub in ((pair.recipient, rec_sub), (pair.donor, don_sub)):
            first, last = substring_span(tokenizer, prompt, sub)
            sides.append({"subject_first": first, "subject_last": last})
        return sides[0], sides[1]

    return find


def tokenize_facts(tokenizer, pairs: Sequence[PromptPair]) -> PairBatch:
    """Tokenize fact pairs: subject_first, subject_last (from each pair's "subject" substrings) and END.

    Example::

        batch = tokenize_facts(tok, generate_facts(tok, 8, ("subject",))["subject"]); batch.position("subject_last")
    """
    for i, pair in enumerate(pairs):
        if [p[0] for p in pair.positions] != ["subject"]:
            raise DataError(f"pair {i} ({pair.recipient!r}): a facts pair names one position, 'subject', got "
                            f"{[p[0] for p in pair.positions]}; generate pairs with generate_facts.")
    return tokenize_pairs(tokenizer, pairs, find=_find(tokenizer))


register(Task("facts", "factual recall, causal tracing (Meng et al. 2022)", generate=generate_facts,
              tokenize=tokenize_facts, designs=DESIGNS, positions=POSITION_NAMES, metric="logit_diff",
              sites=("hidden", "all_heads", "head", "attn", "mlp"), keep_correct=True))
