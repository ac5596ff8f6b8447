"""Tokenized IOI pairs: right-padded recipient/donor id tensors, answer ids and named positions.

``tokenize_pairs`` turns ``PromptPair``s (``ioi``) into a ``PairBatch``: (B, T) recipient and donor
ids with equal real lengths per row, the (B,) answer (IO) and wrong (S) token ids, and the (B,) index
of each named position (IO, S1, S1+1, S2, END), kept only when found in every row. Usage::

    batch = tokenize_pairs(tokenizer, pairs["swap"])       # PairBatch of right-padded (B, T) id tensors
    end = batch.position("END")                            # (B,) index of each row's last real token
    half = batch.select(slice(0, 8))                       # the first 8 pairs, same padded width
    substring_position(tokenizer, "The Eiffel Tower is in", "Eiffel Tower")  # index of the token " Tower"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import torch
from jaxtyping import Int
from torch import Tensor

from .errors import DataError, SiteError
from .ioi import POSITION_NAMES, PromptPair


@dataclass(frozen=True, eq=False)
class PairBatch:
    """Tokenized pairs: right-padded recipient/donor ids of equal real length, answers and named positions.

    Example::

        batch = tokenize_pairs(lm.tokenizer, pairs); batch.position("S2"), batch.recipient_ids.shape
    """

    pairs: tuple[PromptPair, ...]
    recipient_ids: Int[Tensor, "batch pos"]
    donor_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    answer_ids: Int[Tensor, "batch"]
    wrong_ids: Int[Tensor, "batch"]
    positions: Mapping[str, Int[Tensor, "batch"]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)

    def position(self, name: str) -> Int[Tensor, "batch"]:
        """The (B,) index tensor of a named position; SiteError naming the available ones if absent."""
        if name not in self.positions:
            raise SiteError(
                f"position {name!r} is not available for this batch; available: {', '.join(self.positions)}. "
                f"(Known names are {', '.join(POSITION_NAMES)}; a name is only kept when it is found in every row.)"
            )
        return self.positions[name]

    def answer_columns(self) -> Int[Tensor, "batch 2"]:
        """(B, 2): each row's answer (IO) and wrong (S) token ids, the columns a logit difference reads."""
        return torch.stack([self.answer_ids, self.wrong_ids], dim=1)

    def select(self, rows: slice | Sequence[int]) -> PairBatch:
        """The pairs ``rows`` (a slice, or a list of row indices) as a batch of their own; the padded width
        stays the same."""
        if not isinstance(rows, slice):
            pairs = tuple(self.pairs[i] for i in rows)
            rows = torch.as_tensor(list(rows), dtype=torch.long)
            return replace(self.select(slice(None)), pairs=pairs, recipient_ids=self.recipient_ids[rows],
                           donor_ids=self.donor_ids[rows], attention_mask=self.attention_mask[rows],
                           answer_ids=self.answer_ids[rows], wrong_ids=self.wrong_ids[rows],
                           positions=MappingProxyType({k: v[rows] for k, v in self.positions.items()}))
        return replace(
            self, pairs=self.pairs[rows], recipient_ids=self.recipient_ids[rows], donor_ids=self.donor_ids[rows],
            attention_mask=self.attention_mask[rows], answer_ids=self.answer_ids[rows], wrong_ids=self.wrong_ids[rows],
            positions=MappingProxyType({k: v[rows] for k, v in self.positions.items()}),
        )

    def trim(self) -> PairBatch:
        """The same pairs without the padding columns that no row uses (``select`` keeps the full width)."""
        width = int(self.attention_mask.sum(dim=1).max())
        return replace(self, recipient_ids=self.recipient_ids[:, :width], donor_ids=self.donor_ids[:, :width],
                       attention_mask=self.attention_mask[:, :width])

    def chunks(self, size: int) -> list[PairBatch]:
        """Consecutive chunks of at most ``size`` pairs, each trimmed to its own longest prompt.

        Example::

            for part in batch.chunks(32):   # stream a large batch through a run, 32 pairs at a time
                ...
        """
        if size >= len(self):
            return [self]
        return [self.select(slice(lo, lo + size)).trim() for lo in range(0, len(self), size)]

    def to(self, device) -> PairBatch:
        """A copy with every tensor on ``device``."""
        return replace(
            self,
            recipient_ids=self.recipient_ids.to(device),
            donor_ids=self.donor_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            answer_ids=self.answer_ids.to(device),
            wrong_ids=self.wrong_ids.to(device),
            positions=MappingProxyType({k: v.to(device) for k, v in self.positions.items()}),
        )


def _single_token(tokenizer, text: str, what: str, i: int, pair: PromptPair) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise DataError(
            f"pair {i} ({pair.recipient!r}): {what} {text!r} must be exactly one token, got {len(ids)} {ids}; "
            "use single-token names (with their leading space, e.g. ' Mary')."
        )
    return ids[0]


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


def tokenize_pairs(
    tokenizer, pairs: Sequence[PromptPair], *, require_positions: bool = True, positions_from: str = "recipient",
) -> PairBatch:
    """Tokenize pairs (tokenizer defaults, right padding) and find IO, S1, S1+1, S2 and END.

    Positions are found on the recipient's tokens, or on the donor's with ``positions_from="donor"``
    (denoising: the clean prompt is the donor). Donor and recipient have equal lengths, so they align.

    Example::

        batch = tokenize_pairs(lm.tokenizer, generate_pairs(lm.tokenizer, 8)["swap"])

    """
    if positions_from not in ("recipient", "donor"):
        raise DataError(f"positions_from must be 'recipient' or 'donor', got {positions_from!r}")
    pairs = tuple(pairs)
    if not pairs:
        raise DataError("no prompt pairs to tokenize; pass at least one PromptPair.")
    rec_rows, don_rows, ans, wrong = [], [], [], []
    found: dict[str, list[int | None]] = {n: [] for n in POSITION_NAMES}
    for i, pair in enumerate(pairs):
        a = _single_token(tokenizer, pair.answer, "answer", i, pair)
        w = _single_token(tokenizer, pair.wrong, "wrong", i, pair)
        if a == w:
            raise DataError(
                f"pair {i} ({pair.recipient!r}): answer {pair.answer!r} and wrong {pair.wrong!r} are the same token {a}; "
                "the answer (IO) and the wrong name (S) must differ."
            )
        rec = list(tokenizer(pair.recipient)["input_ids"])
        don = list(tokenizer(pair.donor)["input_ids"])
        if len(rec) != len(don):
            raise DataError(
                f"pair {i}: recipient {pair.recipient!r} has {len(rec)} tokens but donor {pair.donor!r} has {len(don)}; "
                "position-aligned patching needs equal lengths: use the same template and single-token names."
            )
        named = rec if positions_from == "recipient" else don
        hits_a = [k for k, t in enumerate(named) if t == a]
        hits_w = [k for k, t in enumerate(named) if t == w]
        io = hits_a[0] if hits_a else None
        s1 = hits_w[0] if hits_w else None
        s2 = hits_w[1] if len(hits_w) > 1 else None
        if require_positions and (io is None or s2 is None):
            raise DataError(
                f"pair {i} ({pair.recipient!r}): expected the answer {pair.answer!r} once and the wrong name "
                f"{pair.wrong!r} twice among the {positions_from}'s tokens, found them {len(hits_a)} and {len(hits_w)} "
                "times; fix the prompt, or pass require_positions=False to drop the IO/S positions."
            )
        end = len(rec) - 1
        for name, v in zip(POSITION_NAMES, (io, s1, None if s1 is None or s1 >= end else s1 + 1, s2, end)):
            found[name].append(v)
        rec_rows.append(rec)
        don_rows.append(don)
        ans.append(a)
        wrong.append(w)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    n, width = len(pairs), max(len(r) for r in rec_rows)
    recipient_ids = torch.full((n, width), pad, dtype=torch.long)  # (B, T)
    donor_ids = torch.full((n, width), pad, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((n, width), dtype=torch.long)  # (B, T)
    for r, (rec, don) in enumerate(zip(rec_rows, don_rows)):
        recipient_ids[r, : len(rec)] = torch.tensor(rec, dtype=torch.long)
        donor_ids[r, : len(don)] = torch.tensor(don, dtype=torch.long)
        attention_mask[r, : len(rec)] = 1
    positions = {
        name: torch.tensor(vals, dtype=torch.long)  # (B,)
        for name, vals in found.items()
        if all(v is not None for v in vals)
    }
    return PairBatch(
        pairs=pairs,
        recipient_ids=recipient_ids,
        donor_ids=donor_ids,
        attention_mask=attention_mask,
        answer_ids=torch.tensor(ans, dtype=torch.long),  # (B,)
        wrong_ids=torch.tensor(wrong, dtype=torch.long),  # (B,)
        positions=MappingProxyType(positions),
    )
