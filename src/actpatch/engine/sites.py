"""Patch sites: small frozen dataclasses naming *where* an activation is read or overwritten.

    HiddenSite(layer=10)                  # block output (residual stream after layer 10), all positions
    HeadSite(layer=9, head=6, pos="END")  # head 9.6's output (o_proj input) at the final token
    HeadSite(layer=9)                     # all heads of layer 9
    MlpOutSite(layer=3, pos=-1)           # MLP output at the last real token
    EmbedSite("subject")                  # the residual stream before layer 0, at a named position
    QKVSite(5, "k", 1, "END")             # layer 5's key head 1 (a KV group under GQA) at END

A position is ``None`` (all positions), an int (an index into the real tokens; negative counts from
the last real token, so -1 is END) or a named IOI position ("IO", "S1", "S1+1", "S2", "END";
"last" is an alias of "END"). Sites only describe; ``Adapter`` says which module each one hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

import torch
from jaxtyping import Int
from torch import Tensor, nn

from ..errors import SiteError
from ..model.adapters import Adapter

Position = Union[None, int, str]
POSITION_ALIASES = {"last": "END"}


def _check_layer(layer: int, adapter: Adapter) -> None:
    if not isinstance(layer, int) or not 0 <= layer < adapter.n_layers:
        raise SiteError(f"layer must be an int in [0, {adapter.n_layers - 1}] for this model, got {layer!r}")


@dataclass(frozen=True)
class _Site:
    layer: int
    pos: Position = None

    kind = "abstract"
    reads_input = False  # True: the site is the module's *input* (forward pre-hook)

    def module(self, adapter: Adapter) -> nn.Module:
        raise NotImplementedError

    def columns(self, adapter: Adapter) -> tuple[int, ...] | None:
        """The features of the module's flat (B, T, F) activation this site covers; None = all of them."""
        return None

    def validate(self, adapter: Adapter) -> None:
        _check_layer(self.layer, adapter)
        if not (self.pos is None or isinstance(self.pos, (int, str))) or isinstance(self.pos, bool):
            raise SiteError(f"pos must be None, an int or a position name, got {self.pos!r}")

    @property
    def key(self) -> tuple[str, int]:
        """What a cache stores for this site: one full activation per (kind, layer)."""
        return (self.kind, self.layer)


@dataclass(frozen=True)
class HiddenSite(_Site):
    """Output of block ``layer``: the whole residual stream after that layer.

    Example::

        HiddenSite(3)              # block 3 output, all positions
        HiddenSite(3, "S2")        # at the second S token only
    """

    kind = "hidden"

    def module(self, adapter: Adapter) -> nn.Module:
        return adapter.block(self.layer)


@dataclass(frozen=True)
class AttnOutSite(_Site):
    """Output of the attention output projection (all heads mixed by W_O, plus b_O).

    Example::

        capture(lm, batch.recipient_ids, batch, [AttnOutSite(3)])  # o_proj output of layer 3
    """

    kind = "attn"

    def module(self, adapter: Adapter) -> nn.Module:
        return adapter.attn_out(self.layer)


@dataclass(frozen=True)
class MlpOutSite(_Site):
    """Output of the MLP of block ``layer``.

    Example::

        capture(lm, batch.recipient_ids, batch, [MlpOutSite(0)])  # MLP output of layer 0
    """

    kind = "mlp"

    def module(self, adapter: Adapter) -> nn.Module:
        return adapter.mlp(self.layer)

    def validate(self, adapter: Adapter) -> None:
        super().validate(adapter)
        if adapter.arch.flat_mlp:
            raise SiteError(f"the mlp site is not supported on {adapter.arch.name}: its MLP runs on the positions "
                            "flattened to (batch*positions, d_model) rows; patch the hidden state or the heads instead")


@dataclass(frozen=True)
class HeadSite(_Site):
    """Per-head outputs: the attention output projection's input viewed as (B, T, H, Dh).

    ``head`` is one head index, a tuple of them, or None for every head of the layer.

    Example::

        HeadSite(9, 6, "END")      # head 9.6 at END
        HeadSite(7, (3, 9))        # two heads of layer 7, all positions
        HeadSite(4)                # every head of layer 4

    """

    head: int | tuple[int, ...] | None = None

    kind = "head"
    reads_input = True

    def __init__(self, layer: int, head: int | tuple[int, ...] | None = None, pos: Position = None) -> None:
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "pos", pos)
        if isinstance(head, (list, range)):
            head = tuple(head)
        object.__setattr__(self, "head", head)

    def module(self, adapter: Adapter) -> nn.Module:
        return adapter.attn_out(self.layer)

    def heads(self, adapter: Adapter) -> tuple[int, ...]:
        if self.head is None:
            return tuple(range(adapter.n_heads))
        return (self.head,) if isinstance(self.head, int) else tuple(self.head)

    def columns(self, adapter: Adapter) -> tuple[int, ...]:
        Dh = adapter.d_head
        return tuple(c for h in self.heads(adapter) for c in range(h * Dh, (h + 1) * Dh))  # in (B, T, H*Dh)

    def validate(self, adapter: Adapter) -> None:
        super().validate(adapter)
        heads = self.heads(adapter)
        bad = [h for h in heads if not isinstance(h, int) or isinstance(h, bool) or not 0 <= h < adapter.n_heads]
        if bad or not heads:
            raise SiteError(
                f"head must be an int in [0, {adapter.n_heads - 1}] (or a tuple of them) for layer {self.layer}, got {self.head!r}"
            )


@dataclass(frozen=True)
class EmbedSite(_Site):
    """The residual stream before layer 0: the embeddings as block 0 receives them (token + position embeddings,
    scaled where the model scales them). Patched through a forward pre-hook on block 0.

    Example::

        EmbedSite("subject")       # the donor's embedding at its subject token, written at the recipient's
    """

    kind = "embed"
    reads_input = True

    def __init__(self, pos: Position = None) -> None:
        object.__setattr__(self, "layer", 0)
        object.__setattr__(self, "pos", pos)

    def module(self, adapter: Adapter) -> nn.Module:
        return adapter.block(0)


@dataclass(frozen=True)
class QKVSite(_Site):
    """One head's query, key or value (``which``), as the q/k/v projection outputs it (before rotary embeddings).

    For ``"q"`` the head is a query head; for ``"k"`` and ``"v"`` it is a key/value head, which under
    grouped-query attention is shared by a group of query heads (``kv_group``).

    Example::

        QKVSite(5, "v", 1, "END")   # layer 5's value head 1 at END
    """

    which: str = "q"
    head: int = 0

    reads_input = False

    def __init__(self, layer: int, which: str, head: int, pos: Position = None) -> None:
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "pos", pos)
        object.__setattr__(self, "which", which)
        object.__setattr__(self, "head", head)

    @property
    def kind(self) -> str:  # one cache entry per (q|k|v, layer)
        return self.which

    def module(self, adapter: Adapter) -> nn.Module:
        return adapter.qkv_module(self.layer, self.which)

    def columns(self, adapter: Adapter) -> tuple[int, ...]:
        start = adapter.qkv_start(self.which, self.head)
        return tuple(range(start, start + adapter.d_head))

    def kv_group(self, adapter: Adapter) -> tuple[int, ...]:
        """The query heads that read this head: itself for q; its group for k and v."""
        if self.which == "q":
            return (self.head,)
        size = adapter.n_heads // adapter.n_kv_heads
        return tuple(range(self.head * size, (self.head + 1) * size))

    def validate(self, adapter: Adapter) -> None:
        super().validate(adapter)
        if self.which not in ("q", "k", "v"):
            raise SiteError(f"which must be 'q', 'k' or 'v', got {self.which!r}")
        n = adapter.n_heads if self.which == "q" else adapter.n_kv_heads
        if isinstance(self.head, bool) or not isinstance(self.head, int) or not 0 <= self.head < n:
            raise SiteError(f"a {self.which} head must be an int in [0, {n - 1}] for layer {self.layer} "
                            f"({'query heads' if self.which == 'q' else 'key/value heads'}), got {self.head!r}")


Site = Union[HiddenSite, AttnOutSite, MlpOutSite, HeadSite, EmbedSite, QKVSite]


def resolve_pos(
    pos: Position,
    positions: Mapping[str, Int[Tensor, "batch"]],
    lengths: Int[Tensor, "batch"],
) -> Int[Tensor, "batch"] | None:
    """Per-row token index of ``pos`` (None = all positions); ``lengths`` are the real token counts."""
    if pos is None:
        return None
    if isinstance(pos, str):
        name = POSITION_ALIASES.get(pos, pos)
        if name not in positions:
            raise SiteError(
                f"position {pos!r} is not known for this batch; available: {', '.join(sorted(positions))}, "
                "an int index, or None for all positions"
            )
        return positions[name]
    idx = torch.as_tensor(pos, device=lengths.device).expand_as(lengths)
    idx = torch.where(idx < 0, lengths + idx, idx)
    if bool(((idx < 0) | (idx >= lengths)).any()):
        raise SiteError(
            f"position {pos} is outside the prompt for some pair (real lengths {int(lengths.min())}-{int(lengths.max())}); "
            "use an index valid for every pair, a negative index from the end, or a named position"
        )
    return idx
