"""Prompt pairs of any task: a recipient, a donor, answer and wrong token sets, named positions; JSONL loading.

A pair says what to patch (donor -> recipient) and what to read (the answer and wrong tokens, as one
string or a set of them). ``positions`` names places in both prompts by a substring of each:
``{"subject": ["Eiffel Tower", "Colosseum"]}`` is the token holding the last character of "Eiffel Tower"
in the recipient, and of "Colosseum" in the donor (``batch`` turns them into token indices). Usage::

    pair = PromptPair("The Eiffel Tower is located in the city of", "The Colosseum is located in the city of",
                      " Paris", " Rome", positions=(("subject", "Eiffel Tower", "Colosseum"),))
    pairs = load_pairs_file("my_pairs.jsonl")      # one JSON object per line, the same fields
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from ..errors import DataError, PairsFileError

MAX_PAIRS_FILE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class PromptPair:
    """A recipient prompt, its donor, the recipient's answer and wrong tokens, and named positions.

    ``answer`` and ``wrong`` are one string or a tuple of strings (a token set), or None where the metric
    needs no answers (KL). ``positions`` holds (name, substring in recipient, substring in donor) triples.
    ``design``, ``template`` and ``order`` say where a generated pair came from ("file" for your own).
    ``noise`` = (substring of the donor, scale, seed) makes the donor a noised run (causal tracing, Meng et al.
    2022): Gaussian noise of ``scale`` x the embeddings' standard deviation is added to the embeddings of the
    substring's tokens, drawn from ``torch.Generator().manual_seed(seed)``.

    Example::

        PromptPair("When Mary and John went to the store, John gave a drink to",
                   "When Mary and John went to the store, Mary gave a drink to", " Mary", " John", "swap")
    """

    recipient: str
    donor: str
    answer: str | tuple[str, ...] | None = None
    wrong: str | tuple[str, ...] | None = None
    design: str = "file"
    template: int | None = None
    order: str | None = None
    positions: tuple[tuple[str, str, str], ...] = ()
    noise: tuple[str, float, int] | None = None


def as_set(value: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """An answer field as a tuple of strings: () for None, (s,) for one string."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


_EXAMPLE = ('{"recipient": "...", "donor": "...", "answer": " Paris", "wrong": [" Rome", " Milan"], '
            '"positions": {"subject": ["Eiffel Tower", "Colosseum"]}}')


def _text(where: str, line_no: int, key: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PairsFileError(where, line_no, f"field {key!r} must be a non-empty string, got {value!r:.200}; "
                             f"expected {_EXAMPLE}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PairsFileError(where, line_no, f"field {key!r} holds an unpaired surrogate escape (\\ud8xx); "
                             "expected text that is valid Unicode.") from None
    return value


def _answer(where: str, line_no: int, key: str, value) -> str | tuple[str, ...]:
    """An answer field: a string, or a non-empty list of strings (a token set)."""
    if isinstance(value, list):
        if not value:
            raise PairsFileError(where, line_no, f"field {key!r} is an empty list; expected a string or a "
                                 "non-empty list of strings (each one token).")
        texts = tuple(_text(where, line_no, key, v) for v in value)
    else:
        texts = (_text(where, line_no, key, value),)
    for t in texts:
        if not t.startswith(" "):
            warnings.warn(f"{where}, line {line_no}: {key} {t!r} has no leading space; after a word the next token "
                          f"usually starts with one, so you probably want {' ' + t!r}.", stacklevel=3)
    return texts if isinstance(value, list) else texts[0]


def _positions(where: str, line_no: int, value) -> tuple[tuple[str, str, str], ...]:
    if not isinstance(value, dict):
        raise PairsFileError(where, line_no, f"field 'positions' must be an object {{name: [substring in recipient, "
                             f"substring in donor]}}, got {value!r:.200}")
    out = []
    for name, subs in value.items():
        if not name or name in ("END", "last"):
            raise PairsFileError(where, line_no, f"position name {name!r} is reserved or empty; END is always the "
                                 "last token of each prompt. Choose another name.")
        if not (isinstance(subs, list) and len(subs) == 2):
            raise PairsFileError(where, line_no, f"position {name!r} must be [substring in recipient, substring in "
                                 f"donor], got {subs!r:.200}")
        out.append((name, _text(where, line_no, name, subs[0]), _text(where, line_no, name, subs[1])))
    return tuple(out)


def _noise(where: str, line_no: int, value) -> tuple[str, float, int]:
    """The ``noise`` field: {"span": substring of the donor, "scale": float (default 3), "seed": int (default 0)}."""
    ok = isinstance(value, dict) and set(value) <= {"span", "scale", "seed"} and "span" in value
    scale, seed = (value.get("scale", 3.0), value.get("seed", 0)) if ok else (None, None)
    if not ok or isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 \
            or isinstance(seed, bool) or not isinstance(seed, int):
        raise PairsFileError(where, line_no, f"field 'noise' must be {{\"span\": substring of the donor, \"scale\": "
                             f"positive number (default 3), \"seed\": int (default 0)}}, got {value!r:.200}")
    return _text(where, line_no, "noise span", value["span"]), float(scale), seed


def _read_text(path: str | PathLike) -> str:
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
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = raw[: e.start].count(b"\n") + 1
        raise PairsFileError(where, line_no, f"is not valid UTF-8 (byte {raw[e.start]:#04x}); save the file as UTF-8.") from None


def _pair(obj: dict, where: str, line_no: int, require_answers: bool) -> PromptPair:
    needed = ("recipient", "donor", "answer", "wrong") if require_answers else ("recipient", "donor")
    for key in needed:
        if key not in obj:
            raise PairsFileError(where, line_no, f"missing field {key!r}; every line needs {', '.join(needed)}.")
        if require_answers and key in ("answer", "wrong") and obj[key] is None:
            raise PairsFileError(where, line_no, f"field {key!r} is null; give a string or a list of strings "
                                 "(only a metric without answers, such as kl, lets answer and wrong be left out).")
    answers = {k: _answer(where, line_no, k, obj[k]) if obj.get(k) is not None else None for k in ("answer", "wrong")}
    positions = _positions(where, line_no, obj["positions"]) if "positions" in obj else ()
    noise = _noise(where, line_no, obj["noise"]) if obj.get("noise") is not None else None
    return PromptPair(_text(where, line_no, "recipient", obj["recipient"]), _text(where, line_no, "donor", obj["donor"]),
                      answers["answer"], answers["wrong"], positions=positions, noise=noise)


def pair_from_dict(obj: dict, index: int = 0, require_answers: bool = False) -> PromptPair:
    """A ``PromptPair`` from a dict with the pairs-file fields, validated the same way (errors name item ``index``).

    Example::

        pair_from_dict({"recipient": "The Louvre is in", "donor": "The Colosseum is in", "answer": " Paris",
                        "wrong": " Rome", "positions": {"subject": ["Louvre", "Colosseum"]}})
    """
    if not isinstance(obj, dict):
        raise DataError(f"expected a pair as a dict like {_EXAMPLE}, got {type(obj).__name__}")
    return _pair(obj, "pairs", index, require_answers)


def load_pairs_file(path: str | PathLike, *, require_answers: bool = True) -> list[PromptPair]:
    """Read a JSONL file of pairs: ``recipient``, ``donor``, ``answer`` and ``wrong`` (a string or a list of
    strings), optional ``positions`` ({name: [substring in recipient, substring in donor]}) and ``noise`` ({"span": substring of
    the donor, "scale": 3, "seed": 0}: Gaussian noise on those tokens' embeddings in the donor run). Blank lines are
    skipped and other keys ignored. ``require_answers=False`` lets ``answer`` and ``wrong`` be left out (KL).

    Example::

        pairs = load_pairs_file("pairs.jsonl")
        batch = tokenize_pairs(lm.tokenizer, pairs)
    """
    where = str(path)
    text = _read_text(path)
    pairs: list[PromptPair] = []
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PairsFileError(where, line_no, f"invalid JSON ({e.msg}, column {e.colno}); expected {_EXAMPLE}") from None
        except RecursionError:
            raise PairsFileError(where, line_no, f"JSON nested too deeply; expected a flat object like {_EXAMPLE}") from None
        if not isinstance(obj, dict):
            raise PairsFileError(where, line_no, f"expected a JSON object like {_EXAMPLE}, got {type(obj).__name__}.")
        pairs.append(_pair(obj, where, line_no, require_answers))
    if not pairs:
        raise DataError(f"pairs file {where!r} contains no pairs; expected one JSON object per line like {_EXAMPLE}")
    return pairs
