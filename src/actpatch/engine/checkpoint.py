"""Save a sweep's finished patch variants as it goes, so an interrupted sweep can be resumed.

    ckpt = Checkpoint(out / ".partial" / "swap.pt", sweep_fingerprint(lm, batch, variants), resume=True)
    todo = [i for i in range(len(variants)) if i not in ckpt.done]
    ...                                     # run some of them
    ckpt.add(indices, {"logit_diff": (k, B) tensor, ...}); ckpt.save()

The file holds only tensors, ints and strings, is written to a temporary file and renamed (an
interruption never leaves half a checkpoint), and is read back with ``torch.load(weights_only=True)``.
A fingerprint of the model, the tokenized pairs and the variant list guards ``--resume``: a
checkpoint made by another run raises ``ResumeError`` instead of mixing numbers.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ..errors import ResumeError
from ..model.models import LoadedModel
from ..model.placement import parameter_sums
from .batch import PairBatch
from .sites import Site


def sweep_fingerprint(
    lm: LoadedModel, batch: PairBatch, variants: Sequence[Sequence[Site]], extra: str = "",
    weight_sums: Sequence[float] | None = None,
) -> str:
    """sha256 of what determines a sweep's numbers: weights, dtype, pairs, variants and ``extra``.

    ``weight_sums``: ``placement.parameter_sums(lm.model)`` when the caller already has it (a run
    fingerprints one sweep per design; the checksum reads every weight).

    Example::

        fp = sweep_fingerprint(lm, batch, [[HeadSite(3)], [HiddenSite(4)]])  # sha256 hex string
    """
    h = hashlib.sha256()
    h.update(repr([lm.info.get(k) for k in ("model_id", "revision", "dtype", "gguf_sha256")]).encode())
    # a cheap weight checksum: catches same-named models with other weights
    h.update(repr(list(parameter_sums(lm.model) if weight_sums is None else weight_sums)).encode())
    tensors = [batch.recipient_ids, batch.donor_ids, batch.attention_mask, batch.donor_attention_mask, *batch.answers()]
    for side in ("recipient", "donor"):  # named positions, each side (pairs of different lengths)
        named = batch.side_positions(side)
        tensors += [named[k] for k in sorted(named)]
    for t in tensors:
        h.update(t.cpu().numpy().tobytes())
    h.update(repr(sorted(batch.positions)).encode())
    h.update(repr([list(v) for v in variants]).encode())
    h.update(extra.encode())
    return h.hexdigest()


class Checkpoint:
    """The finished variants of one sweep: ``done[i] = {key: (B,) tensor}``, mirrored to ``path``.

    Example::

        ckpt = Checkpoint("runs/x/.partial/swap.pt", sweep_fingerprint(lm, batch, variants), resume=True)
        patch_variants(lm, batch, donor, variants, reduce, checkpoint=ckpt)
    """

    def __init__(self, path: str | os.PathLike, fingerprint: str, *, resume: bool = False, every_s: float = 5.0):
        self.path, self.fingerprint, self.every_s = Path(path), fingerprint, every_s
        self.done: dict[int, dict[str, Tensor]] = {}
        self._saved_at = time.monotonic()
        if resume and self.path.is_file():
            try:
                data = torch.load(self.path, weights_only=True)
            except Exception as exc:  # a foreign or damaged file: say so instead of a pickle traceback
                raise ResumeError(f"checkpoint {self.path} cannot be read ({type(exc).__name__}); delete it and "
                                  "rerun without --resume") from exc
            if not isinstance(data, dict) or data.get("fingerprint") != fingerprint:
                raise ResumeError(
                    f"checkpoint {self.path} was saved by a different run (other model, pairs, options or "
                    "actpatch version); expected the same command as the interrupted run. Rerun it without "
                    "--resume (and with --overwrite) to start afresh."
                )
            for n, i in enumerate(data["index"].tolist()):
                self.done[i] = {key: values[n] for key, values in data["values"].items()}

    def add(self, indices: Sequence[int], values: Mapping[str, Tensor]) -> None:
        """Record variants ``indices`` with their (len(indices), B) values per key; save if it is time."""
        for n, i in enumerate(indices):
            self.done[i] = {key: v[n].detach().cpu() for key, v in values.items()}
        if time.monotonic() - self._saved_at >= self.every_s:
            self.save()

    def save(self) -> None:
        """Write every finished variant atomically (temporary file + rename)."""
        if not self.done:
            return
        index = sorted(self.done)
        keys = self.done[index[0]].keys()
        data = {"fingerprint": self.fingerprint, "index": torch.tensor(index, dtype=torch.long),
                "values": {key: torch.stack([self.done[i][key] for i in index]) for key in keys}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(data, fh)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._saved_at = time.monotonic()
