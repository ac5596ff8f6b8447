"""Patch donor activations into recipient runs, many patch variants per forward pass.

A *variant* is a set of sites patched together (one cell of a sweep: "all heads of layer 7",
"head 9.6", "hidden state of layer 3 at END"). ``patch_variants`` stacks variants along the batch
dimension, ``k`` copies of the recipient batch per forward pass (chunked to ``max_rows`` rows), so a
sweep is a few large matmuls instead of hundreds of small passes. Each copy gets only its own
variant's patches; rows never see another variant's donor values.

    donor, _ = capture(lm, batch.donor_ids, batch, [HeadSite(L) for L in range(n)])
    scores = patch_variants(lm, batch, donor, [[HeadSite(L)] for L in range(n)], reduce=ioi_scores_fn)
    scores["logit_diff"]            # (K, B): one row per variant

Head patches rewrite the attention output projection's *input* (forward pre-hook), viewed as
(B, T, H, Dh): exactly the per-head outputs before W_O mixes them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .capture import ActivationCache, last_logits
from .hooks import HookSpec, hooks
from .ioi import PairBatch
from .models import LoadedModel
from .prefix import RecipientState
from .sites import Site, resolve_pos

Reduce = Callable[[Float[Tensor, "k batch vocab"]], Mapping[str, Float[Tensor, "k batch"]]]
DEFAULT_MAX_TOKENS = 8192  # rows * padded length per forward pass; keeps CPU memory and latency modest


def _patch_fn(entries: list, k: int, n_rows: int, n_heads: int, d_head: int, is_head: bool):
    """The hook body for one module: apply every (variant j, site) patch of this chunk."""

    def fn(act: Tensor) -> Tensor:
        new = act.clone()
        T = act.shape[1]
        # a run that starts at position p (prefix reuse) sees only positions p..; donor values are full length
        offset = entries[0][1].shape[1] - T if entries else 0
        if is_head:
            view = new.view(k, n_rows, T, n_heads, d_head)  # (k*B, T, H*Dh) -> (k, B, T, H, Dh)
        else:
            view = new.view(k, n_rows, *act.shape[1:])  # (k*B, T, D) -> (k, B, T, D)
        rows = torch.arange(n_rows, device=act.device)
        for j, src, idx, heads in entries:
            src = src[:, offset:].to(device=act.device, dtype=act.dtype)
            if idx is not None:
                idx = idx - offset
            if is_head:
                hs = torch.as_tensor(heads, device=act.device)
                if idx is None:
                    view[j, :, :, hs] = src[:, :, hs]
                else:
                    r, p, h = rows[:, None], idx.to(act.device)[:, None], hs[None, :]
                    view[j, r, p, h] = src[r, p, h]
            elif idx is None:
                view[j] = src
            else:
                p = idx.to(act.device)
                view[j, rows, p] = src[rows, p]
        return new

    return fn


def patch_hooks(
    lm: LoadedModel, batch: PairBatch, donor: ActivationCache, chunk: Sequence[Sequence[Site]]
) -> list[HookSpec]:
    """Hook specs that patch ``chunk[j]``'s sites into the j-th copy of the recipient batch."""
    adapter = lm.adapter
    lengths = batch.attention_mask.sum(dim=1)
    by_module: dict[tuple[int, bool], tuple] = {}
    for j, variant in enumerate(chunk):
        for site in variant:
            site.validate(adapter)
            if site.key not in donor:
                raise KeyError(f"donor cache lacks {site.key}; capture it first")
            idx = resolve_pos(site.pos, batch.positions, lengths)
            heads = site.heads(adapter) if site.kind == "head" else None
            module = site.module(adapter)
            entry = by_module.setdefault((id(module), site.reads_input), (module, site.reads_input, site.kind == "head", []))
            entry[3].append((j, donor[site], idx, heads))
    return [
        (module, "input" if reads_input else "output",
         _patch_fn(entries, len(chunk), len(batch), adapter.n_heads, adapter.d_head, is_head))
        for module, reads_input, is_head, entries in by_module.values()
    ]


@contextmanager
def patched(
    lm: LoadedModel, batch: PairBatch, donor: ActivationCache, chunk: Sequence[Sequence[Site]]
) -> Iterator[None]:
    """Context in which forward passes over ``len(chunk)`` stacked recipient copies are patched."""
    with hooks(patch_hooks(lm, batch, donor, chunk)):
        yield


def run_chunk(
    lm: LoadedModel, batch: PairBatch, donor: ActivationCache, chunk: Sequence[Sequence[Site]],
    state: RecipientState | None = None,
) -> Float[Tensor, "k batch vocab"]:
    """END logits of the recipient under each variant of ``chunk``, as (k, B, V).

    Without ``state`` this is the reference path: one full forward pass over the stacked copies.
    With the recipient's recorded ``RecipientState`` it runs only the layers and positions that
    the chunk's patches can change (prefix reuse).
    """
    k = len(chunk)
    dev = lm.device
    end = batch.position("END").to(dev)
    with torch.inference_mode(), patched(lm, batch, donor, chunk):
        if state is None:
            ids = batch.recipient_ids.to(dev).repeat(k, 1)  # (k*B, T), variant-major
            mask = batch.attention_mask.to(dev).repeat(k, 1)
            logits = last_logits(lm, ids, mask, end.repeat(k))  # (k*B, V)
        else:
            starts = [_start(v, batch) for v in chunk]
            start, pos = min(s[0] for s in starts), min(s[1] for s in starts)  # each bound on its own
            logits = state.run(lm, end, start=start, pos=pos, copies=k)
    return logits.view(k, len(batch), -1)


def _start(variant: Sequence[Site], batch: PairBatch) -> tuple[int, int]:
    """(first layer, first position) a variant can change: nothing before either needs recomputing."""
    if not variant:
        return (0, 0)
    lengths = batch.attention_mask.sum(dim=1)
    pos = min(0 if s.pos is None else int(resolve_pos(s.pos, batch.positions, lengths).min()) for s in variant)
    return (min(s.layer for s in variant), pos)


def patch_variants(
    lm: LoadedModel,
    batch: PairBatch,
    donor: ActivationCache,
    variants: Sequence[Sequence[Site]],
    reduce: Reduce,
    *,
    max_rows: int | None = None,
    progress: bool | None = False,
    desc: str = "patching",
) -> dict[str, Float[Tensor, "variant batch"]]:
    """Run every variant and ``reduce`` its END logits; results are stacked as (K, B) per key.

    Fast path: variants are sorted by the first layer and position they touch; each chunk starts
    from the recipient's recorded state there (``RecipientState``), so a patch at layer L and
    position p costs only layers >= L at positions >= p. ``max_rows`` caps the rows (variants x
    pairs) of one forward pass; by default ``DEFAULT_MAX_TOKENS // padded_length``. Chunking and
    prefix reuse change results only through float summation order (checked against
    ``run_chunk``'s reference path). ``progress=None`` shows a bar only on a terminal.
    """
    if not variants:
        return {}
    n_rows, T = batch.recipient_ids.shape
    budget = max_rows if max_rows is not None else DEFAULT_MAX_TOKENS // T
    per_chunk = max(1, budget // n_rows)
    state = RecipientState.record(lm, batch)
    starts = [_start(v, batch) for v in variants]
    order = sorted(range(len(variants)), key=lambda i: starts[i])
    out: dict[str, list[Tensor]] = {}
    disable = {True: False, None: None, False: True}[progress]  # None: tqdm shows a bar only on a TTY
    with tqdm(total=len(variants), desc=desc, unit="patch", disable=disable, leave=False) as bar:
        for first in range(0, len(order), per_chunk):
            chunk = [variants[i] for i in order[first : first + per_chunk]]
            for key, value in reduce(run_chunk(lm, batch, donor, chunk, state)).items():
                out.setdefault(key, []).append(value.float().cpu())
            bar.update(len(chunk))
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return {key: torch.cat(parts)[inverse] for key, parts in out.items()}
