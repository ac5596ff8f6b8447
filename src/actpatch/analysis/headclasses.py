"""IOI head classes by stated thresholds, with the evidence, and the heads that nearly qualified.

    prof = characterise(lm, batch)
    classify(prof)            # [{"layer", "head", "classes", "evidence"}, ...]
    near_misses(prof)         # {class: [{"layer", "head", "missed": "END->IO >= 0.3 (0.21)", ...}, ...]}
    class_rules()             # {class: "END->IO >= 0.3, copy >= 0.5, DLA >= 0.05 x |recipient LD|", ...}

Each class is a conjunction of criteria on the profile's (L, H) arrays (Wang et al. 2022's definitions; see
``analysis.heads``). Name mover and S-inhibition evidence is attention from END to the named positions IO and S2,
read from the heads' own softmax weights. A near miss meets every criterion of a class but one; classes of one
criterion (induction, duplicate and previous token) count a head at half the attention threshold or more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .heads import HeadProfile

ATTN, COPY, DLA_SHARE = 0.3, 0.5, 0.05  # the default thresholds


@dataclass(frozen=True)
class Criterion:
    """``value(prof)`` (L, H) compared with ``bound`` by ``op`` (">=", "<=", "<", ">"); ``label`` says it in words."""

    label: str
    value: Callable[[HeadProfile], Tensor]
    op: str
    bound: Callable[[HeadProfile], Tensor | float]

    def holds(self, prof: HeadProfile) -> Tensor:
        v, b = self.value(prof), self.bound(prof)
        return {">=": v >= b, "<=": v <= b, "<": v < b, ">": v > b}[self.op]


def _attention(key: str) -> Callable[[HeadProfile], Tensor]:
    return lambda p: p.attention.get(key, torch.zeros_like(p.dla))


def _rules(attn: float, copy: float, dla_share: float) -> dict[str, list[Criterion]]:
    bar = lambda p: dla_share * abs(p.recipient_logit_diff)  # noqa: E731
    end_io, end_s2 = _attention("END->IO"), _attention("END->S2")
    dla, absdla = (lambda p: p.dla), (lambda p: p.dla.abs())
    pos, neg = (lambda p: p.copy), (lambda p: p.neg_copy)
    bar_text = f"{dla_share:g} x |recipient LD|"
    layer = lambda p: torch.arange(p.dla.shape[0])[:, None].expand_as(p.dla).float()  # noqa: E731

    def last_mover(p: HeadProfile) -> Tensor:
        movers = torch.stack([c.holds(p) for c in rules["name mover"]]).all(0)
        return layer(p)[movers].max() if bool(movers.any()) else torch.tensor(float(p.dla.shape[0]))

    rules = {
        "name mover": [Criterion(f"END->IO >= {attn:g}", end_io, ">=", lambda p: attn),
                       Criterion(f"copy >= {copy:g}", pos, ">=", lambda p: copy),
                       Criterion(f"DLA >= {bar_text}", dla, ">=", bar)],
        "negative name mover": [Criterion(f"END->IO >= {attn:g}", end_io, ">=", lambda p: attn),
                                Criterion(f"negative copy >= {copy:g}", neg, ">=", lambda p: copy),
                                Criterion(f"DLA <= -{bar_text}", dla, "<=", lambda p: -bar(p))],
        "backup name mover": [Criterion(f"END->IO >= {attn / 2:g}", end_io, ">=", lambda p: attn / 2),
                              Criterion(f"copy >= {copy:g}", pos, ">=", lambda p: copy),
                              Criterion(f"|DLA| < {bar_text}", absdla, "<", bar)],
        "S suppressor": [Criterion(f"END->S2 >= {attn:g}", end_s2, ">=", lambda p: attn),
                         Criterion(f"negative copy >= {copy:g}", neg, ">=", lambda p: copy),
                         Criterion(f"DLA >= {bar_text}", dla, ">=", bar)],
        "S-inhibition": [Criterion(f"END->S2 >= {attn:g}", end_s2, ">=", lambda p: attn),
                         Criterion("END->S2 > END->IO", end_s2, ">", end_io),
                         Criterion(f"|DLA| < {bar_text}", absdla, "<", bar),
                         Criterion("a layer before the last name mover", layer, "<", last_mover)],
        "induction": [Criterion(f"S2->S1+1 >= {attn:g}", _attention("S2->S1+1"), ">=", lambda p: attn)],
        "duplicate token": [Criterion(f"S2->S1 >= {attn:g}", _attention("S2->S1"), ">=", lambda p: attn)],
        "previous token": [Criterion(f"S1+1->S1 >= {attn:g}", _attention("S1+1->S1"), ">=", lambda p: attn)],
    }
    return rules


def class_rules(attn: float = ATTN, copy: float = COPY, dla_share: float = DLA_SHARE) -> dict[str, str]:
    """Each class's criteria in words, as the report states them.

    Example::

        class_rules()["name mover"]   # 'END->IO >= 0.3, copy >= 0.5, DLA >= 0.05 x |recipient LD|'
    """
    return {name: ", ".join(c.label for c in crit) for name, crit in _rules(attn, copy, dla_share).items()}


def _evidence(prof: HeadProfile, layer: int, head: int) -> dict:
    out = {k: round(float(v[layer, head]), 3) for k, v in prof.attention.items()}
    out.update(dla=round(float(prof.dla[layer, head]), 3), copy=round(float(prof.copy[layer, head]), 3),
               neg_copy=round(float(prof.neg_copy[layer, head]), 3))
    return out


def classify(prof: HeadProfile, attn: float = ATTN, copy: float = COPY, dla_share: float = DLA_SHARE) -> list[dict]:
    """IOI-paper classes by thresholds (``class_rules``), with the evidence; a head may get several classes.

    Example::

        for head in classify(characterise(lm, batch)):
            print(head["layer"], head["head"], head["classes"])

    """
    rules = _rules(attn, copy, dla_share)
    masks = {name: torch.stack([c.holds(prof) for c in crit]).all(0) for name, crit in rules.items()}
    found = []
    L, H = prof.dla.shape
    for layer in range(L):
        for head in range(H):
            classes = [c for c, m in masks.items() if bool(m[layer, head])]
            if classes:
                found.append({"layer": layer, "head": head, "classes": classes, "evidence": _evidence(prof, layer, head)})
    return found


def near_misses(
    prof: HeadProfile, attn: float = ATTN, copy: float = COPY, dla_share: float = DLA_SHARE, top: int = 5,
) -> dict[str, list[dict]]:
    """Per class, up to ``top`` heads that miss it by one criterion (see the module doc), closest first: each
    with the criterion it missed and its value there, and the evidence.

    Example::

        near_misses(characterise(lm, batch))["name mover"][0]["missed"]   # e.g. 'copy >= 0.5 (0.42)'
    """
    out: dict[str, list[dict]] = {}
    for name, crit in _rules(attn, copy, dla_share).items():
        held = torch.stack([c.holds(prof) for c in crit])  # (C, L, H)
        if len(crit) == 1:
            c = crit[0]
            close = ~held[0] & (c.value(prof) >= 0.5 * c.bound(prof))
            miss = torch.zeros_like(held[0], dtype=torch.long)
        else:
            close = held.sum(0) == len(crit) - 1
            miss = (~held).long().argmax(0)  # (L, H): the criterion each head missed
        rows = []
        for layer, head in close.nonzero().tolist():
            c = crit[int(miss[layer, head])]
            v = float(c.value(prof)[layer, head])
            b = c.bound(prof)
            per_head = isinstance(b, Tensor) and b.dim() > 0  # a bound of its own per head (END->IO, a layer)
            b = float(b[layer, head]) if per_head else float(b)
            gap = abs(v - b) / max(abs(b), 1e-6)
            got = f"{v:.3g} vs {b:.3g}" if per_head else f"{v:.3g}"
            rows.append({"layer": layer, "head": head, "missed": f"{c.label} ({got})", "gap": round(gap, 3),
                         "evidence": _evidence(prof, layer, head)})
        out[name] = sorted(rows, key=lambda r: r["gap"])[:top]
    return out
