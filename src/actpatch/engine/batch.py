"""Tokenized pairs of any task: right-padded recipient and donor ids, answer sets and per-row named positions.

``tokenize_pairs`` turns ``PromptPair``s into a ``PairBatch``. Recipient and donor are padded each to
its own width, so they may differ in length; a named position is a (B,) index on each side
(``positions`` on the recipient, ``donor_positions`` on the donor), found from the pairs' substrings
or by a task's own finder, and END (each prompt's last token) is always there. Answers are token sets,
(B, K) id tensors padded with -1. An answer of several tokens is a *continuation*: its tokens are those of
tokenize(prompt + answer) after the prompt's own (``continuation_ids``), and the batch then holds every answer's
and wrong continuation as ``cont_ids`` (B, n, m) with ``cont_side`` (B, n). Usage::

    batch = tokenize_pairs(tokenizer, pairs)               # PairBatch of right-padded id tensors
    batch.position("END"), batch.donor_position("END")     # (B,) each side's last real token
    half = batch.select(slice(0, 8))                       # the first 8 pairs, same padded widths
    substring_position(tokenizer, "The Eiffel Tower is in", "Eiffel Tower")  # index of the token " Tower"
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import DataError, SiteError
from .pairs import PromptPair, as_set

# (row i, pair, recipient ids, donor ids, answer ids, wrong ids) -> ({name: recipient index}, {name: donor index});
# a name whose index is None in some row is dropped for the whole batch
PositionFinder = Callable[[int, PromptPair, list, list, list, list], tuple[dict, dict]]


@dataclass(frozen=True, eq=False)
class PairBatch:
    """Tokenized pairs: right-padded recipient and donor ids (each side its own width), answer sets, named positions.

    ``answer_ids``/``wrong_ids`` (B,) are the first token of each set; ``answer_sets``/``wrong_sets`` (B, K)
    hold the whole sets, padded with -1 (None: the sets are the single tokens). ``donor_mask`` and
    ``donor_positions`` (None: the recipient's) describe the donor side. ``noise_mask`` (B, dpos) marks donor tokens
    whose embeddings get Gaussian noise of ``noise_scale`` x the embeddings' std, seeded per row by ``noise_seed``
    (None: no pair is noised; ``engine.noise``). ``cont_ids`` (B, n, m): every answer's and wrong continuation
    of each row (answers first), padded with -1, and ``cont_side`` (B, n): +1 answer, -1 wrong, 0 an unused slot;
    None when every answer is one token (the metrics then read the END logits only).

    Example::

        batch = tokenize_pairs(lm.tokenizer, pairs); batch.position("END"), batch.recipient_ids.shape
    """

    pairs: tuple[PromptPair, ...]
    recipient_ids: Int[Tensor, "batch pos"]
    donor_ids: Int[Tensor, "batch dpos"]
    attention_mask: Int[Tensor, "batch pos"]
    answer_ids: Int[Tensor, "batch"]
    wrong_ids: Int[Tensor, "batch"]
    positions: Mapping[str, Int[Tensor, "batch"]] = field(default_factory=dict)
    donor_mask: Int[Tensor, "batch dpos"] | None = None
    donor_positions: Mapping[str, Int[Tensor, "batch"]] | None = None
    answer_sets: Int[Tensor, "batch ka"] | None = None
    wrong_sets: Int[Tensor, "batch kw"] | None = None
    noise_mask: Bool[Tensor, "batch dpos"] | None = None
    noise_scale: Float[Tensor, "batch"] | None = None
    noise_seed: Int[Tensor, "batch"] | None = None
    cont_ids: Int[Tensor, "batch n m"] | None = None
    cont_side: Int[Tensor, "batch n"] | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def donor_attention_mask(self) -> Int[Tensor, "batch dpos"]:
        return self.attention_mask if self.donor_mask is None else self.donor_mask

    def position(self, name: str) -> Int[Tensor, "batch"]:
        """The (B,) recipient index of a named position; SiteError naming the available ones if absent."""
        if name not in self.positions:
            raise SiteError(f"position {name!r} is not available for this batch; available: {', '.join(self.positions)}. "
                            "(A name is only kept when it is found in every row.)")
        return self.positions[name]

    def donor_position(self, name: str) -> Int[Tensor, "batch"]:
        """The (B,) donor index of a named position (the recipient's when the pairs are position-aligned)."""
        self.position(name)
        return (self.positions if self.donor_positions is None else self.donor_positions)[name]

    def side_positions(self, side: str = "recipient") -> Mapping[str, Int[Tensor, "batch"]]:
        """Every named position's (B,) index on the recipient (or ``side="donor"``) prompts."""
        return self.donor_positions if side == "donor" and self.donor_positions is not None else self.positions

    def lengths(self, side: str = "recipient") -> Int[Tensor, "batch"]:
        """(B,) real token counts of the recipient (or ``side="donor"``) prompts."""
        return (self.donor_attention_mask if side == "donor" else self.attention_mask).sum(dim=1)

    def unequal_rows(self) -> list[int]:
        """Rows whose donor and recipient differ in token length (patching at all positions refuses them)."""
        return (self.lengths() != self.lengths("donor")).nonzero().flatten().tolist()

    def answers(self) -> tuple[Int[Tensor, "batch ka"], Int[Tensor, "batch kw"]]:
        """(B, Ka) answer and (B, Kw) wrong token sets, padded with -1."""
        a = self.answer_ids[:, None] if self.answer_sets is None else self.answer_sets
        w = self.wrong_ids[:, None] if self.wrong_sets is None else self.wrong_sets
        return a, w

    def answer_columns(self) -> Int[Tensor, "batch n"]:
        """(B, n): every answer and wrong token id of each row (padding repeats the row's first answer), the
        columns a metric over the sets reads."""
        cols = torch.cat(self.answers(), dim=1)
        return torch.where(cols >= 0, cols, self.answer_ids.clamp(min=0)[:, None])  # no answers (KL): token 0

    def _map(self, fn: Callable[[Tensor], Tensor], donor_fn: Callable[[Tensor], Tensor] | None = None) -> dict:
        """Every tensor field (and position) with ``fn`` applied; donor-width tensors get ``donor_fn`` if given."""
        donor_fn = donor_fn or fn
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                out[f.name] = donor_fn(v) if f.name in ("donor_ids", "donor_mask", "noise_mask") else fn(v)
            elif isinstance(v, Mapping):
                out[f.name] = MappingProxyType({k: fn(t) for k, t in v.items()})
        return out

    def select(self, rows: slice | Sequence[int]) -> PairBatch:
        """The pairs ``rows`` (a slice, or a list of row indices) as a batch of their own; padded widths stay."""
        if isinstance(rows, slice):
            return replace(self, pairs=self.pairs[rows], **self._map(lambda t: t[rows]))
        index = torch.as_tensor(list(rows), dtype=torch.long)
        return replace(self, pairs=tuple(self.pairs[i] for i in rows), **self._map(lambda t: t[index]))

    def trim(self) -> PairBatch:
        """The same pairs without the padding columns that no row uses (``select`` keeps the full widths)."""
        width = int(self.attention_mask.sum(dim=1).max())
        dwidth = int(self.donor_attention_mask.sum(dim=1).max())
        trimmed = replace(self, recipient_ids=self.recipient_ids[:, :width], donor_ids=self.donor_ids[:, :dwidth],
                          attention_mask=self.attention_mask[:, :width])
        if self.noise_mask is not None:
            trimmed = replace(trimmed, noise_mask=self.noise_mask[:, :dwidth])
        return trimmed if self.donor_mask is None else replace(trimmed, donor_mask=self.donor_mask[:, :dwidth])

    def chunks(self, size: int) -> list[PairBatch]:
        """Consecutive chunks of at most ``size`` pairs, each trimmed to its own longest prompts.

        Example::

            for part in batch.chunks(32):   # stream a large batch through a run, 32 pairs at a time
                ...
        """
        if size >= len(self):
            return [self]
        return [self.select(slice(lo, lo + size)).trim() for lo in range(0, len(self), size)]

    def to(self, device) -> PairBatch:
        """A copy with every tensor on ``device``."""
        return replace(self, **self._map(lambda t: t.to(device)))


def continuation_ids(tokenizer, prompt: str, text: str) -> list[int] | None:
    """The tokens ``text`` adds after ``prompt``: tokenize(prompt + text) minus the prompt's own tokens; None when
    the prompt's tokens change (a merge across the boundary), [] when nothing is added.

    Example::

        continuation_ids(tok, "The Getty Center is in", " Los Angeles")   # [" Los", " Angeles"]
    """
    own, full = list(tokenizer(prompt)["input_ids"]), list(tokenizer(prompt + text)["input_ids"])
    return full[len(own):] if full[:len(own)] == own else None


def _continuations(tokenizer, pair: PromptPair, i: int, texts: tuple[str, ...], what: str) -> list[list[int]]:
    """Each text's continuation of the recipient (the same tokens must continue the donor): DataError naming the pair."""
    out = []
    for text in texts:
        got = {side: continuation_ids(tokenizer, prompt, text) for side, prompt in (("recipient", pair.recipient),
                                                                                   ("donor", pair.donor))}
        for side, ids in got.items():
            if not ids:
                why = ("adds no token" if ids == [] else "merges with the prompt's last token (tokenize(prompt + "
                       f"{what}) changes the prompt's own tokens)")
                raise DataError(f"pair {i} ({pair.recipient!r}): the {what} {text!r} {why} on the {side} side; a "
                                "continuation's tokens must be those the tokenizer puts after the prompt's. Give a "
                                "non-empty answer that starts a new token (usually with a leading space).")
        if got["donor"] != got["recipient"]:
            pieces = [[tokenizer.decode([t]) for t in ids] for ids in got.values()]
            raise DataError(f"pair {i} ({pair.recipient!r}): the {what} {text!r} is tokenized as {pieces[0]} after the "
                            f"recipient but as {pieces[1]} after the donor; it must continue both prompts with the "
                            "same tokens. End both prompts alike (a space or a word before the answer).")
        out.append(got["recipient"])
    return out


def _token_set(tokenizer, texts: tuple[str, ...], what: str, i: int, pair: PromptPair) -> list[int]:
    ids = []
    for text in texts:
        got = tokenizer.encode(text, add_special_tokens=False)
        if len(got) != 1:
            pieces = [tokenizer.decode([t]) for t in got]
            raise DataError(f"pair {i} ({pair.recipient!r}): {what} {text!r} must be exactly one token, got {len(got)}: "
                            f"{pieces}; use single-token answers (with their leading space, e.g. ' Mary').")
        ids.append(got[0])
    return ids


def substring_span(tokenizer, prompt: str, substring: str) -> tuple[int, int]:
    """(first, last): the tokens holding the first and the last character of ``substring``'s first occurrence.

    Example::

        substring_span(tok, "The Eiffel Tower is in", "Eiffel Tower")  # (" E..." token, " Tower" token)
    """
    last = substring_position(tokenizer, prompt, substring)
    at = prompt.find(substring)
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    holders = [i for i, (start, end) in enumerate(offsets) if start <= at < end]
    return (holders[0] if holders else last), last


def substring_position(tokenizer, prompt: str, substring: str) -> int:
    """Index of the token holding the last character of the first occurrence of ``substring`` in ``prompt``.

    The prompt is tokenized as ``tokenize_pairs`` does (special tokens included), so the index addresses the
    same ids. Where a character is split across tokens (bytes of one UTF-8 character), the last of them holds it.

    Example::

        substring_position(tok, "The Eiffel Tower is in", "Eiffel Tower")  # the token " Tower"
    """
    at = prompt.find(substring) if substring else -1
    if at < 0:
        raise DataError(f"expected {substring!r} to occur in the prompt {prompt!r}, but it does not; "
                        "give a non-empty substring copied exactly from the prompt.")
    last = at + len(substring) - 1
    try:
        offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    except NotImplementedError as exc:  # slow (Python) tokenizers have no character offsets
        raise DataError(f"named positions need character offsets, which the tokenizer {type(tokenizer).__name__} "
                        "does not give; load the model's fast tokenizer (use_fast=True).") from exc
    holders = [i for i, (start, end) in enumerate(offsets) if start <= last < end]
    if not holders:
        raise DataError(f"no token of {prompt!r} holds character {last} ({prompt[last]!r}) of {substring!r}; "
                        "the tokenizer dropped it (normalisation?). Choose another substring.")
    return holders[-1]


def substring_positions(tokenizer) -> PositionFinder:
    """The default finder: each pair's ``positions`` substrings, looked up in its recipient and its donor."""

    def find(i: int, pair: PromptPair, rec, don, answer, wrong) -> tuple[dict, dict]:
        rec_pos, don_pos = {}, {}
        for name, rec_sub, don_sub in pair.positions:
            try:
                rec_pos[name] = substring_position(tokenizer, pair.recipient, rec_sub)
                don_pos[name] = substring_position(tokenizer, pair.donor, don_sub)
            except DataError as err:
                raise DataError(f"pair {i}, position {name!r}: {err}") from None
        return rec_pos, don_pos

    return find


def _pad(rows: list[list[int]], value: int) -> tuple[Tensor, Tensor]:
    """(B, W) ids right-padded with ``value`` and their (B, W) mask, W the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)  # (B, W)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, W)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, : len(row)] = 1
    return ids, mask


def _kept(found: list[dict], names: list[str]) -> dict[str, Tensor]:
    """Names found (not None) in every row, as (B,) index tensors, in first-seen order."""
    return {n: torch.tensor([f[n] for f in found], dtype=torch.long)
            for n in names if all(f.get(n) is not None for f in found)}


def tokenize_pairs(
    tokenizer, pairs: Sequence[PromptPair], *, find: PositionFinder | None = None, require_answers: bool = True,
    single_token: bool = False, continuations: bool = False,
) -> PairBatch:
    """Tokenize pairs (tokenizer defaults, right padding, each side its own width): answer sets and named positions.

    ``find`` gives each row's named positions on both sides (default: the pairs' ``positions`` substrings,
    ``substring_positions``); END is each prompt's last token. An answer or wrong string is a continuation of
    any length: its tokens are tokenize(prompt + answer) after the prompt's own, the same after recipient and
    donor (else DataError naming the pair). No continuation may be empty or on both sides. ``single_token=True``
    requires every answer to be one token by itself (tasks whose metric is the END logit difference).
    ``continuations=True`` keeps ``cont_ids`` even when every answer is one token. ``require_answers=False``
    allows pairs without answers (a KL metric).

    Example::

        batch = tokenize_pairs(lm.tokenizer, load_pairs_file("pairs.jsonl"))
    """
    pairs = tuple(pairs)
    if not pairs:
        raise DataError("no prompt pairs to tokenize; pass at least one PromptPair.")
    find = find or substring_positions(tokenizer)
    rec_rows, don_rows, sets, rec_found, don_found, names, conts = [], [], [], [], [], [], []
    for i, pair in enumerate(pairs):
        a, w = as_set(pair.answer), as_set(pair.wrong)
        if require_answers and (not a or not w):
            raise DataError(f"pair {i} ({pair.recipient!r}): expected an answer and a wrong token (or sets of them), "
                            f"got answer={pair.answer!r}, wrong={pair.wrong!r}; give both, or use a metric that needs "
                            "no answers (kl).")
        if single_token:
            a_c = [[t] for t in _token_set(tokenizer, a, "answer", i, pair)]
            w_c = [[t] for t in _token_set(tokenizer, w, "wrong", i, pair)]
        else:
            a_c, w_c = _continuations(tokenizer, pair, i, a, "answer"), _continuations(tokenizer, pair, i, w, "wrong")
        both = [c for c in a_c if c in w_c]
        if both:
            shown = [tokenizer.decode(c) for c in both]
            what = "token(s)" if all(len(c) == 1 for c in both) else "token sequence(s)"
            raise DataError(f"pair {i} ({pair.recipient!r}): the answer and wrong sets share the {what} {shown}; an "
                            "answer can be on one side only. Remove it from one of them.")
        conts.append((a_c, w_c))
        a_ids, w_ids = [c[0] for c in a_c], [c[0] for c in w_c]
        rec = list(tokenizer(pair.recipient)["input_ids"])
        don = list(tokenizer(pair.donor)["input_ids"])
        rp, dp = find(i, pair, rec, don, a_ids, w_ids)
        rec_found.append({**rp, "END": len(rec) - 1})
        don_found.append({**dp, "END": len(don) - 1})
        names += [n for n in rp if n not in names]
        rec_rows.append(rec)
        don_rows.append(don)
        sets.append((a_ids, w_ids))
    names.append("END")
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    recipient_ids, attention_mask = _pad(rec_rows, pad)
    donor_ids, donor_mask = _pad(don_rows, pad)
    answer_sets, _ = _pad([s[0] or [-1] for s in sets], -1)  # (B, Ka), -1 = padding (or no answers)
    wrong_sets, _ = _pad([s[1] or [-1] for s in sets], -1)  # (B, Kw)
    positions, donor_positions = _kept(rec_found, names), _kept(don_found, names)
    noise = _noise_fields(tokenizer, pairs, donor_ids.shape[1])
    same_mask = attention_mask.shape == donor_mask.shape and torch.equal(attention_mask, donor_mask)
    same_pos = all(torch.equal(positions[n], donor_positions[n]) for n in positions)
    single = answer_sets.shape[1] == 1 and wrong_sets.shape[1] == 1
    several = any(len(c) > 1 for a_c, w_c in conts for c in a_c + w_c)
    cont = _cont_fields(conts) if (several or continuations) and all(a and w for a, w in conts) else {}
    if cont:
        single = False  # first tokens may repeat within a set: keep the sets as they are
    return PairBatch(
        pairs=pairs, recipient_ids=recipient_ids, donor_ids=donor_ids, attention_mask=attention_mask,
        answer_ids=answer_sets[:, 0].clone(), wrong_ids=wrong_sets[:, 0].clone(),  # (B,) first of each set
        positions=MappingProxyType(positions),
        donor_mask=None if same_mask else donor_mask,
        donor_positions=None if same_pos else MappingProxyType(donor_positions),
        answer_sets=None if single else answer_sets, wrong_sets=None if single else wrong_sets, **noise, **cont,
    )


def _cont_fields(conts: list[tuple[list, list]]) -> dict:
    """``cont_ids`` (B, n, m), answers then wrong continuations, padded with -1, and ``cont_side`` (B, n)."""
    n = max(len(a) + len(w) for a, w in conts)
    m = max(len(c) for a, w in conts for c in a + w)
    ids = torch.full((len(conts), n, m), -1, dtype=torch.long)  # (B, n, m)
    side = torch.zeros((len(conts), n), dtype=torch.long)  # (B, n)
    for b, (a, w) in enumerate(conts):
        for c, (tokens, sign) in enumerate([(t, 1) for t in a] + [(t, -1) for t in w]):
            ids[b, c, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            side[b, c] = sign
    return {"cont_ids": ids, "cont_side": side}


def _noise_fields(tokenizer, pairs: Sequence[PromptPair], width: int) -> dict:
    """``noise_mask`` (B, width): the donor tokens of each pair's noise span; its scale and seed; {} if none."""
    if all(p.noise is None for p in pairs):
        return {}
    mask = torch.zeros((len(pairs), width), dtype=torch.bool)  # (B, Td)
    scale, seed = torch.zeros(len(pairs)), torch.zeros(len(pairs), dtype=torch.long)
    for i, pair in enumerate(pairs):
        if pair.noise is None:
            continue
        span, scale[i], seed[i] = pair.noise
        try:
            first, last = substring_span(tokenizer, pair.donor, span)
        except DataError as err:
            raise DataError(f"pair {i}, noise span: {err}") from None
        mask[i, first:last + 1] = True
    return {"noise_mask": mask, "noise_scale": scale, "noise_seed": seed}
