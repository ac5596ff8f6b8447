"""The computational graph of a model, for circuits: nodes that write to the residual stream and nodes that read it.

    graph = build_graph(lm.adapter)
    graph.senders[:3]          # ('input', 'a0.h0', 'a0.h1'): the embeddings, then every head (or layer attention), MLP
    graph.receivers[:3]        # (Receiver('a0.h0', 'q', 0), ...): each head's q, k, v input, each MLP, the logits
    graph.allowed              # (R, S) bool: sender s writes to the residual stream before receiver r reads it
    graph.edges()              # dataframe: sender, receiver, input, r, s

Senders: the input embeddings (block 0's input), every attention head (its slice of the output projection,
``z_h @ W_O[h]``), every MLP (what it adds to the residual stream). On a model with a norm between attention and
the residual add (Gemma 2/3) one head's write is not separable from the others', so the sender there is the
layer's whole attention (``a5``): every edge still exists, at layer granularity on the sending side.

Receivers: every query head's q input, every key/value head's k and v input (under grouped-query attention a KV
head serves its group of query heads: ``a5.kv1``), every MLP's input, and the logits (the final norm's input).
A receiver's input is the residual stream it reads, before its norm. Under a parallel residual (GPT-NeoX) a
layer's MLP does not read its own layer's attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import pandas as pd
import torch
from jaxtyping import Bool
from torch import Tensor

from ..errors import UnsupportedArchitectureError
from ..model.adapters import Adapter


@dataclass(frozen=True)
class Receiver:
    """One input of one node: ``input`` is "q", "k", "v" (attention), "mlp" or "logits" (``layer`` n_layers);
    ``index`` is the query head (q) or key/value head (k, v)."""

    node: str
    input: str
    layer: int
    index: int = -1

    @property
    def label(self) -> str:
        return self.node if self.input in ("mlp", "logits") else f"{self.node}<{self.input}>"


def head_name(layer: int, head: int) -> str:
    return f"a{layer}.h{head}"


@dataclass(frozen=True)
class Graph:
    """Senders, receivers and which sender may feed which receiver, for one model.

    Example::

        g = build_graph(lm.adapter); g.n_edges, g.sender_index("a3.h1"), g.receiver_index("logits")
    """

    senders: tuple[str, ...]
    sender_layer: tuple[int, ...]          # -1 for the input
    receivers: tuple[Receiver, ...]
    allowed: Bool[Tensor, "receiver sender"]
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_senders: bool                     # False: one attention sender per layer (post-norm attention)

    @property
    def n_edges(self) -> int:
        return int(self.allowed.sum())

    @cached_property
    def _sender_ix(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.senders)}

    @cached_property
    def _receiver_ix(self) -> dict[str, int]:
        return {r.label: i for i, r in enumerate(self.receivers)}

    def sender_index(self, name: str) -> int:
        return self._sender_ix[name]

    def receiver_index(self, label: str) -> int:
        """``label``: "logits", "m5", or "a5.h3<q>" / "a5.kv1<k>" (``Receiver.label``)."""
        return self._receiver_ix[label]

    def layer_receivers(self, layer: int, inputs: tuple[str, ...]) -> list[int]:
        """Indices of ``layer``'s receivers of the given inputs (e.g. ("q",)), in head order."""
        return [i for i, r in enumerate(self.receivers) if r.layer == layer and r.input in inputs]

    def edges(self) -> pd.DataFrame:
        """Every edge: sender, receiver (node), input, and the (r, s) indices into ``allowed``."""
        r, s = self.allowed.nonzero(as_tuple=True)
        return pd.DataFrame({"sender": [self.senders[i] for i in s.tolist()],
                             "receiver": [self.receivers[i].node for i in r.tolist()],
                             "input": [self.receivers[i].input for i in r.tolist()], "r": r.numpy(), "s": s.numpy()})

    def kv_name(self, layer: int, kv: int) -> str:
        """The receiving node of key/value head ``kv``: the head itself without GQA, else its group."""
        return head_name(layer, kv) if self.n_kv_heads == self.n_heads else f"a{layer}.kv{kv}"

    def heads_reading(self, receiver: Receiver) -> list[str]:
        """The query heads whose computation reads ``receiver`` (a group of them for k and v under GQA)."""
        if receiver.input == "q":
            return [receiver.node]
        if receiver.input in ("k", "v"):
            group = self.n_heads // self.n_kv_heads
            kv = receiver.index
            return [head_name(receiver.layer, h) for h in range(kv * group, (kv + 1) * group)]
        return [receiver.node]

    def attention_sender(self, layer: int, head: int) -> str:
        """The sender that carries head ``head``'s write (the layer's attention on post-norm models)."""
        return head_name(layer, head) if self.head_senders else f"a{layer}"


def circuit_refusal(adapter: Adapter) -> str:
    """Why the graph cannot be built for ``adapter``'s model ("" when it can): each receiver must read the residual
    stream through a norm of its own, every write must be a term of that stream, and q, k, v per head must be a
    slice of a linear projection of the normed stream."""
    arch = adapter.arch
    if not arch.attn_norm:
        return "it has no norm in front of attention, so a head's q, k and v input cannot be set apart"
    if arch.qk_norm_spans_heads:
        return "q and k pass a norm over all heads together, so one head's query is not a slice of one projection"
    if adapter.shared_norm:
        return ("attention and the MLP read the block input through one shared norm, so the MLP's input cannot be "
                "patched apart from the heads' q, k and v")
    if arch.post_ln or adapter.final_norm() is None:
        return "it normalises after the residual add (post-LN), so the residual stream is not a sum of writes"
    if arch.flat_mlp:
        return "its MLP runs on (batch*positions, d_model) rows"
    if adapter.resid_scale != 1.0:
        return "each block's writes are scaled by a residual multiplier, which edge patching does not model yet"
    return ""


def build_graph(adapter: Adapter) -> Graph:
    """The graph of ``adapter``'s model (pre-norm, post-norm attention, parallel residual).

    Example::

        graph = build_graph(lm.adapter); graph.n_edges
    """
    why = circuit_refusal(adapter)
    if why:
        raise UnsupportedArchitectureError(f"circuits are not supported on {adapter.arch.name}: {why}.")
    L, H, KV = adapter.n_layers, adapter.n_heads, adapter.n_kv_heads
    per_head = adapter.attn_post_norm(0) is None
    senders, sender_layer = ["input"], [-1]
    for layer in range(L):
        names = [head_name(layer, h) for h in range(H)] if per_head else [f"a{layer}"]
        senders += names + [f"m{layer}"]
        sender_layer += [layer] * (len(names) + 1)
    is_attn = [n.startswith("a") for n in senders]
    graph = Graph((), (), (), torch.zeros(0, 0, dtype=torch.bool), L, H, KV, per_head)  # for kv_name only
    receivers = []
    for layer in range(L):
        receivers += [Receiver(head_name(layer, h), "q", layer, h) for h in range(H)]
        receivers += [Receiver(graph.kv_name(layer, g), w, layer, g) for w in ("k", "v") for g in range(KV)]
        receivers.append(Receiver(f"m{layer}", "mlp", layer))
    receivers.append(Receiver("logits", "logits", L))
    parallel = adapter.parallel_residual
    allowed = torch.zeros(len(receivers), len(senders), dtype=torch.bool)
    for i, r in enumerate(receivers):
        for j, sl in enumerate(sender_layer):
            same_layer_attn = sl == r.layer and is_attn[j] and r.input == "mlp" and not parallel
            allowed[i, j] = sl < r.layer or same_layer_attn
    return Graph(tuple(senders), tuple(sender_layer), tuple(receivers), allowed, L, H, KV, per_head)
