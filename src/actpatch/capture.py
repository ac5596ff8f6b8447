"""Run a model and keep the activations at chosen sites (the donor side of patching).

    cache, logits = capture(lm, batch.donor_ids, batch, [HeadSite(9), HiddenSite(3)])
    cache[HeadSite(9)]          # (B, T, H, Dh): the o_proj input of layer 9, split into heads
    logits                      # (B, V): logits at each row's last real token (END)

Only the final position is unembedded (``last_logits``): the final norm runs inside the base model,
then the LM head is applied to the gathered END rows. That equals ``model(...).logits`` at END
(tested) and avoids full-vocabulary logits at every position.
"""

from __future__ import annotations

from typing import Iterable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .hooks import hooks
from .ioi import PairBatch
from .models import LoadedModel
from .sites import Site


class ActivationCache(dict):
    """``(kind, layer) -> activation``; index it with a site. Head activations are (B, T, H, Dh)."""

    def __getitem__(self, key) -> Tensor:
        return super().__getitem__(key.key if hasattr(key, "key") else key)

    def __contains__(self, key) -> bool:
        return super().__contains__(key.key if hasattr(key, "key") else key)


def split_heads(x: Float[Tensor, "batch pos hd"], n_heads: int, d_head: int) -> Float[Tensor, "batch pos head d_head"]:
    """The attention output projection's input, viewed per head."""
    return x.view(*x.shape[:-1], n_heads, d_head)  # (B, T, H*Dh) -> (B, T, H, Dh)


def last_logits(
    lm: LoadedModel,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    end: Int[Tensor, "batch"],
) -> Float[Tensor, "batch vocab"]:
    """Logits at each row's END token (right padding), computed from the base model's final hidden states."""
    out = lm.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state  # (B, T, D), already final-normed
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return lm.adapter.unembed(hidden[rows, end.to(hidden.device)])  # (B, V)


def capture(
    lm: LoadedModel,
    input_ids: Int[Tensor, "batch pos"],
    batch: PairBatch,
    sites: Iterable[Site],
) -> tuple[ActivationCache, Float[Tensor, "batch vocab"]]:
    """One forward pass of ``input_ids`` (donor or recipient rows of ``batch``) that records ``sites``.

    Whole activations are kept per (kind, layer), whatever the sites' heads and positions, so one
    donor run serves every later patch of that layer.
    """
    adapter = lm.adapter
    cache = ActivationCache()
    specs = []
    seen = set()
    for site in sites:
        site.validate(adapter)
        if site.key in seen:
            continue
        seen.add(site.key)

        def store(act: Tensor, key=site.key, head=site.kind == "head") -> None:
            act = act.detach().clone()
            cache[key] = split_heads(act, adapter.n_heads, adapter.d_head) if head else act

        specs.append((site.module(adapter), "input" if site.reads_input else "output", store))
    with torch.inference_mode(), hooks(specs):
        logits = last_logits(lm, input_ids.to(lm.device), batch.attention_mask.to(lm.device), batch.position("END"))
    return cache, logits


class BlockInputs:
    """What every block of one recipient run received (hidden states + the other call arguments).

    Patching layer L cannot change anything before block L, so a patched run can start at block L
    from these recorded inputs ("prefix reuse") instead of recomputing layers 0..L-1.

        prefix = BlockInputs.record(lm, batch)
        logits = prefix.run(lm, batch, start=20, copies=8)   # (8*B, V), hooks on blocks >= 20 fire
    """

    def __init__(self, hidden: list[Tensor], calls: list[tuple[tuple, dict]], n_rows: int) -> None:
        self.hidden = hidden  # per layer: (B, T, D) input hidden states
        self.calls = calls    # per layer: the remaining positional and keyword arguments
        self.n_rows = n_rows

    @classmethod
    def record(cls, lm: LoadedModel, batch: PairBatch) -> "BlockInputs":
        a = lm.adapter
        hidden: list = [None] * a.n_layers
        calls: list = [None] * a.n_layers

        def recorder(layer: int):
            def record_call(args: tuple, kwargs: dict) -> None:
                if args:
                    hidden[layer], rest = args[0], args[1:]
                else:
                    kwargs = dict(kwargs)
                    hidden[layer], rest = kwargs.pop("hidden_states"), ()
                calls[layer] = (rest, kwargs)

            return record_call

        with torch.inference_mode(), hooks([(a.block(L), "call", recorder(L)) for L in range(a.n_layers)]):
            last_logits(lm, batch.recipient_ids.to(lm.device), batch.attention_mask.to(lm.device), batch.position("END"))
        return cls(hidden, calls, len(batch))

    def _repeat(self, x, copies: int):
        """Stack ``copies`` of every per-row tensor in a call argument (broadcastable ones stay)."""
        if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == self.n_rows and self.n_rows > 1:
            return x.repeat(copies, *([1] * (x.dim() - 1)))  # (B, ...) -> (copies*B, ...)
        if isinstance(x, (tuple, list)):
            return type(x)(self._repeat(v, copies) for v in x)
        if isinstance(x, dict):
            return {k: self._repeat(v, copies) for k, v in x.items()}
        return x

    def run(self, lm: LoadedModel, end: Int[Tensor, "batch"], start: int, copies: int) -> Float[Tensor, "rows vocab"]:
        """Blocks ``start``.. on ``copies`` stacked recipient copies, then the final norm and END logits."""
        a = lm.adapter
        h = self.hidden[start].repeat(copies, 1, 1)  # (copies*B, T, D), variant-major
        for L in range(start, a.n_layers):
            rest, kwargs = self._repeat(self.calls[L], copies)
            out = a.block(L)(h, *rest, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        h = a.final_norm()(h)
        rows = torch.arange(h.shape[0], device=h.device)
        return a.unembed(h[rows, end.to(h.device).repeat(copies)])  # (copies*B, V)
