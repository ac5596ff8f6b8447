"""Prefix reuse: start a patched run late and short, from the recipient's recorded block inputs.

A patch at layer L and position p cannot change anything computed before block L, nor (causal
attention) anything at positions before p. ``RecipientState`` records, in one recipient forward
pass, every block's input hidden states, its other call arguments, and the keys and values of
every attention layer. A patched run then executes only blocks L.. on positions p.., with the
recipient's cached keys and values standing in for positions < p:

    state = RecipientState.record(lm, batch)
    logits = state.run(lm, batch.position("END"), start=20, pos=9, copies=8)   # (8*B, V)

Call arguments are handled generically: every tensor with a per-row batch axis is repeated for
the stacked copies, the query-position axis of positional tensors (masks, rotary tables, position
ids) is cut at ``pos``, arguments the adapter names as laid out (rows * heads, ...) (Bloom's ALiBi) are
repeated whole, and the model's KV-cache argument is replaced by one pre-filled with the
recipient's keys and values. The experiment's ``fast_path_matches_reference`` sanity check and
the tests compare this path with plain full forward passes on every supported architecture.
"""

from __future__ import annotations

import inspect

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache

from ..errors import ConfigError
from ..model.models import LoadedModel
from .batch import PairBatch
from .hooks import hooks


class RecipientState:
    """Block inputs and per-layer keys/values of one recipient run (see the module docstring).

    Example::

        state = RecipientState.record(lm, batch)
        logits = state.run(lm, batch.position("END"), start=20, pos=9, copies=4)  # (4*B, V)
    """

    def __init__(self, hidden: list[Tensor], calls: list[tuple[tuple, dict]], kv: list[tuple[Tensor, Tensor]], n_rows: int, length: int) -> None:
        self.hidden = hidden  # per layer: (B, T, D) block input
        self.calls = calls    # per layer: (other positional args, keyword args)
        self.kv = kv          # per layer: keys and values, (B, H_kv, T, Dh)
        self.n_rows = n_rows
        self.length = length

    @classmethod
    def record(cls, lm: LoadedModel, batch: PairBatch) -> "RecipientState":
        """One recipient forward pass of ``batch``, recorded."""
        return cls.record_rows(lm, batch.recipient_ids, batch.attention_mask)

    @classmethod
    def record_rows(
        cls, lm: LoadedModel, ids: Int[Tensor, "rows pos"], mask: Int[Tensor, "rows pos"],
        position_ids: Int[Tensor, "rows pos"] | None = None, past: DynamicCache | None = None,
    ) -> "RecipientState":
        """One forward pass of ``ids`` recorded; ``position_ids`` where a row has padding inside (continuations);
        ``past``: keys and values of earlier positions (then ``mask`` covers them too, and the recorded calls
        have ``ids``' positions as queries). The final hidden states are kept as ``self.final`` (rows, T, D)."""
        a = lm.adapter
        dev = lm.device
        attn = getattr(lm.model.config, "_attn_implementation", "eager")
        if attn != "eager":  # SDPA without a mask would align the replay's causal mask top-left: wrong numbers
            raise ConfigError(
                f"prefix reuse needs eager attention, but the model now uses {attn!r}; expected the eager attention "
                "wrap_model/load_model set. Call lm.model.set_attn_implementation('eager') or wrap the model again."
            )
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

        cache = past if past is not None else DynamicCache()  # full (non-sliding) layers: every key stays
        takes = "position_ids" in inspect.signature(lm.model.base_model.forward).parameters  # Bloom: from the mask
        extra = {"position_ids": position_ids.to(dev)} if position_ids is not None and takes else {}
        with torch.inference_mode(), hooks([(a.block(L), "call", recorder(L)) for L in range(a.n_layers)]):
            out = lm.model.base_model(input_ids=ids.to(dev), attention_mask=mask.to(dev), cache=cache, use_cache=True,
                                      **extra)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        state = cls(hidden, calls, kv, ids.shape[0], ids.shape[1])
        state.final = out.last_hidden_state  # (rows, T, D), final-normed
        return state

    def _prepare(self, x, copies: int, pos: int, cache: Cache):
        """One call argument, for ``copies`` stacked copies of the rows and query positions >= ``pos``."""
        if isinstance(x, Cache):
            return cache
        if isinstance(x, (tuple, list)):
            return type(x)(self._prepare(v, copies, pos, cache) for v in x)
        if isinstance(x, dict):
            return {k: self._prepare(v, copies, pos, cache) for k, v in x.items()}
        if not isinstance(x, Tensor) or x.dim() == 0:
            return x
        if pos:
            if x.dim() == 1 and x.shape[0] == self.length:
                x = x[pos:]  # cache_position-like: (T,)
            else:
                axis = next((i for i in range(1, x.dim()) if x.shape[i] == self.length), None)
                if axis is not None:
                    x = x.narrow(axis, pos, self.length - pos)  # query positions only; key axes stay whole
        if x.dim() > 1 and x.shape[0] == self.n_rows and self.n_rows > 1:
            x = x.repeat(copies, *([1] * (x.dim() - 1)))  # (B, ...) -> (copies*B, ...), variant-major
        return x

    def _fill(self, cache: DynamicCache, layer: int, pos: int, copies: int) -> None:
        """Put the recipient's keys/values of positions < ``pos`` into ``cache`` for ``layer`` only."""
        if pos:
            k, v = self.kv[layer]
            cache.update(k[:, :, :pos].repeat(copies, 1, 1, 1), v[:, :, :pos].repeat(copies, 1, 1, 1), layer)

    def run(
        self, lm: LoadedModel, end: Int[Tensor, "batch"], start: int, pos: int, copies: int,
        columns: Int[Tensor, "batch n"] | None = None, exact: Int[Tensor, "batch m"] | None = None,
    ) -> Float[Tensor, "rows vocab"]:
        """Blocks ``start``.. on positions ``pos``.. of ``copies`` stacked recipient copies; END logits."""
        a = lm.adapter
        if pos and int(end.min()) < pos:
            raise ValueError(f"pos {pos} is after some row's END token; nothing there to compute")
        cache = DynamicCache(ddp_cache_data=[(None, None)] * a.n_layers)  # empty full-attention layers
        h = self.hidden[start][:, pos:].repeat(copies, 1, 1)  # (copies*B, T-pos, D)
        for L in range(start, a.n_layers):
            self._fill(cache, L, pos, copies)  # one layer's keys/values at a time: memory stays flat
            rest, kwargs = self._prepare(self.calls[L], copies, pos, cache)
            for name in a.arch.head_batched_args:  # (B*H, ..., T_keys) (Bloom's ALiBi): repeated, never cut
                if isinstance(self.calls[L][1].get(name), Tensor):
                    x = self.calls[L][1][name]
                    kwargs[name] = x.repeat(copies, *([1] * (x.dim() - 1)))  # (copies*B*H, ...), variant-major
            out = a.block(L)(h, *rest, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
            cache.layers[L] = type(cache.layers[L])()  # drop this layer's keys/values
        h = a.finalize(h)
        rows = torch.arange(h.shape[0], device=h.device)
        cols = None if columns is None else columns.repeat(copies, 1)  # (copies*B, n)
        ex = None if exact is None else exact.repeat(copies, 1)  # (copies*B, m)
        return a.unembed(h[rows, (end.to(h.device) - pos).repeat(copies)], cols, ex)  # (copies*B, V or n)
