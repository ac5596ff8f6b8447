"""The seed's experiment: hidden-state vs attention-head patching on IOI, with sanity checks.

    result = run_ioi(IOIConfig(n_pairs=16))      # or run_ioi(n_pairs=16, designs=("swap",))
    result.to_dataframe()                         # one row per experiment cell
    result.save("runs/demo")                      # results.json, results.csv, config

For every donor design it runs, on the same recipient prompts (streamed in chunks of pairs, ``sweeps``):
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
from tqdm.auto import tqdm

from ..analysis.audit import check_dla
from ..analysis.heads import characterise, copy_scores
from ..analysis.patterns import patterns
from ..analysis.summary import head_analysis
from ..engine.batch import PairBatch
from ..engine.hooks import count_hooks
from ..engine.planning import memory_budget, pair_chunk, plan_sweep, release_memory, shared_prefix
from ..engine.sanity import SanityCheck, check_no_hooks_left
from ..errors import ConfigError
from ..model.models import LoadedModel
from ..model.placement import parameter_sums
from ..tasks.ioi import denoising, generate_pairs, load_pairs_file, tokenize_ioi
from .config import IOIConfig, environment
from .pooling import pool_checks, pool_profiles
from .results import IOIResult
from .selftest import load_checked
from .sweeps import design_cells, run_design, sweep_positions


log = logging.getLogger(__name__)

def _layers(cfg: IOIConfig, n_layers: int) -> list[int]:
    if cfg.layers is None:
        return list(range(n_layers))
    bad = [L for L in cfg.layers if not isinstance(L, int) or not 0 <= L < n_layers]
    if bad or not cfg.layers:
        raise ConfigError(f"layers (--layers) must be ints in [0, {n_layers - 1}] for this model, got {list(cfg.layers)!r}")
    return sorted(set(cfg.layers))


def _prepare(config: IOIConfig | None, lm: LoadedModel | None, overrides: dict):
    """Validated config, model, swept layers, tokenized batches per design, and the clean batch."""
    cfg = replace(config or IOIConfig(), **overrides)
    if cfg.pairs_file is not None:
        cfg = replace(cfg, designs=("file",))
    cfg.validate()
    file_pairs = load_pairs_file(cfg.pairs_file) if cfg.pairs_file is not None else None  # bad files fail fast
    if lm is None:
        log.info("loading %s (%s on %s)", cfg.model, cfg.dtype, cfg.device or "auto")
        lm = load_checked(cfg.model, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                        device_map=cfg.device_map, offload_folder=cfg.offload_folder)
    layers = _layers(cfg, lm.adapter.n_layers)
    if file_pairs is not None:
        clean = tokenize_ioi(lm.tokenizer, file_pairs, require_positions=False)
        return cfg, lm, layers, {"file": clean}, clean
    pairs = generate_pairs(lm.tokenizer, cfg.n_pairs, designs=cfg.designs, seed=cfg.seed)
    batches = {}
    for d in cfg.designs:
        if cfg.direction in ("noising", "both"):
            batches[d] = tokenize_ioi(lm.tokenizer, pairs[d])
        if cfg.direction in ("denoising", "both"):
            batches[f"{d}-denoise"] = tokenize_ioi(lm.tokenizer, denoising(pairs[d]), positions_from="donor")
    first = cfg.designs[0]  # the clean prompts; already tokenized unless the run is denoising only
    return cfg, lm, layers, batches, batches[first] if first in batches else tokenize_ioi(lm.tokenizer, pairs[first])


def _heads_planned(cfg: IOIConfig, layers: list[int], n_heads: int) -> list[tuple[int, int]]:
    """The single heads a run patches; with method="attribution" the top-k are known only after the run:
    planned all at the first swept layer, an upper bound on their cost."""
    if not cfg.head_sweep:
        return []
    if cfg.method != "attribution":
        return [(L, h) for L in layers for h in range(n_heads)]
    return [(layers[0], 0)] * min(cfg.top_k, len(layers) * n_heads)


def plan_ioi(config: IOIConfig | None = None, *, lm: LoadedModel | None = None, **overrides) -> dict:
    """What ``run_ioi`` would do, without running a sweep: pairs, chunks of pairs, patches, forward passes per design.

    ``forward_equivalents`` estimates the exact sweep's cost in full recipient forward passes, from
    the chunk plan (layers >= L and positions >= p that each chunk must run).

    Example::

        plan = plan_ioi(n_pairs=32, by_position=True)
        plan["designs"]["swap"]["forward_equivalents"]

    """
    cfg, lm, layers, batches, _ = _prepare(config, lm, overrides)
    a = lm.adapter
    budget = memory_budget(lm, cfg.max_memory)
    designs = {}
    for design, batch in batches.items():
        cells = design_cells(layers, _heads_planned(cfg, layers, a.n_heads), sweep_positions(cfg, batch))
        variants = [sites for _, sites in cells]
        parts = batch.chunks(pair_chunk(lm, batch.recipient_ids.shape[1], budget))
        plans = [plan_sweep(lm, part, variants, cfg.max_rows, shared_prefix(part), budget)[0] for part in parts]
        fe = sum(p.forward_equivalents() * len(part) for p, part in zip(plans, parts)) / len(batch)
        designs[design] = {"pairs": len(batch), "pair_chunks": len(parts), "tokens": batch.recipient_ids.shape[1],
                           "patches": len(variants), "forward_passes": sum(len(p.chunks) for p in plans),
                           "forward_equivalents": round(fe, 1),
                           "attribution": cfg.method in ("attribution", "both"), "analysis": cfg.analysis}
    return {"model": lm.info.get("model_id"), "n_layers": a.n_layers, "n_heads": a.n_heads, "layers": layers,
            "memory_budget": budget, "designs": designs}


def _head_profile(lm: LoadedModel, clean: PairBatch, chunk: int) -> tuple[dict, SanityCheck]:
    """Characterise and classify every head on the clean prompts, a chunk of pairs at a time; with the DLA check."""
    a = lm.adapter
    log.info("characterising %d heads on %d recipients", a.n_layers * a.n_heads, len(clean))
    names = torch.unique(torch.cat([clean.answer_ids, clean.wrong_ids]))
    parts = clean.chunks(chunk)
    profiles, checks = [], []
    for part in parts:
        profiles.append(characterise(lm, part, names, copy=False))
        checks.append([check_dla(lm, part, profiles[-1])])
        release_memory()
    profile = pool_profiles(profiles, [len(p) for p in parts], *copy_scores(lm, names))
    analysis = head_analysis(lm, clean, profile)
    analysis["patterns"] = patterns(lm, clean.select(list(range(min(2, len(clean)))))).to_compact()  # drill-down
    return analysis, pool_checks(checks)[0]


def run_ioi(
    config: IOIConfig | None = None, *, lm: LoadedModel | None = None,
    checkpoint_dir: str | Path | None = None, resume: bool = False, **overrides,
) -> IOIResult:
    """Run the whole IOI experiment and return an ``IOIResult`` (nothing else is written to disk).

    Pass an already loaded ``lm`` to reuse it (its spec then replaces ``config.model`` in the record).
    Keyword overrides replace fields of ``config``: ``run_ioi(n_pairs=8, designs=("swap",))``.
    With ``checkpoint_dir`` each design's exact sweep saves its finished patches there as it goes;
    ``resume=True`` skips the patches a previous, interrupted run with the same settings saved.
    Pairs are streamed in chunks sized by ``cfg.max_memory`` (``planning.memory_budget``), so memory
    does not grow with the number of pairs; one progress bar covers every patch of the run.

    Example::

        result = run_ioi(n_pairs=16, designs=("swap", "abc"), by_position=True)
        result.passed, result.to_dataframe().head()
    """
    cfg, lm, layers, batches, clean = _prepare(config, lm, overrides)
    hooks_before = count_hooks(lm.model)
    budget = memory_budget(lm, cfg.max_memory)
    chunks = {d: pair_chunk(lm, b.recipient_ids.shape[1], budget) for d, b in batches.items()}
    baseline, cells, sanity = {"designs": {}}, [], {}
    analysis: dict = {}
    dla_check = None
    if cfg.analysis:  # on the clean prompts, the same for every design: characterise the heads once
        heads, dla_check = _head_profile(lm, clean, pair_chunk(lm, clean.recipient_ids.shape[1], budget))
        analysis = {"heads": heads, "designs": {}}
    weight_sums = parameter_sums(lm.model) if checkpoint_dir is not None else None  # read every weight once
    n_cells = {d: len(design_cells(layers, _heads_planned(cfg, layers, lm.adapter.n_heads), sweep_positions(cfg, b)))
               for d, b in batches.items()}
    total = sum(n_cells[d] * len(b.chunks(chunks[d])) for d, b in batches.items())
    disable = {True: False, None: None, False: True}[cfg.progress]  # None: a bar only on a terminal
    with tqdm(total=total, desc="patching", unit="patch", disable=disable, dynamic_ncols=True) as bar:
        for design, batch in batches.items():
            log.info("design %s: %d pairs, %d tokens wide, %d pairs per chunk", design, len(batch),
                     batch.recipient_ids.shape[1], chunks[design])
            classes = analysis["heads"]["classes"] if cfg.analysis else None
            run = run_design(lm, batch, design, cfg, layers, chunk=chunks[design], checkpoint_dir=checkpoint_dir,
                             resume=resume, classes=classes, weight_sums=weight_sums, budget=budget, bar=bar)
            if run.analysis is not None:
                analysis["designs"][design] = run.analysis
            baseline["designs"][design] = run.baseline
            cells.extend(run.rows)
            for check in run.checks:
                sanity.setdefault(check.name, {})[design] = check.to_dict()
    if dla_check is not None:
        sanity[dla_check.name] = {"clean": dla_check.to_dict()}
    sanity["no_hooks_left"] = {"all": check_no_hooks_left(lm, hooks_before).to_dict()}
    first = next(iter(baseline["designs"].values()))["recipient"]
    baseline.update({**first, "n_pairs": len(next(iter(batches.values())))})
    record = asdict(cfg)
    record["model"] = lm.info.get("spec", cfg.model)
    record["memory_budget"], record["pair_chunks"] = budget, chunks
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
