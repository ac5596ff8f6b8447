"""How a sweep is cut into forward passes: where each variant starts, which variants share a pass, how big a pass is.

A patch at layer L and position p cannot change anything before either, so a variant needs only
layers >= L at positions >= p recomputed (``variant_start``). ``plan_chunks`` groups variants with
similar starts into passes whose extra work stays within a slack factor, capped by rows or by the
hardware's ``token_budget``; ``plan_sweep`` does both for a batch and returns a ``SweepPlan``, whose
``forward_equivalents()`` is the cost in full forward passes (what ``--dry-run`` prints).

    plan, budget = plan_sweep(lm, batch, [[HeadSite(L)] for L in range(n)], shared=shared_prefix(batch))
    len(plan.chunks), plan.forward_equivalents()
"""

from __future__ import annotations

import ctypes
import functools
import gc
from dataclasses import dataclass
from typing import Sequence

import psutil
import torch

from ..model.models import LoadedModel
from .batch import PairBatch
from .sites import Site, resolve_pos

CPU_CACHE_BYTES = 12 * 2**20  # one chunk's MLP activations should fit a CPU's last-level cache
MEMORY_SHARE = 0.25           # at most this share of free (GPU) / available (CPU) memory by default
CPU_MEMORY = 2**30            # default budget on CPU: 1 GiB beyond the model, for a chunk of pairs and its passes


def memory_budget(lm: LoadedModel, max_memory: int | None = None) -> int:
    """Bytes a run may hold beyond the model: ``max_memory`` (``--max-memory``) when given; else, on CUDA, a
    quarter of the free memory of the fullest GPU the model uses, and on CPU 1 GiB, at most a quarter of
    the available RAM. A quarter of it holds one chunk of pairs (caches, the recorded recipient state),
    half of it one batched forward pass over them (``token_budget``, ``logit_rows``).

    Example::

        memory_budget(lm)                   # e.g. 1073741824 on a CPU with plenty of RAM
        memory_budget(lm, 512 * 2**20)      # what --max-memory 512MiB asks for
    """
    if max_memory is not None:
        return int(max_memory)
    cuda = _cuda_devices(lm)
    if cuda:
        return int(MEMORY_SHARE * min(torch.cuda.mem_get_info(dev)[0] for dev in cuda))
    return min(CPU_MEMORY, int(MEMORY_SHARE * psutil.virtual_memory().available))


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


def release_memory() -> None:
    """Give memory freed by a finished chunk of pairs back to the system: Python's cyclic garbage, CUDA's cached
    blocks, and glibc's heap. glibc keeps freed blocks (up to 32 MiB each, once larger ones have been freed)
    in its heap, so without ``malloc_trim`` a process keeps the high-water mark of every earlier phase:
    measured +0.5 to 0.9 GiB on the bundled model after attribution's backward passes.

    Example::

        for part in batch.chunks(32):
            ...                 # capture, sweep, check
            release_memory()
    """
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _dims(lm: LoadedModel) -> tuple[int, int, int]:
    cfg = lm.model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    d = int(cfg.hidden_size)
    d_ff = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d)
    return d, d_ff, int(getattr(cfg, "vocab_size", 0) or 0)


def pair_bytes(lm: LoadedModel, n_positions: int) -> int:
    """What one pair holds while its chunk is worked on: the recipient's and donor's caches (heads, hidden
    states and attention outputs of every layer), the recorded recipient state (block inputs, keys and
    values) and eager attention weights; about 10 MB for SmolLM2-135M at 20 tokens.

    Example::

        pair_bytes(lm, n_positions=20)
    """
    a, (d, _, _) = lm.adapter, _dims(lm)
    per_token = 2 * (a.n_heads * a.d_head + 2 * d) + d + 2 * a.n_kv_heads * a.d_head + a.n_heads * n_positions
    return lm.dtype.itemsize * a.n_layers * n_positions * per_token


def pair_chunk(lm: LoadedModel, n_positions: int, budget: int) -> int:
    """Pairs per chunk: as many as a quarter of ``budget`` holds (at least one). Larger chunks are no faster
    on a CPU (a sweep's forward passes are sized by ``token_budget`` whatever the chunk).

    Example::

        pair_chunk(lm, 20, memory_budget(lm))   # e.g. 24 pairs of 20 tokens for SmolLM2-135M in 1 GiB
    """
    return max(1, (budget // 4) // pair_bytes(lm, n_positions))


def token_budget(lm: LoadedModel, n_positions: int, budget: int | None = None) -> int:
    """Default tokens (rows x computed positions) per forward pass, from the hardware and the memory budget.

    CPU: the matmuls are compute-bound at any size, but the elementwise ops between them are not,
    so chunks are sized to keep the MLP's hidden activations in the last-level cache (measured on
    GPT-2 small, 2 cores: 1,024 tokens is 27 % faster than 4,096). CUDA: as large as half of the
    memory budget allows (``memory_budget``: a quarter of the free memory of the fullest GPU the model
    uses). Both are capped by half the budget; the rows are capped on their own by ``logit_rows``.

    Example::

        token_budget(lm, n_positions=16)  # e.g. 1024 for GPT-2 small on CPU

    """
    d, d_ff, _ = _dims(lm)
    elem = lm.dtype.itemsize
    # residual, norms, q/k/v, per-head outputs, the MLP's hidden layer twice, eager attention scores
    per_token = elem * (8 * d + 2 * d_ff + 2 * lm.adapter.n_heads * n_positions)
    tokens = memory_budget(lm, budget) // 2 // per_token
    if not _cuda_devices(lm):
        tokens = min(CPU_CACHE_BYTES // (d_ff * elem), tokens)
    return max(tokens, n_positions)  # at least one row


def logit_rows(lm: LoadedModel, budget: int | None = None) -> int:
    """Rows per forward pass whose full-vocabulary END logits (the model's dtype, plus the metrics' two float32
    copies) fit half the memory budget. A pass that computes one position per row still makes one row of
    logits per row, so this caps rows, not tokens.

    Example::

        logit_rows(lm)   # e.g. 910 for a 49,152-token vocabulary in a 1 GiB budget
    """
    vocab = _dims(lm)[2] or 1
    return max(1, memory_budget(lm, budget) // 2 // (vocab * (lm.dtype.itemsize + 8)))


def _cuda_devices(lm: LoadedModel) -> list[torch.device]:
    """The CUDA devices holding part of the model: every one under a device map, else lm.device's."""
    placed = getattr(lm.model, "hf_device_map", None)
    if placed:
        devs = {torch.device(f"cuda:{d}" if isinstance(d, int) else d) for d in placed.values() if d not in ("cpu", "disk")}
        return sorted((d for d in devs if d.type == "cuda"), key=str)
    return [lm.device] if lm.device.type == "cuda" else []


def variant_start(variant: Sequence[Site], batch: PairBatch, shared: int = 0) -> tuple[int, int]:
    """(first layer, first position) a variant can change: nothing before either needs recomputing.

    ``shared``: positions before it hold identical tokens in donor and recipient, so (causal model)
    every donor activation there equals the recipient's at the same index: a patch that writes such a
    position from the same donor index changes nothing. One that reads another donor index (pairs of
    different lengths, named positions) changes its position wherever it lies.
    """
    if not variant:
        return (0, 0)
    rec_len, don_len = batch.lengths(), batch.lengths("donor")
    pos = []
    for s in variant:
        dst = resolve_pos(s.pos, batch.positions, rec_len)
        if dst is None:  # all positions (equal lengths): the shared prefix is a no-op
            pos.append(shared)
            continue
        src = resolve_pos(s.pos, batch.side_positions("donor"), don_len)
        first = torch.where((dst >= shared) | (src != dst), dst, torch.full_like(dst, shared))  # (B,)
        pos.append(int(first.min()))
    return (min(s.layer for s in variant), min(pos))


def shared_prefix(batch: PairBatch) -> int:
    """Number of leading positions where every donor row has the recipient's tokens (and no embedding noise).

    Only real tokens count (padding is never shared), and each row's END is always recomputed: a
    control pair (donor == recipient) or a short row must still have its END inside the replay.
    """
    return int(row_prefixes(batch).min())


def row_prefixes(batch: PairBatch) -> torch.Tensor:
    """(B,): per row, the leading positions where the donor has the recipient's tokens (and no embedding noise), at
    most up to the row's END (as ``shared_prefix``). In a causal model every activation there is the same in both."""
    w = min(batch.recipient_ids.shape[1], batch.donor_ids.shape[1])
    real = batch.attention_mask[:, :w].bool() & batch.donor_attention_mask[:, :w].bool()  # (B, w)
    same = (batch.donor_ids[:, :w] == batch.recipient_ids[:, :w]) & real  # (B, w)
    if batch.noise_mask is not None:
        same &= ~batch.noise_mask[:, :w]  # a noised donor token differs from the recipient's
    same = same.long().cumprod(dim=1)  # (B, w): 1 until the first difference
    end = batch.lengths() - 1  # (B,) each row's last real token
    return torch.minimum(same.sum(dim=1), end)


def plan_chunks(
    starts: Sequence[tuple[int, int]], n_layers: int, shape: tuple[int, int], max_rows: int | None = None,
    slack: float = 1.05, max_tokens: int = 1024, row_cap: int | None = None, extra: int = 0,
) -> list[list[int]]:
    """Group variants (by their (layer, position) starts) into forward passes.

    A chunk runs from its lowest layer and position for every variant in it, so variants are taken in
    order and a chunk is closed when adding the next one would cost more than ``slack`` x the sum of their
    own minimal costs, or exceed the size cap: ``max_rows`` rows, or by default ``max_tokens`` tokens (rows x
    computed positions; see ``token_budget``) and ``row_cap`` rows (full-vocabulary logits; see
    ``logit_rows``). ``extra``: positions each row computes whatever its start position (a multi-token
    answer's continuation rows), counted in both the cost and the size. Two orders are tried, by (layer,
    position) and by (position, layer); the plan with fewer passes wins (then the one with less work): a sweep
    at two positions per layer groups each position's variants across layers instead of alternating them.
    ``slack`` 1.05: chunks stay at full matmul speed down to about 256 tokens on a CPU, so recomputed layers
    cost more than extra passes (timed on ``bench_continuations.py``'s k = 1 sweep: 10.9 s at 1.05, 12.0 s at 1.15).

    Example::

        plan_chunks([(0, 0), (5, 3), (11, 15)], n_layers=12, shape=(32, 16), max_tokens=1024)  # [[0], [1], [2]]

    """
    plans = [_greedy(sorted(range(len(starts)), key=key), starts, n_layers, shape, max_rows, slack, max_tokens,
                     row_cap, extra) for key in (lambda i: starts[i], lambda i: starts[i][::-1])]
    return min(plans, key=lambda c: (len(c), _work(c, starts, n_layers, shape[1] + extra)))


def _work(chunks: list[list[int]], starts: Sequence[tuple[int, int]], n_layers: int, width: int) -> int:
    """Layer-positions computed by ``chunks`` per row, each chunk from its lowest start."""
    return sum(len(c) * (n_layers - min(starts[i][0] for i in c)) * (width - min(starts[i][1] for i in c))
               for c in chunks)


def _greedy(
    order: list[int], starts: Sequence[tuple[int, int]], n_layers: int, shape: tuple[int, int],
    max_rows: int | None, slack: float, max_tokens: int, row_cap: int | None, extra: int,
) -> list[list[int]]:
    """``plan_chunks`` for one order of the variants."""
    n_rows, T = shape
    chunks: list[list[int]] = []
    cur: list[int] = []
    lo_L = lo_p = ideal = 0
    for i in order:
        L, p = starts[i]
        if cur:
            nL, np_, nideal = min(lo_L, L), min(lo_p, p), ideal + (n_layers - L) * (T - p + extra)
            rows = (len(cur) + 1) * n_rows
            fits = rows <= max_rows if max_rows is not None else (
                rows * (T - np_ + extra) <= max_tokens and (row_cap is None or rows <= row_cap))
            if fits and (len(cur) + 1) * (n_layers - nL) * (T - np_ + extra) <= slack * nideal:
                cur.append(i)
                lo_L, lo_p, ideal = nL, np_, nideal
                continue
            chunks.append(cur)
        cur, lo_L, lo_p, ideal = [i], L, p, (n_layers - L) * (T - p + extra)
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
    budget: int | None = None, full_logits: bool = True,
) -> tuple[SweepPlan, int]:
    """The chunk plan ``patch_variants`` runs, and the token budget it used (0 with ``max_rows``); ``budget``:
    the run's memory budget in bytes (``memory_budget``), by default from the hardware; ``full_logits=False``
    when the sweep reads only a few logit columns (no cap on rows for the vocabulary's logits).

    Example::

        plan, budget = plan_sweep(lm, batch, [[HeadSite(L)] for L in range(n)], shared=shared_prefix(batch))
        len(plan.chunks), plan.forward_equivalents()
    """
    T = batch.recipient_ids.shape[1]
    starts = [variant_start(v, batch, shared) for v in variants]
    tokens = token_budget(lm, T, budget) if max_rows is None else 0
    extra = 0
    if batch.cont_ids is not None:  # each prompt row brings n continuation rows of M positions
        n, m = batch.cont_ids.shape[1:]
        extra = n * (m - 1)
        tokens = max(T + extra, tokens)
    cap = logit_rows(lm, budget) if full_logits else None  # a readout of a few columns needs no cap
    chunks = plan_chunks(starts, lm.adapter.n_layers, batch.recipient_ids.shape, max_rows, max_tokens=tokens,
                         row_cap=cap, extra=extra)
    return SweepPlan(chunks, starts, lm.adapter.n_layers, T), tokens
