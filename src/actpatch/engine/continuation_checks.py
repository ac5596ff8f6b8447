"""Runtime checks of multi-token readouts (``engine.continuation``), run with every sweep whose answers have
several tokens, next to ``sanity``'s checks of the END readout.

- ``continuation_self_patch_identity``: the recipient patched with its own activations (every head of the checked
  layers at once; each checked layer's hidden state), read through the continuation fast path, gives the
  unpatched recipient's continuation log-probs and END logits, as computed by plain right-padded forwards.

    check = check_continuation_self_patch(lm, batch, rec_cache, plain_readout(lm, batch), layers=[0, 5, 11])
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..model.models import LoadedModel
from .batch import PairBatch
from .capture import ActivationCache
from .continuation import Readout
from .patching import run_chunk
from .sanity import SanityCheck, _check_layers, _diff, _ulps, self_pairs
from .sites import HeadSite, HiddenSite


def check_continuation_self_patch(
    lm: LoadedModel, batch: PairBatch, rec_cache: ActivationCache, rec: Readout, layers: Sequence[int],
) -> SanityCheck:
    """Self-patches through the continuation path leave every continuation's log-prob (and END) unchanged.

    Example::

        check_continuation_self_patch(lm, batch, rec_cache, plain_readout(lm, batch), [0, 1]).passed
    """
    variants = [[HeadSite(L) for L in layers]] + [[HiddenSite(L)] for L in _check_layers(layers)]
    own = self_pairs(batch)  # the recipient is its own donor
    d_tail = d_end = 0.0
    with torch.inference_mode():
        for v in variants:
            got = run_chunk(lm, own, rec_cache, [v])
            d_tail = max(d_tail, _diff(got.tail[0], rec.tail))
            d_end = max(d_end, _diff(got.end[0], rec.end))
    scale = max(float(rec.end.abs().max()), float(rec.tail.abs().max()))
    # plain rows are another batch shape than the padded layout: float summation order, as fast_path_matches_reference
    tol = 1e-4 if lm.dtype in (torch.float32, torch.float64) else max(5e-2, _ulps(lm, scale, 2))
    d = max(d_tail, d_end)
    return SanityCheck(
        "continuation_self_patch_identity", d <= tol,
        f"{len(variants)} self-patches read through the continuation path: max abs d(tail log-prob) = {d_tail:.3g}, "
        f"max abs dlogit at END = {d_end:.3g}, against plain forwards of prompt + continuation", d, tol)
