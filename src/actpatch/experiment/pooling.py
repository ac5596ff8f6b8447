"""Pool what chunks of pairs found into what the whole set of pairs gives.

A run streams its pairs in chunks (``PairBatch.chunks``), so that its memory does not grow with the
number of pairs. Every number it reports is either a per-pair score (one float per pair and cell,
concatenated across chunks) or a mean over pairs, pooled here as the mean of the chunks' means
weighted by their numbers of pairs, which is the mean over all pairs. A check passes only when it
passed on every chunk.

    pool_means([gap_1, gap_2], [32, 16])          # nested dicts / lists of floats or tensors, same shape
    pool_checks([[c1, c2], [c1b, c2b]])           # one SanityCheck per name
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Sequence

import torch
from torch import Tensor

from ..analysis.heads import HeadProfile
from ..engine.sanity import SanityCheck


def pool_means(parts: Sequence, weights: Sequence[int]):
    """The weighted mean of ``parts``, recursively: dicts by key, lists element by element, floats and tensors
    averaged; values equal in every part (names, layers, head lists) are kept as they are.

    Example::

        pool_means([{"layer": 3, "ld": 1.0}, {"layer": 3, "ld": 4.0}], [2, 1])   # {"layer": 3, "ld": 2.0}
    """
    first, total = parts[0], float(sum(weights))
    if isinstance(first, Tensor):
        return sum(w * p for w, p in zip(weights, parts)) / total
    if isinstance(first, dict):
        return {key: pool_means([p[key] for p in parts], weights) for key in first}
    if isinstance(first, (list, tuple)) and all(isinstance(p, type(first)) and len(p) == len(first) for p in parts):
        if all(p == first for p in parts):
            return first
        return type(first)(pool_means([p[i] for p in parts], weights) for i in range(len(first)))
    if all(p == first for p in parts):
        return first
    if isinstance(first, float) and not isinstance(first, bool):
        return sum(w * p for w, p in zip(weights, parts)) / total
    raise ValueError(f"cannot pool values that differ between chunks of pairs: {parts[:3]!r}")


def pool_profiles(parts: Sequence[HeadProfile], weights: Sequence[int], copy: Tensor, neg_copy: Tensor) -> HeadProfile:
    """The head profile of all pairs from the chunks' profiles (made with ``characterise(copy=False)``) and the
    copy scores, which do not depend on the pairs."""
    pooled = {f.name: pool_means([getattr(p, f.name) for p in parts], weights)
              for f in fields(HeadProfile) if f.name not in ("copy", "neg_copy")}
    return replace(parts[0], **pooled, copy=copy, neg_copy=neg_copy)


def pool_checks(per_part: Sequence[Sequence[SanityCheck]]) -> list[SanityCheck]:
    """One check per name over every chunk: passed only if it passed everywhere; the detail of the first
    failure (else of the largest difference) and the largest difference seen.

    Example::

        pool_checks([run_sanity_checks(...) for part in batch.chunks(32)])
    """
    if len(per_part) == 1:
        return list(per_part[0])
    out = []
    for name in dict.fromkeys(c.name for part in per_part for c in part):
        checks = [c for part in per_part for c in part if c.name == name]
        failed = [c for c in checks if not c.passed]
        worst = failed[0] if failed else max(checks, key=lambda c: c.max_abs_diff or 0.0)
        diffs = [c.max_abs_diff for c in checks if c.max_abs_diff is not None]
        where = f"failed in {len(failed)} of {len(checks)}" if failed else f"the worst of {len(checks)}"
        out.append(SanityCheck(name, not failed, f"{worst.detail} [{where} chunks of pairs]",
                               max(diffs) if diffs else None, worst.tolerance))
    return out


def concat_scores(parts: Sequence[dict[str, Tensor]], dim: int = -1) -> dict[str, Tensor]:
    """Per-pair scores of every chunk side by side: each key's tensors concatenated along the pairs' axis."""
    return {key: torch.cat([p[key] for p in parts], dim=dim) for key in parts[0]}
