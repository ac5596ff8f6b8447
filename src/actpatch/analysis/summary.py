"""The seed's two open questions, answered with numbers for one model: which heads do IOI, and why
patching heads moves the metric less than patching hidden states.

    heads = head_analysis(lm, batch)                      # classes with evidence (design-independent)
    design = design_analysis(lm, batch, rec, don, rows, heads["classes"])   # per donor design

``head_analysis`` characterises every head (attention between named positions, direct logit
attribution, copy scores; ``actpatch.analysis.heads``) and assigns the IOI paper's classes. When the model is
GPT-2 small it lines them up with the paper's list. ``design_analysis`` gives the per-layer account of
the gap (``actpatch.analysis.gap``), Wang-style path patching from the S-inhibition-like heads into the
name-mover-like heads' queries (with how that moves each name mover's attention from END to IO and S2) and
from the name movers straight to the logits (``actpatch.engine.paths``),
an ordinary patch of the S-inhibition-like heads at END (the paper's 3.55 -> -3.16 experiment), and
where "heads only nudge" holds.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from ..engine.batch import PairBatch
from ..engine.capture import ActivationCache
from ..engine.metrics import logit_diff
from ..engine.patching import run_chunk
from ..engine.paths import Receiver, path_patch, path_patch_attention
from ..engine.sites import HeadSite
from ..model.models import LoadedModel
from .gap import gap_account, with_totals
from .headclasses import class_rules, classify, near_misses
from .heads import PAPER_GPT2_HEADS, HeadProfile, characterise
from .patterns import attention_shift

log = logging.getLogger(__name__)
NUDGE = 0.1   # |normalised effect| below this: the patch only nudges the answer
NEAR_FLIP = 0.5


def _grid(t: torch.Tensor) -> list[list[float]]:
    return [[round(float(v), 4) for v in row] for row in t]


def head_analysis(lm: LoadedModel, batch: PairBatch, prof: HeadProfile | None = None) -> dict:
    """Characterise (unless ``prof`` is given) and classify every head on ``batch``'s recipients; JSON-ready."""
    if prof is None:
        log.info("characterising %d heads on %d recipients", lm.adapter.n_layers * lm.adapter.n_heads, len(batch))
        prof = characterise(lm, batch)
    classes = classify(prof)
    out = {
        "attention": {k: _grid(v) for k, v in prof.attention.items()}, "dla": _grid(prof.dla),
        "copy": _grid(prof.copy), "neg_copy": _grid(prof.neg_copy), "n_names": prof.n_names,
        "recipient_logit_diff": prof.recipient_logit_diff, "classes": classes,
        "class_rules": class_rules(), "near_misses": near_misses(prof),
    }
    model_id = str(lm.info.get("model_id", ""))
    if model_id in ("gpt2", "openai-community/gpt2") and (lm.adapter.n_layers, lm.adapter.n_heads) == (12, 12):
        found = {(c["layer"], c["head"]): c["classes"] for c in classes}
        out["paper_comparison"] = [
            {"class": cls, "layer": L, "head": h, "found_as": found.get((L, h), []), "agrees": cls in found.get((L, h), [])}
            for cls, heads in PAPER_GPT2_HEADS.items() for L, h in heads
        ]
    return out


def heads_of(classes: Sequence[dict], name: str) -> list[tuple[int, int]]:
    """The (layer, head) pairs ``classify`` gave the class ``name``."""
    return [(c["layer"], c["head"]) for c in classes if name in c["classes"]]


def nudge_summary(rows: Sequence[dict], recipient_ld: float) -> dict:
    """Where all-heads patching only nudges the answer, nearly flips it, or flips it (per position).

    Sign-agnostic, so denoising designs (a corrupted recipient with negative LD) read the same way:
    a flip is a mean LD of the opposite sign to the recipient's; the strongest cell is the one with
    the largest normalised effect (1 = the donor's behaviour).
    """
    out = {}
    for pos in ("all", "END"):
        cells = [r for r in rows if r["experiment"] == "all_heads" and r["position"] == pos]
        if not cells:
            continue
        flips = [r["layer"] for r in cells if r["logit_diff"] * recipient_ld < 0]
        out[pos] = {
            "n_layers": len(cells),
            "nudge_layers": [r["layer"] for r in cells if abs(r["normalised_effect"]) < NUDGE],
            "near_flip_layers": [r["layer"] for r in cells if r["normalised_effect"] >= NEAR_FLIP and r["layer"] not in flips],
            "flip_layers": flips,
            "strongest": max(cells, key=lambda r: r["normalised_effect"]),
        }
    return out


def design_measurements(
    lm: LoadedModel, batch: PairBatch, recipient: ActivationCache, donor: ActivationCache, classes: Sequence[dict],
) -> dict:
    """The parts of a design's analysis that are means over pairs: the gap account (without the sweeps'
    totals) and path patching; JSON-ready. Chunks of pairs are pooled by ``pooling.pool_means``.

    ``recipient`` / ``donor`` need HiddenSite, AttnOutSite and HeadSite of every layer.
    """
    result = {"gap": gap_account(lm, batch, recipient, donor), "paths": []}
    ans, wrong = batch.answer_ids, batch.wrong_ids

    def ld(logits: torch.Tensor) -> float:
        return float(logit_diff(logits.cpu(), ans, wrong).mean())

    s_inhib, movers = heads_of(classes, "S-inhibition"), heads_of(classes, "name mover")
    if s_inhib:
        senders = [HeadSite(L, h, "END") for L, h in s_inhib]
        result["paths"].append({"what": "patch S-inhibition-like heads at END (ordinary activation patching)",
                                "senders": s_inhib, "receivers": "everything downstream",
                                "logit_diff": ld(run_chunk(lm, batch, donor, [senders])[0])})  # one plain pass
    if s_inhib and movers:
        later = [(L, h) for L, h in movers if L > min(s[0] for s in s_inhib)]
        if later:
            logits, att = path_patch_attention(lm, batch, donor, senders, [Receiver("q", L, h) for L, h in later],
                                               later, recipient=recipient)
            result["paths"].append({"what": "path: S-inhibition-like heads (END) -> name-mover-like heads' queries",
                                    "senders": s_inhib, "receivers": later, "logit_diff": ld(logits),
                                    "attention": attention_shift(lm, batch, att)})  # END -> IO, S2 of each mover
    if movers:
        logits = path_patch(lm, batch, donor, [HeadSite(L, h, "END") for L, h in movers], [Receiver("logits")],
                            recipient=recipient)
        result["paths"].append({"what": "path: name-mover-like heads (END) -> logits (later heads frozen)",
                                "senders": movers, "receivers": "logits", "logit_diff": ld(logits)})
    return result


def design_summary(measured: dict, rows: Sequence[dict], recipient_ld: float) -> dict:
    """A design's analysis from its (pooled) measurements and the sweeps' cells: the gap account with the sweeps'
    totals and the indirect parts, path patching, and where "heads only nudge" holds."""
    exact = {(r["experiment"], r["layer"]): r["delta_logit_diff"] for r in rows
             if r["experiment"] in ("hidden", "all_heads") and r["position"] == "END"}
    return {"gap": with_totals(measured["gap"], exact), "nudge": nudge_summary(rows, recipient_ld),
            "paths": measured["paths"]}


def design_analysis(
    lm: LoadedModel, batch: PairBatch, recipient: ActivationCache, donor: ActivationCache,
    rows: Sequence[dict], classes: Sequence[dict], recipient_ld: float,
) -> dict:
    """Gap account, path patching and the nudge summary for one donor design, on one batch; JSON-ready.

    ``recipient`` / ``donor`` need HiddenSite, AttnOutSite and HeadSite of every layer.
    """
    return design_summary(design_measurements(lm, batch, recipient, donor, classes), rows, recipient_ld)
