"""Shard a sweep's patch variants over the processes of a torch.distributed job.

    torchrun --nproc_per_node 2 -m actpatch.cli ioi --n-pairs 32 --out runs/x      # or: accelerate launch

Every process loads the model and the pairs, runs every ``rank``-th patch variant (interleaved, so
early- and late-layer variants, which cost different amounts, spread evenly), and the results are
gathered on every rank with ``all_gather_object``; rank 0 writes the output. Without a process
group (the default, a plain ``actpatch ioi``) this is exactly ``patch_variants``. The backend is
gloo on CPU and NCCL on CUDA, where each process uses the GPU of its ``LOCAL_RANK``.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor

from ..model.models import LoadedModel
from .batch import PairBatch
from .capture import ActivationCache
from .patching import Reduce, patch_variants
from .sites import Site


def world() -> tuple[int, int]:
    """(rank, world size) of the current process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> bool:
    """Join the process group torchrun / accelerate describe in the environment (WORLD_SIZE > 1)."""
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def local_device() -> str | None:
    """This process's GPU in a multi-process CUDA job (``cuda:LOCAL_RANK``), else None (the default)."""
    if world()[1] > 1 and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return None


def sharded_patch_variants(
    lm: LoadedModel, batch: PairBatch, donor: ActivationCache, variants: Sequence[Sequence[Site]], reduce: Reduce,
    **kwargs,
) -> dict[str, Float[Tensor, "variant batch"]]:
    """``patch_variants`` with the variants split over the ranks and the results gathered on every rank."""
    rank, size = world()
    if size == 1:
        return patch_variants(lm, batch, donor, variants, reduce, **kwargs)
    kwargs.pop("checkpoint", None)  # --resume is single-process only
    mine = list(range(rank, len(variants), size))
    part = patch_variants(lm, batch, donor, [variants[i] for i in mine], reduce, **kwargs) if mine else {}
    gathered: list = [None] * size
    dist.all_gather_object(gathered, (mine, {key: value.cpu() for key, value in part.items()}))
    out: dict[str, Tensor] = {}
    for indices, values in gathered:
        for key, value in values.items():
            if key not in out:
                out[key] = torch.empty((len(variants), *value.shape[1:]), dtype=value.dtype)
            out[key][indices] = value
    return out
