"""The seed's experiment: hidden-state vs attention-head patching on IOI, with sanity checks.

    result = run_ioi(IOIConfig(n_pairs=16))      # or run_ioi(n_pairs=16, designs=("swap",))
    result.to_dataframe()                         # one row per experiment cell
    result.save("runs/demo")                      # results.json, results.csv, config

For every donor design it runs, on the same recipient prompts:
  1. the baseline (recipients and donors, scored with the recipient's IO and S tokens);
  2. hidden-state (block output) patching for every layer, at all positions and at END;
  3. all-heads-of-a-layer patching (o_proj input, every head) for every layer, all positions and END;
  4. the single-head sweep, layer x head, at all positions;
and the mandatory sanity checks. Direction: denoising-style transplant donor -> recipient, so a
normalised effect of 1 means the recipient now behaves like the donor.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, replace
from pathlib import Path

import torch

from . import __version__ as actpatch_version
from .analysis import design_analysis, head_analysis, heads_of
from .audit import check_dla, check_gap, check_path_identity
from .attribution import Attribution, attribute
from .batch import PairBatch, tokenize_pairs
from .capture import capture
from .checkpoint import Checkpoint, sweep_fingerprint
from .config import IOIConfig, environment
from .distributed import sharded_patch_variants
from .errors import ConfigError
from .heads import characterise
from .hooks import count_hooks
from .ioi import POSITION_NAMES, denoising, generate_pairs, load_pairs_file
from .metrics import ioi_scores, normalised_effect
from .models import LoadedModel, load_model
from .placement import parameter_sums
from .planning import plan_sweep, shared_prefix
from .results import IOIResult
from .sanity import check_fast_path, check_no_hooks_left, run_sanity_checks
from .sites import AttnOutSite, HeadSite, HiddenSite


log = logging.getLogger(__name__)

def _summary(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    ld = scores["logit_diff"]
    return {
        "accuracy": float(scores["correct"].mean()), "mean_logit_diff": float(ld.mean()),
        "median_logit_diff": float(ld.median()), "mean_p_io": float(scores["p_io"].mean()),
        "mean_p_s": float(scores["p_s"].mean()), "top1_rate": float(scores["top1"].mean()),
    }


def _layers(cfg: IOIConfig, n_layers: int) -> list[int]:
    if cfg.layers is None:
        return list(range(n_layers))
    bad = [L for L in cfg.layers if not isinstance(L, int) or not 0 <= L < n_layers]
    if bad or not cfg.layers:
        raise ConfigError(f"layers (--layers) must be ints in [0, {n_layers - 1}] for this model, got {list(cfg.layers)!r}")
    return sorted(set(cfg.layers))


def _variants(layers: list[int], heads: list[tuple[int, int]], positions: tuple[str, ...]) -> list[tuple[dict, list]]:
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


def _exact_heads(cfg: IOIConfig, layers: list[int], n_heads: int, att: Attribution | None) -> list[tuple[int, int]]:
    """Which (layer, head) pairs get an exact single-head patch: all, or attribution's top-k."""
    if not cfg.head_sweep:
        return []
    every = [(L, h) for L in layers for h in range(n_heads)]
    if cfg.method != "attribution":
        return every
    effect = att.head_effect()
    ranked = sorted(every, key=lambda lh: -abs(float(effect[att.layers.index(lh[0]), lh[1]])))
    return sorted(ranked[: cfg.top_k])


def run_design(
    lm: LoadedModel, batch: PairBatch, design: str, cfg: IOIConfig, layers: list[int],
    checkpoint_dir: Path | None = None, resume: bool = False, classes: list[dict] | None = None,
    weight_sums: list[float] | None = None,
) -> tuple[dict, list[dict], list, dict | None]:
    """Baseline, sweeps (exact and/or attribution), sanity checks and (with ``classes``) the analysis
    of one donor design."""
    a = lm.adapter
    sites = [HeadSite(L) for L in layers] + [HiddenSite(L) for L in layers]
    every = range(a.n_layers) if classes is not None else layers  # the analysis needs every layer
    extra = [AttnOutSite(L) for L in every] + [HeadSite(L) for L in every] + [HiddenSite(L) for L in every]
    rec_cache, rec_logits = capture(lm, batch.recipient_ids, batch, sites + extra)
    don_cache, don_logits = capture(lm, batch.donor_ids, batch, sites + (extra if classes is not None else []))
    ans, wrong = batch.answer_ids, batch.wrong_ids
    rec_scores = ioi_scores(rec_logits.cpu(), ans, wrong)
    rec = _summary(rec_scores)
    don = _summary(ioi_scores(don_logits.cpu(), ans, wrong))
    baseline = {"recipient": rec, "donor": don}

    att = attribute(lm, batch, don_cache, layers) if cfg.method in ("attribution", "both") else None
    positions = tuple(p for p in POSITION_NAMES if p in batch.positions) if cfg.by_position else ()
    cells = _variants(layers, _exact_heads(cfg, layers, a.n_heads, att), positions)
    variants = [sites for _, sites in cells]
    ckpt = None
    if checkpoint_dir is not None:
        ckpt = Checkpoint(Path(checkpoint_dir) / f"{design}.pt",
                          sweep_fingerprint(lm, batch, variants, extra=f"ioi_scores {actpatch_version}",
                                            weight_sums=weight_sums), resume=resume)
    scores = sharded_patch_variants(  # = patch_variants unless launched with torchrun on several processes
        lm, batch, don_cache, variants, reduce=lambda logits: ioi_scores(logits, ans, wrong),
        max_rows=cfg.max_rows, progress=cfg.progress, desc=design, donor_from_batch=True,
        checkpoint=ckpt,
    )
    rows = []
    for k, (cell, _) in enumerate(cells):
        ld = scores["logit_diff"][k]
        mean_ld = float(ld.mean())
        rows.append({
            # flip_rate: the share of pairs whose LD changed sign against their own unpatched recipient
            **cell, "logit_diff": mean_ld, "flip_rate": float((ld * rec_scores["logit_diff"] < 0).float().mean()),
            "p_io": float(scores["p_io"][k].mean()), "p_s": float(scores["p_s"][k].mean()),
        })
    if att is not None:
        rows += [{**c, "logit_diff": rec["mean_logit_diff"] + c["delta_logit_diff"]} for c in _attribution_cells(att, batch, a.n_heads)]
    for row in rows:
        row.update(design=design, direction="denoising" if design.endswith("-denoise") else "noising", depth=row["layer"] / a.n_layers, n_pairs=len(batch),
                   delta_logit_diff=row["logit_diff"] - rec["mean_logit_diff"],
                   normalised_effect=float(normalised_effect(row["logit_diff"], rec["mean_logit_diff"], don["mean_logit_diff"])))
    checks = run_sanity_checks(lm, batch, rec_cache, don_cache, rec_logits, don_logits, layers)
    checks.append(check_fast_path(lm, batch, don_cache, variants, scores["logit_diff"]))
    analysis = None
    if classes is not None:
        analysis = design_analysis(lm, batch, rec_cache, don_cache, rows, classes, rec["mean_logit_diff"])
        checks.append(check_gap(lm, batch, analysis["gap"]))
        checks.append(check_path_identity(lm, batch, rec_cache, rec_logits, heads_of(classes, "name mover")))
    return baseline, rows, checks, analysis


def _prepare(config: IOIConfig | None, lm: LoadedModel | None, overrides: dict):
    """Validated config, model, swept layers, tokenized batches per design, and the clean batch."""
    cfg = replace(config or IOIConfig(), **overrides)
    if cfg.pairs_file is not None:
        cfg = replace(cfg, designs=("file",))
    cfg.validate()
    file_pairs = load_pairs_file(cfg.pairs_file) if cfg.pairs_file is not None else None  # bad files fail fast
    if lm is None:
        log.info("loading %s (%s on %s)", cfg.model, cfg.dtype, cfg.device or "auto")
        lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                        device_map=cfg.device_map, offload_folder=cfg.offload_folder)
    layers = _layers(cfg, lm.adapter.n_layers)
    if file_pairs is not None:
        clean = tokenize_pairs(lm.tokenizer, file_pairs, require_positions=False)
        return cfg, lm, layers, {"file": clean}, clean
    pairs = generate_pairs(lm.tokenizer, cfg.n_pairs, designs=cfg.designs, seed=cfg.seed)
    batches = {}
    for d in cfg.designs:
        if cfg.direction in ("noising", "both"):
            batches[d] = tokenize_pairs(lm.tokenizer, pairs[d])
        if cfg.direction in ("denoising", "both"):
            batches[f"{d}-denoise"] = tokenize_pairs(lm.tokenizer, denoising(pairs[d]), positions_from="donor")
    first = cfg.designs[0]  # the clean prompts; already tokenized unless the run is denoising only
    return cfg, lm, layers, batches, batches[first] if first in batches else tokenize_pairs(lm.tokenizer, pairs[first])


def plan_ioi(config: IOIConfig | None = None, *, lm: LoadedModel | None = None, **overrides) -> dict:
    """What ``run_ioi`` would do, without running a sweep: pairs, patches, forward passes per design.

    ``forward_equivalents`` estimates the exact sweep's cost in full recipient forward passes, from
    the chunk plan (layers >= L and positions >= p that each chunk must run).

    Example::

        plan = plan_ioi(n_pairs=32, by_position=True)
        plan["designs"]["swap"]["forward_equivalents"]

    """
    cfg, lm, layers, batches, _ = _prepare(config, lm, overrides)
    a = lm.adapter
    designs = {}
    for design, batch in batches.items():
        positions = tuple(p for p in POSITION_NAMES if p in batch.positions) if cfg.by_position else ()
        # with method="attribution" the top-k heads are known only after the run: plan them all at the
        # first swept layer, an upper bound on their cost
        heads = [] if not cfg.head_sweep else (
            [(L, h) for L in layers for h in range(a.n_heads)] if cfg.method != "attribution"
            else [(layers[0], 0)] * min(cfg.top_k, len(layers) * a.n_heads))
        variants = [sites for _, sites in _variants(layers, heads, positions)]
        plan, _ = plan_sweep(lm, batch, variants, cfg.max_rows, shared_prefix(batch))
        designs[design] = {"pairs": len(batch), "tokens": plan.n_positions, "patches": len(variants),
                           "forward_passes": len(plan.chunks), "forward_equivalents": round(plan.forward_equivalents(), 1),
                           "attribution": cfg.method in ("attribution", "both"), "analysis": cfg.analysis}
    return {"model": lm.info.get("model_id"), "n_layers": a.n_layers, "n_heads": a.n_heads, "layers": layers,
            "designs": designs}


def run_ioi(
    config: IOIConfig | None = None, *, lm: LoadedModel | None = None,
    checkpoint_dir: str | Path | None = None, resume: bool = False, **overrides,
) -> IOIResult:
    """Run the whole IOI experiment and return an ``IOIResult`` (nothing else is written to disk).

    Pass an already loaded ``lm`` to reuse it (its spec then replaces ``config.model`` in the record).
    Keyword overrides replace fields of ``config``: ``run_ioi(n_pairs=8, designs=("swap",))``.
    With ``checkpoint_dir`` each design's exact sweep saves its finished patches there as it goes;
    ``resume=True`` skips the patches a previous, interrupted run with the same settings saved.

    Example::

        result = run_ioi(n_pairs=16, designs=("swap", "abc"), by_position=True)
        result.passed, result.to_dataframe().head()
    """
    cfg, lm, layers, batches, clean = _prepare(config, lm, overrides)
    hooks_before = count_hooks(lm.model)
    baseline, cells, sanity = {"designs": {}}, [], {}
    analysis: dict = {}
    dla_check = None
    if cfg.analysis:  # on the clean prompts, the same for every design: characterise the heads once
        log.info("characterising %d heads on %d recipients", lm.adapter.n_layers * lm.adapter.n_heads, len(clean))
        profile = characterise(lm, clean)
        analysis = {"heads": head_analysis(lm, clean, profile), "designs": {}}
        dla_check = check_dla(lm, clean, profile)
    weight_sums = parameter_sums(lm.model) if checkpoint_dir is not None else None  # read every weight once
    for design, batch in batches.items():
        log.info("design %s: %d pairs, %d tokens wide", design, len(batch), batch.recipient_ids.shape[1])
        classes = analysis["heads"]["classes"] if cfg.analysis else None
        base, rows, checks, extra = run_design(lm, batch, design, cfg, layers, checkpoint_dir, resume, classes,
                                               weight_sums)
        if extra is not None:
            analysis["designs"][design] = extra
        baseline["designs"][design] = base
        cells.extend(rows)
        for check in checks:
            sanity.setdefault(check.name, {})[design] = check.to_dict()
    if dla_check is not None:
        sanity[dla_check.name] = {"clean": dla_check.to_dict()}
    sanity["no_hooks_left"] = {"all": check_no_hooks_left(lm, hooks_before).to_dict()}
    first = next(iter(baseline["designs"].values()))["recipient"]
    baseline.update({**first, "n_pairs": len(next(iter(batches.values())))})
    record = asdict(cfg)
    record["model"] = lm.info.get("spec", cfg.model)
    if cfg.pairs_file is not None:  # the pairs themselves are saved too (``pairs``)
        record.update(n_pairs=len(clean), pairs_file=str(Path(cfg.pairs_file).resolve()),
                      pairs_file_sha256=hashlib.sha256(Path(cfg.pairs_file).read_bytes()).hexdigest(), seed=None)
    return IOIResult(
        config=record, model=dict(lm.info), environment=environment(), baseline=baseline, cells=cells,
        sanity={name: _merge(by_design) for name, by_design in sanity.items()},
        n_layers=lm.adapter.n_layers, n_heads=lm.adapter.n_heads, layers=layers, analysis=analysis,
        examples=[{"design": d, "recipient": b.pairs[0].recipient, "donor": b.pairs[0].donor,
                   "answer": b.pairs[0].answer, "wrong": b.pairs[0].wrong} for d, b in batches.items()],
        pairs={d: [asdict(p) for p in b.pairs] for d, b in batches.items()},
    )


def _merge(by_design: dict[str, dict]) -> dict[str, object]:
    """One sanity record per check: passed only if it passed for every design."""
    return {
        "passed": all(c["passed"] for c in by_design.values()),
        "detail": "; ".join(f"{d}: {c['detail']}" for d, c in by_design.items()),
        "by_design": by_design,
    }
