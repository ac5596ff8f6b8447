"""One donor design of the IOI experiment, streamed over chunks of pairs so that memory stays flat.

    run = run_design(lm, batch, "swap", cfg, layers, chunk=32)
    run.baseline, run.rows, run.checks, run.analysis

For every chunk of pairs (``PairBatch.chunks``) it captures the recipient and donor activations,
scores the baseline, runs the exact sweeps, the sanity checks and the analysis' measurements, then
drops the activations. Across chunks it keeps only per-pair scalars (each cell's LD, P(IO) and P(S)
per pair, for means, medians and flip rates) and means over pairs (``pooling``). Attribution runs in a
first pass over the chunks, because with ``method="attribution"`` its top-k heads choose the exact
cells. A chunk's numbers do not depend on the other pairs, so chunking changes results only through
float summation order (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .. import __version__ as actpatch_version
from ..analysis.audit import check_gap, check_path_identity
from ..analysis.summary import design_measurements, design_summary, heads_of
from ..engine.attribution import Attribution, attribute
from ..engine.batch import PairBatch
from ..engine.capture import capture
from ..engine.checkpoint import Checkpoint, sweep_fingerprint
from ..engine.distributed import sharded_patch_variants
from ..engine.metrics import ioi_scores, normalised_effect
from ..engine.planning import release_memory
from ..engine.sanity import SanityCheck, check_fast_path, run_sanity_checks
from ..engine.sites import AttnOutSite, HeadSite, HiddenSite
from ..model.models import LoadedModel
from ..tasks.ioi import POSITION_NAMES
from .config import IOIConfig
from .pooling import concat_scores, pool_checks, pool_means

KEPT = ("logit_diff", "p_io", "p_s")  # the per-pair scores a sweep cell keeps across chunks


@dataclass
class DesignRun:
    """What one design gave: its baseline, result rows (cells), sanity checks and analysis (or None)."""

    baseline: dict
    rows: list[dict]
    checks: list[SanityCheck]
    analysis: dict | None


def summary(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    """Baseline numbers from per-pair scores (``ioi_scores``)."""
    ld = scores["logit_diff"]
    return {
        "accuracy": float(scores["correct"].mean()), "mean_logit_diff": float(ld.mean()),
        "median_logit_diff": float(ld.median()), "mean_p_io": float(scores["p_io"].mean()),
        "mean_p_s": float(scores["p_s"].mean()), "top1_rate": float(scores["top1"].mean()),
    }


def design_cells(layers: Sequence[int], heads: Sequence[tuple[int, int]], positions: tuple[str, ...]) -> list[tuple[dict, list]]:
    """(cell description, sites patched together) for every exact cell: layer sweeps, then single heads."""
    cells = []
    layer_positions = [("all", None), ("END", "END")] + [(p, p) for p in positions if p != "END"]
    for L in layers:
        for pos_name, pos in layer_positions:
            cells.append(({"experiment": "hidden", "layer": L, "head": None, "position": pos_name}, [HiddenSite(L, pos)]))
            cells.append(({"experiment": "all_heads", "layer": L, "head": None, "position": pos_name}, [HeadSite(L, None, pos)]))
    for L, h in heads:
        for pos_name, pos in [("all", None)] + [(p, p) for p in positions]:
            cells.append(({"experiment": "head", "layer": L, "head": h, "position": pos_name}, [HeadSite(L, h, pos)]))
    return cells


def sweep_positions(cfg: IOIConfig, batch: PairBatch) -> tuple[str, ...]:
    """The named positions the sweeps patch at: with ``by_position``, those found in every pair."""
    return tuple(p for p in POSITION_NAMES if p in batch.positions) if cfg.by_position else ()


def exact_heads(cfg: IOIConfig, layers: Sequence[int], n_heads: int, effect: torch.Tensor | None) -> list[tuple[int, int]]:
    """Which (layer, head) pairs get an exact single-head patch: all, or the top-k by attribution ``effect`` (L, H)."""
    if not cfg.head_sweep:
        return []
    every = [(L, h) for L in layers for h in range(n_heads)]
    if cfg.method != "attribution":
        return every
    ranked = sorted(every, key=lambda lh: -abs(float(effect[list(layers).index(lh[0]), lh[1]])))
    return sorted(ranked[: cfg.top_k])


def _attribution_cells(att: Attribution, batch: PairBatch, n_heads: int) -> list[dict]:
    """Attribution estimates as cells: every head and hidden state, all positions and each named position."""
    positions = [("all", None)] + [(p, batch.positions[p]) for p in POSITION_NAMES if p in batch.positions]
    cells = []
    for pos_name, index in positions:
        head = att.head_effect() if index is None else att.at_positions(att.heads, index)  # (L, H)
        hidden = att.hidden.sum(dim=(1, 2)) if index is None else att.at_positions(att.hidden, index)  # (L,)
        for i, L in enumerate(att.layers):
            cells.append({"experiment": "hidden_attribution", "layer": L, "head": None, "position": pos_name,
                          "delta_logit_diff": float(hidden[i])})
            for h in range(n_heads):
                cells.append({"experiment": "head_attribution", "layer": L, "head": h, "position": pos_name,
                              "delta_logit_diff": float(head[i, h])})
    return cells


def attribution_pass(lm: LoadedModel, parts: Sequence[PairBatch], layers: Sequence[int]) -> tuple[list[dict], torch.Tensor]:
    """Attribution over every chunk: the pooled cells, and the (L, H) head effect (patching at all positions)."""
    sites = [HeadSite(L) for L in layers] + [HiddenSite(L) for L in layers]
    cells, effects = [], []
    for part in parts:
        donor, _ = capture(lm, part.donor_ids, part, sites)
        att = attribute(lm, part, donor, layers)
        cells.append(_attribution_cells(att, part, lm.adapter.n_heads))
        effects.append(att.head_effect())
        del donor, att
        release_memory()  # the backward passes' buffers, before the next chunk's
    weights = [len(p) for p in parts]
    return pool_means(cells, weights), pool_means(effects, weights)


def _part(lm: LoadedModel, part: PairBatch, index: int, design: str, cfg: IOIConfig, layers: Sequence[int],
          variants: list, classes: list[dict] | None, checkpoint_dir: Path | None, resume: bool,
          weight_sums: list[float] | None, budget: int | None, bar: tqdm | None) -> dict:
    """One chunk of pairs: baseline scores, exact sweeps, sanity checks and analysis measurements."""
    a = lm.adapter
    sites = [HeadSite(L) for L in layers] + [HiddenSite(L) for L in layers]
    every = range(a.n_layers) if classes is not None else layers  # the analysis needs every layer
    extra = [AttnOutSite(L) for L in every] + [HeadSite(L) for L in every] + [HiddenSite(L) for L in every]
    rec_cache, rec_logits = capture(lm, part.recipient_ids, part, sites + extra)
    don_cache, don_logits = capture(lm, part.donor_ids, part, sites + (extra if classes is not None else []))
    ans, wrong = part.answer_ids, part.wrong_ids
    ckpt = None
    if checkpoint_dir is not None:
        ckpt = Checkpoint(Path(checkpoint_dir) / f"{design}-{index}.pt",
                          sweep_fingerprint(lm, part, variants, extra=f"ioi_scores {actpatch_version}",
                                            weight_sums=weight_sums), resume=resume)
    scores = sharded_patch_variants(  # = patch_variants unless launched with torchrun on several processes
        lm, part, don_cache, variants, reduce=lambda logits: ioi_scores(logits, ans, wrong),
        max_rows=cfg.max_rows, progress=cfg.progress, desc=design, donor_from_batch=True, checkpoint=ckpt,
        budget=budget, bar=bar,
    )
    checks = run_sanity_checks(lm, part, rec_cache, don_cache, rec_logits, don_logits, layers)
    checks.append(check_fast_path(lm, part, don_cache, variants, scores["logit_diff"]))
    measured = None
    if classes is not None:
        measured = design_measurements(lm, part, rec_cache, don_cache, classes)
        checks.append(check_gap(lm, part, measured["gap"]))
        checks.append(check_path_identity(lm, part, rec_cache, rec_logits, heads_of(classes, "name mover")))
    return {"rec": ioi_scores(rec_logits.cpu(), ans, wrong), "don": ioi_scores(don_logits.cpu(), ans, wrong),
            "sweep": {k: scores[k] for k in KEPT}, "checks": checks, "measured": measured}


def run_design(
    lm: LoadedModel, batch: PairBatch, design: str, cfg: IOIConfig, layers: list[int], *, chunk: int,
    checkpoint_dir: Path | None = None, resume: bool = False, classes: list[dict] | None = None,
    weight_sums: list[float] | None = None, budget: int | None = None, bar: tqdm | None = None,
) -> DesignRun:
    """Baseline, sweeps (exact and/or attribution), sanity checks and (with ``classes``) the analysis of one
    donor design, ``chunk`` pairs at a time."""
    a = lm.adapter
    parts = batch.chunks(chunk)
    weights = [len(p) for p in parts]
    att_cells, effect = attribution_pass(lm, parts, layers) if cfg.method in ("attribution", "both") else ([], None)
    cells = design_cells(layers, exact_heads(cfg, layers, a.n_heads, effect), sweep_positions(cfg, batch))
    variants = [sites for _, sites in cells]
    done = []
    for i, part in enumerate(parts):
        if bar is not None:
            bar.set_description(f"{design} {i + 1}/{len(parts)}" if len(parts) > 1 else design)
        done.append(_part(lm, part, i, design, cfg, layers, variants, classes, checkpoint_dir, resume, weight_sums,
                          budget, bar))
        release_memory()  # this chunk's caches and recorded state are gone: give their memory back
    rec_scores = concat_scores([d["rec"] for d in done])
    rec, don = summary(rec_scores), summary(concat_scores([d["don"] for d in done]))
    sweep = concat_scores([d["sweep"] for d in done])  # (K, N) per key
    rows = []
    for k, (cell, _) in enumerate(cells):
        ld = sweep["logit_diff"][k]
        rows.append({
            # flip_rate: the share of pairs whose LD changed sign against their own unpatched recipient
            **cell, "logit_diff": float(ld.mean()), "flip_rate": float((ld * rec_scores["logit_diff"] < 0).float().mean()),
            "p_io": float(sweep["p_io"][k].mean()), "p_s": float(sweep["p_s"][k].mean()),
        })
    rows += [{**c, "logit_diff": rec["mean_logit_diff"] + c["delta_logit_diff"]} for c in att_cells]
    for row in rows:
        row.update(design=design, direction="denoising" if design.endswith("-denoise") else "noising",
                   depth=row["layer"] / a.n_layers, n_pairs=len(batch),
                   delta_logit_diff=row["logit_diff"] - rec["mean_logit_diff"],
                   normalised_effect=float(normalised_effect(row["logit_diff"], rec["mean_logit_diff"], don["mean_logit_diff"])))
    analysis = None
    if classes is not None:
        analysis = design_summary(pool_means([d["measured"] for d in done], weights), rows, rec["mean_logit_diff"])
    return DesignRun({"recipient": rec, "donor": don}, rows, pool_checks([d["checks"] for d in done]), analysis)
