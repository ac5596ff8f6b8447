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
(B, T, H, Dh): exactly the per-head outputs before W_O mixes them. How variants are grouped into
passes, and how large a pass may be, is ``planning``'s job.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import DataError, NumericalError
from ..model.models import LoadedModel
from ..model.placement import execution_device
from .batch import PairBatch
from .capture import ActivationCache, last_logits, nonfinite_rows
from .checkpoint import Checkpoint
from .continuation import ContinuationState, Readout
from .hooks import HookSpec, hooks
from .patternsite import PatternSite, check_rows, check_variant
from .planning import plan_sweep, shared_prefix, variant_start
from .prefix import RecipientState
from .sites import Site, resolve_pos

log = logging.getLogger(__name__)
Reduce = Callable[[Float[Tensor, "k batch vocab"]], Mapping[str, Float[Tensor, "k batch"]]]


class HookGate:
    """A switch the patch hooks read: while ``open`` is False they pass activations through unchanged (the
    continuation rows of a multi-token readout, which are computed under the patch but never written)."""

    def __init__(self) -> None:
        self.open = True


def _patch_fn(entries: list, k: int, n_rows: int, start: int, width: int, gate: HookGate | None = None):
    """The hook body for one module: apply every (variant j, site) patch of this chunk.

    ``start``: the first position the forward pass computes (0 for a full pass; p for a prefix-reuse
    replay of positions p..); ``width``: the recipient's padded width. Each entry is (j, donor activation,
    donor index, recipient index, feature columns): a named position reads the donor at its own index and
    writes the recipient's; columns (a head's d_head features, ...) None = the whole feature vector.
    """

    def fn(act: Tensor) -> Tensor:
        if gate is not None and not gate.open:
            return act
        T = act.shape[1]
        if start + T != width:  # never guess the offset: a wrong one shifts every write silently
            raise RuntimeError(f"patch hook saw {T} positions from position {start}, expected {width - start}")
        new = act.clone()
        view = new.view(k, n_rows, T, -1)  # (k*B, T, F) -> (k, B, T, F); heads are F = H*Dh
        rows = torch.arange(n_rows, device=act.device)
        for j, src, src_idx, dst_idx, cols in entries:
            src = src.flatten(2).to(device=act.device, dtype=act.dtype)  # (B, Td, F): heads (B, Td, H, Dh) flat
            cols = None if cols is None else cols.to(act.device)
            if dst_idx is None:  # all positions: rows of equal lengths, so donor position t is recipient position t
                part = src[:, start:start + T]  # (B, <=T, F): a narrower donor pads only where both are padding
                if cols is None:
                    view[j, :, : part.shape[1]] = part
                else:
                    view[j, :, : part.shape[1], cols] = part[:, :, cols]
                continue
            # no-ops unless a pre-hook sees its input before accelerate moved it across a device split
            src_idx, dst = src_idx.to(act.device), dst_idx.to(act.device) - start
            live = None
            if start:
                # A recipient position before the run's start is one that variant_start proved a no-op: inside the
                # donor/recipient shared prefix, read from the same index. Such rows keep their own value (a
                # masked write, not a boolean index: no host sync on CUDA).
                live = dst >= 0  # (B,)
                dst = dst.clamp(min=0)
            if cols is None:
                value = src[rows, src_idx]  # (B, F)
                view[j, rows, dst] = value if live is None else torch.where(live[:, None], value, view[j, rows, dst])
            else:
                r, c = rows[:, None], cols[None, :]
                value = src[r, src_idx[:, None], c]  # (B, C)
                p = dst[:, None]
                view[j, r, p, c] = value if live is None else torch.where(live[:, None], value, view[j, r, p, c])
        return new

    return fn


def _check_donor(site: Site, src: Tensor, batch: PairBatch) -> None:
    """A donor activation must have been captured on this batch: one row per pair, the batch's padded width."""
    want = (len(batch), batch.donor_ids.shape[1])
    if tuple(src.shape[:2]) != want:
        raise DataError(
            f"the donor activation for {site!r} has {src.shape[0]} rows x {src.shape[1]} positions, but this batch's "
            f"donors are {want[0]} pairs x {want[1]} positions; capture the donor on the same batch "
            "(capture(lm, batch.donor_ids, batch, sites)), or select the same rows of both (batch.select)."
        )


def require_equal_lengths(batch: PairBatch, site: Site) -> None:
    """Patching at all positions maps donor position t to recipient position t: refuse pairs of unequal lengths."""
    bad = batch.unequal_rows()
    if bad:
        i = bad[0]
        raise DataError(
            f"{site!r} patches all positions, which needs donor and recipient of equal token length, but pair {i} "
            f"({batch.pairs[i].recipient!r} -> {int(batch.lengths()[i])} tokens, donor {batch.pairs[i].donor!r} -> "
            f"{int(batch.lengths('donor')[i])} tokens) differs ({len(bad)} such pairs); patch at named positions "
            "or END instead (--positions), or make the prompts the same length."
        )


def patch_hooks(
    lm: LoadedModel, batch: PairBatch, donor: ActivationCache, chunk: Sequence[Sequence[Site]], start: int = 0,
    gate: HookGate | None = None,
) -> list[HookSpec]:
    """Hook specs that patch ``chunk[j]``'s sites into the j-th copy of the recipient batch.

    ``start``: the first position the patched forward pass computes (prefix reuse), 0 for a full pass.
    ``gate``: while closed, the hooks write nothing.
    """
    adapter = lm.adapter
    rec_len, don_len = batch.lengths(), batch.lengths("donor")
    by_module: dict[tuple[int, bool], tuple] = {}
    for j, variant in enumerate(chunk):
        check_variant(variant)
        for site in variant:
            site.validate(adapter)
            src = donor[site]  # SiteError naming what the cache holds, before any hook is registered
            _check_donor(site, src, batch)
            module = site.module(adapter)
            dev = execution_device(module)  # index tensors made once per chunk, where the hook runs
            dst = resolve_pos(site.pos, batch.positions, rec_len)
            src_idx = resolve_pos(site.pos, batch.side_positions("donor"), don_len)
            if dst is None:
                require_equal_lengths(batch, site)
            else:
                dst, src_idx = dst.to(dev), src_idx.to(dev)
            if isinstance(site, PatternSite):
                check_rows(site, src, src_idx, batch)
            cols = site.columns(adapter)
            cols = None if cols is None else torch.as_tensor(cols, device=dev)
            entry = by_module.setdefault((id(module), site.reads_input), (module, site.reads_input, []))
            entry[2].append((j, src, src_idx, dst, cols))
    width = batch.recipient_ids.shape[1]
    return [(module, "input" if reads_input else "output", _patch_fn(entries, len(chunk), len(batch), start, width, gate))
            for module, reads_input, entries in by_module.values()]


@contextmanager
def patched(
    lm: LoadedModel, batch: PairBatch, donor: ActivationCache, chunk: Sequence[Sequence[Site]], start: int = 0,
    gate: HookGate | None = None,
) -> Iterator[None]:
    """Context in which forward passes over ``len(chunk)`` stacked recipient copies are patched.

    ``start`` is the first position those passes compute: 0 for full passes (prefix reuse passes p).

    Example::

        with patched(lm, batch, donor, [[HeadSite(9, 6)]]):
            logits = last_logits(lm, batch.recipient_ids, batch.attention_mask, batch.position("END"))
    """
    with hooks(patch_hooks(lm, batch, donor, chunk, start, gate)):
        yield


def run_chunk(
    lm: LoadedModel, batch: PairBatch, donor: ActivationCache, chunk: Sequence[Sequence[Site]],
    state: RecipientState | ContinuationState | None = None,
    columns: Int[Tensor, "batch n"] | None = None,
    shared: int = 0,
    tail_kl: bool = False,
) -> Float[Tensor, "k batch vocab"] | Readout:
    """END logits of the recipient under each variant of ``chunk``, as (k, B, V).

    Without ``state`` this is the reference path: one full forward pass over the stacked copies.
    With the recipient's recorded ``RecipientState`` it runs only the layers and positions that
    the chunk's patches can change (prefix reuse). ``columns`` (B, n) computes only those token
    ids' logits, (k, B, n): all a logit-difference metric needs. A batch with continuations (``batch.cont_ids``)
    gives a ``Readout`` instead: END logits and the continuations' tail log-probs, (k, B, ...), from a
    ``ContinuationState`` (recorded here when ``state`` is None); ``tail_kl`` adds the KL over the answer's tail.

    Example::

        logits = run_chunk(lm, batch, donor, [[HeadSite(23, 3, "END")], [HiddenSite(20)]])  # (2, B, V)

    """
    k = len(chunk)
    dev = lm.device
    end = batch.position("END").to(dev)
    if batch.cont_ids is not None:
        state = state if isinstance(state, ContinuationState) else ContinuationState.record(lm, batch)
        start, pos = (0, 0) if not chunk else [min(s) for s in zip(*[variant_start(v, batch, shared) for v in chunk])]
        gate = HookGate()
        with torch.inference_mode(), patched(lm, batch, donor, chunk, start=pos, gate=gate):
            return state.run(lm, end, start, pos, k, gate, kl=tail_kl).view(k, len(batch))
    exact = batch.answer_columns()  # (B, 2): IO and S logits in float32 even in half precision
    if state is None:
        start = pos = 0
    else:
        starts = [variant_start(v, batch, shared) for v in chunk]
        start, pos = min(s[0] for s in starts), min(s[1] for s in starts)  # each bound on its own
    with torch.inference_mode(), patched(lm, batch, donor, chunk, start=pos):
        if state is None:
            ids = batch.recipient_ids.to(dev).repeat(k, 1)  # (k*B, T), variant-major
            mask = batch.attention_mask.to(dev).repeat(k, 1)
            cols = None if columns is None else columns.repeat(k, 1)  # (k*B, n)
            logits = last_logits(lm, ids, mask, end.repeat(k), cols, exact.repeat(k, 1))  # (k*B, V)
        else:
            logits = state.run(lm, end, start=start, pos=pos, copies=k, columns=columns, exact=exact)
    return logits.view(k, len(batch), -1)


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
    columns: Int[Tensor, "batch n"] | None = None,
    donor_from_batch: bool = False,
    checkpoint: Checkpoint | None = None,
    budget: int | None = None,
    bar: tqdm | None = None,
    tail_kl: bool = False,
) -> dict[str, Float[Tensor, "variant batch"]]:
    """Run every variant and ``reduce`` its END logits; results are stacked as (K, B) per key.

    Fast path: variants are grouped by the first layer and position they touch (``plan_chunks``);
    each chunk starts from the recipient's recorded state there (``RecipientState``), so a patch at
    layer L and position p costs only layers >= L at positions >= p. ``max_rows`` caps the rows
    (variants x pairs) of one forward pass; by default the cap comes from ``token_budget``. Chunking and prefix reuse change results only through
    float summation order (checked against ``run_chunk``'s reference path). ``columns`` (B, n)
    restricts the readout to those token ids. ``donor_from_batch=True`` promises that ``donor`` was
    captured from ``batch.donor_ids``: positions before the first token where donor and recipient
    differ then need no recomputation either. ``progress=None`` shows a bar only on a terminal.
    ``checkpoint`` (see ``actpatch.engine.checkpoint``): variants already in it are not run again, and each
    finished chunk is added to it, saved even when the sweep is interrupted. ``budget``: the run's memory
    budget in bytes (``planning.memory_budget``) that sizes the forward passes. ``bar``: a progress bar
    of the whole run to advance, instead of one of this sweep's own. A batch with continuations hands ``reduce``
    a ``Readout`` (see ``run_chunk``); ``tail_kl`` adds the KL over the answer's continuation to it.

    Example::

        scores = patch_variants(lm, batch, donor, [[HeadSite(L)] for L in range(n)],
                                reduce=lambda lg: {"ld": logit_diff(lg, batch.answer_ids, batch.wrong_ids)})
        scores["ld"].shape  # (n, B)

    """
    if not variants:
        return {}
    results: dict[int, dict[str, Tensor]] = dict(checkpoint.done) if checkpoint is not None else {}
    todo = [i for i in range(len(variants)) if i not in results]
    shared = shared_prefix(batch) if donor_from_batch else 0
    plan, tokens = plan_sweep(lm, batch, [variants[i] for i in todo], max_rows, shared, budget, columns is None)
    log.info("sweep '%s': %d patches (%d already done) in %d forward passes of <= %s", desc, len(variants),
             len(variants) - len(todo), len(plan.chunks), f"{max_rows} rows" if max_rows else f"{tokens} tokens")
    record = ContinuationState.record if batch.cont_ids is not None else RecipientState.record
    state = record(lm, batch) if todo else None
    disable = {True: False, None: None, False: True}[progress]  # None: tqdm shows a bar only on a TTY
    own = bar is None
    if own:
        bar = tqdm(total=len(variants), initial=len(results), desc=desc, unit="patch", disable=disable, leave=False)
    else:
        bar.update(len(results))  # the finished ones count as done in the run's bar
    try:
        for local in plan.chunks:
            idx = [todo[j] for j in local]
            chunk = [variants[i] for i in idx]
            logits = run_chunk(lm, batch, donor, chunk, state, columns, shared, tail_kl)  # (k, B, V or n), or a Readout
            bad = logits.nonfinite_rows() if isinstance(logits, Readout) else nonfinite_rows(logits)
            if bad:
                raise NumericalError(
                    f"patching {list(chunk[bad[0]])} made the recipient's logits NaN or inf, although the "
                    "unpatched runs are finite; the donor values overflow this dtype: try --dtype float32."
                )
            values = {key: value.float().cpu() for key, value in reduce(logits).items()}
            for n, i in enumerate(idx):
                results[i] = {key: value[n] for key, value in values.items()}
            if checkpoint is not None:
                checkpoint.add(idx, values)
            bar.update(len(chunk))
    finally:  # an interrupted sweep keeps what it finished
        if own:
            bar.close()
        if checkpoint is not None:
            checkpoint.save()
    return {key: torch.stack([results[i][key] for i in range(len(variants))]) for key in results[0]}
