"""Patching on any contrastive task: your pairs (any lengths, named positions, answer sets), any metric.

    df = patch(lm, pairs, sites="heads", positions=["subject", "END"], metric="kl")   # one call, a tidy dataframe
    result = run_pairs(PairsConfig(pairs_file="facts.jsonl", positions=("subject", "END")))
    result.to_dataframe(); result.save("runs/facts")

For every chunk of pairs it captures the recipient and donor runs, patches every cell (a site family at a
layer, head and named position) with the batched fast path, scores each pair with the metric, and runs the
mandatory checks, with the fast path compared cell by cell to the independent reference patcher on this
metric. Cells: ``hidden`` (block output), ``all_heads`` (every head of a layer), ``head`` (one head),
``attn`` and ``mlp`` outputs, ``embed`` (the residual stream before layer 0), per-head ``q``, ``k``, ``v``, and
per-head ``pattern`` and ``values`` (the donor's attention weights or values, ``engine.patternsite``);
positions are named positions, ``END``, or ``all`` (equal lengths only).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..engine.batch import PairBatch, tokenize_pairs
from ..engine.capture import capture
from ..engine.hooks import count_hooks
from ..engine.continuation import plain_readout
from ..engine.continuation_checks import check_continuation_self_patch
from ..engine.generation import generate_patched
from ..engine.metrics import ANSWER_REDUCE, KL_OVER, TASK_METRICS, continuation_scores, normalised_effect, task_scores
from ..engine.reference import reference_readout
from ..engine.pairs import PromptPair, load_pairs_file, pair_from_dict
from ..engine.patching import patch_variants
from ..engine.planning import memory_budget, pair_chunk, release_memory
from ..engine.patternsite import PatternSite
from ..engine.sanity import check_fast_path, check_no_hooks_left, run_sanity_checks
from ..engine.sites import AttnOutSite, EmbedSite, HeadSite, HiddenSite, MlpOutSite, QKVSite
from ..errors import ConfigError, DataError, SanityCheckError
from ..model.models import DEFAULT_MODEL, LoadedModel
from ..tasks.registry import get_task
from .config import environment
from .pairsresult import PairsResult
from .pooling import concat_scores, pool_checks
from .selftest import load_checked

log = logging.getLogger(__name__)
FAMILIES = ("embed", "hidden", "all_heads", "head", "attn", "mlp", "q", "k", "v", "pattern", "values")
SITE_ALIASES = {"all": ("hidden", "all_heads", "head"), "heads": ("all_heads", "head"), "layers": ("hidden", "all_heads"),
                "qkv": ("q", "k", "v")}
MAKE = {"hidden": lambda L, h, p: HiddenSite(L, p), "all_heads": lambda L, h, p: HeadSite(L, None, p),
        "head": lambda L, h, p: HeadSite(L, h, p), "attn": lambda L, h, p: AttnOutSite(L, p),
        "mlp": lambda L, h, p: MlpOutSite(L, p), "embed": lambda L, h, p: EmbedSite(p),
        "q": lambda L, h, p: QKVSite(L, "q", h, p), "k": lambda L, h, p: QKVSite(L, "k", h, p),
        "v": lambda L, h, p: QKVSite(L, "v", h, p), "pattern": lambda L, h, p: PatternSite(L, h, p),
        "values": lambda L, h, p: PatternSite(L, h, p, "values")}


@dataclass(frozen=True)
class PairsConfig:
    """Everything that determines an ``actpatch run``; saved next to its results.

    Example::

        run_pairs(PairsConfig(pairs_file="facts.jsonl", positions=("subject", "END"), metric="prob_diff"))
    """

    model: str = DEFAULT_MODEL
    task: str = "pairs"               # "pairs" (pairs_file) or a registered task that generates pairs
    pairs_file: str | None = None
    n_pairs: int = 16                 # generated pairs (a registered task)
    design: str | None = None         # the task's donor design (default: its first)
    seed: int = 0                     # the pair generator's own RNG
    positions: tuple[str, ...] | None = None  # named positions, END, all; None: every named position and END
    metric: str | None = None         # None: the task's (logit_diff for your own pairs)
    sites: tuple[str, ...] | None = None  # None: the task's (hidden, all_heads, head for your own pairs)
    layers: tuple[int, ...] | None = None
    device: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    max_memory: int | None = None
    max_rows: int | None = None
    progress: bool | None = None
    command: str | None = None
    answer_reduce: str = "sum"        # answers of several tokens: log-prob summed over the tokens, or their mean
    kl_over: str = "end"              # kl: the next-token distribution at END, or averaged over the answer's positions
    generate: int = 0                 # greedy tokens the recipient says under the headline patches (0: none)

    def resolved(self) -> "PairsConfig":
        """The config with the task's defaults filled in (metric, sites, donor design); checked."""
        task = get_task(self.task)
        cfg = replace(self, metric=self.metric or task.metric, sites=tuple(self.sites or task.sites),
                      design=self.design or (task.designs[0] if task.designs else None))
        cfg.validate()
        if task.designs and cfg.design not in task.designs:
            raise ConfigError(f"design (--donor) must be one of {', '.join(task.designs)} for task {cfg.task!r}, "
                              f"got {cfg.design!r}")
        return cfg

    def validate(self) -> None:
        if self.metric not in TASK_METRICS:
            raise ConfigError(f"metric (--metric) must be one of {', '.join(TASK_METRICS)}, got {self.metric!r}")
        if self.answer_reduce not in ANSWER_REDUCE:
            raise ConfigError(f"answer reduce (--answer-reduce) must be one of {', '.join(ANSWER_REDUCE)}, "
                              f"got {self.answer_reduce!r}")
        if self.kl_over not in KL_OVER:
            raise ConfigError(f"kl over (--kl-over) must be one of {', '.join(KL_OVER)}, got {self.kl_over!r}")
        if self.kl_over == "continuation" and self.metric != "kl":
            raise ConfigError(f"--kl-over continuation applies to the kl metric, but the metric is {self.metric!r}; "
                              "use --metric kl, or leave --kl-over out.")
        if isinstance(self.generate, bool) or not isinstance(self.generate, int) or not 0 <= self.generate <= 256:
            raise ConfigError(f"generate (--generate) must be a number of tokens in [0, 256], got {self.generate!r}")
        bad = [s for s in self.sites if s not in FAMILIES]
        if bad or not self.sites:
            raise ConfigError(f"sites must be among {', '.join(FAMILIES)} (or all, heads, layers), got {list(self.sites)!r}")
        if self.task == "pairs" and self.pairs_file is None:
            raise ConfigError("your own task needs a pairs file (--pairs-file FILE), or name a task: "
                              "actpatch run ioi")


def site_families(sites: str | Sequence[str]) -> tuple[str, ...]:
    """``"all"``, ``"heads"``, ``"layers"`` or family names -> the families, in ``FAMILIES`` order."""
    names = [sites] if isinstance(sites, str) else list(sites)
    expanded = {f for n in names for f in SITE_ALIASES.get(n, (n,))}
    bad = sorted(expanded - set(FAMILIES))
    if bad:
        raise ConfigError(f"unknown site family {bad}; expected {', '.join(FAMILIES)} or all, heads, layers")
    return tuple(f for f in FAMILIES if f in expanded)


def make_cells(families: Sequence[str], layers: Sequence[int], adapter, positions: Sequence[str]) -> list[tuple[dict, list]]:
    """(cell description, [site]) for every family x layer (x head) x position. ``embed`` (the residual stream
    before layer 0) is labelled layer -1; ``k`` and ``v`` cells are per key/value head, and name the query heads
    that share it (``query_heads``, a group under grouped-query attention)."""
    cells = []
    for family in families:
        heads = {"head": range(adapter.n_heads), "q": range(adapter.n_heads), "k": range(adapter.n_kv_heads),
                 "v": range(adapter.n_kv_heads), "pattern": range(adapter.n_heads),
                 "values": range(adapter.n_heads)}.get(family, [None])
        for L in ([-1] if family == "embed" else layers):
            for h in heads:
                for name in positions:
                    site = MAKE[family](L, h, None if name == "all" else name)
                    cell = {"experiment": family, "layer": L, "head": h, "position": name}
                    if family in ("k", "v"):
                        cell["query_heads"] = ",".join(map(str, site.kv_group(adapter)))
                    cells.append((cell, [site]))
    return cells


def choose_positions(batch: PairBatch, asked: Sequence[str] | None) -> tuple[str, ...]:
    """The positions to patch: ``asked`` (checked against the batch), or every named position and END."""
    if asked is None:
        return tuple(batch.positions)
    missing = [p for p in asked if p != "all" and p not in batch.positions]
    if missing:
        raise ConfigError(f"position(s) {missing} are not defined for every pair; available: "
                          f"{', '.join(batch.positions)}, or all. Add them to each pair's \"positions\".")
    if "all" in asked and batch.unequal_rows():
        i = batch.unequal_rows()[0]
        raise DataError(f"position 'all' needs donor and recipient of equal token length, but pair {i} "
                        f"({batch.pairs[i].recipient!r}) is {int(batch.lengths()[i])} tokens and its donor "
                        f"{int(batch.lengths('donor')[i])}; patch at named positions and END instead.")
    return tuple(dict.fromkeys(asked))


def _part(lm: LoadedModel, part: PairBatch, cells: list, metric: str, layers: list[int], budget: int, bar,
          max_rows: int | None = None, reduce: str = "sum", kl_over: str = "end") -> dict:
    """One chunk of pairs: recipient and donor runs, the sweep's per-pair scores, and the checks."""
    if part.cont_ids is not None:
        return _part_continuations(lm, part, cells, metric, layers, budget, bar, max_rows, reduce, kl_over)
    variants = [sites for _, sites in cells]
    checked = sorted({layers[0], layers[len(layers) // 2], layers[-1]})
    own = [s(L) for L in checked for s in (HeadSite, HiddenSite, AttnOutSite)]  # what the checks read
    own.append(HiddenSite(lm.adapter.n_layers - 1))  # pairs of different lengths: the last layer's END reproduces the donor
    rec_cache, rec_logits = capture(lm, part.recipient_ids, part, own)
    don_cache, don_logits = capture(lm, part.donor_ids, part, own + [v[0] for v in variants])
    answers, wrong = part.answers()
    rec_f = rec_logits.float()
    score = lambda lg: task_scores(metric, lg, answers, wrong, rec_f)  # noqa: E731
    sweep = patch_variants(lm, part, don_cache, variants, reduce=score, donor_from_batch=True, budget=budget, bar=bar,
                           max_rows=max_rows)
    checks = run_sanity_checks(lm, part, rec_cache, don_cache, rec_logits, don_logits, checked)
    checks.append(check_fast_path(lm, part, don_cache, variants, sweep[metric],
                                  score=lambda lg: score(lg)[metric], name=metric))
    return {"rec": {k: v.cpu() for k, v in score(rec_logits).items()},
            "don": {k: v.cpu() for k, v in score(don_logits).items()}, "sweep": sweep, "checks": checks}


def _part_continuations(lm: LoadedModel, part: PairBatch, cells: list, metric: str, layers: list[int], budget: int,
                        bar, max_rows: int | None, reduce: str, kl_over: str) -> dict:
    """``_part`` for answers of several tokens: each continuation is read by teacher forcing under the patch."""
    variants = [sites for _, sites in cells]
    checked = sorted({layers[0], layers[len(layers) // 2], layers[-1]})
    own = [s(L) for L in checked for s in (HeadSite, HiddenSite, AttnOutSite)]
    own.append(HiddenSite(lm.adapter.n_layers - 1))
    rec_cache, rec_logits = capture(lm, part.recipient_ids, part, own)
    don_cache, don_logits = capture(lm, part.donor_ids, part, own + [v[0] for v in variants])
    tail_kl = metric == "kl" and kl_over == "continuation"
    rec = plain_readout(lm, part, keep=tail_kl)
    don = plain_readout(lm, part, "donor", against=rec.answer_logp)
    rec_end = rec.end.float()

    def score(ro):
        kl = ro.tail_kl if ro.tail_kl is not None or not tail_kl else torch.zeros(ro.end.shape[:-1])
        return continuation_scores(metric, ro.end, ro.tail, part.cont_ids, part.cont_side, reduce, rec_end, kl, kl_over)

    sweep = patch_variants(lm, part, don_cache, variants, reduce=score, donor_from_batch=True, budget=budget, bar=bar,
                           max_rows=max_rows, tail_kl=tail_kl)
    first = replace(part, cont_ids=None, cont_side=None)  # the END checks read the first answer tokens
    checks = run_sanity_checks(lm, first, rec_cache, don_cache, rec_logits, don_logits, checked)
    checks.append(check_continuation_self_patch(lm, part, rec_cache, rec, checked))
    checks.append(check_fast_path(lm, part, don_cache, variants, sweep[metric], score=lambda ro: score(ro)[metric],
                                  name=metric, reference=lambda v: reference_readout(lm, part, don_cache, v, tail_kl)))
    return {"rec": {k: v.cpu() for k, v in score(rec).items()}, "don": {k: v.cpu() for k, v in score(don).items()},
            "sweep": sweep, "checks": checks}


def _rows(cells: list, sweep: dict, rec: dict, don: dict, metric: str, n_layers: int) -> list[dict]:
    r, d = float(rec[metric].mean()), float(don[metric].mean())
    delta = "delta_logit_diff" if metric == "logit_diff" else f"delta_{metric}"
    rows = []
    for k, (cell, _) in enumerate(cells):
        v = sweep[metric][k]
        row = {**cell, "depth": max(cell["layer"], 0) / n_layers, metric: float(v.mean()), delta: float(v.mean()) - r,
               "normalised_effect": float(normalised_effect(float(v.mean()), r, d)), "n_pairs": int(v.numel())}
        if "logit_diff" in sweep:
            ld = sweep["logit_diff"][k]
            row.update(logit_diff=float(ld.mean()), flip_rate=float((ld * rec["logit_diff"] < 0).float().mean()),
                       p_answer=float(sweep["p_answer"][k].mean()), p_wrong=float(sweep["p_wrong"][k].mean()))
        rows.append(row)
    return rows


def _correct(lm: LoadedModel, batch: PairBatch) -> torch.Tensor:
    """(B,) True where the model gets the pair right: the recipient prefers its answer (LD > 0) and a donor that is
    another prompt (not a noised copy) prefers the wrong side (LD < 0)."""
    keep = []
    for part in batch.chunks(32):
        answers, wrong = part.answers()
        if part.cont_ids is not None:  # answers of several tokens: their log-prob difference
            rec, don = (continuation_scores("logit_diff", ro.end, ro.tail, part.cont_ids, part.cont_side)["logit_diff"]
                        for ro in (plain_readout(lm, part), plain_readout(lm, part, "donor")))
        else:
            rec = task_scores("logit_diff", capture(lm, part.recipient_ids, part, [])[1], answers, wrong)["logit_diff"]
            don = task_scores("logit_diff", capture(lm, part.donor_ids, part, [])[1], answers, wrong)["logit_diff"]
        text = torch.tensor([p.noise is None and p.donor != p.recipient for p in part.pairs])
        keep.append((rec.cpu() > 0) & ~(text & (don.cpu() >= 0)))
    return torch.cat(keep)


def multi_token_pairs(batch: PairBatch) -> int:
    """How many pairs have an answer or wrong continuation of more than one token."""
    if batch.cont_ids is None:
        return 0
    return int(((batch.cont_ids >= 0).sum(-1) > 1).any(-1).sum())


def _generated(cfg: PairsConfig, lm: LoadedModel) -> tuple[PairBatch, dict]:
    """A registered task's pairs for this tokenizer; with ``keep_correct``, the first ``n_pairs`` of a larger
    candidate set that the model gets right."""
    task = get_task(cfg.task)
    if task.generate is None:
        raise ConfigError(f"task {cfg.task!r} generates no pairs; pass a pairs file (--pairs-file).")
    if not task.keep_correct:
        return task.tokenize(lm.tokenizer, task.generate(lm.tokenizer, cfg.n_pairs, (cfg.design,), cfg.seed)[cfg.design]), {}
    candidates = task.generate(lm.tokenizer, max(4 * cfg.n_pairs, 64), (cfg.design,), cfg.seed)[cfg.design]
    batch = task.tokenize(lm.tokenizer, candidates)
    correct = _correct(lm, batch).nonzero().flatten().tolist()
    if not correct:
        raise DataError(f"the model gets none of the {len(candidates)} {cfg.task} candidate pairs right (recipient "
                        "LD > 0, and a donor's < 0), so there is nothing to patch; try another model or your own pairs.")
    kept = correct[:cfg.n_pairs]
    if len(kept) < cfg.n_pairs:
        log.warning("%s: only %d of %d candidate pairs are answered correctly; running %d pairs, not %d",
                    cfg.task, len(correct), len(candidates), len(kept), cfg.n_pairs)
    return batch.select(kept).trim(), {"candidates": len(candidates), "correct": len(correct), "kept": len(kept),
                                       "rule": "recipient LD > 0, and a donor that is another prompt LD < 0"}


def _pairs_for(cfg: PairsConfig, lm: LoadedModel, pairs: Sequence[PromptPair] | None) -> tuple[PairBatch, str, dict]:
    task = get_task(cfg.task)
    if pairs is None and cfg.task == "pairs":
        pairs = load_pairs_file(cfg.pairs_file, require_answers=cfg.metric != "kl")
    if pairs is None:
        batch, filtered = _generated(cfg, lm)
        return batch, cfg.design, filtered
    if cfg.task != "pairs":
        return task.tokenize(lm.tokenizer, pairs), cfg.design, {}
    batch = tokenize_pairs(lm.tokenizer, pairs, require_answers=cfg.metric != "kl",
                           continuations=cfg.kl_over == "continuation")
    if cfg.kl_over == "continuation" and batch.cont_ids is None:
        raise DataError("--kl-over continuation averages the KL over the answer's positions, but these pairs have no "
                        "answers; give each pair an `answer` and a `wrong`, or use --kl-over end.")
    return batch, "file", {}


def run_pairs(config: PairsConfig | None = None, *, lm: LoadedModel | None = None,
              pairs: Sequence[PromptPair] | None = None, **overrides) -> PairsResult:
    """Run a contrastive task's sweep and checks, and return a ``PairsResult`` (nothing is written to disk).

    ``pairs`` replaces the pairs file; keyword overrides replace fields of ``config``.

    Example::

        result = run_pairs(pairs_file="facts.jsonl", positions=("subject", "END"), metric="logprob")
        result.passed, result.to_dataframe().head()
    """
    cfg = replace(config or PairsConfig(), **overrides)
    if pairs is not None and cfg.task == "pairs":
        cfg = replace(cfg, pairs_file=cfg.pairs_file or "<python>")
    cfg = cfg.resolved()
    if lm is None:
        lm = load_checked(cfg.model, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    batch, design, filtered = _pairs_for(cfg, lm, pairs)
    a = lm.adapter
    layers = list(range(a.n_layers)) if cfg.layers is None else sorted(set(cfg.layers))
    if not layers or any(not isinstance(L, int) or not 0 <= L < a.n_layers for L in layers):
        raise ConfigError(f"layers must be ints in [0, {a.n_layers - 1}] for this model, got {cfg.layers!r}")
    positions = choose_positions(batch, cfg.positions)
    cells = make_cells(cfg.sites, layers, a, positions)
    hooks_before = count_hooks(lm.model)
    budget = memory_budget(lm, cfg.max_memory)
    parts = batch.chunks(pair_chunk(lm, max(batch.recipient_ids.shape[1], batch.donor_ids.shape[1]), budget))
    disable = {True: False, None: None, False: True}[cfg.progress]
    done = []
    with tqdm(total=len(cells) * len(parts), desc=cfg.task, unit="patch", disable=disable, dynamic_ncols=True) as bar:
        for part in parts:
            done.append(_part(lm, part, cells, cfg.metric, layers, budget, bar, cfg.max_rows, cfg.answer_reduce,
                              cfg.kl_over))
            release_memory()
    rec, don = concat_scores([d["rec"] for d in done]), concat_scores([d["don"] for d in done])
    sweep = concat_scores([d["sweep"] for d in done])  # (K, N) per key
    checks = pool_checks([d["checks"] for d in done]) + [check_no_hooks_left(lm, hooks_before)]
    baseline = {side: {f"mean_{k}": float(v.mean()) for k, v in s.items()} for side, s in (("recipient", rec), ("donor", don))}
    baseline["n_pairs"] = len(batch)
    baseline["n_multi_token"] = multi_token_pairs(batch)
    record = {**asdict(cfg), "model": lm.info.get("spec", cfg.model), "design": design, "positions": list(positions),
              "memory_budget": budget, **({"filtered": filtered} if filtered else {})}
    rows = [{"task": cfg.task, "metric": cfg.metric, **row} for row in _rows(cells, sweep, rec, don, cfg.metric, a.n_layers)]
    return PairsResult(
        config=record, model=dict(lm.info), environment=environment(), baseline=baseline, cells=rows,
        sanity={c.name: c.to_dict() for c in checks}, n_layers=a.n_layers, n_heads=a.n_heads, layers=layers,
        pairs=[asdict(p) for p in batch.pairs],
        generations=headline_generations(lm, batch, cells, rows, cfg.generate) if cfg.generate else [],
    )


def headline_generations(lm: LoadedModel, batch: PairBatch, cells: list, rows: list[dict], n_tokens: int,
                         n_pairs: int = 3, n_patches: int = 3) -> list[dict]:
    """What the model says: greedy ``n_tokens`` of the first ``n_pairs`` recipients, unpatched, under each of the
    ``n_patches`` cells with the largest |normalised effect| (the headline patches), and of their donors."""
    order = sorted(range(len(rows)), key=lambda k: -abs(rows[k]["normalised_effect"]))[:n_patches]
    some = batch.select(list(range(min(n_pairs, len(batch))))).trim()
    plain = generate_patched(lm, some, [], n_tokens)
    donor = generate_patched(lm, some, [], n_tokens, side="donor")
    patched = {k: generate_patched(lm, some, cells[k][1], n_tokens) for k in order}
    out = []
    for i, pair in enumerate(some.pairs):
        for k in order:
            c = cells[k][0]
            label = f"{c['experiment']} L{c['layer']}" + ("" if c.get("head") is None else f"H{c['head']}") + f" @ {c['position']}"
            out.append({"pair": i, "recipient": pair.recipient, "donor": pair.donor, "recipient_says": plain[i],
                        "donor_says": donor[i], "patch": label, "normalised_effect": rows[k]["normalised_effect"],
                        "patched_says": patched[k][i]})
    return out


def patch(model, pairs: Sequence[PromptPair] | Sequence[dict] | str | Path, *, sites: str | Sequence[str] = "all",
          positions: Sequence[str] | None = None, metric: str = "logit_diff", layers: Sequence[int] | None = None,
          progress: bool | None = False) -> pd.DataFrame:
    """Patch donor into recipient at every site family x layer (x head) x position; one row per cell.

    ``model``: a ``LoadedModel`` (``load_model``, ``wrap_model``) or a model spec. ``pairs``: ``PromptPair``s, dicts with the pairs-file fields, or a JSONL path.
    The run's sanity checks must pass, or ``SanityCheckError`` says which failed.

    Example::

        df = actpatch.patch(lm, "facts.jsonl", sites="heads", positions=["subject", "END"], metric="kl")
    """
    if isinstance(model, str):
        model = load_checked(model)
    if not isinstance(model, LoadedModel):
        raise ConfigError(f"model must be a LoadedModel or a model spec (load_model's), got {type(model).__name__}; "
                          "wrap a HuggingFace model first: wrap_model(model, tokenizer).")
    if isinstance(pairs, (str, Path)):
        pairs = load_pairs_file(pairs, require_answers=metric != "kl")
    pairs = [p if isinstance(p, PromptPair) else pair_from_dict(p, i) for i, p in enumerate(pairs)]
    result = run_pairs(lm=model, pairs=pairs, sites=site_families(sites), positions=None if positions is None else
                       tuple(positions), metric=metric, layers=None if layers is None else tuple(layers), progress=progress)
    if not result.passed:
        failed = [f"{n}: {c['detail']}" for n, c in result.sanity.items() if not c["passed"]]
        raise SanityCheckError("a sanity check failed, so these numbers cannot be trusted: " + "; ".join(failed))
    return result.to_dataframe()
