"""What the patched model says: greedy continuations of the recipient under a patch.

The patch is written at prompt positions in the first forward pass (the prompt, with the donor's activations
patched in as any sweep writes them); the tokens after it are generated with the model's own key/value cache and
no hook, so each new token reads the patched prompt, as causal tracing does. Pairs run one at a time (no padding
to get wrong). A noised donor generates with its noise::

    texts = generate_patched(lm, pairs, [HiddenSite(20, "END")], max_new_tokens=8)   # one string per pair
    plain = generate_patched(lm, pairs, [], 8)                                        # the unpatched recipient
    donor = generate_patched(lm, pairs, [], 8, side="donor")
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch

from ..errors import ConfigError
from ..model.models import LoadedModel
from .batch import PairBatch, tokenize_pairs
from .capture import capture
from .hooks import hooks
from .noise import noise_hook
from .pairs import PromptPair
from .patching import patched
from .sites import Site


def _greedy(lm: LoadedModel, ids: torch.Tensor, first, max_new_tokens: int) -> list[int]:
    """Greedy tokens after ``ids`` (1, T); ``first`` is the context the prompt's forward pass runs in."""
    eos = getattr(lm.tokenizer, "eos_token_id", None) if lm.tokenizer is not None else None
    out_ids: list[int] = []
    with torch.inference_mode():
        with first:
            out = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        for step in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)  # (1,)
            out_ids.append(int(nxt))
            if int(nxt) == eos or step == max_new_tokens - 1:
                break
            out = lm.model(input_ids=nxt[:, None], cache=out.past_key_values, use_cache=True)
    return out_ids


def generate_patched(
    lm: LoadedModel, pairs: Sequence[PromptPair] | PairBatch, sites: Sequence[Site], max_new_tokens: int,
    side: str = "recipient", decode: bool = True,
) -> list[str] | list[list[int]]:
    """The greedy ``max_new_tokens`` continuation of each pair's recipient with ``sites`` patched from its donor
    (``sites=[]``: unpatched; ``side="donor"``: the donor prompt itself, unpatched). Strings, or token ids with
    ``decode=False``.

    Example::

        generate_patched(lm, pairs, [HiddenSite(20, "END")], max_new_tokens=8)   # ['  Rome, Italy...', ...]
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if side not in ("recipient", "donor") or (side == "donor" and sites):
        raise ConfigError(f"side must be 'recipient' (patched with sites) or 'donor' (no sites), got {side!r} "
                          f"with {len(sites)} sites")
    batch = pairs if isinstance(pairs, PairBatch) else tokenize_pairs(lm.tokenizer, pairs, require_answers=False)
    results = []
    for i in range(len(batch)):
        one = batch.select([i]).trim()
        if side == "donor":
            noise = noise_hook(lm, one)
            first = hooks([noise]) if noise is not None else nullcontext()
            ids = one.donor_ids
        else:
            donor = capture(lm, one.donor_ids, one, list(sites))[0] if sites else {}
            first = patched(lm, one, donor, [list(sites)]) if sites else nullcontext()
            ids = one.recipient_ids
        tokens = _greedy(lm, ids.to(lm.device), first, max_new_tokens)
        results.append(lm.tokenizer.decode(tokens) if decode else tokens)
    return results
