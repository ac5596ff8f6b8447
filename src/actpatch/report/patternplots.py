"""Figures from ``AttentionPatterns`` (plots only read results; matplotlib with the Agg backend).

    fig = plot_pattern(pats, layer=9, head=9, pair=0)   # query x key heatmap, tokens as labels
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..analysis.patterns import PATTERN_PLOTTERS, AttentionPatterns  # noqa: E402


def plot_pattern(pats: AttentionPatterns, layer: int, head: int, pair: int = 0, ax=None):
    """One head's attention on one pair: rows are queries, columns keys, both labelled with the tokens; the
    named positions are marked on both axes. Future keys (masked) are left blank."""
    w = pats.pattern(layer, head, pair).numpy()  # (n, n)
    toks = [repr(t)[1:-1] for t in pats.tokens[pair]]
    n = len(toks)
    named = {i: name for name, idx in pats.positions.items() for i in [idx[pair]]}
    labels = [f"{t} [{named[i]}]" if i in named else t for i, t in enumerate(toks)]
    fig = None
    if ax is None:
        size = max(4.0, 0.32 * n + 2)
        fig, ax = plt.subplots(figsize=(size + 1, size))
    shown = np.where(np.tril(np.ones((n, n), dtype=bool)), w, np.nan)
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    ax.set_title(f"L{layer}H{head}, {pats.side} of pair {pair}")
    (fig or ax.figure).colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention")
    return fig or ax.figure


PATTERN_PLOTTERS.update(pattern=lambda pats, layer, head, pair, **kw: plot_pattern(pats, layer, head, pair, **kw))
