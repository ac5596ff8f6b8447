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

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import psutil
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from .batch import PairBatch
from .capture import ActivationCache, last_logits
from .checkpoint import Checkpoint
from .errors import NumericalError
from .hooks import HookSpec, hooks
from .models import LoadedModel
from .prefix import RecipientState
from .sites import Site, resolve_pos

log = logging.getLogger(__name__)
Reduce = Callable[[Float[Tensor, "k batch vocab"]], Mapping[str, Float[Tensor, "k batch"]]]
CPU_CACHE_BYTES = 12 * 2**20  # one chunk's MLP activations should fit a CPU's last-level cache
MEMORY_SHARE = 0.25           # at most this share of free (GPU) / available (CPU) memory per forward pass


def token_budget(lm: LoadedModel, n_positions: int) -> int:
    """Default tokens (rows x computed positions) per forward pass, from the hardware.

    CPU: the matmuls are compute-bound at any size, but the elementwise ops between them are not,
    so chunks are sized to keep the MLP's hidden activations in the last-level cache (measured on
    GPT-2 small, 2 cores: 1,024 tokens is 27 % faster than 4,096). CUDA: as large as a quarter of the
    free GPU memory allows. Both are capped by available memory.

    Example::

        token_budget(lm, n_positions=16)  # e.g. 1024 for GPT-2 small on CPU

    """
    cfg = lm.model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    d = int(cfg.hidden_size)
    d_ff = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d)
    elem = next(lm.model.parameters()).element_size()
    # residual, norms, q/k/v, per-head outputs, the MLP's hidden layer twice, eager attention scores
    per_token = elem * (8 * d + 2 * d_ff + 2 * lm.adapter.n_heads * n_positions)
    if lm.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(lm.device)
        budget = int(MEMORY_SHARE * free / per_token)
    else:
        budget = min(CPU_CACHE_BYTES // (d_ff * elem),
                     int(MEMORY_SHARE * psutil.virtual_memory().available / per_token))
    return max(budget, n_positions)  # at least one row


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
    """Context in which forward passes over ``len(chunk)`` stacked recipient copies are patched.

    Example::

        with patched(lm, batch, donor, [[HeadSite(9, 6)]]):
            logits = last_logits(lm, batch.recipient_ids, batch.attention_mask, batch.position("END"))
    """
    with hooks(patch_hooks(lm, batch, donor, chunk)):
        yield


def run_chunk(
    lm: LoadedModel, batch: PairBatch, donor: ActivationCache, chunk: Sequence[Sequence[Site]],
    state: RecipientState | None = None,
    columns: Int[Tensor, "batch n"] | None = None,
    shared: int = 0,
) -> Float[Tensor, "k batch vocab"]:
    """END logits of the recipient under each variant of ``chunk``, as (k, B, V).

    Without ``state`` this is the reference path: one full forward pass over the stacked copies.
    With the recipient's recorded ``RecipientState`` it runs only the layers and positions that
    the chunk's patches can change (prefix reuse). ``columns`` (B, n) computes only those token
    ids' logits, (k, B, n): all a logit-difference metric needs.

    Example::

        logits = run_chunk(lm, batch, donor, [[HeadSite(23, 3, "END")], [HiddenSite(20)]])  # (2, B, V)

    """
    k = len(chunk)
    dev = lm.device
    end = batch.position("END").to(dev)
    with torch.inference_mode(), patched(lm, batch, donor, chunk):
        if state is None:
            ids = batch.recipient_ids.to(dev).repeat(k, 1)  # (k*B, T), variant-major
            mask = batch.attention_mask.to(dev).repeat(k, 1)
            cols = None if columns is None else columns.repeat(k, 1)  # (k*B, n)
            logits = last_logits(lm, ids, mask, end.repeat(k), cols)  # (k*B, V)
        else:
            starts = [variant_start(v, batch, shared) for v in chunk]
            start, pos = min(s[0] for s in starts), min(s[1] for s in starts)  # each bound on its own
            logits = state.run(lm, end, start=start, pos=pos, copies=k, columns=columns)
    return logits.view(k, len(batch), -1)


def variant_start(variant: Sequence[Site], batch: PairBatch, shared: int = 0) -> tuple[int, int]:
    """(first layer, first position) a variant can change: nothing before either needs recomputing.

    ``shared``: positions before it hold identical tokens in donor and recipient, so (causal model)
    every donor activation there equals the recipient's and patching it changes nothing.
    """
    if not variant:
        return (0, 0)
    lengths = batch.attention_mask.sum(dim=1)
    pos = min(0 if s.pos is None else int(resolve_pos(s.pos, batch.positions, lengths).min()) for s in variant)
    return (min(s.layer for s in variant), max(pos, shared))


def shared_prefix(batch: PairBatch) -> int:
    """Number of leading positions where every donor row has the recipient's tokens."""
    same = (batch.donor_ids == batch.recipient_ids).long().cumprod(dim=1)  # (B, T): 1 until the first difference
    return int(same.sum(dim=1).min())


def plan_chunks(
    starts: Sequence[tuple[int, int]], n_layers: int, shape: tuple[int, int], max_rows: int | None = None,
    slack: float = 1.15, max_tokens: int = 1024,
) -> list[list[int]]:
    """Group variants (by their (layer, position) starts) into forward passes.

    A chunk runs from its lowest layer and position for every variant in it, so variants are
    taken in (layer, position) order and a chunk is closed when adding the next one would cost
    more than ``slack`` x the sum of their own minimal costs, or exceed the size cap: ``max_rows``
    rows, or by default ``max_tokens`` tokens (rows x computed positions; see ``token_budget``).

    Example::

        plan_chunks([(0, 0), (5, 3), (11, 15)], n_layers=12, shape=(32, 16), max_tokens=1024)  # [[0], [1], [2]]

    """
    n_rows, T = shape
    chunks: list[list[int]] = []
    cur: list[int] = []
    lo_L = lo_p = ideal = 0
    for i in sorted(range(len(starts)), key=lambda i: starts[i]):
        L, p = starts[i]
        if cur:
            nL, np_, nideal = min(lo_L, L), min(lo_p, p), ideal + (n_layers - L) * (T - p)
            rows = (len(cur) + 1) * n_rows
            fits = rows <= max_rows if max_rows is not None else rows * (T - np_) <= max_tokens
            if fits and (len(cur) + 1) * (n_layers - nL) * (T - np_) <= slack * nideal:
                cur.append(i)
                lo_L, lo_p, ideal = nL, np_, nideal
                continue
            chunks.append(cur)
        cur, lo_L, lo_p, ideal = [i], L, p, (n_layers - L) * (T - p)
    if cur:
        chunks.append(cur)
    return chunks


@dataclass(frozen=True)
class SweepPlan:
    """Variants grouped into forward passes: ``chunks`` of indices, each variant's (layer, position) start."""

    chunks: list[list[int]]
    starts: list[tuple[int, int]]
    n_layers: int
    n_positions: int

    def forward_equivalents(self) -> float:
        """The layer-stack work of every chunk, in full forward passes of the recipient batch."""
        total = 0
        for c in self.chunks:
            L, p = min(self.starts[i][0] for i in c), min(self.starts[i][1] for i in c)
            total += len(c) * (self.n_layers - L) * (self.n_positions - p)
        return total / (self.n_layers * self.n_positions)


def plan_sweep(
    lm: LoadedModel, batch: PairBatch, variants: Sequence[Sequence[Site]], max_rows: int | None = None, shared: int = 0,
) -> tuple[SweepPlan, int]:
    """The chunk plan ``patch_variants`` runs, and the token budget it used (0 with ``max_rows``).

    Example::

        plan, budget = plan_sweep(lm, batch, [[HeadSite(L)] for L in range(n)], shared=shared_prefix(batch))
        len(plan.chunks), plan.forward_equivalents()
    """
    T = batch.recipient_ids.shape[1]
    starts = [variant_start(v, batch, shared) for v in variants]
    budget = token_budget(lm, T) if max_rows is None else 0
    chunks = plan_chunks(starts, lm.adapter.n_layers, batch.recipient_ids.shape, max_rows, max_tokens=budget)
    return SweepPlan(chunks, starts, lm.adapter.n_layers, T), budget


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
    ``checkpoint`` (see ``actpatch.checkpoint``): variants already in it are not run again, and each
    finished chunk is added to it, saved even when the sweep is interrupted.

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
    plan, budget = plan_sweep(lm, batch, [variants[i] for i in todo], max_rows, shared)
    log.info("sweep '%s': %d patches (%d already done) in %d forward passes of <= %s", desc, len(variants),
             len(variants) - len(todo), len(plan.chunks), f"{max_rows} rows" if max_rows else f"{budget} tokens")
    state = RecipientState.record(lm, batch) if todo else None
    disable = {True: False, None: None, False: True}[progress]  # None: tqdm shows a bar only on a TTY
    try:
        with tqdm(total=len(variants), initial=len(results), desc=desc, unit="patch", disable=disable, leave=False) as bar:
            for local in plan.chunks:
                idx = [todo[j] for j in local]
                chunk = [variants[i] for i in idx]
                logits = run_chunk(lm, batch, donor, chunk, state, columns, shared)  # (k, B, V or n)
                bad = (~torch.isfinite(logits)).flatten(1).any(dim=1).nonzero().flatten().tolist()
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
        if checkpoint is not None:
            checkpoint.save()
    return {key: torch.stack([results[i][key] for i in range(len(variants))]) for key in results[0]}
