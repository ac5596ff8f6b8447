"""Attention patterns: where chosen heads look on a batch's prompts, as a result with named axes.

    pats = patterns(lm, batch, [(9, 9), (10, 7)])      # the recipients' patterns of two heads
    pats.pattern(9, 9, pair=0)                          # (n, n) over pair 0's real tokens, rows = queries
    pats.between("END", "IO")                           # (heads, pairs): attention from END to IO
    pats.to_dataframe()                                 # one row per (layer, head, pair, query, key), keys <= query
    fig = pats.plot_pattern(9, 9, pair=0)               # a heatmap with the tokens as labels

A pattern is the attention module's own softmax output (eager attention returns (output, weights)), read by a
forward hook on one forward pass of the prompts: after the causal mask, any sliding window and soft-cap, so a
weight is exactly what multiplies the values. Rows and columns past a prompt's length are padding and are cut
from ``pattern`` and ``to_dataframe``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..engine.batch import PairBatch
from ..engine.hooks import hooks
from ..errors import ConfigError, SiteError, UnsupportedArchitectureError
from ..model.models import LoadedModel

# kind -> function(result, layer, head, pair, **kw) -> matplotlib Figure; filled in by actpatch.report.patternplots
PATTERN_PLOTTERS: dict[str, Callable] = {}


@dataclass(frozen=True)
class AttentionPatterns:
    """Attention weights ``weights`` (head, pair, query, key) of ``heads`` [(layer, head), ...] on one side's
    prompts; ``tokens`` are each pair's token strings, ``positions`` the named positions' indices per pair.

    Example::

        pats = patterns(lm, batch, [(9, 9)]); pats.save("runs/pats"); AttentionPatterns.load("runs/pats")
    """

    weights: Float[Tensor, "head pair query key"]
    heads: list[tuple[int, int]]
    tokens: list[list[str]]
    positions: dict[str, list[int]]
    side: str = "recipient"

    def _index(self, layer: int, head: int) -> int:
        try:
            return self.heads.index((layer, head))
        except ValueError:
            raise SiteError(f"head ({layer}, {head}) is not in these patterns; they hold {self.heads}. "
                            "Pass it to patterns(lm, batch, heads).") from None

    def _pair(self, pair: int) -> int:
        if not 0 <= pair < len(self.tokens):
            raise ConfigError(f"pair must be in 0..{len(self.tokens) - 1}, got {pair}")
        return pair

    def pattern(self, layer: int, head: int, pair: int) -> Float[Tensor, "query key"]:
        """One head's (n, n) pattern on one pair's n real tokens: row q, column k = attention from q to k."""
        n = len(self.tokens[self._pair(pair)])
        return self.weights[self._index(layer, head), pair, :n, :n]

    def between(self, query: str, key: str) -> Float[Tensor, "head pair"]:
        """Attention from named position ``query`` to named position ``key``, per head and pair."""
        for name in (query, key):
            if name not in self.positions:
                raise SiteError(f"position {name!r} is not named on these prompts; named: {', '.join(self.positions)}")
        rows = torch.arange(len(self.tokens))
        q, k = torch.tensor(self.positions[query]), torch.tensor(self.positions[key])
        return self.weights[:, rows, q, k]  # (N, B)

    def to_dataframe(self) -> pd.DataFrame:
        """Long format: layer, head, pair, query, key, query_token, key_token, weight (real tokens, key <= query)."""
        frames = []
        for i, (layer, head) in enumerate(self.heads):
            for b, toks in enumerate(self.tokens):
                n = len(toks)
                q, k = np.tril_indices(n)
                frames.append(pd.DataFrame({
                    "layer": layer, "head": head, "pair": b, "query": q, "key": k,
                    "query_token": np.asarray(toks, dtype=object)[q], "key_token": np.asarray(toks, dtype=object)[k],
                    "weight": self.weights[i, b, :n, :n].numpy()[q, k]}))
        return pd.concat(frames, ignore_index=True)

    def to_compact(self, decimals: int = 3) -> dict:
        """JSON-ready and small: per head and pair, the real tokens' lower triangle row by row (query q holds keys
        0..q), rounded; what the HTML report's drill-down reads."""
        rows = []
        for i, (layer, head) in enumerate(self.heads):
            for b, toks in enumerate(self.tokens):
                n = len(toks)
                q, k = np.tril_indices(n)
                w = np.round(self.weights[i, b, :n, :n].numpy()[q, k].astype(float), decimals)
                rows.append({"layer": layer, "head": head, "pair": b, "w": w.tolist()})
        return {"tokens": self.tokens, "positions": self.positions, "side": self.side, "rows": rows}

    def plot_pattern(self, layer: int, head: int, pair: int = 0, **kwargs):
        """A matplotlib heatmap of one head's pattern on one pair, tokens as labels (nothing is written)."""
        self._index(layer, head), self._pair(pair)
        return PATTERN_PLOTTERS["pattern"](self, layer, head, pair, **kwargs)

    def save(self, path: str | os.PathLike) -> Path:
        """``path``.npz with the weights and ``path``.json with the heads, tokens and positions."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path.with_suffix(".npz"), weights=self.weights.numpy())
        meta = {"heads": self.heads, "tokens": self.tokens, "positions": self.positions, "side": self.side,
                "axes": ["head", "pair", "query", "key"]}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
        return path.with_suffix(".json")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AttentionPatterns":
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        with np.load(path.with_suffix(".npz")) as data:
            weights = torch.from_numpy(data["weights"])
        return cls(weights, [tuple(h) for h in meta["heads"]], meta["tokens"], meta["positions"], meta["side"])


def _heads(lm: LoadedModel, heads: Sequence | None) -> list[tuple[int, int]]:
    """(layer, head) tuples from tuples or HeadSite-like objects; every head by default; checked against the model."""
    a = lm.adapter
    if heads is None:
        return [(L, h) for L in range(a.n_layers) for h in range(a.n_heads)]
    out = []
    for item in heads:
        L, h = (item.layer, item.head) if hasattr(item, "layer") else tuple(item)
        if h is None or not (0 <= L < a.n_layers and 0 <= h < a.n_heads):
            raise SiteError(f"a head is (layer, head) with layer in 0..{a.n_layers - 1} and head in "
                            f"0..{a.n_heads - 1}; got {item!r}")
        out.append((int(L), int(h)))
    return out


def patterns(
    lm: LoadedModel, batch: PairBatch, heads: Sequence | None = None, side: str = "recipient",
) -> AttentionPatterns:
    """The attention patterns of ``heads`` ((layer, head) tuples or ``HeadSite``s; all heads by default) on
    ``batch``'s recipient prompts (``side="donor"``: the donors'), from one forward pass. float32 on the CPU.

    Example::

        pats = actpatch.patterns(lm, batch, [(9, 9)]); pats.pattern(9, 9, 0).sum(-1)  # ones: each row sums to 1
    """
    if side not in ("recipient", "donor"):
        raise ConfigError(f"side must be 'recipient' or 'donor', got {side!r}")
    a, chosen = lm.adapter, _heads(lm, heads)
    ids = batch.recipient_ids if side == "recipient" else batch.donor_ids  # (B, T)
    mask = batch.attention_mask if side == "recipient" else batch.donor_attention_mask
    layers = sorted({L for L, _ in chosen})
    got: dict[int, Tensor] = {}

    def keep(L: int):
        def fn(out) -> None:
            if not isinstance(out, tuple) or len(out) < 2 or out[1] is None:
                raise UnsupportedArchitectureError(
                    f"layer {L}'s attention returned no weights (attention {lm.model.config._attn_implementation!r}); "
                    "expected eager attention, which returns (output, weights). Load the model with "
                    "attn_implementation='eager' (actpatch.load_model does).")
            got[L] = out[1].detach().float().cpu()  # (B, H, T, T)
        return fn

    with torch.inference_mode(), hooks([(a.attention(L), "result", keep(L)) for L in layers]):
        lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
    weights = torch.stack([got[L][:, h] for L, h in chosen])  # (N, B, T, T)
    lengths = mask.sum(1).tolist()
    tokens = [[lm.tokenizer.decode([t]) for t in row[:n].tolist()] for row, n in zip(ids, lengths)]
    positions = {name: idx.tolist() for name, idx in batch.side_positions(side).items()}
    return AttentionPatterns(weights, chosen, tokens, positions, side)


def pattern_shift(
    lm: LoadedModel, batch: PairBatch, donor, senders: Sequence, head: tuple[int, int], query: str = "END",
    keys: Sequence[str] = ("IO", "S2"), receivers: Sequence[str] = ("q",),
) -> dict[str, dict[str, float]]:
    """How path patching ``senders`` into ``head``'s ``receivers`` (its query by default) moves its attention from
    ``query`` to each named position in ``keys``: the mean over pairs, unpatched, patched and their difference.

    Example::

        pattern_shift(lm, batch, donor, [HeadSite(8, 6, "END")], (9, 9))["IO"]["change"]   # e.g. -0.21
    """
    from ..engine.paths import Receiver, path_patch_attention

    L, h = _heads(lm, [head])[0]
    _, att = path_patch_attention(lm, batch, donor, senders, [Receiver(r, L, h) for r in receivers], [(L, h)])
    return attention_shift(lm, batch, att, query, keys)[0]["keys"]


def attention_shift(
    lm: LoadedModel, batch: PairBatch, patched: dict[tuple[int, int], Tensor], query: str = "END",
    keys: Sequence[str] = ("IO", "S2"),
) -> list[dict]:
    """For each head of ``patched`` ({(layer, head): (B, T, T) weights of a patched run, as
    ``path_patch_attention`` returns them}), its mean attention from ``query`` to each of ``keys`` in the
    unpatched recipients and in the patched run: [{"head": [L, h], "keys": {key: {"unpatched", "patched",
    "change"}}}]. The unpatched weights come from one plain forward (``patterns``)."""
    heads = list(patched)
    clean = patterns(lm, batch, heads)
    after = AttentionPatterns(torch.stack([patched[x].float().cpu() for x in heads]), heads, clean.tokens,
                              clean.positions)  # (N, B, T, T)
    out = []
    for i, (L, h) in enumerate(heads):
        entry = {}
        for key in keys:
            b, p = float(clean.between(query, key)[i].mean()), float(after.between(query, key)[i].mean())
            entry[key] = {"unpatched": b, "patched": p, "change": p - b}
        out.append({"head": [L, h], "keys": entry})
    return out


def node_patterns(lm: LoadedModel, batch: PairBatch, nodes: Sequence[str], limit: int = 32) -> dict | None:
    """Patterns for a circuit drawing's nodes, in ``to_compact``'s format with a ``node`` per row: ``a5.h3`` is
    that head's pattern, ``a5`` (a layer's attention, where heads are not separable) the mean over layer 5's
    heads; other nodes (MLPs, KV heads, input, logits) have none. At most ``limit`` nodes, in the order given;
    None when no node has a pattern."""
    picked: list[tuple[str, list[tuple[int, int]]]] = []
    a = lm.adapter
    for name in nodes:
        head, layer = re.fullmatch(r"a(\d+)\.h(\d+)", name), re.fullmatch(r"a(\d+)", name)
        if head:
            picked.append((name, [(int(head[1]), int(head[2]))]))
        elif layer:
            picked.append((name, [(int(layer[1]), h) for h in range(a.n_heads)]))
        if len(picked) == limit:
            break
    if not picked:
        return None
    heads = sorted({x for _, hs in picked for x in hs})
    pats = patterns(lm, batch, heads)
    rows = []
    for name, hs in picked:
        w = pats.weights[[heads.index(x) for x in hs]].mean(0)  # (B, T, T): one head, or the layer's mean
        for b, toks in enumerate(pats.tokens):
            q, k = np.tril_indices(len(toks))
            rows.append({"node": name, "pair": b, "w": np.round(w[b].numpy()[q, k].astype(float), 3).tolist()})
    return {"tokens": pats.tokens, "positions": pats.positions, "side": pats.side, "rows": rows}
